"""LAMBADA accuracy as Megatron-LM's zero-shot evaluation measures it: predict a passage's last
word from the rest, greedily and with teacher forcing.

strict (whole word): the passage is the text before its last whitespace-separated word
(stripped), a space and that word. The target is the passage's ids after those of the text
before the word; every one of them must be the argmax. With GPT-2's BPE that is the encoding of
" " + word (its pre-tokenizer gives the space to the word), as in Megatron-LM; tokenizers that
write a word differently alone than after text (SentencePiece's prefix space, a Llama 2
tokenizer.json's "▁" prepended to any text) get the word as it reads in the passage. Where the
two encodings part earlier (a token spanning the end of the context and the word's start), the
target starts at the first id where they differ: that token is predicted too, never given, and
`evaluate` counts such passages as `merged_boundaries`.
Non-strict: the whole text is encoded and only its last token is the target, so the last
word's earlier tokens are context, not predictions.
With a tokenizer whose post-processor starts a text with a beginning-of-text token (Llama's
tokenizer.json), the context starts with it, as Llama checkpoints saw their training text; it is
never a target.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from megajax import loss
from megajax.config import ConfigError
from megajax.data.tokenizer import text_ids
from megajax.evals import batched
from megajax.sharded_model import ShardedModel

Example = tuple[list[int], list[int]]  # (context ids, target ids)


def _split(text: str) -> tuple[str, str]:
    """(the text before the last whitespace-separated word, stripped; the word)."""
    word = text.split()[-1]
    return text[: text.rfind(word)].strip(), word


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def example(text: str, tokenizer, *, strict: bool = True) -> Example:
    """The context and target token ids of one passage."""
    if not strict:
        ids = text_ids(tokenizer, text)
        return ids[:-1], ids[-1:]
    return _strict(text, tokenizer)[:2]


def merged_boundary(text: str, tokenizer) -> bool:
    """Whether the tokenizer writes a token across the end of the context and the last word,
    so that the context's ids are not a prefix of the passage's (strict `example`)."""
    return _strict(text, tokenizer)[2]


def _strict(text: str, tokenizer) -> tuple[list[int], list[int], bool]:
    """The strict example's context and target ids, and whether its boundary is merged."""
    context, word = _split(text)
    whole, alone = text_ids(tokenizer, f"{context} {word}"), text_ids(tokenizer, context)
    common = _common_prefix(alone, whole)
    start = min(common, len(whole) - 1)
    return whole[:start], whole[start:], common < len(alone)


def read(path: str | Path) -> list[str]:
    """The 'text' of each line of a JSON Lines file."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f'{path}:{number}: not a JSON object with "text"') from None
    if not texts:
        raise ConfigError(f"{path}: no passages")
    return texts


class Windows(Sequence):
    """Each example as one window of seq_len targets: context + target, the context cut on the
    left where it is too long, zeros after it (the model is causal: they change nothing
    before them); the weights mark the target's positions."""

    def __init__(self, examples: Sequence[Example], *, seq_len: int):
        self.examples, self.seq_len = examples, seq_len

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        context, target = self.examples[i]
        ids = np.asarray([*context, *target], np.int32)[-(self.seq_len + 1) :]
        padded = np.zeros(self.seq_len + 1, np.int32)
        padded[: len(ids)] = ids
        weights = np.zeros(self.seq_len, np.float32)
        # Target token j of ids is predicted at position j - 1.
        weights[max(0, len(ids) - len(target) - 1) : len(ids) - 1] = 1
        return {"inputs": padded[:-1], "targets": padded[1:], "weights": weights}


def correct(sharded: ShardedModel, params, examples: Sequence[Example], *, log=None) -> int:
    """How many examples have every target token predicted right (greedy, teacher-forced)."""

    def all_right(params, f):
        model = sharded.model(params)
        predicted = loss.argmax(
            model(f["inputs"]), model.lm_head, vocab_size=sharded.cfg.model.vocab_size
        )
        right = (predicted == f["targets"]) | (f["weights"] == 0)
        return jnp.all(right, axis=-1).astype(jnp.float32)

    windows = Windows(examples, seq_len=sharded.cfg.model.seq_len)
    return round(batched.total(sharded, params, all_right, windows, log=log, label="lambada"))


def evaluate(
    sharded: ShardedModel,
    params,
    path: str | Path,
    tokenizer,
    *,
    strict: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """accuracy over the passages of a JSON Lines file, their number n, and (strict) how many
    have a token across the last word's boundary."""
    if strict:
        made = [_strict(text, tokenizer) for text in read(path)]
        examples, merged = [m[:2] for m in made], sum(m[2] for m in made)
    else:
        examples, merged = [example(text, tokenizer, strict=False) for text in read(path)], 0
    right = correct(sharded, params, examples, log=log)
    return {
        "accuracy": right / len(examples),
        "correct": right,
        "n": len(examples),
        "strict": strict,
        "merged_boundaries": merged,
        "bos": tokenizer.bos_id is not None,
    }
