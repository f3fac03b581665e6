"""Training throughput benchmark: the bare jitted train step vs. the real epoch loop.

    python experiments/bench_train.py --json_out=/tmp/bench_train.json

For each model (default: full-width ResNet-18 and a CPU-sized ResNet-8 at width 0.25, CIFAR-shaped
32x32x3 inputs, batch 128, SGD + momentum + weight decay, on-device crop/flip augmentation) it
prints images/s and achieved GFLOP/s of

  - bare: `jax.jit(make_step(classification_loss()))` called in a Python loop on one fixed
    device-resident batch, synced once at the end;
  - loop: `salun_jax.loop.run` for one epoch per round on synthetic data (its run seconds,
    which exclude its ahead-of-time compile), after a warm-up call;

both timed in `--rounds` interleaved rounds (medians reported, loop/bare the median of per-round
ratios), next to this machine's float32 matmul GFLOP/s (jnp, and numpy) as the reference limit.
The loop passes when it keeps the device busy: throughput >= 90% of the bare step's, and no
XLA compilation after the warm-up call beyond the one ahead-of-time compile of each call. FLOPs
per step come from XLA's cost analysis of the compiled step (fallback: 3x the forward's).
`--strict` exits 1 when a model fails.

Result on the 2-core CPU machine (AMD EPYC with AVX-512, jax 0.10.2, XLA:CPU, 1 device), default
flags, about 5 minutes, while other jobs kept the load average at 6-8 on the two cores:

    reference f32 matmul 4096^2: jnp 82.9 GFLOP/s, numpy 54.6 GFLOP/s
    resnet18 x1: 372 GFLOP/step (XLA cost analysis of the compiled train step)
    resnet8 x0.25: 9.1 GFLOP/step (XLA cost analysis of the compiled train step)
    model               params phase    step s    img/s  GFLOP/s   % mm loop/bare  check
    resnet18 x1       11173962 bare      9.534     13.4    39.06   47.1
                               loop      10.62     12.1    35.07   42.3     0.898  FAIL (compiles 0)
    resnet8 x0.25        78042 bare     0.4681    273.5    19.44   23.4
                               loop     0.5257    243.5    17.31   20.9     0.890  FAIL (compiles 0)

Under that load the numbers move by 30% from run to run: a calmer earlier run gave ResNet-18 at
7.1-7.3 s/step (~52 GFLOP/s, jnp matmul 115-170 GFLOP/s) with loop/bare 1.02, and a separate
4-way interleaved timing of ResNet-8 x0.25 (bare jit / jit with gather / pmapped step / run_epoch)
gave 0.327 / 0.340 / 0.334 / 0.330 s per step: the loop adds no systematic overhead here, and a
FAIL at ~0.9 on a loaded machine is noise. Judge the ratio on an idle machine or a GPU.

`--quick` runs a tiny SmallCNN on 8x8 images in seconds (the test's configuration).

Convolution formulations and PyTorch (`--conv_impls`, replaces the loop check):

    taskset -c 1 python experiments/bench_train.py --conv_impls=xla,plain,auto --models=resnet18 \
        --widths=0.25 --steps=3 --rounds=7

times the bare step of each `conv_impl` (salun_jax.models.conv) and, when torch is importable
(`pip install -e .[bench]`), the same ResNet in PyTorch (NCHW and channels_last), rotating the
order each round; prints img/s, per-round-median ratios and the per-layer choice of "auto"
(isolated fwd + dx + dw medians of XLA's and the chosen formulation). `--epoch_dataset` adds
whole `loop.run` epochs per conv_impl. Measured 2026-12 on the 2-core machine under a load average
of 7-10 from other jobs (jax 0.10.2, torch 2.13.0+cpu), ResNet-18 x0.25, batch 128:

    with salun_jax.host_memory (clean clone of ee4d07c, one core, --conv_impls=xla,plain,auto;
    load 1-2): xla 213.8, plain 202.9, auto 230.5, torch NCHW 264.2, channels_last 347.6
                          img/s; xla / NCHW 0.81x, auto / NCHW 0.82x, xla / channels_last
                          0.62x. The same clone with SALUN_JAX_KEEP_HOST_MEMORY=0, run right
                          after: xla 184.2, auto 189.9, NCHW 246.3; xla / NCHW 0.76x. A profile
                          of the step (jax.profiler, one core) had found 0.11-0.12 s of its
                          0.6 s in the kernel: XLA:CPU's 232 MB per-call scratch, freshly
                          mmapped, 56,800 page faults a step; now 0.
                          Both cores, same clone: xla 287.5, torch NCHW 448.6 img/s, 0.65x.
                          CIFAR-10 epochs (--conv_impls=xla --epoch_dataset=<zip>
                          --epoch_rounds=2, one core): 40.7 / 40.0 s, vs 46.5 / 46.0 s with
                          SALUN_JAX_KEEP_HOST_MEMORY=0 (1.15x; the same losses)
    BatchNorm with the batch mask applied to per-example sums (not flax's where() over the
                          whole activation) plus materialising each conv's output gradient:
                          1.04-1.06x the step in-process, half the float64 error of flax's, but
                          every digits table moves by float chaos (Retrain UA 1.81 -> 1.03);
                          not adopted
    quiet machine (clean clone of 95cc1f3, load ~1, nothing else running), one core, inputs
    materialised ("xla", "auto"; see salun_jax.models.conv.materialize) or not ("plain"):
                          xla 187.0, plain 180.8, auto 193.4, torch NCHW 257.6, channels_last
                          348.7 img/s; xla / NCHW 0.71x, auto / NCHW 0.76x, plain / xla 0.93x
    both cores, whole CIFAR-10 epochs (9,000 images, --conv_impls=xla,plain
    --epoch_dataset=<zip> --epoch_rounds=3): xla 35.3 / 32.0 / 30.3 s, plain 42.4 / 37.8 /
                          35.7 s: 1.18x
    before materialising (clean clone of 06da1cb, quiet), one core:
                          xla 189.6, auto 181.0 (0.96x xla), torch NCHW 278.9,
                          channels_last 349.6 img/s; xla / NCHW 0.66x, xla / channels_last
                          0.50x; all conv layers isolated: auto 1.15x xla (480 vs 554 ms)
    pinned to one core:   xla 90.5, auto 116.3 (per round: 1.08x xla), torch NCHW 124.2,
                          channels_last 248.6 img/s; xla / NCHW 0.72x, auto / NCHW 0.66x,
                          auto / channels_last 0.49x
    one core, another run: xla / NCHW 0.65x, auto / NCHW 0.77x, auto / xla 1.07x
    one core, XLA_FLAGS=--xla_cpu_use_onednn=true: xla / NCHW 0.71x (no gain over 0.72x)
    --xla_cpu_experimental_{onednn,xnn}_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION:
                          the compiled convolutions stay XLA's own (only dots move to oneDNN
                          or YNNPACK); with the oneDNN one, 16-channel 3x3 layer fwd / dx / dw
                          15.4 / 15.6 / 32.3 ms vs 15.6 / 15.5 / 21.4 without (one core)
    materialising the output gradients too (identity with a materialising VJP on each conv
                          output), in-process, one core: 692 vs 651 ms per gradient (0.94x)
    a 3x3 conv as a 3x1 conv over the three column shifts stacked into channels (48 inputs,
                          so YNNPACK takes it): 16-channel forward 84.6 ms vs 16.1 ms
    both cores:           xla 70.5, custom 61.2, auto 68.8 img/s (custom / xla 0.77x,
                          auto / xla 0.83x); torch 24-50 img/s (its threads suffer most
                          under the load), so the PyTorch ratios of that run mean little

    epochs (--epoch_dataset=<CIFAR-10 zip> --epoch_per_class=200 --epoch_rounds=2, one core,
                          16 steps of 128): xla 22.1 / 19.2 s, auto 18.0 / 18.8 s: auto 1.12x
                          (about 93 vs 83 s for the CIFAR CPU config's 9,000-image epoch at this
                          load; 44.7 s was measured for xla on a calmer machine)

Before oneDNN, "auto" won per layer in isolation (1.09-1.23x summed over the conv layers) but
only ~1.08x in the whole step at one core and lost on two: the default stays "xla". What was left
was XLA:CPU's convolution kernels themselves (Eigen, ~30 GFLOP/s on the 16-channel layers).

conv_impl="onednn" (salun_jax.models.onednn: oneDNN's kernels as XLA FFI custom calls) closes
that gap. Clean clone of 94a35a8, Intel Sapphire Rapids, --conv_impls=xla,onednn,auto
--epoch_dataset=<zip> --epoch_rounds=2, PyTorch in its own process:

    both cores:  xla 445.1, onednn 735.1, auto 720.9 (oneDNN in every part of every layer),
                 torch NCHW 705.8, channels_last 878.7 img/s: onednn / NCHW 1.03x (0.94-1.05x
                 over five runs of earlier commits), onednn / channels_last 0.83x; CIFAR-10
                 epochs 14.0 / 13.2 s vs xla 22.4 / 20.3 s
    one core:    xla 255.4, onednn 432.6, torch NCHW 377.3, channels_last 486.6 img/s:
                 onednn / NCHW 1.13x, 0.88x channels_last; epochs 22.0 / 21.8 s vs 36.5 / 35.4 s

PyTorch's steps run in a child process: in this one, after oneDNN's OpenMP teams had run, PyTorch
(same libgomp) lost ~20% on 2 cores (NCHW 656 -> 534 img/s).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from salun_jax import host_memory, loop
from salun_jax.data.batches import index_batches
from salun_jax.losses import classification_loss
from salun_jax.models import conv as conv_lib
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
    "Compare the bare train step with these conv_impl settings (xla, custom, auto, plain, "
    "onednn; see salun_jax.models.conv) and, when torch is importable, PyTorch's step (NCHW and "
    "channels_last), interleaved; prints the per-layer choice table. Replaces the loop check. "
    "Steps compile with the library's CPU options (salun_jax.models.conv.compiler_options: "
    "YNNPACK kept off convolutions); a setting with the suffix '+ynn' (e.g. xla+ynn) compiles "
    "with XLA's defaults instead, YNNPACK on the convolutions.",
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


# 6. Convolution formulations, PyTorch's step, whole epochs.


def _torch_resnet(stage_sizes, width: float, num_classes: int, mean, std):
    """The same CIFAR ResNet in PyTorch (upstream SalUn's layout and PyTorch's default init)."""
    import torch  # noqa: PLC0415 (optional)
    from torch import nn as tnn  # noqa: PLC0415

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.shortcut = tnn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            base = max(1, int(round(64 * width)))
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
            self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(base)
            blocks, cin = [], base
            for stage, count in enumerate(stage_sizes):
                for block in range(count):
                    stride = 2 if stage > 0 and block == 0 else 1
                    blocks.append(Block(cin, base * 2**stage, stride))
                    cin = base * 2**stage
            self.layers = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
            return self.fc(self.layers(x).mean(dim=(2, 3)))

    return Net()


_TORCH_STAGES = {"resnet18": (2, 2, 2, 2), "resnet8": (1, 1, 1)}


def _torch_step_fn(model_name: str, width: float, batch: dict, channels_last: bool):
    """One PyTorch train step (SGD, momentum 0.9, wd 5e-4, cross-entropy) on a fixed batch;
    None for a model without a PyTorch twin here."""
    import torch  # noqa: PLC0415 (optional)

    if model_name not in _TORCH_STAGES:
        return None
    torch.manual_seed(0)
    net = _torch_resnet(_TORCH_STAGES[model_name], width, _NUM_CLASSES, (0.5,) * 3, (0.25,) * 3)
    images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    images = images.float() / 255.0
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(batch["label"].astype(np.int64))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _torch_worker(connection, model_name: str, width: float, batch: dict) -> None:
    """PyTorch's steps, in a process of their own (see `_torch_runners`): sends
    ("ready", torch version, layouts) or ("skip", why), then for each (layout, count) received
    runs that many steps and sends their seconds, until it receives None."""
    # The same malloc settings as this process (PyTorch's step had them when it ran here).
    host_memory.keep_freed_host_memory()
    try:
        import torch  # noqa: PLC0415 (optional)
    except ImportError:
        connection.send(("skip", "torch is not importable: PyTorch rows skipped"))
        return
    steps = {}
    for layout, channels_last in (("NCHW", False), ("channels_last", True)):
        step = _torch_step_fn(model_name, width, batch, channels_last)
        if step is None:
            connection.send(("skip", f"no PyTorch twin of {model_name}: PyTorch rows skipped"))
            return
        steps[layout] = step
    connection.send(("ready", torch.__version__, list(steps)))
    while (request := connection.recv()) is not None:
        layout, count = request
        start = time.perf_counter()
        for _ in range(count):
            steps[layout]()
        connection.send(time.perf_counter() - start)


def _torch_runners(model_name: str, width: float, batch: dict):
    """(torch version, {"torch <layout>": run(count)}, close) with PyTorch in a child process,
    or (None, {}, close) without it. Why a process of its own: oneDNN's OpenMP threads
    (conv_impl="onednn") and PyTorch's share one libgomp in a process, and PyTorch's step, run
    after ours in the same process, was ~20% slower on 2 cores (656 -> 534 img/s, NCHW) and
    stayed so. Each runner returns the child's own timing of its steps."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_torch_worker, args=(child, model_name, width, batch))
    process.start()
    message = parent.recv()
    if message[0] == "skip":  # the worker has returned
        print(f"  {message[1]}", flush=True)
        process.join()
        return None, {}, lambda: None

    def close():
        parent.send(None)
        process.join()

    def runner(layout):
        def run(count):
            parent.send((layout, count))
            return parent.recv()

        return run

    _, version, layouts = message
    return version, {f"torch {layout}": runner(layout) for layout in layouts}, close


def conv_layer_table(model, image_shape, batch_size: int) -> list[dict]:
    """Per distinct conv shape of `model`: its layers, the plan "auto" uses and the candidates'
    times (from the plan cache; empty until an "auto" step has been compiled)."""
    rows: dict[str, dict] = {}
    cache = conv_lib.plan_cache()
    x = jnp.zeros((batch_size, *image_shape))
    for name, shape in conv_lib.conv_layer_shapes(model, x):
        row = rows.setdefault(shape.key(), {"shape": shape.key(), "layers": [], "first": False})
        row["layers"].append(name)
        row["first"] = row["first"] or shape.input_shape[-1] == image_shape[-1]
        plan, times = cache.get(shape), cache.times(shape)
        row["plan"] = None if plan is None else str(plan)
        row["times"] = times
        if plan is not None and times:
            # The stem's input gradient is never computed (the images need none).
            parts = ("forward", "weight_grad") if row["first"] else conv_lib.PLAN_PARTS
            row["xla_s"] = sum(times[p]["xla"] for p in parts)
            row["chosen_s"] = sum(times[p][getattr(plan, p)] for p in parts)
    return list(rows.values())


def format_layer_table(rows: list[dict]) -> str:
    header = (
        f"{'conv shape (B x H x W x C, kernel, out, stride, pad)':<52}{'n':>3}  "
        f"{'auto plan fwd/dx/dw':<20}{'xla ms':>8}{'auto ms':>8}{'speedup':>8}"
    )
    lines = [header, "-" * len(header)]
    total_xla = total_chosen = 0.0
    for row in rows:
        n = len(row["layers"])
        if "xla_s" in row:
            total_xla += n * row["xla_s"]
            total_chosen += n * row["chosen_s"]
            tail = (
                f"{1e3 * row['xla_s']:>8.1f}{1e3 * row['chosen_s']:>8.1f}"
                f"{row['xla_s'] / row['chosen_s']:>8.2f}"
            )
        else:
            tail = "     (not timed)"
        lines.append(f"{row['shape']:<52}{n:>3}  {row['plan'] or '-':<20}{tail}")
    if total_chosen:
        lines.append(
            f"{'all conv layers (isolated fwd + dx + dw, x n)':<55}  {'':<20}"
            f"{1e3 * total_xla:>8.1f}{1e3 * total_chosen:>8.1f}{total_xla / total_chosen:>8.2f}"
        )
    return "\n".join(lines)


# The library compiles with `conv_lib.compiler_options()` (on CPU: YNNPACK kept off the
# convolutions); a setting with this suffix compiles with XLA's defaults, for comparison.
YNN_CONVS = "+ynn"


def _split_setting(setting: str) -> tuple[str, dict]:
    """ "xla" -> ("xla", the library's compiler options); "xla+ynn" -> ("xla", {}: XLA's
    defaults, YNNPACK on the convolutions)."""
    impl, ynn, rest = setting.partition(YNN_CONVS)
    if rest or impl not in conv_lib.CONV_IMPLS:
        raise ValueError(
            f"unknown conv_impl setting {setting!r}; known: {', '.join(conv_lib.CONV_IMPLS)}, "
            f"each optionally with {YNN_CONVS!r}"
        )
    return impl, ({} if ynn else conv_lib.compiler_options())


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
    """Bare train steps of `name` with each conv_impl (and PyTorch's, NCHW and channels_last,
    when importable), `steps` steps each per round, in rotating order over `rounds` rounds."""
    data = _synthetic_data(batch_size, image_shape)
    batch = {**data, "weight": np.ones(batch_size, np.float32)}
    device_batch = jax.device_put(batch)
    key = jax.random.key(1)
    runners, compile_s, table = {}, {}, []
    settings = {setting: _split_setting(setting) for setting in impls}  # bad names fail here
    for setting, (impl, compiler_options) in settings.items():
        model = create_model(
            name, _NUM_CLASSES, (0.5,) * image_shape[-1], (0.25,) * image_shape[-1], width, impl
        )
        state = create_train_state(
            model, jax.random.key(0), image_shape, make_sgd(0.01, momentum=0.9, weight_decay=5e-4)
        )
        start = time.perf_counter()  # for "auto" this includes timing new layer shapes once
        compiled = (
            jax.jit(make_step(classification_loss(), axis_name=None))
            .lower(state, device_batch, key)
            .compile(compiler_options=compiler_options or None)
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
        if setting == "auto":
            table = conv_layer_table(model, image_shape, batch_size)
    torch_version, close_torch = None, lambda: None
    if with_torch:
        torch_version, torch_runners, close_torch = _torch_runners(name, width, batch)
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
        "layers": table,
        "load_average": os.getloadavg(),
    }


def bench_epochs(
    dataset_path: str, name: str, width: float, impls: list[str], per_class: int, rounds: int
) -> dict:
    """Seconds of whole `loop.run` epochs (batch 128, no augmentation) per conv_impl, on the
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
    settings = {setting: _split_setting(setting) for setting in impls}
    for impl in impls:
        model = create_model(
            name, dataset.num_classes, dataset.mean, dataset.std, width, settings[impl][0]
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
            # A "+ynn" setting: the library compiles with XLA's defaults (on the first round).
            ynn = {conv_lib.YNN_CONVOLUTIONS_ENV_VAR: "1"} if YNN_CONVS in impl else {}
            with mock.patch.dict(os.environ, ynn):
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
        if record["layers"]:
            print("\nper-layer choice of conv_impl=auto (isolated, jitted, medians):")
            print(format_layer_table(record["layers"]))
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
    kept = host_memory.keep_freed_host_memory()  # before JAX starts its backend
    print(f"host memory kept between calls (salun_jax.host_memory): {kept}", flush=True)
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
