"""Checks a machine's JAX install in one command: devices, train-step speed, a short SalUn chain.

    python3 experiments/gpu_check.py                    # GPU, TPU or CPU: JAX's default backend
    python3 experiments/gpu_check.py --tiny             # CPU-sized: under 2 minutes on 2 cores
    python3 experiments/gpu_check.py --data=cifar10 --data_dir=DIR   # tfds data prepared in DIR
    python3 experiments/gpu_check.py --data=cifar10.zip              # an image folder or zip

Prints, in one process:
  1. JAX's version, backend and devices (`jax.devices()`);
  2. images/s of the ResNet-18 train step (`salun_jax.step.make_step`, jitted on one device,
     float32, synthetic 32x32x3 images, crop + flip): full width at batch 256, halved while the
     device runs out of memory; `--tiny`: width 0.25 at batch 32;
  3. a short 10% random-forgetting chain through the library's API (README, Python API): the
     original model, Retrain, the SalUn mask and SalUn, each with UA / MIA / RA / TA, its seconds
     and the Avg. Gap to Retrain. Data: `digits` (bundled, no download; the main job's small
     CNN, 20 epochs; `--tiny`: 8), or CIFAR-10-like images (ResNet-18, 15 + 15 epochs, then 5
     of SalUn; `--tiny`: width 0.25, 100 train and 20 test images per class, 2 + 2 + 1 epochs).

The chain runs the recipe end to end at reduced length: its numbers are not the paper's (the full
runs: docs/reproduce.md). Nothing is saved but data caches (tfds downloads, a decoded zip's
.npz). Not yet run on a GPU or TPU.
"""

from __future__ import annotations

import time

import salun_jax.cpu

salun_jax.cpu.enable()  # as the experiment scripts do, before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import salun_jax as sj  # noqa: E402
from salun_jax.data import subset_per_class  # noqa: E402
from salun_jax.losses import classification_loss  # noqa: E402

_DATA = flags.DEFINE_string(
    "data", "digits", "digits (bundled), a tfds name such as cifar10, or an image folder / zip."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory (prepared data).")
_TINY = flags.DEFINE_bool("tiny", False, "CPU-sized: small model, few images and epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Step-speed batch size (0: 256, --tiny 32).")


def print_devices() -> None:
    devices = jax.devices()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} device(s):")
    for device in devices:
        print(f"  {device.id}: {device.device_kind} ({device.platform})")


def _time_step(width: float, batch_size: int, steps: int) -> dict:
    model = sj.create_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3, width)
    tx = sj.make_sgd(0.1, momentum=0.9, weight_decay=5e-4)
    # The init runs once: compiled without XLA's optimisation (on a CPU, 4x less compile time).
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        state = sj.create_train_state(model, jax.random.key(0), (32, 32, 3), tx)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, batch_size, dtype=np.int32),
            "weight": np.ones(batch_size, np.float32),
        }
    )
    key = jax.random.key(1)
    start = time.perf_counter()
    step = jax.jit(sj.make_step(classification_loss(), axis_name=None))
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):  # warm-up
        state, _ = compiled(state, batch, key)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    return {"compile_s": compile_s, "step_s": seconds, "images_per_s": batch_size / seconds}


def step_speed(tiny: bool, batch_size: int) -> None:
    width, steps = (0.25, 5) if tiny else (1.0, 30)
    batch_size = batch_size or (32 if tiny else 256)
    while True:
        try:
            result = _time_step(width, batch_size, steps)
            break
        except Exception as error:  # XLA's out-of-memory error: try half the batch
            if "RESOURCE_EXHAUSTED" not in str(error) or batch_size <= 8:
                raise
            print(f"  batch {batch_size} does not fit in device memory; trying {batch_size // 2}")
            batch_size //= 2
    print(
        f"ResNet-18 x{width} train step, batch {batch_size}, one device: "
        f"{result['images_per_s']:.0f} images/s ({1e3 * result['step_s']:.1f} ms a step, "
        f"compiled in {result['compile_s']:.1f} s)"
    )


def _recipes(digits: bool, tiny: bool) -> tuple[str, float, sj.TrainConfig, sj.UnlearnConfig]:
    """(model, width, training recipe, SalUn recipe) of the chain."""
    if digits:  # the main job's (configs/digits_unlearn.py), shorter with --tiny
        train = sj.TrainConfig(
            model="small_cnn",
            width=0.5,
            epochs=8 if tiny else 20,
            batch_size=64,
            learning_rate=0.05,
            milestones=() if tiny else (15,),
            crop_padding=1,
            flip=False,
        )
        salun = dict(learning_rate=0.005, batch_size=64, crop_padding=1, flip=False)
        return "small_cnn", 0.5, train, sj.UnlearnConfig(epochs=5, **salun)
    train = sj.TrainConfig(  # configs/cifar10_paper.py's, shortened
        model="resnet18",
        width=0.25 if tiny else 1.0,
        epochs=2 if tiny else 15,
        batch_size=64 if tiny else 256,
        learning_rate=0.05 if tiny else 0.1,
        milestones=() if tiny else (8, 12),
    )
    salun = sj.UnlearnConfig(
        epochs=1 if tiny else 5,
        learning_rate=0.013,
        batch_size=train.batch_size,
        rl_variant="sequential",
    )
    return "resnet18", train.width, train, salun


def chain(source: str, data_dir: str | None, tiny: bool) -> None:
    start = time.perf_counter()
    data = sj.load_dataset(source, data_dir=data_dir)
    digits = source == "digits"
    if tiny and not digits:
        data = subset_per_class(data, train_per_class=100, test_per_class=20)
    x, y = data.train_images, data.train_labels
    split = sj.make_split(y, data.test_labels, scenario="random", forget_fraction=0.1)
    name, width, train, config = _recipes(digits, tiny)
    print(
        f"{data.name}: {len(split.train)} train images ({len(split.forget)} forgotten), "
        f"{len(split.test)} test, {x.shape[1:]}; {name} x{width}, {train.epochs} epochs, "
        f"SalUn {config.epochs} (loaded in {time.perf_counter() - start:.1f} s)"
    )
    model = sj.create_model(name, data.num_classes, data.mean, data.std, width=width)
    task = sj.UnlearnTask(model, x, y, split, data.num_classes)
    rows = {}

    def add(row: str, output, extra_seconds: float = 0.0) -> None:
        start = time.perf_counter()
        metrics = sj.evaluate(output.state, task, data.test_images, data.test_labels)
        seconds = output.run_seconds + output.compile_seconds + extra_seconds
        rows[row] = {key: metrics[key] for key in ("UA", "MIA", "RA", "TA")} | {"s": seconds}
        print(
            f"  {row}: {seconds:.1f} s ({output.compile_seconds:.1f} s of it compiling), "
            f"evaluated in {time.perf_counter() - start:.1f} s",
            flush=True,
        )

    original = sj.train_classifier(x, y, split.train, model, train, progress=False)
    add("Original", original)
    images = train.epochs * len(split.train)
    print(f"  training: {images / original.run_seconds:.0f} images/s over all devices")
    add("Retrain", sj.unlearn("Retrain", original.state, task, train, progress=False))
    start = time.perf_counter()
    mask = sj.salun_mask(original.state, task, fraction=0.5, config=config)
    mask_s = time.perf_counter() - start
    add(
        "SalUn",
        sj.unlearn("SalUn", original.state, task, config, mask=mask, progress=False),
        mask_s,
    )
    print("\n| Model | UA | MIA | RA | TA | Avg. Gap | seconds |\n|---|---|---|---|---|---|---|")
    for row, values in rows.items():
        gap = np.mean([abs(values[k] - rows["Retrain"][k]) for k in ("UA", "MIA", "RA", "TA")])
        cells = " | ".join(f"{values[k]:.2f}" for k in ("UA", "MIA", "RA", "TA"))
        print(f"| {row} | {cells} | {gap:.2f} | {values['s']:.1f} |")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    sections = [
        ("Devices", print_devices),
        ("Train-step speed", lambda: step_speed(_TINY.value, _BATCH.value)),
        (
            f"10% random forgetting: Original, Retrain, SalUn ({_DATA.value})",
            lambda: chain(_DATA.value, _DATA_DIR.value, _TINY.value),
        ),
    ]
    for title, section in sections:
        print(f"\n## {title} (at {time.perf_counter() - start:.0f} s)", flush=True)
        section()
    print(f"\ngpu_check: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
