"""Diffusion throughput: DDPM train-step images/s (paper and tiny UNet), DDIM sampling images/s.

    python experiments/bench_diffusion.py --json_out=/tmp/bench_diffusion.json

Measures, on whatever device JAX picks:
  - the machine's float32 matmul GFLOP/s (jnp, n x n) as the reference limit;
  - the jitted DDPM train step (`make_step(denoising_loss(...))`: loss, grad, clip + Adam,
    EMA) on one fixed device-resident batch, for the paper's CIFAR-10 UNet (38.6M params,
    32x32x3) and the tiny digits UNet (0.78M params, 8x8x1): compile seconds, median seconds/step,
    images/s and achieved GFLOP/s (FLOPs from XLA's cost analysis of the compiled step);
  - CFG DDIM sampling with the tiny UNet (100 steps, eta 1, w 2; each step is one UNet pass on a
    2B batch): images/s.

Result on the 2-core CPU machine (jax 0.10.2, XLA:CPU, 1 device, shared with other jobs: expect
+-30% noise), default flags, 1 min 44 s in all:

    float32 matmul 2048^2: 185.1 GFLOP/s (jnp)

    | train step         | params | batch | compile (s) | s/step | images/s | GFLOP/s |
    | paper UNet 32x32x3 | 38.63M | 8     | 25.5        | 2.679  | 3.0      | 105.1   |
    | tiny UNet 8x8x1    | 0.78M  | 64    | 15.5        | 0.070  | 914.7    | 73.8    |

    | DDIM sampling (CFG w 2, eta 1) | batch | steps | compile (s) | s    | images/s |
    | tiny UNet 8x8x1                | 100   | 100   | 3.9         | 5.46 | 18.3     |

So the paper's 800k x 128 images would take ~1 year of this CPU: the paper config is for
accelerators. The tiny UNet trains at ~900 images/s (digits_ddpm: 1000 steps of 64 in ~2 min).

`--quick` runs a minimal UNet with tiny batches and step counts in seconds (the test's setting).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from salun_jax import cpu
from salun_jax.diffusion import linear_schedule
from salun_jax.evaluation.generation import generate_samples
from salun_jax.losses import denoising_loss
from salun_jax.models.unet import UNet, minimal_unet, paper_cifar10_unet, tiny_digits_unet
from salun_jax.step import make_step
from salun_jax.train_diffusion import (
    DiffusionTrainConfig,
    create_diffusion_state,
    init_unet_params,
)

_QUICK = flags.DEFINE_bool("quick", False, "Seconds-scale run with a minimal UNet (for tests).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch_size", 8, "Batch of the paper UNet's step.")
_PAPER_STEPS = flags.DEFINE_integer("paper_steps", 3, "Timed steps of the paper UNet.")
_TINY_BATCH = flags.DEFINE_integer("tiny_batch_size", 64, "Batch of the tiny UNet's step.")
_TINY_STEPS = flags.DEFINE_integer("tiny_steps", 20, "Timed steps of the tiny UNet.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch_size", 100, "Images per sampler call.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 100, "DDIM steps.")


def matmul_gflops(n: int, repeats: int = 5) -> float:
    """Median float32 matmul GFLOP/s of an n x n product."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def bench_train_step(name: str, model: UNet, params, batch_size: int, steps: int) -> dict:
    """Compile time, median step time, images/s and GFLOP/s of the jitted DDPM train step."""
    schedule = linear_schedule()
    state = create_diffusion_state(
        model, None, DiffusionTrainConfig(ema_decay=0.9999), params=params
    )
    # No donation: a fresh state's EMA shares its buffers with the params.
    step = jax.jit(make_step(denoising_loss(model.apply, schedule, flip=True), axis_name=None))
    shape = (batch_size, model.image_size, model.image_size, model.out_channels)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, model.num_classes, batch_size), jnp.int32),
        "weight": jnp.ones((batch_size,), jnp.float32),
    }
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_seconds = time.perf_counter() - start
    flops = _cost_flops(compiled)
    state, metrics = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "name": name,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "batch_size": batch_size,
        "steps": steps,
        "compile_seconds": compile_seconds,
        "seconds_per_step": seconds,
        "images_per_s": batch_size / seconds,
        "flops_per_step": flops,
        "gflops": None if flops is None else flops / seconds / 1e9,
    }


def bench_sampling(name: str, model: UNet, params, batch_size: int, num_steps: int) -> dict:
    """Images/s of CFG DDIM sampling (eta 1, w 2), timed after a compiling call."""
    schedule = linear_schedule()
    labels = np.arange(batch_size) % model.num_classes
    image_shape = (model.image_size, model.image_size, model.out_channels)

    def run(seed):
        return generate_samples(
            model.apply,
            params,
            schedule,
            labels,
            jax.random.key(seed),
            image_shape=image_shape,
            num_steps=num_steps,
            eta=1.0,
            guidance_scale=2.0,
            batch_size=batch_size,
        )

    start = time.perf_counter()
    run(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(1)
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "batch_size": batch_size,
        "ddim_steps": num_steps,
        "compile_seconds": max(first - seconds, 0.0),
        "seconds": seconds,
        "images_per_s": batch_size / seconds,
        "unet_passes_per_s": 2 * batch_size * num_steps / seconds,
    }


def main(argv):
    del argv
    cpu.enable()  # the scripts' CPU options, before JAX starts its backend
    quick = _QUICK.value
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()}, jax {jax.__version__}"
    )
    reference = {"matmul_n": 256 if quick else 2048}
    reference["jax_matmul_gflops"] = matmul_gflops(reference["matmul_n"])
    key = jax.random.key(0, impl="rbg")  # rbg: init compiles much faster than threefry
    if quick:
        model = minimal_unet()
        params = init_unet_params(model, key)
        train = [bench_train_step("minimal UNet 8x8x1", model, params, 2, 1)]
        sampling = [bench_sampling("minimal UNet 8x8x1", model, params, 2, 1)]
    else:
        paper, tiny = paper_cifar10_unet(), tiny_digits_unet()
        tiny_params = init_unet_params(tiny, key)
        train = [
            bench_train_step(
                "paper UNet 32x32x3",
                paper,
                init_unet_params(paper, key),
                _PAPER_BATCH.value,
                _PAPER_STEPS.value,
            ),
            bench_train_step(
                "tiny UNet 8x8x1", tiny, tiny_params, _TINY_BATCH.value, _TINY_STEPS.value
            ),
        ]
        sampling = [
            bench_sampling(
                "tiny UNet 8x8x1", tiny, tiny_params, _SAMPLE_BATCH.value, _SAMPLE_STEPS.value
            )
        ]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"float32 matmul {reference['matmul_n']}^2: "
        f"{reference['jax_matmul_gflops']:.1f} GFLOP/s (jnp)",
        "",
        "| train step | params | batch | compile (s) | s/step | images/s | GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in train:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} | "
            f"{r['compile_seconds']:.1f} | {r['seconds_per_step']:.3f} | "
            f"{r['images_per_s']:.1f} | {fmt(r['gflops'], '.1f')} |"
        )
    lines += [
        "",
        "| DDIM sampling (CFG w 2, eta 1) | batch | steps | compile (s) | s | "
        "images/s | UNet image-passes/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sampling:
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['ddim_steps']} | "
            f"{r['compile_seconds']:.1f} | {r['seconds']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['unet_passes_per_s']:.0f} |"
        )
    print("\n".join(lines))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(
                {
                    "reference": reference,
                    "train": train,
                    "sampling": sampling,
                    "quick": quick,
                    "jax": jax.__version__,
                    "device": jax.devices()[0].device_kind,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
