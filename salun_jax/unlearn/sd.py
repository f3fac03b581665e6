"""Concept unlearning in a text-to-image (Stable Diffusion) UNet: SalUn-SD, RL-SD, ESD and FMN,
with the library's one signature `fn(state, task, config, rng, mask=None, **run_options) ->
UnlearnOutput`, the shared saliency mask, masked optimizer, step builder and loop.

  * SalUn-SD (`sd_salun`): MSE(eps(x_t, c_forget), stop_grad eps(x_t, c_pseudo)) + alpha * the
    ldm loss on retain images, on the salient UNet weights (`sd_saliency_scores` +
    `saliency.mask_from_scores`), Adam; RL-SD is the same on all weights.
  * ESD (`sd_esd`): eps(x_t, c) -> eps_0(x_t, "") - eta (eps_0(x_t, c) - eps_0(x_t, "")) from a
    frozen copy at x_t from the model's own partial DDIM chain; ESD-u ("noxattn", the ESD
    paper's choice for nudity and objects) or ESD-x ("xattn": the cross-attention layers).
  * FMN (`sd_fmn`): Forget-Me-Not's attention re-steering: minimise the norm of the
    cross-attention maps on the concept's tokens over the forget images (the whole UNet, or
    cross-attention only), AdamW; no textual inversion (the concept's own tokens are used).

Each step draws a fresh forget (and retain) batch from shuffled cyclic loaders; `faithful=True`
reuses the first unshuffled batch at every step, as the paper-time scripts did (upstream
`SD/train-scripts/random_label.py` and `nsfw_removal.py` before their 2026 fix:
`next(iter(loader))`; the object script drew its retain batch at random, the nudity script fixed
both: here both are fixed).

References:
  SalUn (Fan et al., ICLR 2024) Eq. 3, 7 and upstream `SD/train-scripts/{generate_mask,
  random_label,nsfw_removal}.py`; ESD (Gandikota et al., ICCV 2023) and its
  `train-scripts/train-esd.py`; FMN (Zhang et al., 2023) and its `src/train_attn.py`,
  `configs/attn.yaml`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salun_jax import optim, saliency
from salun_jax.data.batches import cyclic_batches, gather_batches
from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.diffusion.sd_sampling import make_grid
from salun_jax.losses import (
    text_attention_loss,
    text_esd_loss,
    text_forget_loss,
    text_guided_mask_loss,
)
from salun_jax.step import TrainState, make_step
from salun_jax.train_diffusion import uncommitted
from salun_jax.types import PyTree
from salun_jax.unlearn.common import UnlearnOutput, run_unlearning

TRAINABLE_SETS = ("full", "xattn", "xattn-kv", "noxattn")


@dataclasses.dataclass(frozen=True)
class SDTask:
    """What a text-to-image unlearning method sees.

    Attributes:
      unet: the `UNet2DConditionModel`.
      schedule: its training noise schedule (`scaled_linear_schedule()` for SD).
      contexts: [P, M, D] text-encoder states of the prompt table; row 0 is "" (unconditional).
      token_ids: [P, M] the table's token ids (FMN finds the concept's positions in them).
      forget_images: [Nf, H, W, C] uint8 pixels (a pixel-space UNet) or float32 latents (SD:
        the VAE posterior mean times the scale factor).
      forget_prompt: [Nf] rows of the table: each forget image's prompt (the concept's).
      pseudo_prompt: [Nf] rows: SalUn's pseudo prompt for it (another class, or "a photo of a
        person wearing clothes").
      retain_images: [Nr, H, W, C] like forget_images.
      retain_prompt: [Nr] rows.
      concept_token_ids: FMN: the ids of the concept's tokens (e.g. "nude", or a class name).
      eos_token_id: FMN's `use_pooler` also re-steers every position holding this id.
      forget_latent_std, retain_latent_std: optional [N, H, W, C] VAE posterior std (times the
        scale factor): SD's `get_input` samples the posterior at every call; None for pixels.
    """

    unet: nn.Module
    schedule: NoiseSchedule
    contexts: np.ndarray
    token_ids: np.ndarray
    forget_images: np.ndarray
    forget_prompt: np.ndarray
    pseudo_prompt: np.ndarray
    retain_images: np.ndarray
    retain_prompt: np.ndarray
    concept_token_ids: tuple[int, ...] = ()
    eos_token_id: int | None = None
    forget_latent_std: np.ndarray | None = None
    retain_latent_std: np.ndarray | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.forget_images.shape[1:])

    def data(self) -> dict[str, np.ndarray]:
        """The loop's data: forget rows first, then retain rows (`image`, `prompt`, `pseudo`,
        and `latent_std` when given)."""
        data = {
            "image": np.concatenate([self.forget_images, self.retain_images]),
            "prompt": np.concatenate([self.forget_prompt, self.retain_prompt]).astype(np.int32),
            "pseudo": np.concatenate([self.pseudo_prompt, self.retain_prompt]).astype(np.int32),
        }
        if self.forget_latent_std is not None:
            data["latent_std"] = np.concatenate([self.forget_latent_std, self.retain_latent_std])
        return data

    @property
    def forget(self) -> np.ndarray:
        return np.arange(len(self.forget_images))

    @property
    def retain(self) -> np.ndarray:
        return len(self.forget_images) + np.arange(len(self.retain_images))


@dataclasses.dataclass(frozen=True)
class SDUnlearnConfig:
    """Hyper-parameters of text-to-image unlearning (defaults: SalUn's SD scripts).

    Attributes:
      epochs: passes over the forget set (steps = epochs * ceil(Nf / batch_size)) unless
        `num_iterations` > 0 (upstream: 5 epochs for objects, 1 for nudity).
      num_iterations: optimizer steps, overriding `epochs` (ESD: 1000; FMN: 35).
      batch_size: forget (and retain) examples per step (upstream 8; ESD and FMN 1).
      learning_rate: 1e-5 (SalUn, ESD); FMN 2e-6.
      alpha: weight of SalUn's retain loss (0.1 default upstream; the objects README 0.5).
      grad_clip: global-norm clipping before the mask and Adam (None: off, as SalUn and ESD;
        FMN 1.0).
      weight_decay: decoupled (AdamW) weight decay (FMN 0.01).
      mask_mode: "hard" (non-salient weights bit-identical) or "paper".
      faithful: every step reuses the first unshuffled forget and retain batch (paper time).
      log_every: steps per history record (and per epoch of the loop).
      seed: batch order seed.
      negative_guidance: ESD's eta (1).
      esd_start_guidance: ESD's CFG scale s of the chain that makes x_t (3).
      esd_num_steps: ESD's DDIM grid (50).
      esd_train: ESD's trainable set: "noxattn" (ESD-u), "xattn" (ESD-x), "xattn-kv" (ESD-x
        strict: to_k/to_v of the cross-attention), "full".
      fmn_only_cross_attention: FMN trains the cross-attention layers only (FMN default: the
        whole UNet).
      fmn_use_pooler: FMN also re-steers every <|endoftext|> position (FMN default; with SD
        v1.x's padding by <|endoftext|> this includes all padding; FMN's `src/train_attn.py`).
    """

    epochs: int = 5
    num_iterations: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-5
    alpha: float = 0.1
    grad_clip: float | None = None
    weight_decay: float = 0.0
    mask_mode: str = "hard"
    faithful: bool = False
    log_every: int = 50
    seed: int = 0
    negative_guidance: float = 1.0
    esd_start_guidance: float = 3.0
    esd_num_steps: int = 50
    esd_train: str = "noxattn"
    fmn_only_cross_attention: bool = False
    fmn_use_pooler: bool = True

    def __post_init__(self):
        if self.mask_mode not in optim.MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; known: hard, paper")
        if self.esd_train not in TRAINABLE_SETS:
            raise ValueError(f"unknown esd_train {self.esd_train!r}; known: {TRAINABLE_SETS}")
        if self.batch_size < 1 or self.log_every < 1 or self.esd_num_steps < 1:
            raise ValueError("batch_size, log_every and esd_num_steps must be >= 1")
        if self.epochs < 1 and self.num_iterations < 1:
            raise ValueError("set epochs >= 1 or num_iterations >= 1")

    def num_steps(self, num_forget: int) -> int:
        if self.num_iterations > 0:
            return self.num_iterations
        return self.epochs * math.ceil(num_forget / self.batch_size)


def trainable_params(params: PyTree, which: str) -> PyTree:
    """A whole-leaf mask (Python bools) of the UNet weights a method trains.

    - "full": everything.
    - "xattn" (ESD-x): the cross-attention modules `attn2` (to_q/k/v/out).
    - "xattn-kv" (ESD-x strict): `attn2` to_k and to_v.
    - "noxattn" (ESD-u): everything except `attn2`, the time embedding and the output head
      (`conv_norm_out`, `conv_out`: ldm's `out.`), as the original `train-esd.py`.

    Raises:
      ValueError: an unknown set, or one that selects nothing.
    """
    if which not in TRAINABLE_SETS:
        raise ValueError(f"unknown trainable set {which!r}; known: {TRAINABLE_SETS}")

    def select(path, _):
        names = [str(p) for p in path]
        if which == "full":
            return True
        cross = "attn2" in names
        if which == "xattn":
            return cross
        if which == "xattn-kv":
            return cross and ("to_k" in names or "to_v" in names)
        return not (cross or names[0] in ("time_embedding", "conv_norm_out", "conv_out"))

    selection = flax.traverse_util.path_aware_map(select, flax.core.unfreeze(params))
    if not any(jax.tree.leaves(selection)):
        raise ValueError(f"the trainable set {which!r} selects no weights of this UNet")
    return selection


def trainable_fraction(selection: PyTree, params: PyTree) -> float:
    """Share of the weights a whole-leaf selection trains."""
    sizes = [np.size(p) for p in jax.tree.leaves(params)]
    chosen = [s for s, keep in zip(sizes, jax.tree.leaves(selection), strict=True) if keep]
    return float(sum(chosen) / max(sum(sizes), 1))


def concept_positions(
    token_ids: np.ndarray, concept_token_ids, eos_token_id: int | None, use_pooler: bool
) -> np.ndarray:
    """[P, M] bool: where each prompt holds one of the concept's tokens (and, with
    `use_pooler`, <|endoftext|>), as FMN's `concept_positions`."""
    token_ids = np.asarray(token_ids)
    positions = np.isin(token_ids, np.asarray(list(concept_token_ids), token_ids.dtype))
    if use_pooler and eos_token_id is not None:
        positions |= token_ids == eos_token_id
    return positions


def _check(task: SDTask, *, retain: bool) -> None:
    if len(task.forget_images) == 0:
        raise ValueError("the forget set is empty")
    if retain and len(task.retain_images) == 0:
        raise ValueError("this method needs retain images")


def sd_saliency_scores(
    params: PyTree, task: SDTask, *, batch_size: int = 8, guidance_scale: float = 7.5, seed: int = 0
) -> PyTree:
    """SalUn-SD saliency: |sum over forget batches of grad MSE(noise, (1 + w) eps(x_t, c) - w
    eps(x_t, ""))| per UNet weight (upstream SD `generate_mask.py`: w 7.5, the whole forget set
    once, unshuffled, no clipping). Batch i's noise and timesteps use fold_in(key(seed), i).

    Raises:
      ValueError: an empty forget set.
    """
    _check(task, retain=False)
    arrays = {"image": task.forget_images, "prompt": task.forget_prompt.astype(np.int32)}
    if task.forget_latent_std is not None:
        arrays["latent_std"] = task.forget_latent_std
    batches = gather_batches(arrays, task.forget, batch_size, rng=None)
    loss_fn = text_guided_mask_loss(
        task.unet.apply, task.schedule, jnp.asarray(task.contexts), guidance_scale
    )
    return saliency.gradient_saliency(loss_fn, uncommitted(params), batches, jax.random.key(seed))


def _run(
    state,
    task: SDTask,
    config: SDUnlearnConfig,
    rng: jax.Array,
    loss_fn,
    desc: str,
    *,
    mask: PyTree | None,
    retain: bool,
    extra: PyTree = None,
    record_mask: bool = True,
    **run_options,
) -> UnlearnOutput:
    _check(task, retain=retain)
    tx = optim.make_adam(
        config.learning_rate,
        clip_norm=config.grad_clip,
        mask=mask,
        mask_mode=config.mask_mode,
        weight_decay=config.weight_decay,
    )
    start = TrainState.create(
        apply_fn=task.unet.apply, params=uncommitted(state.params), tx=tx, extra=extra
    )
    num_devices = jax.device_count()  # all processes'; each takes its rows (`loop.local_rows`)
    b, every = config.batch_size, config.log_every
    if b % num_devices:
        raise ValueError(f"batch size {b} is not divisible by {num_devices} devices")
    n = config.num_steps(len(task.forget_images))
    index_rng = np.random.default_rng([config.seed, 1])
    sets = {"": task.forget, "retain": task.retain} if retain else {"": task.forget}
    if config.faithful:  # paper time: the first unshuffled batch, every step
        streams = {k: np.tile(np.resize(v, b), (n, 1)).astype(np.int32) for k, v in sets.items()}
    else:
        streams = {k: cyclic_batches(v, b, n, index_rng) for k, v in sets.items()}
    streams = {k: v.reshape(n, num_devices, b // num_devices) for k, v in streams.items()}
    weights = np.ones((n, num_devices, b // num_devices), np.float32)

    def batches_fn(epoch, np_rng):
        del np_rng  # drawn once, above
        chunk = slice(epoch * every, (epoch + 1) * every)
        return {k: v[chunk] for k, v in streams.items()}, weights[chunk]

    return run_unlearning(
        start,
        make_step(loss_fn),
        task.data(),
        batches_fn,
        num_epochs=math.ceil(n / every),
        key=rng,
        seed=config.seed,
        mask=mask if record_mask else None,
        desc=desc,
        **run_options,
    )


def sd_random_label(
    state,
    task: SDTask,
    config: SDUnlearnConfig,
    rng: jax.Array,
    mask=None,
    *,
    name: str = "RL",
    **run_options,
) -> UnlearnOutput:
    """RL-SD: the pseudo-prompt forget loss + alpha * retain loss (`losses.text_forget_loss`) on
    all UNet weights (or `mask`'s). SalUn-SD (`sd_salun`) is the same on the salient weights."""
    if name == "SalUn" and mask is None:
        raise ValueError("SalUn needs a saliency mask (sd_saliency_scores + mask_from_scores)")
    loss_fn = text_forget_loss(
        task.unet.apply, task.schedule, jnp.asarray(task.contexts), alpha=config.alpha
    )
    return _run(state, task, config, rng, loss_fn, name, mask=mask, retain=True, **run_options)


sd_salun = functools.partial(sd_random_label, name="SalUn")


def sd_esd(
    state,
    task: SDTask,
    config: SDUnlearnConfig,
    rng: jax.Array,
    mask=None,
    **run_options,
) -> UnlearnOutput:
    """ESD on the concept's prompts (the forget prompts; images are not used): the
    `config.esd_train` weights (ESD-u by default) or `mask`'s, Adam, no retain term
    (`losses.text_esd_loss`)."""
    grid = make_grid(task.schedule, "ddim", config.esd_num_steps)
    loss_fn = text_esd_loss(
        task.unet.apply,
        jnp.asarray(task.contexts),
        (grid.timesteps, grid.a_t, grid.a_next),
        sample_shape=task.sample_shape,
        negative_guidance=config.negative_guidance,
        start_guidance=config.esd_start_guidance,
    )
    selection = mask if mask is not None else trainable_params(state.params, config.esd_train)
    return _run(
        state,
        task,
        config,
        rng,
        loss_fn,
        "ESD",
        mask=selection,
        retain=False,
        extra={"frozen": uncommitted(state.params)},
        record_mask=mask is not None,
        **run_options,
    )


def sd_fmn(
    state,
    task: SDTask,
    config: SDUnlearnConfig,
    rng: jax.Array,
    mask=None,
    **run_options,
) -> UnlearnOutput:
    """Forget-Me-Not's attention re-steering on the forget images and prompts: minimise the L2
    norm of the cross-attention maps at the concept's token positions (`concept_positions`;
    `losses.text_attention_loss`), the whole UNet or (`fmn_only_cross_attention`) its `attn2`
    layers, AdamW with `config.weight_decay` and `grad_clip`.

    Raises:
      ValueError: no concept token ids, or none of them in the forget prompts.
    """
    if not task.concept_token_ids:
        raise ValueError("FMN needs the concept's token ids (SDTask.concept_token_ids)")
    positions = concept_positions(
        task.token_ids, task.concept_token_ids, task.eos_token_id, config.fmn_use_pooler
    )
    forget_rows = np.unique(task.forget_prompt)
    if not positions[forget_rows].any():
        raise ValueError("the concept's tokens occur in none of the forget prompts")
    loss_fn = text_attention_loss(
        task.unet.apply, task.schedule, jnp.asarray(task.contexts), jnp.asarray(positions)
    )
    selection = mask
    if selection is None and config.fmn_only_cross_attention:
        selection = trainable_params(state.params, "xattn")
    return _run(
        state,
        task,
        config,
        rng,
        loss_fn,
        "FMN",
        mask=selection,
        retain=False,
        record_mask=mask is not None,
        **run_options,
    )
