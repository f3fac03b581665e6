"""Trains a classifier (the "original" model of an unlearning study).

    python experiments/train.py --config experiments/configs/digits.py --workdir runs/digits

Writes config.json, split.npz, checkpoints/, metrics.jsonl and results.json in --workdir;
re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

import _common
from salun_jax import report
from salun_jax.models import create_model
from salun_jax.train import TrainingDivergedError, accuracy, make_predict_fn, train_classifier

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    _common.write_config(workdir, config)
    dataset = _common.load_data(config)
    split = _common.get_split(workdir, dataset, config.split)
    train_config = _common.train_config(config.train)
    model = create_model(train_config.model, dataset.num_classes, dataset.mean, dataset.std,
                         train_config.width)
    predict_fn = make_predict_fn(model.apply)
    images, labels = dataset.train_images, dataset.train_labels

    def eval_fn(state):
        if split.val.size == 0:
            return {}
        return {"val_accuracy": accuracy(predict_fn, state.variables, images[split.val],
                                         labels[split.val])}

    try:
        state, history = train_classifier(images, labels, split.train, model, train_config,
                                          workdir=workdir, eval_fn=eval_fn)
    except TrainingDivergedError as error:
        _common.fail(str(error))
    test = split.test
    results = {
        "dataset": dataset.name, "split_hash": split.hash, "epochs": len(history),
        "train_accuracy": accuracy(predict_fn, state.variables, images[split.train],
                                   labels[split.train]),
        "test_accuracy": accuracy(predict_fn, state.variables, dataset.test_images[test],
                                  dataset.test_labels[test]),
        "history": history,
    }
    report.write_results(os.path.join(workdir, "results.json"), results)
    logging.info("train accuracy %.2f%%, test accuracy %.2f%%", results["train_accuracy"],
                 results["test_accuracy"])
    print(f"test accuracy {results['test_accuracy']:.2f}% (results in {workdir}/results.json)")


if __name__ == "__main__":
    _common.run(main, _CONFIG)
