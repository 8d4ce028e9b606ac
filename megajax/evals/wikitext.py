"""WikiText-103 perplexity as Megatron-LM's zero-shot evaluation measures it.

The tokenized release (` @-@ `, spaces around punctuation) is detokenized, encoded into T
tokens (GPT-2's BPE or the model's tokenizer.json) and scored in windows of seq_len + 1 tokens
advanced by `overlap`. The adjusted perplexity spreads the same summed loss over the T_o - 1
gaps between the release's own tokens, so that models with different tokenizers compare:
exp(nll / (T_o - 1)). A tokenizer whose post-processor starts a text with a beginning-of-text
token (Llama's) has it put before the file, once: then every one of the T text tokens is a
target, and the first original token is predicted too, so the adjusted perplexity divides by T_o.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from megajax.config import ConfigError
from megajax.data.tokenizer import text_ids
from megajax.evals import perplexity
from megajax.sharded_model import ShardedModel

# Megatron-LM's WikiText detokenizer (tasks/zeroshot_gpt/detokenizer.py), rule by rule and in its
# order, which matters. Megatron-LM also lists a pattern for "' 9" whose slashes are literal;
# it never matches the release's text, so it is left out.
_lit = re.escape  # a plain replacement
_RULES = tuple(
    (re.compile(pattern), new)
    for pattern, new in (
        (_lit("s '"), "s'"),  # plural possessive
        (_lit(" @-@ "), "-"),  # number and word separators
        (_lit(" @,@ "), ","),
        (_lit(" @.@ "), "."),
        (_lit(" : "), ": "),
        (_lit(" ; "), "; "),
        (_lit(" . "), ". "),
        (_lit(" ! "), "! "),
        (_lit(" ? "), "? "),
        (_lit(" , "), ", "),
        # no space inside brackets and quotes
        (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
        (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
        (r"{\s*([^}]*?)\s*}", r"{\1}"),
        (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
        (r"'\s*([^']*?)\s*'", r"'\1'"),
        (_lit("= = = ="), "===="),  # section headings
        (_lit("= = ="), "==="),
        (_lit("= ="), "=="),
        (_lit(" \N{DEGREE SIGN} "), "\N{DEGREE SIGN}"),
        (_lit(" \n"), "\n"),
        (_lit("\n "), "\n"),
        (_lit(" N "), " 1 "),
        (_lit(" 's"), "'s"),
    )
)


def detokenize(text: str) -> str:
    """WikiText's tokenized form back to ordinary text, as Megatron-LM does it."""
    for pattern, new in _RULES:
        text = pattern.sub(new, text)
    return text


def token_ids(text: str, tokenizer) -> list[int]:
    """The ids a WikiText file is scored as: its detokenized text encoded, after the tokenizer's
    beginning-of-text token if it has one."""
    return text_ids(tokenizer, detokenize(text))


def count_original_tokens(text: str) -> int:
    """T_o: the release's tokens, counted as Megatron-LM counts them, by splitting the whole
    file on single spaces (a newline separates nothing; runs of spaces give empty tokens)."""
    return len(text.strip().split(" "))


class Windows(Sequence):
    """Windows of seq_len + 1 tokens starting every `overlap` tokens, so that each of the
    len(tokens) - 1 targets is scored exactly once: the first window weighs all its targets,
    each later one only its last `overlap` (the ones the window before did not reach), with
    all the context before them. The last window is padded with zeros that weigh nothing."""

    def __init__(self, tokens: Sequence[int], *, seq_len: int, overlap: int):
        if not 1 <= overlap <= seq_len:
            raise ConfigError(f"overlap {overlap} must be between 1 and seq_len {seq_len}")
        if len(tokens) < 2:
            raise ConfigError(f"{len(tokens)} tokens: nothing to predict")
        self.tokens, self.seq_len, self.overlap = np.asarray(tokens, np.int32), seq_len, overlap
        beyond_first = max(0, len(tokens) - 1 - seq_len)  # targets the first window misses
        self._len = 1 + -(-beyond_first // overlap)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._len:
            raise IndexError(i)
        s, start = self.seq_len, i * self.overlap
        chunk = self.tokens[start : start + s + 1]
        padded = np.zeros(s + 1, np.int32)
        padded[: len(chunk)] = chunk
        weights = np.zeros(s, np.float32)
        weights[0 if i == 0 else s - self.overlap : len(chunk) - 1] = 1
        return {"inputs": padded[:-1], "targets": padded[1:], "weights": weights}


def evaluate(
    sharded: ShardedModel,
    params,
    path: str | Path,
    tokenizer,
    *,
    overlap: int = 32,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """loss and ppl per token of the tokenizer, adjusted_ppl per original token, both token
    counts (`tokens` includes a beginning-of-text token; `bos` says whether there is one)."""
    # Bytes decoded as they are: no newline translation, which would change T_o.
    text = Path(path).read_bytes().decode("utf-8")
    original = count_original_tokens(text)
    ids = token_ids(text, tokenizer)
    bos = tokenizer.bos_id is not None
    if log:
        log(f"wikitext103: {original:,} original tokens, {len(ids) - bos:,} model tokens")
    windows = Windows(ids, seq_len=sharded.cfg.model.seq_len, overlap=overlap)
    nll = perplexity.score(sharded, params, windows, log=log, label="wikitext103 windows")["nll"]
    return {
        "loss": nll / (len(ids) - 1),
        "ppl": math.exp(nll / (len(ids) - 1)),
        "adjusted_ppl": math.exp(nll / (original - 1 + bos)),
        "tokens": len(ids),
        "original_tokens": original,
        "overlap": overlap,
        "bos": bos,
    }
