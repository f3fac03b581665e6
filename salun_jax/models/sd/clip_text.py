"""CLIP text transformer (transformers' `CLIPTextModel`) in Flax Linen: SD's text encoder.

Token + learned position embeddings, pre-LN causal self-attention blocks with a quick_gelu MLP,
and a final LayerNorm. SD conditions on the full `last_hidden_state` [B, 77, D] after the final
LayerNorm; the pooled output is not needed and not computed. As in SD, no padding mask is used.

References:
  (`transformers:src/transformers/models/clip/modeling_clip.py`);
  Radford et al. 2021 (CLIP), §2.4.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from salun_jax.models.sd.layers import layer_norm, multi_head_attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Fields of transformers' text-encoder `config.json`; defaults: SD v1.x's (CLIP ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} does not divide by "
                f"{self.num_attention_heads} heads"
            )


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        q, k, v = (nn.Dense(dim, name=f"{n}_proj")(x) for n in "qkv")
        h = multi_head_attention(q, k, v, self.num_heads, is_causal=True)
        return nn.Dense(dim, name="out_proj")(h)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        attn = CLIPAttention(cfg.num_attention_heads, name="self_attn")
        x = x + attn(layer_norm(cfg.layer_norm_eps, "layer_norm1")(x))
        mlp = CLIPMLP(cfg.intermediate_size, cfg.hidden_act, name="mlp")
        return x + mlp(layer_norm(cfg.layer_norm_eps, "layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding"
        )(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, name=f"layers_{i}")(x)
        return x


class CLIPTextModel(nn.Module):
    """SD's text encoder.

    Attributes:
      config: the architecture; `CLIPTextConfig()` is SD v1.x's (123,060,480 parameters).
    """

    config: CLIPTextConfig = CLIPTextConfig()

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Encodes token ids.

        Args:
          input_ids: [B, L] int ids, L <= max_position_embeddings (77 for SD, from the tokenizer).

        Returns:
          [B, L, hidden_size] `last_hidden_state` after the final LayerNorm.

        Raises:
          ValueError: L larger than the position table.
        """
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [B, L<={cfg.max_position_embeddings}], got {input_ids.shape}"
            )
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        x = CLIPEncoder(cfg, name="encoder")(x)
        return layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
