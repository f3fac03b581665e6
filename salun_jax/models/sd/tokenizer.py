"""CLIP's byte-level BPE tokenizer as SD v1.x uses it, read from `vocab.json` + `merges.txt`.

Why our own (about 100 lines): transformers' `CLIPTokenizer` would pull transformers and
`tokenizers` into a JAX stack for one function, keras_hub brings Keras, and open_clip's
`SimpleTokenizer` reads its own bundled vocabulary instead of the model folder's. This is a
direct port of the CLIP/transformers algorithm, needing only the `regex` package (stdlib `re`
has no `\\p{L}` / `\\p{N}` classes). `tests/test_sd_models.py` checks it id for id against
transformers' `CLIPTokenizer`.

Text cleanup is NFC, whitespace collapsing and lower-casing, as transformers' current
(tokenizers-backed) `CLIPTokenizer` does. The slow tokenizer additionally ran `ftfy.fix_text`
when ftfy was installed (mojibake repair, curly quotes to straight ones, ...); that is not
reproduced, so prompts with such characters may tokenize differently from a pipeline that had
ftfy.

References:
  (`transformers:src/transformers/models/clip/tokenization_clip.py`);
  Radford et al. 2019 (GPT-2, byte-level BPE); Sennrich et al. 2016 (BPE).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import regex

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
# Only the first 49152 - 256 - 2 merges of the file are used (the slow tokenizer's slice).
MAX_MERGES = 49152 - 256 - 2
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (BPE runs on these)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return dict(zip(printable + others, map(chr, chars), strict=True))


def clean_text(text: str) -> str:
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


class CLIPTokenizer:
    """Prompts -> [B, 77] int32 ids: `BOS tokens EOS`, truncated to 77, padded with EOS.

    Args:
      vocab: token -> id (`vocab.json`).
      merges: BPE merges in priority order (`merges.txt` without its header line).
      max_length: padded/truncated length (77 in SD).

    Example:
      tokenizer = CLIPTokenizer.from_files("sd/tokenizer/vocab.json", "sd/tokenizer/merges.txt")
      ids = tokenizer(["a photo of a cat", ""])  # [2, 77]; the empty prompt is BOS + 76 EOS
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        max_length: int = MAX_LENGTH,
    ):
        self.vocab = dict(vocab)
        self.merge_ranks = {tuple(m): i for i, m in enumerate(merges[:MAX_MERGES])}
        self.max_length = max_length
        self.bos_id, self.eos_id = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
        self.pad_id = self.unk_id = self.eos_id  # SD v1.x pads with <|endoftext|>
        self._bpe_cache = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, **kwargs) -> CLIPTokenizer:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().strip().split("\n")[1:]  # line 0 is "#version: ..."
        return cls(vocab, [tuple(line.split()) for line in lines], **kwargs)

    @classmethod
    def from_words(cls, words: Sequence[str], **kwargs) -> CLIPTokenizer:
        """A tiny CLIP-style vocabulary for a fixed set of prompts (tiny test models).

        The vocabulary holds every byte symbol with and without the word-end mark `</w>`, one
        merge chain per word (left to right, so each listed word becomes one token when no
        other merge gets there first), BOS and EOS. Words are lower-cased pre-tokens (letters
        or single digits); any other text still tokenizes, into byte symbols.
        """
        symbols = list(bytes_to_unicode().values())
        vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
        merges: list[tuple[str, str]] = []
        byte_map = bytes_to_unicode()
        for word in dict.fromkeys(w.lower() for w in words):
            chars = [byte_map[b] for b in word.encode("utf-8")]
            if len(chars) < 2:
                continue
            chars[-1] += "</w>"
            merged = chars[0]
            for char in chars[1:]:
                if (merged, char) not in merges:
                    merges.append((merged, char))
                merged += char
                vocab.setdefault(merged, len(vocab))
        vocab[BOS_TOKEN], vocab[EOS_TOKEN] = len(vocab), len(vocab) + 1
        return cls(vocab, merges, **kwargs)

    def _bpe(self, word: str) -> list[str]:
        """Merges the characters of one pre-token (the last one ending in `</w>`)."""
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:], strict=False))
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._bpe_cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[str]:
        """Text -> BPE tokens, without BOS/EOS."""
        byte_map = bytes_to_unicode()
        tokens = []
        for piece in _PATTERN.findall(clean_text(text)):
            tokens.extend(self._bpe("".join(byte_map[b] for b in piece.encode("utf-8"))))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS; unknown tokens become `<|endoftext|>`."""
        return [self.vocab.get(token, self.unk_id) for token in self.tokenize(text)]

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> [B, max_length] int32 ids (`BOS x EOS pad...`, x cut to max_length - 2)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            seq = [self.bos_id, *self.encode(prompt)[: self.max_length - 2], self.eos_id]
            ids[row, : len(seq)] = seq
        return ids
