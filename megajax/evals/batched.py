"""Evaluation windows fed to the mesh in batches, sharded over `data` like training batches.

A window is a dict of (seq_len,) arrays: 'inputs', 'targets' and 'weights' (1 where a target is
scored, 0 elsewhere; all ones when absent). A per-row function of a (batch, seq_len) batch gives
one value per window; the sum over all windows comes back as a replicated scalar, so nothing
larger than a scalar crosses to the host and every process of a multi-host job reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.sharded_model import ShardedModel

# (params, inputs, targets, weights) -> (batch,) float32, traced under sharded.context()
RowFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def padded_batches(
    sharded: ShardedModel,
    samples: Sequence[dict],
    *,
    log: Callable[[str], None] | None = None,
    label: str = "samples",
):
    """Yield (start, rows): each batch of train.batch_size samples from `start`, as this
    process's rows of it (sharded.eval_rows) stacked field by field. The last batch is filled up
    with copies of sample 0: its rows at start + r >= len(samples) are fillers. About ten
    progress lines are logged, each once its batch has been used."""
    batch, n = sharded.cfg.train.batch_size, len(samples)
    num_batches = -(-n // batch)
    every = max(1, num_batches // 10)
    for b, start in enumerate(range(0, n, batch)):
        ids = np.arange(start, start + batch)[sharded.eval_rows]
        mine = [samples[i if i < n else 0] for i in ids]
        yield start, {k: np.stack([s[k] for s in mine]) for k in mine[0]}
        if log and ((b + 1) % every == 0 or b + 1 == num_batches):
            log(f"{label} {min(start + batch, n):,}/{n:,}")


def total(
    sharded: ShardedModel,
    params,
    row_fn: RowFn,
    windows: Sequence[dict],
    *,
    log: Callable[[str], None] | None = None,
    label: str = "windows",
) -> float:
    """Sum of row_fn over every window, in batches of train.batch_size (padded_batches; the
    filler windows weigh nothing)."""
    batch, n = sharded.cfg.train.batch_size, len(windows)
    summed = jax.jit(lambda p, x, y, w, keep: (row_fn(p, x, y, w) * keep).sum(dtype=jnp.float32))
    keep_sharding = NamedSharding(sharded.mesh, P(parallel.DATA))
    row_sharding = sharded.eval_sharding["inputs"]  # (batch, length) split over `data`
    # Batches add up in a Python float (float64). One batch stays in flight while the host
    # builds the next.
    result, pending = 0.0, jnp.float32(0)
    with sharded.context():
        for start, rows in padded_batches(sharded, windows, log=log, label=label):
            keep = (np.arange(start, start + batch) < n).astype(np.float32)
            weights = rows.get("weights", np.ones_like(rows["inputs"], np.float32))
            local = (rows["inputs"], rows["targets"], weights)
            dtypes = (np.int32, np.int32, np.float32)
            shape = (batch, rows["inputs"].shape[1])
            x, y, w = (
                jax.make_array_from_process_local_data(row_sharding, a.astype(t), shape)
                for a, t in zip(local, dtypes, strict=True)
            )
            k = jax.make_array_from_process_local_data(
                keep_sharding, keep[sharded.eval_rows], (batch,)
            )
            result, pending = result + float(pending), summed(params, x, y, w, k)
    return result + float(pending)
