"""SCRUB (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023): the student (the
model being unlearned) moves away from the frozen teacher (the original model) on the forget set
and stays close to it on the retain set.

Each of the first `scrub_max_epochs` epochs runs max-steps over the forget batches, then every
epoch runs min-steps over the retain batches, with one SGD optimizer, as the reference code's
`train_distill(..., "maximize" / "minimize")`:

  max-step (forget): -KL(teacher || student)
  min-step (retain): gamma * CE + alpha * KL(teacher || student)

with KL at temperature T scaled by T^2 (the reference `DistillKL`), the teacher in inference mode
and the student in train mode. Values (the teacher's variables, alpha, gamma, T) live in
`TrainState.extra`, so seeds and populations share one compiled step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.losses import prepare_images, softmax_cross_entropy, train_mode_logits
from salun_jax.unlearn.common import MethodSpec, UnlearnConfig, UnlearnTask, sgd_method


def distill_kl(student_logits, teacher_logits, temperature):
    """Per-example KL(p_teacher || p_student) at temperature T, times T^2 (`DistillKL`)."""
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    return kl * temperature**2


@functools.cache
def _scrub_loss(crop_padding: int, flip: bool):
    """Per example: -KL on forget examples, gamma * CE + alpha * KL on retain ones (each batch
    holds one kind: the phases are separate); BatchNorm as `losses.train_mode_logits`."""

    def loss_fn(params, batch, rng, state):
        augment_rng, _ = jax.random.split(rng)
        images = prepare_images(augment_rng, batch["image"], crop_padding, flip)
        labels = batch["label"]
        logits, batch_stats = train_mode_logits(params, images, batch, state)
        values = state.extra
        teacher = jax.lax.stop_gradient(state.apply_fn(values["teacher"], images, train=False))
        kl = distill_kl(logits, teacher, values["scrub_temperature"])
        retain_loss = values["scrub_gamma"] * softmax_cross_entropy(logits, labels)
        retain_loss = retain_loss + values["scrub_alpha"] * kl
        aux = {
            "metrics": {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)},
            "batch_stats": batch_stats,
        }
        return jnp.where(batch["forget"], -kl, retain_loss), aux

    return loss_fn


def scrub_values(variables, config: UnlearnConfig) -> dict:
    """SCRUB's `extra`: the frozen teacher's variables and the loss weights."""
    return {
        "teacher": variables,
        "scrub_alpha": np.float32(config.scrub_alpha),
        "scrub_gamma": np.float32(config.scrub_gamma),
        "scrub_temperature": np.float32(config.scrub_temperature),
    }


def scrub_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """SCRUB: max-steps on D_f (the first `scrub_max_epochs` epochs), then min-steps on D_r, every
    epoch; the teacher is the model the run starts from."""
    return MethodSpec(
        "SCRUB",
        _scrub_loss(config.crop_padding, config.flip),
        (task.forget, task.retain),
        extra_fn=lambda state: scrub_values(state.variables, config),
        phase_epochs=(config.scrub_max_epochs, None),
    )


scrub = sgd_method(scrub_spec)
