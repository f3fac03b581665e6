"""End-to-end pipelines: `train_and_evaluate(config, workdir)` per task (classification,
diffusion), resumable from their work directories. The scripts in `experiments/` only parse
flags and call these."""
