"""Loads a diffusers-format Stable Diffusion folder into the Flax modules of `salun_jax.models.sd`.

A folder (e.g. a local copy of `CompVis/stable-diffusion-v1-4`) holds `unet/`, `vae/`,
`text_encoder/` and `tokenizer/`; each model folder has a `config.json` and a `*.safetensors`
file, read with the `safetensors` package's numpy API (no PyTorch needed).

Weights are mapped by name alone: the Flax modules name their submodules as diffusers names its
keys, with list indices joined by an underscore (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`). `weight` becomes `kernel` (conv OIHW -> HWIO, linear
[out, in] -> [in, out]), `scale` (norms) or `embedding` (embeddings), whichever the Flax module
has. Every key must be used and every Flax parameter filled, with matching shapes; otherwise a
`WeightLoadingError` names the first offending key.

References:
  (weight names, folder layout, `modeling_flax_pytorch_utils.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from salun_jax.models.sd.clip_text import CLIPTextConfig, CLIPTextModel
from salun_jax.models.sd.tokenizer import CLIPTokenizer
from salun_jax.models.sd.unet import UNet2DConditionModel, UNetConfig
from salun_jax.models.sd.vae import AutoencoderKL, VAEConfig

PyTree = Any

# Preferred weight file per model folder (diffusers/transformers names); any single other
# `*.safetensors` file is accepted too.
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
# Buffers that are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")
# Old VAE checkpoints name the mid-block attention's projections differently (diffusers remaps
# them on load, diffusers' `modeling_flax_pytorch_utils.py`).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")

# Config options that must keep their diffusers default: this port implements only that one.
_UNET_FIXED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "center_input_sample": False,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_type": "default",
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
}
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
_CLIP_FIXED = {}


class WeightLoadingError(ValueError):
    """A model folder does not match the Flax model (bad config, unknown/missing key, shape)."""


class WeightFileNotFoundError(WeightLoadingError, FileNotFoundError):
    """A model folder or one of its files is missing."""


class StableDiffusion(NamedTuple):
    """The four parts of an SD folder: modules and their parameter pytrees."""

    unet: UNet2DConditionModel
    unet_params: PyTree
    text_encoder: CLIPTextModel
    text_encoder_params: PyTree
    vae: AutoencoderKL
    vae_params: PyTree
    tokenizer: CLIPTokenizer


# ----------------------------------------------------------------------------------------------
# Key mapping and conversion.


def flax_path(key: str) -> tuple[str, ...]:
    """`down_blocks.0.resnets.1.conv1.weight` -> `('down_blocks_0', 'resnets_1', 'conv1',
    'weight')`: numeric parts join the name before them (diffusers' `rename_key`)."""
    key = _LEGACY_ATTENTION_KEY.sub(lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + ".", key)
    path = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _torch_key(path: tuple[str, ...]) -> str:
    """The inverse of `flax_path`, for error messages."""
    *modules, leaf = path
    leaf = "bias" if leaf == "bias" else "weight"
    return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + [leaf])


def _to_flax_array(
    key: str, leaf: str, value: np.ndarray, shape: tuple[int, ...], source: str
) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1x1 conv stored for a linear layer (old VAE files)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T  # [out, in] -> [in, out]
    if value.shape != tuple(shape):
        raise WeightLoadingError(
            f"{source}: shape mismatch for {key!r}: file gives {value.shape} (after layout "
            f"conversion), the model expects {tuple(shape)}"
        )
    return value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected: PyTree,
    *,
    source: str = "state dict",
    prefix: str = "",
    dtype: jnp.dtype | None = jnp.float32,
) -> PyTree:
    """Maps a diffusers/transformers state dict onto a Flax parameter tree.

    Args:
      state_dict: torch-named arrays (NCHW/OIHW layout).
      expected: the Flax `params` tree, or its `jax.eval_shape` (only shapes are used).
      source: what to name in error messages (the file).
      prefix: a key prefix to drop where present (`text_model.` in CLIP files).
      dtype: dtype of the returned jax arrays; None keeps (views of) the host numpy arrays,
        e.g. to place or shard them yourself.

    Returns:
      A params tree with the structure of `expected`.

    Raises:
      WeightLoadingError: an unknown key, a missing parameter or a shape mismatch; the message
        names the first offending key.
    """
    wanted = flax.traverse_util.flatten_dict(expected)
    params = {}
    for key in sorted(state_dict):
        if _IGNORED_KEYS.search(key):
            continue
        *modules, leaf = flax_path(key.removeprefix(prefix))
        modules = tuple(modules)
        candidates = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        target = next((modules + (c,) for c in candidates if modules + (c,) in wanted), None)
        if target is None:
            raise WeightLoadingError(
                f"{source}: unknown key {key!r} (no Flax parameter "
                f"{'/'.join(modules + (candidates[0],))})"
            )
        value = _to_flax_array(
            key, target[-1], np.asarray(state_dict[key]), wanted[target].shape, source
        )
        params[target] = value if dtype is None else jnp.asarray(value, dtype)
    missing = [path for path in wanted if path not in params]
    if missing:
        # Name the key as this file would (with the prefix only if its keys carry it).
        if not (prefix and any(k.startswith(prefix) for k in state_dict)):
            prefix = ""
        raise WeightLoadingError(
            f"{source}: missing key {prefix + _torch_key(missing[0])!r} for Flax parameter "
            f"{'/'.join(missing[0])} ({len(missing)} missing in all)"
        )
    return flax.traverse_util.unflatten_dict(params)


# ----------------------------------------------------------------------------------------------
# Files and configs.


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise WeightFileNotFoundError(f"missing {what}: {path}")
    return path


def _read_json(path: str) -> dict:
    with open(_require(path, "file"), encoding="utf-8") as f:
        return json.load(f)


def _weight_file(folder: str, preferred: str) -> str:
    _require(folder, "folder")
    path = os.path.join(folder, preferred)
    if os.path.exists(path):
        return path
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(found) != 1:
        raise WeightFileNotFoundError(
            f"missing weights: {path} (and {len(found)} other *.safetensors files in {folder}; "
            "sharded or .bin checkpoints are not supported)"
        )
    return os.path.join(folder, found[0])


def config_from_dict(
    cls: type,
    raw: Mapping[str, Any],
    fixed: Mapping[str, Any] | None = None,
    source: str = "config",
) -> Any:
    """Builds a config dataclass from a `config.json` dict.

    Keys that are fields of `cls` are used (lists become tuples); keys in `fixed` must hold the
    given value (the only one this port implements); all other keys are informational
    (`_class_name`, `dropout`, `sample_size`, ...) and ignored.

    Raises:
      WeightLoadingError: an option with an unsupported value, or an invalid config.
    """
    for name, supported in (fixed or {}).items():
        if name in raw and raw[name] != supported:
            raise WeightLoadingError(
                f"{source}: unsupported {name}={raw[name]!r} (only {supported!r} is implemented)"
            )
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightLoadingError(f"{source}: {e}") from e


def _dummy_inputs(model) -> tuple[jax.Array, ...]:
    cfg = model.config
    if isinstance(model, CLIPTextModel):
        return (jnp.zeros((1, cfg.max_position_embeddings), jnp.int32),)
    size = 2 ** (len(cfg.block_out_channels) - 1)  # the smallest valid image size
    image = jnp.zeros((1, size, size, cfg.in_channels))
    if isinstance(model, AutoencoderKL):
        return (image,)
    return image, jnp.zeros((1,)), jnp.zeros((1, 1, cfg.cross_attention_dim))


def param_shapes(model: UNet2DConditionModel | AutoencoderKL | CLIPTextModel) -> PyTree:
    """The `params` tree of `model` as `jax.ShapeDtypeStruct`s (`jax.eval_shape`; allocates
    nothing, so it also works for the full-size models)."""
    return jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(model))["params"]


def _load_model(
    folder: str,
    config_cls: type,
    fixed: Mapping[str, Any],
    make_model: Callable,
    weight_file: str,
    prefix: str,
    dtype,
) -> tuple:
    config_path = os.path.join(_require(folder, "folder"), "config.json")
    config = config_from_dict(config_cls, _read_json(config_path), fixed, config_path)
    model = make_model(config)
    path = _weight_file(folder, weight_file)
    params = convert_state_dict(
        load_file(path), param_shapes(model), source=path, prefix=prefix, dtype=dtype
    )
    return model, params


def load_unet(folder: str, dtype=jnp.float32) -> tuple[UNet2DConditionModel, PyTree]:
    """Loads a diffusers `unet/` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

    Returns:
      `(module, params)`; call `module.apply({"params": params}, sample, t, context)`.

    Raises:
      WeightFileNotFoundError: the folder, its config or its weights are missing.
      WeightLoadingError: unsupported config, unknown/missing key or shape mismatch.
    """
    return _load_model(
        folder, UNetConfig, _UNET_FIXED, UNet2DConditionModel, WEIGHT_FILES["unet"], "", dtype
    )


def load_vae(folder: str, dtype=jnp.float32) -> tuple[AutoencoderKL, PyTree]:
    """Loads a diffusers `vae/` folder (AutoencoderKL); same contract as `load_unet`."""
    return _load_model(folder, VAEConfig, _VAE_FIXED, AutoencoderKL, WEIGHT_FILES["vae"], "", dtype)


def load_text_encoder(folder: str, dtype=jnp.float32) -> tuple[CLIPTextModel, PyTree]:
    """Loads a transformers `text_encoder/` folder (CLIPTextModel; keys with or without the
    `text_model.` prefix); same contract as `load_unet`."""
    return _load_model(
        folder,
        CLIPTextConfig,
        _CLIP_FIXED,
        CLIPTextModel,
        WEIGHT_FILES["text_encoder"],
        "text_model.",
        dtype,
    )


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """Reads `vocab.json` + `merges.txt` from a `tokenizer/` folder.

    Raises:
      WeightFileNotFoundError: the folder or a file is missing.
    """
    _require(folder, "folder")
    return CLIPTokenizer.from_files(
        _require(os.path.join(folder, "vocab.json"), "file"),
        _require(os.path.join(folder, "merges.txt"), "file"),
    )


def load_stable_diffusion(folder: str, dtype=jnp.float32) -> StableDiffusion:
    """Loads `unet/`, `text_encoder/`, `vae/` and `tokenizer/` from a diffusers SD folder."""
    unet, unet_params = load_unet(os.path.join(folder, "unet"), dtype)
    text_encoder, text_params = load_text_encoder(os.path.join(folder, "text_encoder"), dtype)
    vae, vae_params = load_vae(os.path.join(folder, "vae"), dtype)
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    return StableDiffusion(unet, unet_params, text_encoder, text_params, vae, vae_params, tokenizer)
