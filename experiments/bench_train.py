"""Training throughput benchmark: the bare jitted train step vs. the real epoch loop.

    python experiments/bench_train.py --json_out=/tmp/bench_train.json

For each model (default: full-width ResNet-18 and a ResNet-8 at width 0.25, 32x32x3 inputs,
batch 128, SGD + momentum + weight decay, on-device crop/flip augmentation) it prints images/s and
achieved GFLOP/s of

  - bare: `jax.jit(make_step(classification_loss()))` called in a Python loop on one fixed
    device-resident batch, synced once at the end;
  - loop: `salun_jax.loop.run` for one epoch per round on synthetic data (its run seconds, which
    exclude its ahead-of-time compile), after a warm-up call;

timed in `--rounds` interleaved rounds (medians; loop/bare the median of per-round ratios), beside
this machine's float32 matmul GFLOP/s as the reference limit. The loop passes when it keeps the
device busy: throughput >= 90% of the bare step's and no compilation after the warm-up beyond the
one ahead-of-time compile of each call. `--strict` exits 1 when a model fails. `--quick` runs a
tiny SmallCNN on 8x8 images in seconds (the test's configuration).

`--conv_impls=xla,onednn` instead times the bare step with each of the CPU wing's convolution
modules (salun_jax.cpu; `flax` is plain `nn.Conv`, the library without the wing) and, when torch
is importable (`pip install -e .[bench]`), the same ResNet in PyTorch (`torch_twin.py`, NCHW and
channels_last, in a process of its own), rotating the order each round. `--epoch_dataset=<zip>`
adds whole `loop.run` epochs per setting. Judge ratios on a quiet machine: under load they move
by 30%.

Measurements, with their commands, machines and dates: docs/benchmarks.md, section 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch_twin  # experiments/: the same ResNet in PyTorch
from absl import app, flags

from salun_jax import cpu, loop
from salun_jax.data.batches import index_batches
from salun_jax.losses import classification_loss
from salun_jax.models import create_model
from salun_jax.optim import make_sgd
from salun_jax.step import create_train_state, make_step

_MODELS = flags.DEFINE_list("models", ["resnet18", "resnet8"], "Model names (create_model).")
_WIDTHS = flags.DEFINE_list("widths", ["1.0", "0.25"], "Width multiplier per model (or one).")
_STEPS = flags.DEFINE_list("steps", ["2", "20"], "Steps per timed round, per model (or one).")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    3,
    "Interleaved timed rounds (bare steps, then a loop epoch); medians over rounds are reported.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_WARMUP = flags.DEFINE_integer(
    "warmup",
    1,
    "Untimed steps of the bare step (the loop's warm-up "
    "epoch has as many steps as its timed epoch).",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Square input size.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Input channels.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "Reference f32 matmul: n x n @ n x n.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 5, "Timed matmuls (median is used).")
_NUMPY_REFERENCE = flags.DEFINE_bool("numpy_reference", True, "Also time numpy's matmul.")
_MIN_RATIO = flags.DEFINE_float("min_ratio", 0.9, "Loop/bare throughput needed to pass.")
_STRICT = flags.DEFINE_bool("strict", False, "Exit with status 1 if any model fails.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
_CONV_IMPLS = flags.DEFINE_list(
    "conv_impls",
    [],
    "Compare the bare train step with these convolution modules (xla, onednn: the CPU wing's, "
    "salun_jax.cpu; flax: plain nn.Conv) and, when torch is importable, PyTorch's step (NCHW and "
    "channels_last), interleaved. Replaces the loop check. The process runs with the wing's "
    "options (salun_jax.cpu.enable: YNNPACK kept off convolutions, host memory kept).",
)
_TORCH = flags.DEFINE_bool("torch", True, "With --conv_impls: also time PyTorch if importable.")
_EPOCH_DATASET = flags.DEFINE_string(
    "epoch_dataset",
    None,
    "With --conv_impls: also time whole `loop.run` epochs on this data set (e.g. the CIFAR-10 "
    "zip; its first --epoch_per_class images per class, the CIFAR CPU config's train subset), "
    "one epoch per conv_impl per round, interleaved.",
)
_EPOCH_PER_CLASS = flags.DEFINE_integer("epoch_per_class", 900, "Images per class per epoch.")
_EPOCH_ROUNDS = flags.DEFINE_integer("epoch_rounds", 1, "Interleaved epoch rounds.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny configuration (seconds; for the tests). Flags given explicitly still win."
)

# What --quick changes; flags given on the command line override these.
_QUICK_VALUES = {
    "models": ["small_cnn"],
    "widths": ["0.25"],
    "steps": ["3"],
    "batch_size": 16,
    "image_size": 8,
    "matmul_size": 256,
    "matmul_repeats": 3,
    "rounds": 2,
}
_NUM_CLASSES = 10
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# 1. The reference limit: float32 matmul throughput.


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int, repeats: int, use_numpy: bool) -> dict[str, float]:
    """Median float32 GFLOP/s of an n x n matmul (2 n^3 flops), jitted jnp and optionally numpy."""
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal((n, n), np.float32)
    b_host = rng.standard_normal((n, n), np.float32)
    flops = 2.0 * n**3
    matmul = jax.jit(jnp.matmul)
    a, b = jax.device_put(a_host), jax.device_put(b_host)
    matmul(a, b).block_until_ready()  # compile
    out = {
        "matmul_size": n,
        "jax_matmul_gflops": flops
        / _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
        / 1e9,
    }
    if use_numpy:
        np.matmul(a_host, b_host)
        out["numpy_matmul_gflops"] = (
            flops / _median_seconds(lambda: np.matmul(a_host, b_host), repeats) / 1e9
        )
    return out


# 2. Compilation and transfer checks around the pmapped step.


class _CompileCounter:
    """Counts XLA backend compilations (any function) while registered."""

    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == _COMPILE_EVENT:
            self.count += 1


@contextlib.contextmanager
def _counting_compiles() -> Iterator[_CompileCounter]:
    counter = _CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)


# 3. FLOPs of one train step.


def _cost_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _forward_flops(state, images: jax.Array) -> float:
    forward = jax.jit(
        lambda variables, x: state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    )
    return _cost_flops(forward.lower(state.variables, images.astype(jnp.float32)).compile())


# 4. One model.


def _synthetic_data(num_examples: int, image_shape: tuple[int, ...], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, _NUM_CLASSES, num_examples, dtype=np.int32),
    }


def _rates(seconds_per_step: float, batch_size: int, flops: float, peak_gflops: float) -> dict:
    gflops = flops / seconds_per_step / 1e9
    return {
        "step_s": seconds_per_step,
        "images_per_s": batch_size / seconds_per_step,
        "gflops": gflops,
        "pct_of_matmul": 100.0 * gflops / peak_gflops,
    }


def bench_model(
    name: str,
    width: float,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    rounds: int,
    image_shape: tuple[int, ...],
    peak_gflops: float,
    min_ratio: float,
) -> dict:
    """Times the bare jitted step and the epoch loop of one model; returns a result record.

    After compiling and warming up both, runs `rounds` rounds, each `steps` bare steps and one
    `steps`-step epoch of the loop (in alternating order): interleaving exposes both to the same
    spells of load from other jobs on a shared machine. loop/bare is the median over rounds of
    the per-round ratio.
    """
    if steps < 1 or warmup < 1 or rounds < 1:
        raise ValueError(f"need steps, warmup and rounds >= 1, got {steps}, {warmup}, {rounds}")
    num_devices = jax.local_device_count()
    model = create_model(
        name, _NUM_CLASSES, (0.5,) * image_shape[-1], (0.25,) * image_shape[-1], width
    )
    state = create_train_state(
        model, jax.random.key(0), image_shape, make_sgd(0.01, momentum=0.9, weight_decay=5e-4)
    )
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    data = _synthetic_data(steps * batch_size, image_shape)
    key = jax.random.key(1)
    loss_fn = classification_loss()

    # Bare step: one compile (also the source of the FLOP count), then a Python loop on one
    # device-resident batch that syncs only at its end.
    batch = jax.device_put(
        {
            "image": data["image"][:batch_size],
            "label": data["label"][:batch_size],
            "weight": np.ones(batch_size, np.float32),
        }
    )
    start = time.perf_counter()
    compiled = jax.jit(make_step(loss_fn, axis_name=None)).lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    flops, flops_source = _cost_flops(compiled), "XLA cost analysis of the compiled train step"
    if flops <= 0:
        flops = 3.0 * _forward_flops(state, batch["image"])
        flops_source = "3x XLA cost analysis of the forward pass"

    def bare_steps(state, count):
        start = time.perf_counter()
        for _ in range(count):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        return state, (time.perf_counter() - start) / count

    # Loop: `salun_jax.loop.run` for one epoch of `steps` steps per round (its ahead-of-time
    # compile is reported apart from its run seconds). The first call warms up the loop's other
    # pieces; after it, each call must compile exactly once (the step), never inside a step.
    step = make_step(loss_fn)
    batches_fn = index_batches(np.arange(steps * batch_size), batch_size)
    loop_state = state

    def loop_epoch(state, epoch):
        with _counting_compiles() as counter:
            out = loop.run(
                state, step, data, batches_fn, num_epochs=1, key=key, seed=epoch, progress=False
            )
        return out, out.run_seconds / steps, counter.count

    out, warm_s, _ = loop_epoch(loop_state, 0)
    loop_state = out.state
    state, _ = bare_steps(jax.tree.map(jnp.copy, state), warmup)
    bare_times, loop_times, extra_compiles, finite = [], [], 0, True
    for epoch in range(1, rounds + 1):
        # Alternate which phase goes first, so a load that grows or fades within a round
        # does not always favour the same one.
        for phase in ("bare", "loop") if epoch % 2 else ("loop", "bare"):
            if phase == "bare":
                state, seconds = bare_steps(state, steps)
                bare_times.append(seconds)
            else:
                out, seconds, compiles = loop_epoch(loop_state, epoch)
                loop_state = out.state
                loop_times.append(seconds)
                extra_compiles += max(compiles - 1, 0)  # 0 when the step came from a cache
                finite = finite and bool(np.isfinite(out.history[-1]["loss"]))
    # Each round's bare and loop phases ran side by side in time, so their ratio cancels slow
    # changes in the machine's load; the median over rounds drops a round one phase of which
    # was hit by a burst. Times per phase: the median round (the fastest is in the JSON).
    bare_s, loop_s = statistics.median(bare_times), statistics.median(loop_times)
    ratio = statistics.median(b / t for b, t in zip(bare_times, loop_times, strict=True))
    passed = ratio >= min_ratio and extra_compiles == 0 and finite
    return {
        "model": name,
        "width": width,
        "params": num_params,
        "batch_size": batch_size,
        "image_shape": list(image_shape),
        "devices": num_devices,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "flops_per_step": flops,
        "flops_source": flops_source,
        "bare_compile_s": compile_s,
        "loop_warmup_epoch_s": warm_s * steps,
        "bare": _rates(bare_s, batch_size, flops, peak_gflops),
        "loop": _rates(loop_s, batch_size, flops, peak_gflops),
        "bare_step_s_per_round": bare_times,
        "loop_step_s_per_round": loop_times,
        "bare_fastest": _rates(min(bare_times), batch_size, flops, peak_gflops),
        "loop_fastest": _rates(min(loop_times), batch_size, flops, peak_gflops),
        "loop_over_bare": ratio,
        "loop_compiles_after_warmup": extra_compiles,
        "loop_loss": out.history[-1]["loss"],
        "finite": bool(finite),
        "passed": bool(passed),
    }


# 5. Output.


def format_table(results: list[dict]) -> str:
    header = (
        f"{'model':<16}{'params':>10} {'phase':<6}{'step s':>9}{'img/s':>9}"
        f"{'GFLOP/s':>9}{'% mm':>7}{'loop/bare':>10}  check"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        label = f"{r['model']} x{r['width']:g}"
        for phase in ("bare", "loop"):
            p = r[phase]
            tail = ""
            if phase == "loop":
                tail = (
                    f"{r['loop_over_bare']:>10.3f}  {'PASS' if r['passed'] else 'FAIL'}"
                    f" (compiles {r['loop_compiles_after_warmup']})"
                )
            lines.append(
                f"{label if phase == 'bare' else '':<16}"
                f"{r['params'] if phase == 'bare' else '':>10} {phase:<6}"
                f"{p['step_s']:>9.4g}{p['images_per_s']:>9.1f}{p['gflops']:>9.2f}"
                f"{p['pct_of_matmul']:>7.1f}{tail}"
            )
    return "\n".join(lines)


def _per_model(values: list[str], count: int, name: str, cast: Callable) -> list:
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise app.UsageError(f"--{name} needs 1 or {count} values, got {len(values)}")
    return [cast(v) for v in values]


def run_benchmark() -> dict:
    """Runs the benchmark as the flags say, prints the table; returns the JSON record."""
    models = _MODELS.value
    widths = _per_model(_WIDTHS.value, len(models), "widths", float)
    steps = _per_model(_STEPS.value, len(models), "steps", int)
    image_shape = (_IMAGE_SIZE.value, _IMAGE_SIZE.value, _CHANNELS.value)

    reference = matmul_gflops(_MATMUL_SIZE.value, _MATMUL_REPEATS.value, _NUMPY_REFERENCE.value)
    peak = reference["jax_matmul_gflops"]
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.local_device_count()} device(s): {jax.devices()[0].device_kind}"
    )
    print(
        f"reference f32 matmul {reference['matmul_size']}^2: jnp {peak:.1f} GFLOP/s"
        + (
            f", numpy {reference['numpy_matmul_gflops']:.1f} GFLOP/s"
            if "numpy_matmul_gflops" in reference
            else ""
        )
    )
    sys.stdout.flush()
    results = []
    for name, width, num_steps in zip(models, widths, steps, strict=True):
        record = bench_model(
            name,
            width,
            batch_size=_BATCH_SIZE.value,
            steps=num_steps,
            warmup=_WARMUP.value,
            rounds=_ROUNDS.value,
            image_shape=image_shape,
            peak_gflops=peak,
            min_ratio=_MIN_RATIO.value,
        )
        results.append(record)
        print(
            f"{name} x{width:g}: {record['flops_per_step'] / 1e9:.3g} GFLOP/step "
            f"({record['flops_source']}); bare compile {record['bare_compile_s']:.1f} s, "
            f"loop warm-up epoch {record['loop_warmup_epoch_s']:.1f} s",
            flush=True,
        )
    print()
    print(
        f"batch {_BATCH_SIZE.value}, images {'x'.join(map(str, image_shape))}; "
        f"% mm = achieved GFLOP/s as % of the jnp matmul; loop passes at loop/bare >= "
        f"{_MIN_RATIO.value:g} with no compilation after the warm-up epoch"
    )
    print(format_table(results))
    output = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.local_device_count(),
        "reference": reference,
        "min_ratio": _MIN_RATIO.value,
        "results": results,
        "passed": all(r["passed"] for r in results),
    }
    if _JSON_OUT.value:
        directory = os.path.dirname(os.path.abspath(_JSON_OUT.value))
        os.makedirs(directory, exist_ok=True)
        with open(_JSON_OUT.value, "w") as f:
            json.dump(output, f, indent=2, sort_keys=True)
    return output


# 6. Convolution modules, PyTorch's step, whole epochs.

FLAX_CONV = "flax"  # plain nn.Conv: the models' default without the CPU wing


def conv_setting(setting: str):
    """The flax convolution module of a --conv_impls setting."""
    if setting == FLAX_CONV:
        return nn.Conv
    if setting not in cpu.CONVS:
        known = ", ".join((*cpu.CONVS, FLAX_CONV))
        raise ValueError(f"unknown conv_impls setting {setting!r}; known: {known}")
    return cpu.conv_module(setting)


def bench_conv_impls(
    name: str,
    width: float,
    *,
    impls: list[str],
    batch_size: int,
    steps: int,
    rounds: int,
    image_shape: tuple[int, ...],
    with_torch: bool,
) -> dict:
    """Bare train steps of `name` with each convolution module (and PyTorch's, NCHW and
    channels_last, when importable), `steps` steps each per round, in rotating order over
    `rounds` rounds."""
    data = _synthetic_data(batch_size, image_shape)
    batch = {**data, "weight": np.ones(batch_size, np.float32)}
    device_batch = jax.device_put(batch)
    key = jax.random.key(1)
    runners, compile_s = {}, {}
    convs = {setting: conv_setting(setting) for setting in impls}  # bad names fail here
    for setting, conv in convs.items():
        model = create_model(
            name, _NUM_CLASSES, (0.5,) * image_shape[-1], (0.25,) * image_shape[-1], width, conv
        )
        state = create_train_state(
            model, jax.random.key(0), image_shape, make_sgd(0.01, momentum=0.9, weight_decay=5e-4)
        )
        start = time.perf_counter()
        compiled = (
            jax.jit(make_step(classification_loss(), axis_name=None))
            .lower(state, device_batch, key)
            .compile()
        )
        compile_s[setting] = time.perf_counter() - start
        print(
            f"  {name} x{width:g} conv_impl={setting}: compiled in {compile_s[setting]:.1f} s",
            flush=True,
        )

        def run_jax(count, compiled=compiled, state=state):
            out = state
            for _ in range(count):
                out, metrics = compiled(out, device_batch, key)
            jax.block_until_ready((out, metrics))

        runners[f"jax {setting}"] = run_jax
    torch_version, close_torch = None, lambda: None
    if with_torch:
        torch_version, torch_runners, close_torch = torch_twin.runners(name, width, batch)
        runners.update(torch_runners)
    try:
        for run in runners.values():
            run(1)  # warm up
        times = {label: [] for label in runners}
        labels = list(runners)
        for round_index in range(rounds):
            # Rotate the order each round, so no setting always runs first (or last) in a round.
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                seconds = runners[label](steps)  # PyTorch's runners time their own steps
                seconds = time.perf_counter() - start if seconds is None else seconds
                times[label].append(seconds / steps)
    finally:
        close_torch()
    rates = {label: batch_size / statistics.median(t) for label, t in times.items()}
    ratios = {}
    for label in rates:
        for reference in ("torch NCHW", "torch channels_last", "jax xla"):
            if reference in times and label != reference:
                # Median over rounds of the per-round ratio (both ran within the same round).
                ratios[f"{label} / {reference}"] = statistics.median(
                    r / t for r, t in zip(times[reference], times[label], strict=True)
                )
    return {
        "model": name,
        "width": width,
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "torch_version": torch_version,
        "compile_s": compile_s,
        "step_s_per_round": times,
        "images_per_s": rates,
        "ratios": ratios,
        "load_average": os.getloadavg(),
    }


def bench_epochs(
    dataset_path: str, name: str, width: float, impls: list[str], per_class: int, rounds: int
) -> dict:
    """Seconds of whole `loop.run` epochs (batch 128, no augmentation) per setting, on the
    first `per_class` train images of each class of `dataset_path`, interleaved over rounds."""
    from salun_jax.data.sources import load_dataset  # noqa: PLC0415

    dataset = load_dataset(dataset_path)
    labels = dataset.train_labels
    indices = np.concatenate(
        [np.flatnonzero(labels == c)[:per_class] for c in range(dataset.num_classes)]
    )
    data = {"image": dataset.train_images, "label": labels}
    batches_fn = index_batches(indices, 128)
    key = jax.random.key(1)
    states = {}
    for impl in impls:
        model = create_model(
            name, dataset.num_classes, dataset.mean, dataset.std, width, conv_setting(impl)
        )
        states[impl] = create_train_state(
            model,
            jax.random.key(0),
            dataset.image_shape,
            make_sgd(0.05, momentum=0.9, weight_decay=5e-4),
        )
    seconds = {impl: [] for impl in impls}
    losses = {impl: [] for impl in impls}
    for round_index in range(rounds):
        order = impls if round_index % 2 == 0 else impls[::-1]
        for impl in order:
            out = loop.run(
                states[impl],
                make_step(classification_loss()),
                data,
                batches_fn,
                num_epochs=1,
                key=key,
                seed=round_index,
                progress=False,
            )
            seconds[impl].append(out.run_seconds)
            losses[impl].append(out.history[-1]["loss"])
            print(
                f"  epoch round {round_index}: conv_impl={impl} {out.run_seconds:.1f} s "
                f"(compile {out.compile_seconds:.1f} s), loss {out.history[-1]['loss']:.4f}, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    ratios = {
        f"{impl} / xla": statistics.median(
            x / t for x, t in zip(seconds["xla"], seconds[impl], strict=True)
        )
        for impl in impls
        if impl != "xla" and "xla" in seconds
    }
    return {
        "dataset": dataset_path,
        "images": int(len(indices)),
        "epoch_s": seconds,
        "loss": losses,
        "speedup_over_xla": ratios,
    }


def run_conv_comparison() -> dict:
    """--conv_impls: the comparison, printed; returns the JSON record."""
    models = _MODELS.value
    widths = _per_model(_WIDTHS.value, len(models), "widths", float)
    steps = _per_model(_STEPS.value, len(models), "steps", int)
    image_shape = (_IMAGE_SIZE.value, _IMAGE_SIZE.value, _CHANNELS.value)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}, load average {os.getloadavg()}",
        flush=True,
    )
    results = []
    for name, width, num_steps in zip(models, widths, steps, strict=True):
        record = bench_conv_impls(
            name,
            width,
            impls=_CONV_IMPLS.value,
            batch_size=_BATCH_SIZE.value,
            steps=num_steps,
            rounds=_ROUNDS.value,
            image_shape=image_shape,
            with_torch=_TORCH.value,
        )
        results.append(record)
        print(f"\n{name} x{width:g}, batch {_BATCH_SIZE.value}: train step, median over rounds")
        for label, rate in record["images_per_s"].items():
            print(f"  {label:<22}{rate:>8.1f} img/s")
        for label, ratio in record["ratios"].items():
            print(f"  {label:<44}{ratio:>6.2f}x")
        print(f"load average {record['load_average']}", flush=True)
    output = {"jax_version": jax.__version__, "conv_results": results}
    if _EPOCH_DATASET.value:
        output["epochs"] = bench_epochs(
            _EPOCH_DATASET.value,
            models[0],
            widths[0],
            _CONV_IMPLS.value,
            _EPOCH_PER_CLASS.value,
            _EPOCH_ROUNDS.value,
        )
        print(
            f"epochs: {output['epochs']['epoch_s']}, speedup {output['epochs']['speedup_over_xla']}"
        )
    output["load_average_end"] = os.getloadavg()
    return output


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = cpu.enable()  # the scripts' CPU options, before JAX starts its backend
    print(f"CPU options (salun_jax.cpu.enable): {options}", flush=True)
    if _QUICK.value:
        for name, value in _QUICK_VALUES.items():
            if not flags.FLAGS[name].present:
                flags.FLAGS[name].value = value
    if _CONV_IMPLS.value:
        output = run_conv_comparison()
        if _JSON_OUT.value:
            os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
            with open(_JSON_OUT.value, "w") as f:
                json.dump(output, f, indent=2, sort_keys=True, default=str)
        return
    output = run_benchmark()
    if _STRICT.value and not output["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
