"""Builds the tiny Stable Diffusion equivalence fixtures in tests/fixtures/sd_tiny/.

Run (in the PyTorch venv, not the main environment; about 10 s on a 2-core CPU):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install -r experiments/sd_fixtures/requirements.txt
    /work/venv-torch/bin/python experiments/sd_fixtures/make_fixtures.py

It writes a diffusers-format folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, each as the
hub's SD v1.x folder lays it out) holding TINY randomly initialised models, plus `reference.npz`
with seeded inputs and the PyTorch outputs that `tests/test_sd_models.py` compares the Flax port
against, and `sd_v1_shapes.json`, the parameter names and shapes of the full-size SD v1.x models
(to check the key mapping without the weights). Everything is synthetic; the whole folder stays
well under 1 MB.

The configs keep SD v1.x's structure (cross-attention down blocks before a plain DownBlock2D, the
mirror image going up, `attention_head_dim` read as the number of heads, 2 layers per block, a
causal quick_gelu CLIP) at toy widths. Every parameter gets a small random offset, so that norm
scales and biases are not the trivial 1/0 and a mis-mapped weight shows up in the outputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# transformers' own byte map, so that the fixture does not share code with the port under test.
from transformers.convert_slow_tokenizer import bytes_to_unicode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "sd_tiny")

TEXT_DIM = 16  # CLIP hidden size == UNet cross_attention_dim
MAX_LENGTH = 77  # SD's tokenizer/text-encoder length
NUM_MERGES = 150

# Corpus the tiny BPE merges are learned from, and the prompts whose ids are checked.
CORPUS = (
    "a photo of a cat . a painting of a dog in the style of van gogh . an image of a church , "
    "a parachute , a garbage truck , a gas pump , a golf ball , a french horn , a chain saw , "
    "a cassette player , an english springer , a tench . a photo of a nude person on the beach ! "
    "the starry night , oil on canvas , highly detailed , trending on artstation"
)
PROMPTS = [
    "",
    "a photo of a cat",
    "A Painting of a DOG in the style of Van Gogh!!",
    "  image   of a\tchurch, 4k, highly-detailed  ",
    "don't we'll it's 1999 x2",
    "café crème naïve ölçü",
    "golf ball " * 50,  # 100 tokens: truncated to 75, EOS kept last
]


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (Sennrich et al. 2016, Fig. 1) on the lower-cased words of `corpus`,
    with CLIP's `</w>` word ends; words are space-joined symbols (no symbol holds a space)."""
    byte_encoder = bytes_to_unicode()
    words = collections.Counter()
    for word in corpus.lower().split():
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        words[" ".join(symbols) + "</w>"] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            symbols = word.split()
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        pattern = re.compile(r"(?<!\S)" + re.escape(" ".join(best)) + r"(?!\S)")
        words = collections.Counter({pattern.sub("".join(best), w): c for w, c in words.items()})
    return merges


def write_tokenizer(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Writes vocab.json + merges.txt in the order of the real CLIP files."""
    os.makedirs(folder, exist_ok=True)
    merges = learn_merges(CORPUS, NUM_MERGES)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merges


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Adds N(0, scale^2) to every parameter (norm scales and biases included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def full_size_shapes() -> dict[str, dict[str, list[int]]]:
    """Parameter names and shapes of the full-size SD v1.x models (built on the meta device, so
    nothing is allocated), to check the key mapping without the 4 GB of weights."""
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(
                sample_size=64,
                cross_attention_dim=768,
                attention_head_dim=8,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            ),
            "vae": AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32,
                sample_size=512,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                )
            ),
        }
        return {
            name: {k: list(v.shape) for k, v in model.state_dict().items()}
            for name, model in models.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ref = {}

    # 1. Tokenizer: our vocab/merges, ids from transformers' CLIPTokenizer.
    vocab, _ = write_tokenizer(os.path.join(args.out, "tokenizer"))
    # Read back from the folder, as SD pipelines load it.
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(args.out, "tokenizer"))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    ref["tokenizer_prompts"] = np.array(PROMPTS)
    ref["tokenizer_ids"] = np.array(ids["input_ids"], np.int32)

    # 2. CLIP text encoder on the tokenized prompts.
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    text_encoder = CLIPTextModel(text_config).eval()
    perturb_(text_encoder)
    text_encoder.save_pretrained(os.path.join(args.out, "text_encoder"))
    with torch.no_grad():
        text_out = text_encoder(torch.tensor(ref["tokenizer_ids"][:3].astype(np.int64)))[0]
    ref["text_ids"] = ref["tokenizer_ids"][:3]
    ref["text_out"] = text_out.numpy()  # [3, 77, D]

    # 3. UNet: SD v1.x's layout at toy width.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=4,
    ).eval()
    perturb_(unet)
    unet.save_pretrained(os.path.join(args.out, "unet"), safe_serialization=True)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW
    timesteps = np.array([981.0, 37.5], np.float32)
    context = rng.standard_normal((2, MAX_LENGTH, TEXT_DIM)).astype(np.float32)
    with torch.no_grad():
        unet_out = unet(
            torch.from_numpy(sample),
            torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample
    ref.update(
        unet_sample=sample,
        unet_timesteps=timesteps,
        unet_context=context,
        unet_out=unet_out.numpy(),
    )

    # 4. VAE: encoder (mean, logvar of the posterior) and decoder.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    perturb_(vae)
    vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    image = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(image)).latent_dist
        decoded = vae.decode(torch.from_numpy(latent)).sample
    ref.update(
        vae_image=image,
        vae_mean=posterior.mean.numpy(),
        vae_logvar=posterior.logvar.numpy(),
        vae_latent=latent,
        vae_decoded=decoded.numpy(),
    )

    with open(os.path.join(args.out, "sd_v1_shapes.json"), "w") as f:
        json.dump(full_size_shapes(), f, separators=(",", ":"))
    np.savez_compressed(os.path.join(args.out, "reference.npz"), **ref)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
