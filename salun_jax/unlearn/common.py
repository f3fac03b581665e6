"""What every unlearning method shares: the task, the config, the output and the SGD runner.

References: upstream `Classification/unlearn/impl.py` (`_iterative_unlearn_impl`: a fresh SGD
optimizer per run, epochs over the method's data, multi-step LR).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from salun_jax import loop, optim, validation
from salun_jax.data.batches import epoch_batches, warn_if_padded
from salun_jax.data.splits import Split, check_split_fits
from salun_jax.saliency import mask_stats
from salun_jax.step import TrainState, make_step
from salun_jax.types import BatchesFn, LossFn, PyTree


@dataclasses.dataclass(frozen=True)
class UnlearnTask:
    """The data an unlearning method sees. Images/labels are the data set's whole train arrays;
    `split` says which indices are forget and retain."""

    model: nn.Module
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    split: Split
    num_classes: int

    def __post_init__(self):
        """Checks the data before any work (see `salun_jax.validation`): images uint8
        [N, H, W, C] (0..255, as `load_dataset` gives them), labels integer class ids in
        [0, num_classes) one per image, and a split that indexes these arrays (and, if it
        records them, was made for a train set of this size)."""
        validation.check_int("UnlearnTask.num_classes", self.num_classes, 1)
        n = validation.check_images_uint8("UnlearnTask.images", self.images)[0]
        validation.check_labels("UnlearnTask.labels", self.labels, self.num_classes, n)
        model_classes = getattr(self.model, "num_classes", None)
        if isinstance(model_classes, int) and model_classes < self.num_classes:
            raise ValueError(
                f"UnlearnTask.num_classes is {self.num_classes}, but the model has only "
                f"{model_classes} outputs"
            )
        if not isinstance(self.split, Split):
            raise ValueError(
                f"UnlearnTask.split must be a Split (make_split), got {type(self.split).__name__}"
            )
        check_split_fits(self.split, self.labels)

    @property
    def forget(self) -> np.ndarray:
        return self.split.forget

    @property
    def retain(self) -> np.ndarray:
        return self.split.retain

    def data(self) -> dict[str, np.ndarray]:
        """The loop's data: images, labels and a per-example `forget` flag."""
        forget_flag = np.zeros(len(self.labels), bool)
        forget_flag[self.forget] = True
        return {"image": self.images, "label": self.labels, "forget": forget_flag}


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Hyper-parameters of one classification unlearning run; defaults are upstream's
    (`Classification/arg_parser.py`)."""

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
    update_batch_stats: bool = True  # BN running statistics update in train mode (upstream)
    # RL/SalUn: "concat" (forget and retain mixed in shuffled batches: the paper-time code, HEAD's
    # CIFAR-100/TinyImageNet branch) or "sequential" (forget batches then retain batches: HEAD's
    # CIFAR-10/SVHN branch; class-wise it under-forgets, since train-mode BatchNorm normalises
    # single-class forget batches by their own statistics).
    rl_variant: str = "concat"
    rl_exclude_true_label: bool = False  # paper Eq. 5 says y' != y; upstream draws uniformly
    l1_coefficient: float = 0.0  # l1-sparse: alpha of the decaying l1 term
    no_l1_epochs: int = 0
    iu_step_size: float = 0.0  # IU: theta += step * H^-1 (grad L_f - grad L_r)
    boundary_bound: float = 0.1  # boundary shrink: FGSM step size on [0, 1] images
    remove_shadow_logit: bool = True  # boundary expanding: drop the K+1-th logit afterwards
    soft_mask_ratio: float = 0.5  # SalUn-soft: share of coordinates reset per step at the start
    woodfisher_samples: int = 1000  # IU: retain samples in the WoodFisher recursion (+2 upstream)
    neggrad_beta: float = 0.999  # NegGrad+: beta * CE(D_r) - (1 - beta) * CE(D_f)
    ssd_alpha: float = 10.0  # SSD: select weights whose forget importance > alpha * train's
    ssd_lambda: float = 1.0  # SSD: dampen them by min(lambda * I_D / I_f, 1)
    # SCRUB: max-steps (-KL to the teacher) on D_f in the first scrub_max_epochs epochs, then
    # min-steps (gamma * CE + alpha * KL) on D_r; KL at temperature T (the reference defaults)
    scrub_max_epochs: int = 2
    scrub_alpha: float = 0.001
    scrub_gamma: float = 0.99
    scrub_temperature: float = 4.0
    iu_augment: bool = True  # IU: upstream keeps the train transform on while taking gradients

    def __post_init__(self):
        if self.mask_mode not in optim.MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; known: hard, paper")
        if self.rl_variant not in ("sequential", "concat"):
            raise ValueError(f"unknown rl_variant {self.rl_variant!r}; known: sequential, concat")
        # learning_rate 0 is allowed: IU is one-shot (no SGD); its configs may say so.
        validation.check_sgd_config(self, zero_learning_rate_ok=True)
        for name in ("update_batch_stats", "rl_exclude_true_label", "remove_shadow_logit"):
            validation.check_bool(f"UnlearnConfig.{name}", getattr(self, name))
        validation.check_bool("UnlearnConfig.iu_augment", self.iu_augment)
        validation.check_real("UnlearnConfig.l1_coefficient", self.l1_coefficient, 0.0)
        validation.check_int("UnlearnConfig.no_l1_epochs", self.no_l1_epochs, 0)
        validation.check_real("UnlearnConfig.iu_step_size", self.iu_step_size)
        validation.check_real("UnlearnConfig.boundary_bound", self.boundary_bound, 0.0)
        validation.check_real("UnlearnConfig.soft_mask_ratio", self.soft_mask_ratio, 0.0, 1.0)
        validation.check_real("UnlearnConfig.neggrad_beta", self.neggrad_beta, 0.0, 1.0)
        validation.check_real("UnlearnConfig.ssd_alpha", self.ssd_alpha, 0.0)
        validation.check_real("UnlearnConfig.ssd_lambda", self.ssd_lambda, 0.0)
        validation.check_int("UnlearnConfig.scrub_max_epochs", self.scrub_max_epochs, 0)
        validation.check_real("UnlearnConfig.scrub_alpha", self.scrub_alpha, 0.0)
        validation.check_real("UnlearnConfig.scrub_gamma", self.scrub_gamma, 0.0)
        validation.check_real(
            "UnlearnConfig.scrub_temperature", self.scrub_temperature, 0.0, low_open=True
        )
        validation.check_int("UnlearnConfig.woodfisher_samples", self.woodfisher_samples, 0)


class UnlearnOutput(NamedTuple):
    """The unlearned state; seconds of compilation and of the run proper; per-epoch records;
    `model` if the method changed the architecture (boundary expanding without removing the
    shadow logit). The one output type of every method (classification and diffusion)."""

    state: TrainState
    compile_seconds: float
    run_seconds: float
    history: list
    model: nn.Module | None = None
    code: str = ""  # the code version(s) that made it (see `loop.RunOutput.code`)


def with_mask_sparsity(history: list[dict], mask: PyTree | None) -> list[dict]:
    """The records with `mask_sparsity` (the share of weights the mask freezes; 0 without one)."""
    sparsity = 0.0 if mask is None else 1.0 - mask_stats(mask)["fraction"]
    return [{**record, "mask_sparsity": sparsity} for record in history]


def steps_per_epoch(phases: Sequence[np.ndarray], batch_size: int) -> int:
    return sum(math.ceil(len(ix) / batch_size) for ix in phases if len(ix))


def phase_batches(
    phases: Sequence[np.ndarray], batch_size: int, phase_epochs: Sequence[int | None] = ()
) -> BatchesFn:
    """The loop's batches of an unlearning run: each epoch runs the index `phases` in order
    (e.g. forget batches, then retain batches), each shuffled and cut into padded batches for
    all devices of all processes (each takes its rows, `loop.local_rows`). Phase i runs in the
    first `phase_epochs[i]` epochs only (None or absent: in every epoch)."""
    num_devices = jax.device_count()
    for ix in phases:
        warn_if_padded(len(ix), batch_size)
    limits = [*phase_epochs, *[None] * (len(phases) - len(phase_epochs))]
    phases = [(ix, limit) for ix, limit in zip(phases, limits, strict=True) if len(ix)]

    def batches_fn(epoch, np_rng):
        active = [ix for ix, limit in phases if limit is None or epoch < limit]
        batches = [epoch_batches(ix, batch_size, np_rng, num_devices) for ix in active]
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

    return batches_fn


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """An SGD unlearning method, declared once: its loss, the index phases of an epoch, whether
    it takes a mask, the values it carries in `TrainState.extra` and its hooks. The single run
    (`run_unlearning_sgd`) and the population (`salun_jax.population.population_unlearn`) both
    run exactly this, with the one optimizer (`unlearning_optimizer`)."""

    name: str
    loss_fn: LossFn
    phases: tuple[np.ndarray, ...]  # each epoch runs these in order, each shuffled
    mask: str = "optional"  # "optional", "required" or "forbidden"
    mask_reason: str = ""  # why "required" or "forbidden", for the error message
    # state -> the method's values in `TrainState.extra` at the start (None: no values). Values
    # in the state, not in closures: seeds, rates and members share one compiled step.
    extra_fn: Callable[[TrainState], dict] | None = None
    post_update_fn: Callable[[TrainState], TrainState] | None = None
    epoch_start_fn: Callable[[TrainState, int], TrainState] | None = None
    # Phase i runs in the first phase_epochs[i] epochs only (None or absent: every epoch), e.g.
    # SCRUB's max-steps on the forget set. Such epochs differ in length.
    phase_epochs: tuple[int | None, ...] = ()

    def __post_init__(self):
        if len(self.phase_epochs) > len(self.phases):
            raise ValueError(
                f"MethodSpec: {len(self.phase_epochs)} phase_epochs for {len(self.phases)} phases"
            )
        if self.mask not in ("optional", "required", "forbidden"):
            raise ValueError(f"MethodSpec.mask: optional, required or forbidden, not {self.mask}")

    def check_mask(self, mask: PyTree | None) -> None:
        if self.mask == "required" and mask is None:
            raise ValueError(f"{self.name} needs a saliency mask ({self.mask_reason})")
        if self.mask == "forbidden" and mask is not None:
            raise ValueError(f"{self.name} does not take a mask ({self.mask_reason})")

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps of the first epoch (every epoch's, unless `phase_epochs` drops phases)."""
        return steps_per_epoch(self.phases, batch_size)

    def batches_fn(self, batch_size: int) -> BatchesFn:
        return phase_batches(self.phases, batch_size, self.phase_epochs)

    def check_config(self, config: UnlearnConfig) -> None:
        """Epochs of different lengths would misplace a step-counted LR milestone: refused."""
        dropped = any(e is not None and e < config.epochs for e in self.phase_epochs)
        if dropped and any(m < config.epochs for m in config.milestones):
            raise ValueError(
                f"{self.name}: its epochs differ in length, so LR milestones inside the run "
                f"({config.milestones} within {config.epochs} epochs) are not supported"
            )


def unlearning_optimizer(
    config: UnlearnConfig, steps: int, mask: PyTree | None, learning_rate: float | None = None
):
    """The optimizer of every SGD unlearning run: multi-step SGD, optionally masked, with every
    value (learning rate, schedule, momentum, weight decay, mask) in its state, so methods and
    seeds that differ only in them share one compiled step. `learning_rate` overrides the
    config's (a population member's own)."""
    return optim.multistep_sgd(
        config.learning_rate if learning_rate is None else learning_rate,
        config.milestones,
        config.gamma,
        steps,
        config.momentum,
        config.weight_decay,
        mask,
        config.mask_mode,
    )


def run_unlearning_sgd(
    state: TrainState,
    task: UnlearnTask,
    config: UnlearnConfig,
    rng: jax.Array,
    spec: MethodSpec,
    *,
    mask: PyTree | None = None,
    order_seed: int | None = None,
    **run_options,
) -> UnlearnOutput:
    """`config.epochs` epochs of the method `spec` from `state`'s weights with a fresh
    (optionally masked) optimizer; each epoch runs the spec's index phases in order (e.g. forget
    batches, then retain batches), each shuffled and cut into padded batches. The batch order's
    seed is drawn from `rng` unless `order_seed` is given (to match a population member,
    `salun_jax.population`). `run_options` (workdir, checkpoint_every, progress) go to
    `loop.run`. The returned state carries no `extra`."""
    spec.check_mask(mask)
    spec.check_config(config)
    state = state.with_optimizer(
        unlearning_optimizer(config, spec.steps_per_epoch(config.batch_size), mask)
    )
    if spec.extra_fn is not None:
        state = state.replace(extra=spec.extra_fn(state))
    step = make_step(
        spec.loss_fn,
        update_batch_stats=config.update_batch_stats,
        post_update_fn=spec.post_update_fn,
    )
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1)) if order_seed is None else order_seed
    output = run_unlearning(
        state,
        step,
        task.data(),
        spec.batches_fn(config.batch_size),
        num_epochs=config.epochs,
        key=rng,
        seed=seed,
        mask=mask,
        epoch_start_fn=spec.epoch_start_fn,
        desc=spec.name,
        **run_options,
    )
    return output._replace(state=output.state.replace(extra=None))


def sgd_method(spec_fn: Callable[[UnlearnTask, UnlearnConfig], MethodSpec]) -> Callable:
    """The registry's function of the SGD method that `spec_fn(task, config)` declares:
    `fn(state, task, config, rng, mask=None, **run_options) -> UnlearnOutput`, with `spec_fn`
    as its `spec` attribute (where the population reads it)."""

    def method(state, task, config, rng, mask=None, **run_options) -> UnlearnOutput:
        return run_unlearning_sgd(
            state, task, config, rng, spec_fn(task, config), mask=mask, **run_options
        )

    method.__name__ = method.__qualname__ = spec_fn.__name__.removesuffix("_spec")
    method.__doc__ = spec_fn.__doc__
    method.spec = spec_fn
    return method


def run_unlearning(state, step, data, batches_fn, *, mask=None, **loop_options) -> UnlearnOutput:
    """`loop.run` of an unlearning step, as an `UnlearnOutput` whose records carry the mask's
    sparsity."""
    out = loop.run(state, step, data, batches_fn, **loop_options)
    return UnlearnOutput(
        out.state,
        out.compile_seconds,
        out.run_seconds,
        with_mask_sparsity(out.history, mask),
        code=out.code,
    )
