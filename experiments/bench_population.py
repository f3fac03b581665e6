"""Population benchmark: N models in one program vs one model, per member-mapping strategy.

    python experiments/bench_population.py --json_out=/tmp/bench_population.json

Digits (bundled), SmallCNN x0.5, batch 64, one epoch over the train split (~1,300 images), the
digits train recipe. Times the epoch (run seconds, excluding the ahead-of-time compile, which is
reported apart) of `population_train_classifier` with 1 member and with `--members` members for
each strategy in `--strategies`, and prints each N-member time over the 1-member time (the
target on CPU: <= N, i.e. no worse than training the N models one after another).
`--rounds` > 1 repeats the timings interleaved and reports medians.

Measured on the 2-core CPU machine (jax 0.10.2), `--rounds=2`, populations in `loop.run`
(clean clone of 2aff122, nothing else running): one model 0.55 s; 8 models: map 6.80x, unroll
0.84x (compile 5.8 s), vmap 1.28x (compile 1.7 s). Earlier, at load average 2.3-5:

    1 model: 0.49 s per 1 epoch(s)
    8 models, map   :    3.68 s ( 7.58x one model), compile 2.2 s
    8 models, unroll:    0.44 s ( 0.91x one model), compile 7.6 s
    8 models, vmap  :    0.77 s ( 1.58x one model), compile 2.4 s

`--members=32 --strategies=vmap`: 3.54 s (7.28x one model of 0.49 s), compile 2.3 s.
An earlier single round at load 6-9 gave 5.6x / 0.71x / 0.92x (one model 1.40 s). With
`--members=32 --train_images=640 --strategies=map,vmap`, lax.map had not finished its 32-member
epoch after 90 s (one model: 0.45 s; stopped). This small model's step is dominated by fixed
per-op costs, which vmap and unrolling amortise; lax.map (a while loop in the program) does not
(XLA:CPU is also slow on convolution gradients inside loops, see the README). Unrolling runs
fastest but compiles N copies of the step, so `strategy="auto"` is vmap.
"""

from __future__ import annotations

import json
import statistics

import jax
import numpy as np
from absl import app, flags

from salun_jax import cpu, population
from salun_jax.data import load_dataset
from salun_jax.models import create_model
from salun_jax.train import TrainConfig

_MEMBERS = flags.DEFINE_integer("members", 8, "Population size.")
_STRATEGIES = flags.DEFINE_list("strategies", ["map", "unroll", "vmap"], "Strategies to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved timing rounds (medians reported).")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Epochs per timing.")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 0, "Cut the train set (0: all).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


def _time(data, indices, model, config, members: int, strategy: str) -> dict:
    out = population.population_train_classifier(
        data.train_images,
        data.train_labels,
        indices,
        model,
        config,
        seeds=list(range(members)),
        strategy=strategy,
    )
    jax.block_until_ready(out.state.params)
    return {"run_s": out.run_seconds, "compile_s": out.compile_seconds}


def main(argv):
    del argv
    cpu.enable()  # the scripts' CPU options, before JAX starts its backend
    data = load_dataset("digits")
    model = create_model("small_cnn", data.num_classes, data.mean, data.std, 0.5)
    config = TrainConfig(
        model="small_cnn",
        width=0.5,
        epochs=_EPOCHS.value,
        batch_size=64,
        learning_rate=0.05,
        milestones=(),
        crop_padding=1,
        flip=False,
    )
    indices = np.arange(_TRAIN_IMAGES.value or len(data.train_labels))
    cases = [(1, "map")] + [(_MEMBERS.value, s) for s in _STRATEGIES.value]
    timings = {case: [] for case in cases}
    for _ in range(_ROUNDS.value):
        for case in cases:
            timings[case].append(_time(data, indices, model, config, *case))
            print(f"{case[0]} models, {case[1]}: {timings[case][-1]}", flush=True)
    one = statistics.median(t["run_s"] for t in timings[(1, "map")])
    results = {
        "backend": jax.default_backend(),
        "members": _MEMBERS.value,
        "epochs": _EPOCHS.value,
        "rounds": _ROUNDS.value,
        "one_model_run_s": one,
        "one_model_compile_s": statistics.median(t["compile_s"] for t in timings[(1, "map")]),
        "strategies": {},
    }
    print(f"1 model: {one:.2f} s per {_EPOCHS.value} epoch(s)")
    for members, strategy in cases[1:]:
        run_s = statistics.median(t["run_s"] for t in timings[(members, strategy)])
        compile_s = statistics.median(t["compile_s"] for t in timings[(members, strategy)])
        results["strategies"][strategy] = {
            "run_s": run_s,
            "compile_s": compile_s,
            "ratio_to_one": run_s / one,
        }
        print(
            f"{members} models, {strategy:6s}: {run_s:7.2f} s ({run_s / one:5.2f}x one model), "
            f"compile {compile_s:.1f} s"
        )
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
