"""LAMBADA accuracy as Megatron-LM's zero-shot evaluation measures it: predict a passage's last
word from the rest, greedily and with teacher forcing.

strict (whole word): the target is the BPE encoding of " " + the last whitespace-separated
word, after the encoded text before it (stripped); every one of its tokens must be the argmax.
Non-strict: the whole text is encoded and only its last BPE token is the target, so the last
word's earlier tokens are context, not predictions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from megajax import loss
from megajax.config import ConfigError
from megajax.evals import batched
from megajax.trainer import Trainer

Example = tuple[list[int], list[int]]  # (context ids, target ids)


def example(text: str, tokenizer, *, strict: bool = True) -> Example:
    """The context and target token ids of one passage."""
    if not strict:
        ids = tokenizer.encode(text)
        return ids[:-1], ids[-1:]
    word = text.split()[-1]
    return tokenizer.encode(text[: text.rfind(word)].strip()), tokenizer.encode(" " + word)


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


def correct(trainer: Trainer, params, examples: Sequence[Example], *, log=None) -> int:
    """How many examples have every target token predicted right (greedy, teacher-forced)."""

    def all_right(params, inputs, targets, weights):
        model = trainer.model(params)
        predicted = loss.argmax(
            model(inputs), model.lm_head, vocab_size=trainer.cfg.model.vocab_size
        )
        return jnp.all((predicted == targets) | (weights == 0), axis=-1).astype(jnp.float32)

    windows = Windows(examples, seq_len=trainer.cfg.model.seq_len)
    return round(batched.total(trainer, params, all_right, windows, log=log, label="lambada"))


def evaluate(
    trainer: Trainer,
    params,
    path: str | Path,
    tokenizer,
    *,
    strict: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """accuracy over the passages of a JSON Lines file, and their number n."""
    examples = [example(text, tokenizer, strict=strict) for text in read(path)]
    right = correct(trainer, params, examples, log=log)
    return {
        "accuracy": right / len(examples),
        "correct": right,
        "n": len(examples),
        "strict": strict,
    }
