"""Cost of a saliency mask against one forward+backward pass over the forget set.

    python experiments/bench_saliency.py --model=resnet18 --width=0.25 --forget=900 --batch_size=128

Times (after compilation, medians of interleaved repeats) (a) `saliency.gradient_saliency`
(jitted per-batch gradient steps accumulating |sum of per-batch gradients|) plus the global top-k
ranking into a mask, against (b) a plain jitted forward+backward per batch over the same forget
set, dispatched from Python. The issue's bar: the
mask costs at most 1.5x (b).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from salun_jax import cpu, saliency
from salun_jax.data.batches import gather_batches
from salun_jax.losses import classification_forget_loss
from salun_jax.models import create_model
from salun_jax.step import init_variables

_MODEL = flags.DEFINE_string("model", "resnet18", "Model name.")
_WIDTH = flags.DEFINE_float("width", 0.25, "Width multiplier.")
_FORGET = flags.DEFINE_integer("forget", 900, "Forget-set size.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image side.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_JSON = flags.DEFINE_string("json_out", None, "Write the numbers here.")


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model_name, width, forget, batch_size, image_size, channels, repeats) -> dict:
    model = create_model(model_name, 10, (0.5,) * channels, (0.25,) * channels, width)
    variables = init_variables(model, jax.random.key(0), (image_size, image_size, channels))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (forget, image_size, image_size, channels)).astype(np.uint8)
    labels = rng.integers(0, 10, forget).astype(np.int32)
    batches = gather_batches({"image": images, "label": labels}, np.arange(forget), batch_size, rng)
    loss_fn = classification_forget_loss(model.apply, variables["batch_stats"])
    params = variables["params"]
    key = jax.random.key(1)
    device_batches = jax.device_put(batches)

    grad_fn = jax.jit(jax.grad(loss_fn))
    per_batch = [
        jax.tree.map(lambda x, i=i: x[i], device_batches) for i in range(batches["weight"].shape[0])
    ]

    def forward_backward_once():
        jax.block_until_ready([grad_fn(params, b, key) for b in per_batch])

    def scores_only():
        return jax.block_until_ready(
            saliency.gradient_saliency(loss_fn, params, device_batches, key)
        )

    scores = scores_only()  # compile both before timing
    forward_backward_once()
    scores_times, fb_times, ranking_times = [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        scores_times.append(_seconds(scores_only))
        fb_times.append(_seconds(forward_backward_once))
        ranking_times.append(_seconds(lambda: saliency.mask_from_scores(scores, 0.5)))
    scores_s, fb_s = float(np.median(scores_times)), float(np.median(fb_times))
    ranking_s = float(np.median(ranking_times))
    mask_s = scores_s + ranking_s
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return {
        "model": model_name,
        "width": width,
        "params": int(num_params),
        "forget": forget,
        "batch_size": batch_size,
        "mask_seconds": mask_s,
        "scores_seconds": scores_s,
        "ranking_seconds": ranking_s,
        "forward_backward_seconds": fb_s,
        "mask_over_forward_backward": mask_s / fb_s,
    }


def main(argv):
    del argv
    cpu.enable()  # the scripts' CPU options, before JAX starts its backend
    result = run(
        _MODEL.value,
        _WIDTH.value,
        _FORGET.value,
        _BATCH.value,
        _SIZE.value,
        _CHANNELS.value,
        _REPEATS.value,
    )
    print(
        f"{result['model']} x{result['width']} ({result['params']:,} params), forget "
        f"{result['forget']}, batch {result['batch_size']} on {jax.devices()[0].platform}"
    )
    print(f"  one fwd+bwd pass over D_f : {result['forward_backward_seconds']:.3f} s")
    print(f"  saliency scores           : {result['scores_seconds']:.3f} s")
    print(f"  + global top-k ranking    : {result['ranking_seconds']:.3f} s")
    print(
        f"  mask / fwd+bwd            : {result['mask_over_forward_backward']:.2f}x "
        f"({'PASS' if result['mask_over_forward_backward'] <= 1.5 else 'FAIL'} vs 1.5x)"
    )
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
