"""Tokenizers loaded from local files only: GPT-2 byte-level BPE and characters."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import tiktoken

from megajax.config import ConfigError

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py) in the equivalent possessive form tiktoken runs.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
EOT = "<|endoftext|>"


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in vocab.json."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class GPT2Tokenizer:
    """GPT-2 BPE from vocab.json + merges.txt, run by tiktoken.

    tiktoken merges by rank; GPT-2's rank of a merged token equals its id (256 + merge index),
    which `__init__` checks against merges.txt, so the ids are those of GPT-2's own BPE.
    """

    def __init__(self, vocab_dir: str | Path):
        vocab_dir = Path(vocab_dir)
        for name in ("vocab.json", "merges.txt"):
            if not (vocab_dir / name).is_file():
                raise ConfigError(f"GPT-2 tokenizer: {vocab_dir / name} not found (data.vocab_dir)")
        vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
        decode = {c: b for b, c in _byte_to_unicode().items()}
        ranks = {bytes(decode[c] for c in tok): i for tok, i in vocab.items() if tok != EOT}
        merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [m for m in merges if m and not m.startswith("#version")]
        for i, merge in enumerate(merges):
            if vocab.get(merge.replace(" ", "")) != 256 + i:
                raise ConfigError(f"{vocab_dir}: merges.txt line {i} does not match vocab.json")
        self.eot_id = vocab[EOT]
        self.vocab_size = len(vocab)
        self._enc = tiktoken.Encoding(
            "gpt2-local",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self.eot_id},
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids))


class CharTokenizer:
    """One id per distinct character of the text, in sorted order (nanoGPT's shakespeare_char)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)
