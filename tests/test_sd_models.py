"""Stable Diffusion port vs PyTorch: tiny diffusers/transformers models and their outputs.

The fixtures in tests/fixtures/sd_tiny/ come from experiments/sd_fixtures/make_fixtures.py
(diffusers 0.42.1, transformers 5.24.0, torch 2.13.0 CPU). PyTorch tensors there are NCHW; the
Flax port is NHWC, converted here at the boundary.
"""

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from salun_jax.models.sd import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
    WeightFileNotFoundError,
    WeightLoadingError,
    convert_state_dict,
    load_stable_diffusion,
    load_text_encoder,
    loading,
)
from salun_jax.models.sd.loading import flax_path

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sd_tiny")
ATOL = 2e-5  # float32; measured max abs errors are 1e-6 to 5e-6 on outputs of size ~1-3


def nchw_to_nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURES, "reference.npz")))


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(FIXTURES)


def assert_matches_torch(name, actual, expected):
    err = float(np.abs(np.asarray(actual) - expected).max())
    print(f"{name}: max abs error vs PyTorch {err:.2e} (max |ref| {np.abs(expected).max():.2f})")
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def test_tokenizer_matches_transformers(sd, ref):
    ids = sd.tokenizer(list(ref["tokenizer_prompts"]))
    np.testing.assert_array_equal(ids, ref["tokenizer_ids"])
    tok = sd.tokenizer
    assert ids.shape == (len(ref["tokenizer_prompts"]), 77) and ids.dtype == np.int32
    assert list(ids[0]) == [tok.bos_id] + [tok.eos_id] * 76  # "" (the CFG prompt)
    assert ids[-1, -1] == tok.eos_id and tok.eos_id not in ids[-1, :-1]  # truncated


def test_text_encoder_matches_torch(sd, ref):
    apply_fn = jax.jit(sd.text_encoder.apply)  # jit: 4x quicker than op-by-op here
    out = apply_fn({"params": sd.text_encoder_params}, jnp.asarray(ref["text_ids"]))
    assert_matches_torch("text_encoder", out, ref["text_out"])


def test_unet_matches_torch(sd, ref):
    out = jax.jit(sd.unet.apply)(
        {"params": sd.unet_params},
        nchw_to_nhwc(ref["unet_sample"]),
        ref["unet_timesteps"],
        jnp.asarray(ref["unet_context"]),
    )
    assert_matches_torch("unet", nhwc_to_nchw(out), ref["unet_out"])


def test_vae_matches_torch(sd, ref):
    variables = {"params": sd.vae_params}
    encode = jax.jit(functools.partial(sd.vae.apply, method=sd.vae.encode))
    decode = jax.jit(functools.partial(sd.vae.apply, method=sd.vae.decode))
    posterior = encode(variables, nchw_to_nhwc(ref["vae_image"]))
    assert_matches_torch("vae.encode mean", nhwc_to_nchw(posterior.mean), ref["vae_mean"])
    assert_matches_torch("vae.encode logvar", nhwc_to_nchw(posterior.logvar), ref["vae_logvar"])
    decoded = decode(variables, nchw_to_nhwc(ref["vae_latent"]))
    assert_matches_torch("vae.decode", nhwc_to_nchw(decoded), ref["vae_decoded"])
    assert sd.vae.config.scaling_factor == pytest.approx(0.18215)
    sample = posterior.sample(jax.random.key(0))
    assert sample.shape == posterior.mean.shape and not np.allclose(sample, posterior.mean)


def test_text_encoder_keys_with_text_model_prefix(tmp_path, sd):
    # SD v1.x hub files name CLIP keys `text_model.*`; transformers 5 saves them without it.
    folder = tmp_path / "text_encoder"
    shutil.copytree(os.path.join(FIXTURES, "text_encoder"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in weights.items()}, str(folder / "model.safetensors"))
    _, params = load_text_encoder(str(folder))
    jax.tree.map(np.testing.assert_array_equal, params, sd.text_encoder_params)


@pytest.mark.parametrize(
    "name, model",
    [
        ("unet", UNet2DConditionModel(UNetConfig())),
        ("vae", AutoencoderKL(VAEConfig())),
        ("text_encoder", CLIPTextModel(CLIPTextConfig())),
    ],
)
def test_full_size_sd_v1_key_mapping(name, model):
    # Every parameter name of the full-size diffusers/transformers SD v1.x models maps onto the
    # default configs with the right shape, from shapes alone (zero-stride arrays, no memory).
    with open(os.path.join(FIXTURES, "sd_v1_shapes.json")) as f:
        shapes = json.load(f)[name]
    expected = loading.param_shapes(model)
    state_dict = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    params = convert_state_dict(state_dict, expected, dtype=None)
    count = sum(math.prod(s) for s in shapes.values())
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}[name]


def test_flax_path():
    assert flax_path("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight") == (
        "down_blocks_0",
        "attentions_1",
        "transformer_blocks_0",
        "attn2",
        "to_out_0",
        "weight",
    )
    assert flax_path("mid_block.attentions.0.proj_attn.bias") == (
        "mid_block",
        "attentions_0",
        "to_out_0",
        "bias",
    )  # old VAE attention names
    assert flax_path("ff.net.0.proj.weight") == ("ff", "net_0", "proj", "weight")


# ----------------------------------------------------------------------------------------------
# Bad folders: one-line errors naming the path or key. The text encoder is the quickest to load.


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(os.path.join(FIXTURES, "text_encoder"), folder)
    return folder


def rewrite_weights(folder, edit):
    path = str(folder / "model.safetensors")
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


def load_error(folder, error=WeightLoadingError) -> str:
    with pytest.raises(error) as info:
        load_text_encoder(str(folder))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files(tmp_path, text_folder):
    message = load_error(tmp_path / "nowhere", WeightFileNotFoundError)
    assert "nowhere" in message
    os.remove(text_folder / "model.safetensors")
    assert "model.safetensors" in load_error(text_folder, FileNotFoundError)
    os.remove(text_folder / "config.json")
    assert "config.json" in load_error(text_folder, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        loading.load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer files
    os.makedirs(tmp_path / "tok")
    shutil.copy(os.path.join(FIXTURES, "tokenizer", "vocab.json"), tmp_path / "tok")
    with pytest.raises(WeightFileNotFoundError, match="merges.txt"):
        loading.load_tokenizer(str(tmp_path / "tok"))


def test_unknown_key(text_folder):
    rewrite_weights(
        text_folder,
        lambda w: w.update({"encoder.layers.0.mlp.fc3.weight": np.zeros((4, 4), np.float32)}),
    )
    assert "unknown key 'encoder.layers.0.mlp.fc3.weight'" in load_error(text_folder)


def test_missing_key(text_folder):
    rewrite_weights(text_folder, lambda w: w.pop("encoder.layers.1.layer_norm2.bias"))
    assert "missing key 'encoder.layers.1.layer_norm2.bias'" in load_error(text_folder)


def test_shape_mismatch(text_folder):
    def edit(weights):
        weights["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 8), np.float32)

    rewrite_weights(text_folder, edit)
    message = load_error(text_folder)
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert f"model.safetensors: shape mismatch for {key!r}" in message


def test_unsupported_config(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(os.path.join(FIXTURES, "unet"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    with pytest.raises(WeightLoadingError, match="unsupported act_fn='gelu'"):
        loading.load_unet(str(folder))
