"""Sequential deletion requests: the forget set arrives as K requests, unlearned one after another.

Request r forgets chunk r of the forget set (`np.array_split`, in the split's order) from the model
the previous request left; its retain set is the original retain set plus the chunks still to
come (they are still training data when request r arrives). SalUn's saliency mask is computed
anew for every request, on that request's forget set, at the current model. Retrain retrains from
scratch on each request's retain set. After every request the model is evaluated on the request's
split (UA on its chunk, RA on its retain set, TA, MIA-Efficacy on its chunk) and on the data of
all requests so far (`UA_forgotten`) and of the earlier ones (`UA_earlier`): forgotten data must
stay forgotten.

With K = 1 the one request is the one-shot run: the same split, mask and key (fold_in(rng, 0)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from salun_jax.data.splits import Split
from salun_jax.evaluation.classification import (
    evaluate_unlearning,
    make_predict_fn,
    model_accuracy,
)
from salun_jax.saliency import mask_stats, salun_mask
from salun_jax.step import TrainState
from salun_jax.types import PyTree
from salun_jax.unlearn import MASKED_METHODS, get_method
from salun_jax.unlearn.common import UnlearnTask


class SequentialOutput(NamedTuple):
    """The model after the last request, the metrics after every request (one dict each) and the
    mask of every request (None for unmasked methods)."""

    state: TrainState
    requests: list[dict[str, Any]]
    masks: list[PyTree | None]


def request_splits(split: Split, num_requests: int) -> list[Split]:
    """The K requests' splits: forget = chunk r of `split.forget`, retain = `split.retain` then
    the later chunks; train, val, test and the description unchanged (K = 1 gives `split`'s
    arrays)."""
    if not 1 <= num_requests <= len(split.forget):
        raise ValueError(
            f"num_requests must be in [1, {len(split.forget)}] (the forget set's size), "
            f"got {num_requests}"
        )
    chunks = np.array_split(np.asarray(split.forget), num_requests)
    return [
        dataclasses.replace(
            split, forget=chunk, retain=np.concatenate([split.retain, *chunks[r + 1 :]])
        )
        for r, chunk in enumerate(chunks)
    ]


def request_key(rng: jax.Array, request: int) -> jax.Array:
    """Request r's key: fold_in(rng, r)."""
    return jax.random.fold_in(rng, request)


def sequential_unlearn(
    method: str,
    state: TrainState,
    task: UnlearnTask,
    config,
    num_requests: int,
    rng: jax.Array,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    mask_fraction: float = 0.5,
    evaluation: dict | None = None,
) -> SequentialOutput:
    """Unlearns `task.forget` as `num_requests` requests in order (module docstring).

    Args:
      method: a classification method's name (Retrain takes a `TrainConfig` as `config`).
      state: the original model.
      task: the whole forget set in `task.split.forget`.
      config: the method's config, the same for every request.
      num_requests: K.
      rng: request r runs with `request_key(rng, r)`.
      test_images, test_labels: the test arrays (`task.split.test` indexes them).
      mask_fraction: SalUn's mask fraction (each request's mask: `salun_mask` with the run's
        batch size and augmentation, at the current model, on the request's forget set).
      evaluation: options for `evaluate_unlearning` (e.g. `shadow_seed`).

    Returns:
      A `SequentialOutput`; request r's metrics: UA, RA, TA, MIA (on request r's split),
      `UA_forgotten` (on the forget data of requests 0..r), `UA_earlier` (requests 0..r-1; None
      for the first), `num_forget`, `run_time_s` and `mask_fraction` (masked methods).
    """
    splits = request_splits(task.split, num_requests)
    requests, masks = [], []
    for r, split in enumerate(splits):
        request_task = dataclasses.replace(task, split=split)
        mask = None
        if method in MASKED_METHODS:
            mask = salun_mask(state, request_task, mask_fraction, config=config)
        output = get_method(method)(
            state, request_task, config, request_key(rng, r), mask=mask, progress=False
        )
        state = output.state
        predict_fn = make_predict_fn(state.apply_fn)
        variables = jax.device_get(state.variables)
        metrics = evaluate_unlearning(
            predict_fn,
            variables,
            task.images,
            task.labels,
            test_images,
            test_labels,
            split,
            **(evaluation or {}),
        )
        metrics = {k: metrics[k] for k in ("UA", "RA", "TA", "MIA")}
        metrics["UA_forgotten"] = _unlearning_accuracy(predict_fn, variables, task, splits[: r + 1])
        metrics["UA_earlier"] = (
            _unlearning_accuracy(predict_fn, variables, task, splits[:r]) if r else None
        )
        metrics.update(request=r, num_forget=int(len(split.forget)), run_time_s=output.run_seconds)
        if mask is not None:
            metrics["mask_fraction"] = mask_stats(mask)["fraction"]
        requests.append(metrics)
        masks.append(mask)
    return SequentialOutput(state, requests, masks)


def _unlearning_accuracy(
    predict_fn, variables, task: UnlearnTask, splits: Sequence[Split]
) -> float:
    """100 - accuracy on the forget data of `splits` together."""
    indices = np.concatenate([s.forget for s in splits])
    return 100.0 - model_accuracy(predict_fn, variables, task.images[indices], task.labels[indices])
