"""Perplexity of a token stream, every token scored once, in non-overlapping windows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.trainer import Trainer


def windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (n, seq_len): consecutive windows covering all but the last
    partial one; every target token appears exactly once."""
    n = (len(tokens) - 1) // seq_len
    body = tokens[: n * seq_len + 1]
    return body[:-1].reshape(n, seq_len), body[1:].reshape(n, seq_len)


def score(trainer: Trainer, params, tokens: np.ndarray) -> dict[str, float]:
    """Summed and mean negative log-likelihood and perplexity of `tokens` under `params`."""
    cfg = trainer.cfg
    inputs, targets = windows(tokens, cfg.model.seq_len)
    batch = cfg.train.batch_size
    summed = jax.jit(
        lambda p, x, y, w: (trainer.token_losses(p, x, y) * w[:, None]).sum(dtype=jnp.float32)
    )
    weights_sharding = NamedSharding(trainer.mesh, P(parallel.DATA))
    total = 0.0
    with trainer.context():
        for start in range(0, len(inputs), batch):
            x, y = inputs[start : start + batch], targets[start : start + batch]
            weight = np.ones(batch, np.float32)
            if len(x) < batch:  # pad the last batch with copies that weigh nothing
                weight[len(x) :] = 0
                x, y = (np.concatenate([a, np.repeat(a[:1], batch - len(a), 0)]) for a in (x, y))
            rows = trainer.eval_rows  # this process's share of the batch
            weight = jax.make_array_from_process_local_data(
                weights_sharding, weight[rows], (batch,)
            )
            x, y = x[rows], y[rows]
            total += float(summed(params, *trainer.put_eval_batch(x, y), weight))
    count = targets.size
    return {"tokens": count, "nll": total, "loss": total / count, "ppl": math.exp(total / count)}
