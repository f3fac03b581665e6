"""Unlearning methods in one registry, one signature:
`fn(state, task, config, rng, mask=None, **run_options) -> UnlearnOutput`.

`METHODS[kind][name]`, kind "classification" (an `UnlearnTask`, `UnlearnConfig`; Retrain takes a
`TrainConfig`), "diffusion" (a `DiffusionTask`, `DiffusionUnlearnConfig`; Retrain takes a
`DiffusionTrainConfig`) or "sd" (text-to-image: an `SDTask`, `SDUnlearnConfig`). `run_options`
(workdir, checkpoint_every, progress) go to the loop.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn.boundary import boundary_expanding, boundary_shrink
from salun_jax.unlearn.common import MethodSpec, UnlearnConfig, UnlearnOutput, UnlearnTask
from salun_jax.unlearn.diffusion import (
    DiffusionTask,
    DiffusionUnlearnConfig,
    ddpm_esd,
    ddpm_gradient_ascent,
    ddpm_random_label,
    ddpm_retrain,
    ddpm_salun,
)
from salun_jax.unlearn.finetune import fine_tune, gradient_ascent, l1_sparse
from salun_jax.unlearn.influence import influence_unlearning
from salun_jax.unlearn.neggrad import neggrad_plus
from salun_jax.unlearn.relabel import random_label, salun, salun_soft
from salun_jax.unlearn.scrub import scrub
from salun_jax.unlearn.sd import (
    SDTask,
    SDUnlearnConfig,
    sd_esd,
    sd_fmn,
    sd_random_label,
    sd_salun,
)
from salun_jax.unlearn.ssd import selective_synaptic_dampening


def retrain(
    state, task: UnlearnTask, config: TrainConfig, rng=None, mask=None, **run_options
) -> UnlearnOutput:
    """Retrain: the original recipe from scratch on D_r (init and order from `config.seed`)."""
    del state, rng
    if mask is not None:
        raise ValueError("Retrain does not take a mask")
    out = train_classifier(
        task.images, task.labels, task.retain, task.model, config, desc="Retrain", **run_options
    )
    return UnlearnOutput(
        out.state, out.compile_seconds, out.run_seconds, out.history, code=out.code
    )


_logger = logging.getLogger(__name__)

METHODS: dict[str, dict[str, Callable[..., UnlearnOutput]]] = {
    "classification": {
        "Retrain": retrain,
        "FT": fine_tune,
        "GA": gradient_ascent,
        "RL": random_label,
        "IU": influence_unlearning,
        "l1-sparse": l1_sparse,
        "BS": boundary_shrink,
        "BE": boundary_expanding,
        "SalUn": salun,
        "SalUn-soft": salun_soft,
        "NegGrad+": neggrad_plus,
        "SCRUB": scrub,
        "SSD": selective_synaptic_dampening,
    },
    "diffusion": {
        "Retrain": ddpm_retrain,
        "SalUn": ddpm_salun,
        "RL": ddpm_random_label,
        "GA": ddpm_gradient_ascent,
        "ESD": ddpm_esd,
    },
    "sd": {
        "SalUn": sd_salun,
        "RL": sd_random_label,
        "ESD": sd_esd,
        "FMN": sd_fmn,
    },
}


# The SGD methods: each declared once by a `MethodSpec` (the function's `spec`), which the single
# run and the population (`salun_jax.population`) both run. Retrain trains; IU is one-shot.
def sgd_methods() -> tuple[str, ...]:
    """The registered classification methods declared by a `MethodSpec`, methods registered
    later included."""
    return tuple(n for n, fn in METHODS["classification"].items() if hasattr(fn, "spec"))


SGD_METHODS = sgd_methods()  # at import
MASKED_METHODS = ("SalUn",)
# The original code's `--unlearn` names (Classification/unlearn/) and the method each is here.
# SalUn is upstream's RL run with `--mask_path`: `unlearn("RL", ..., mask=m)` runs SalUn.
UPSTREAM_NAMES = {
    "retrain": "Retrain",
    "wfisher": "IU",
    "FT_prune": "l1-sparse",
    "boundary_shrink": "BS",
    "boundary_expanding": "BE",
    "RL_proximal": "SalUn-soft",
}


def method_name(name: str, kind: str = "classification", mask=None) -> str:
    """The registry's name of `name`: itself, or the method an upstream name (`UPSTREAM_NAMES`)
    maps to, logged once per call; "RL" with a mask is SalUn (RL restricted to the salient
    weights)."""
    if kind == "classification" and name in UPSTREAM_NAMES:
        _logger.info("upstream method name %r is %r here", name, UPSTREAM_NAMES[name])
        name = UPSTREAM_NAMES[name]
    if kind == "classification" and name == "RL" and mask is not None:
        _logger.info("RL with a saliency mask is SalUn: running SalUn")
        name = "SalUn"
    return name


def get_method(name: str, kind: str = "classification") -> Callable[..., UnlearnOutput]:
    """The method `name` of `kind` (upstream's names are aliases: `method_name`).

    Raises:
      ValueError: an unknown kind or name, listing the known ones.
    """
    if kind not in METHODS:
        raise ValueError(f"unknown kind of task {kind!r}; known: {', '.join(METHODS)}")
    name = method_name(name, kind)
    if name not in METHODS[kind]:
        raise ValueError(
            f"unknown {kind} unlearning method {name!r}; known: {', '.join(METHODS[kind])}"
            + (f" (and upstream's {', '.join(UPSTREAM_NAMES)})" if kind == "classification" else "")
        )
    return METHODS[kind][name]


def method_spec(name: str, task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """The declaration of SGD classification method `name` (`SGD_METHODS`) for this task and
    config: its loss, phases, mask rule, `extra` values and hooks.

    Raises:
      ValueError: an unknown name, or a method that is not SGD (Retrain, IU).
    """
    method = get_method(name)
    if not hasattr(method, "spec"):
        raise ValueError(
            f"{method_name(name)} is not an SGD unlearning method; these are: "
            + ", ".join(sgd_methods())
        )
    return method.spec(task, config)


def method_key(seed: int, method: str):
    """The random key of `method` for split seed `seed`, derived from the method's name (not its
    position in a list): a result never depends on which other methods ran, or in what order.
    The pipelines and `unlearn` (by default) both use it."""
    import jax

    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(method.encode()) & 0x7FFFFFFF)


def unlearn(
    name: str, state, task: UnlearnTask, config=None, rng=None, mask=None, **run_options
) -> UnlearnOutput:
    """Runs method `name` (its kind from the task's type) with `config` (default: the kind's
    default unlearning config; Retrain needs its training config) and `rng` (default:
    `method_key(seed, name)` with the seed of the task's split, as the pipeline does)."""

    if isinstance(task, SDTask):
        kind = "sd"
    elif isinstance(task, DiffusionTask):
        kind = "diffusion"
    else:
        kind = "classification"
    name = method_name(name, kind, mask)
    method = get_method(name, kind)
    if config is None:
        if name == "Retrain":
            raise ValueError(
                "Retrain needs its training config (a TrainConfig or DiffusionTrainConfig)"
            )
        config = {
            "classification": UnlearnConfig,
            "diffusion": DiffusionUnlearnConfig,
            "sd": SDUnlearnConfig,
        }[kind]()
    if rng is None:
        split = getattr(task, "split", None)
        rng = method_key(int((split.description if split else {}).get("seed", 0)), name)
    return method(state, task, config, rng, mask=mask, **run_options)


__all__ = [
    "MASKED_METHODS",
    "METHODS",
    "MethodSpec",
    "SGD_METHODS",
    "DiffusionTask",
    "DiffusionUnlearnConfig",
    "SDTask",
    "SDUnlearnConfig",
    "UnlearnConfig",
    "UnlearnOutput",
    "UnlearnTask",
    "UPSTREAM_NAMES",
    "get_method",
    "method_key",
    "method_name",
    "method_spec",
    "sgd_methods",
    "retrain",
    "unlearn",
]
