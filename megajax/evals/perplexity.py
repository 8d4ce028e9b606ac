"""Perplexity of held-out text: every token scored once, in non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.trainer import Trainer


def score(trainer: Trainer, params, windows: Sequence[dict]) -> dict[str, float]:
    """Summed and mean negative log-likelihood and perplexity over `windows` (samples with
    'inputs' and 'targets', (seq_len,) each, that together cover every target token once)."""
    batch, n = trainer.cfg.train.batch_size, len(windows)
    summed = jax.jit(
        lambda p, x, y, w: (trainer.token_losses(p, x, y) * w[:, None]).sum(dtype=jnp.float32)
    )
    weights_sharding = NamedSharding(trainer.mesh, P(parallel.DATA))
    rows = trainer.eval_rows  # this process's share of each batch
    total, count = 0.0, 0
    with trainer.context():
        for start in range(0, n, batch):
            # The last batch is filled up with copies of window 0 that weigh nothing.
            ids = [i if i < n else 0 for i in range(start, start + batch)]
            weight = np.array([float(i < n) for i in range(start, start + batch)], np.float32)
            samples = [windows[ids[r]] for r in rows]
            x, y = (np.stack([s[k] for s in samples]) for k in ("inputs", "targets"))
            w = jax.make_array_from_process_local_data(weights_sharding, weight[rows], (batch,))
            b = trainer.put_eval_batch({"inputs": x, "targets": y})
            total += float(summed(params, b["inputs"], b["targets"], w))
            count += int(weight.sum()) * x.shape[1]
    return {"tokens": count, "nll": total, "loss": total / count, "ppl": math.exp(total / count)}
