"""Perplexity of held-out text: the summed loss of the targets that windows weigh 1."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
    every scored target once)."""

    def nll(params, inputs, targets, weights):
        return (sharded.token_losses(params, inputs, targets) * weights).sum(-1)

    total = batched.total(sharded, params, nll, windows, log=log, label=label)
    tokens = sum(int(w["weights"].sum()) if "weights" in w else len(w["targets"]) for w in windows)
    return {"tokens": tokens, "nll": total, "loss": total / tokens, "ppl": math.exp(total / tokens)}
