"""What every unlearning method shares: the task, the config, the SGD epoch runner and timing."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from salun_jax import optim
from salun_jax.data.splits import Split
from salun_jax.train import (
    AXIS,
    TrainState,
    _reduce_epoch_metrics,
    epoch_batches,
    parallel_step,
    replicate,
    unreplicate,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class UnlearnTask:
    """The data an unlearning method sees. Images/labels are the data set's whole train arrays;
    `split` says which indices are forget and retain."""

    model: nn.Module
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    split: Split
    num_classes: int

    @property
    def forget(self) -> np.ndarray:
        return self.split.forget

    @property
    def retain(self) -> np.ndarray:
        return self.split.retain


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Hyper-parameters of one unlearning run. Defaults are upstream's (reference-salun.md §2)."""

    epochs: int = 10
    learning_rate: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (91, 136)  # never reached in 10 epochs: constant LR
    gamma: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    mask_mode: str = "hard"  # "hard" (PR #33 fix) or "paper" (gradient-only masking)
    batch_stats: str = "update"  # BN running statistics: "update" (upstream) or "freeze"
    rl_variant: str = "sequential"  # RL/SalUn: "sequential" (HEAD) or "concat" (paper time)
    rl_exclude_true_label: bool = False  # paper Eq. 5 says y' != y; upstream draws uniformly
    alpha: float = 0.0  # l1-sparse coefficient / IU step size
    no_l1_epochs: int = 0
    boundary_bound: float = 0.1  # boundary shrink: FGSM step size on [0, 1] images
    remove_shadow_logit: bool = True  # boundary expanding: drop the K+1-th logit afterwards
    soft_mask_ratio: float = 0.5  # SalUn-soft: share of coordinates reset per step at the start
    woodfisher_samples: int = 1000  # IU: retain samples in the WoodFisher recursion (+2 upstream)
    iu_augment: bool = True  # IU: upstream keeps the train transform on while taking gradients

    def __post_init__(self):
        if self.mask_mode not in optim.MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; known: hard, paper")
        if self.batch_stats not in ("update", "freeze"):
            raise ValueError(f"unknown batch_stats policy {self.batch_stats!r}; known: update, "
                             "freeze")
        if self.rl_variant not in ("sequential", "concat"):
            raise ValueError(f"unknown rl_variant {self.rl_variant!r}; known: sequential, concat")
        if self.epochs < 0 or self.batch_size <= 0:
            raise ValueError("epochs must be >= 0 and batch_size > 0")


class UnlearnOutput(NamedTuple):
    """The unlearned state; `model` if the method changed the architecture (boundary expanding
    without removing the shadow logit); seconds of compilation and of the run proper."""

    state: TrainState
    compile_seconds: float
    run_seconds: float
    history: list
    model: nn.Module | None = None


def make_optimizer(config: UnlearnConfig, steps_per_epoch: int, mask: PyTree | None = None):
    schedule = optim.multistep_schedule(config.learning_rate, config.milestones, config.gamma,
                                        steps_per_epoch)
    return optim.make_sgd(schedule, config.momentum, config.weight_decay, mask, config.mask_mode)


Phase = tuple[np.ndarray, bool]  # (indices, is_forget phase)


def run_sgd(
    state: TrainState,
    task: UnlearnTask,
    train_step: Callable,
    phases_fn: Callable[[int, np.random.Generator], Sequence[np.ndarray]],
    config: UnlearnConfig,
    rng: jax.Array,
    epoch_start_fn: Callable[[TrainState, int], TrainState] | None = None,
    desc: str = "unlearn",
    progress: bool = True,
) -> tuple[TrainState, float, float, list]:
    """Runs `config.epochs` epochs of a pmapped step; each epoch is a sequence of index phases
    (e.g. forget batches then retain batches), each shuffled and cut into padded batches.

    The data dict carries a `forget` flag per example, so steps can relabel forget samples.
    Compilation is done ahead of time and reported apart from the run time.

    Returns:
      (state, compile seconds, run seconds, per-epoch metrics).
    """
    forget_flag = np.zeros(len(task.labels), bool)
    forget_flag[task.forget] = True
    data = replicate({"image": task.images, "label": task.labels, "forget": forget_flag})
    num_devices = jax.local_device_count()
    p_step = parallel_step(train_step)
    state_r = replicate(state)
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    history: list[dict] = []
    compiled, compile_seconds = None, 0.0
    run_seconds = 0.0
    for epoch in range(config.epochs):
        np_rng = np.random.default_rng([seed, epoch])
        batches = [epoch_batches(ix, config.batch_size, np_rng, num_devices)
                   for ix in phases_fn(epoch, np_rng) if len(ix)]
        indices = np.concatenate([b[0] for b in batches])
        weights = np.concatenate([b[1] for b in batches])
        epoch_key = jax.random.fold_in(rng, epoch)
        if compiled is None:
            start = time.perf_counter()
            compiled = p_step.lower(state_r, data, indices[0], weights[0], epoch_key).compile()
            compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if epoch_start_fn is not None:
            state_r = epoch_start_fn(state_r, epoch)
        step_metrics = []
        iterator = range(indices.shape[0])
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False,
                            mininterval=2.0)
        for s in iterator:
            state_r, metrics = compiled(state_r, data, indices[s], weights[s], epoch_key)
            step_metrics.append(metrics)
        metrics = _reduce_epoch_metrics(step_metrics)  # the one host sync of the epoch
        run_seconds += time.perf_counter() - start
        metrics.pop("finite")
        history.append({"phase": desc, "epoch": epoch + 1, **metrics})
    return unreplicate(state_r), compile_seconds, run_seconds, history


def steps_per_epoch(sizes: Sequence[int], batch_size: int) -> int:
    return sum(math.ceil(n / batch_size) for n in sizes if n)


def sgd_state(state: TrainState, config: UnlearnConfig, steps: int,
              mask: PyTree | None = None) -> TrainState:
    """The original weights with a fresh unlearning optimizer (a new one per run, as upstream)."""
    return state.with_optimizer(make_optimizer(config, steps, mask))


def step_kwargs(config: UnlearnConfig) -> dict:
    return dict(augment=config.crop_padding > 0 or config.flip, crop_padding=config.crop_padding,
                flip=config.flip, update_batch_stats=config.batch_stats == "update",
                axis_name=AXIS)
