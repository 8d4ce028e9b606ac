"""Perplexity of held-out text: the summed loss of the targets that windows weigh 1."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from megajax.data import samples
from megajax.evals import batched
from megajax.sharded_model import ShardedModel


def score(
    sharded: ShardedModel,
    params,
    windows: Sequence[dict],
    *,
    log: Callable[[str], None] | None = None,
    label: str = "windows",
) -> dict[str, float]:
    """Summed and mean negative log-likelihood and perplexity over `windows` (samples with
    'inputs', 'targets' and optional 'weights', (seq_len,) each, whose weights together cover
    every scored target once). Each process builds only the windows of its rows, once."""

    def nll_and_targets(params, f):
        losses = sharded.token_losses(
            params, f["inputs"], f["targets"], segments=f.get("segments"),
            positions=f.get("positions"),
        )  # fmt: skip
        return (losses * f["weights"]).sum(-1), f["weights"].sum(-1).astype(jnp.int32)

    total, tokens = batched.total(sharded, params, nll_and_targets, windows, log=log, label=label)
    return {"tokens": tokens, "nll": total, "loss": total / tokens, "ppl": math.exp(total / tokens)}


class EveryTarget(Sequence):
    """Every target of held-out splits once, each window built when it is asked for, so that a
    process builds only the rows it feeds: samples.GPTWindows weighed 1, then the tail they
    leave (fewer than seq_len targets) in one zero-padded window; rows that weigh their own
    targets (conversations, samples.ChatRows) as they are."""

    def __init__(self, splits: Sequence):
        self.splits = list(splits)
        # A split's windows, and one more for its tail if targets are left after them.
        sizes = [len(w) + _has_tail(w) for w in self.splits]
        self._starts = np.cumsum([0, *sizes])  # the first item of each split

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        windows, j = self.splits[k], i - int(self._starts[k])
        if j < len(windows):
            window = windows[j]
            return {"weights": np.ones(windows.seq_len, np.float32), **window}
        return _tail(windows)


def _has_tail(windows) -> bool:
    """Whether GPT windows leave targets after the last whole window (rows of conversations
    are whole)."""
    if isinstance(windows, samples.ChatRows):
        return False
    return len(windows) * windows.seq_len < windows.num_tokens - 1


def _tail(windows) -> dict[str, np.ndarray]:
    """The targets after the last whole window of a split, zero-padded into one window."""
    s, start, offsets = windows.seq_len, len(windows) * windows.seq_len, windows.offsets
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    rows = [windows.source[r]["tokens"] for r in range(first, len(offsets) - 1)]
    tail = np.concatenate(rows)[start - offsets[first] :]
    padded, weights = np.zeros(s + 1, np.int32), np.zeros(s, np.float32)
    padded[: len(tail)], weights[: len(tail) - 1] = tail, 1
    return {"inputs": padded[:-1], "targets": padded[1:], "weights": weights}
