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
from megajax.trainer import Trainer

# (params, inputs, targets, weights) -> (batch,) float32, traced under trainer.context()
RowFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def total(
    trainer: Trainer,
    params,
    row_fn: RowFn,
    windows: Sequence[dict],
    *,
    log: Callable[[str], None] | None = None,
    label: str = "windows",
) -> float:
    """Sum of row_fn over every window, in batches of train.batch_size.

    Each process builds only its rows (trainer.eval_rows) of a batch. The last batch is filled
    up with copies of window 0 that weigh nothing.
    """
    batch, n = trainer.cfg.train.batch_size, len(windows)
    summed = jax.jit(lambda p, x, y, w, keep: (row_fn(p, x, y, w) * keep).sum(dtype=jnp.float32))
    keep_sharding = NamedSharding(trainer.mesh, P(parallel.DATA))
    rows = trainer.eval_rows
    num_batches = -(-n // batch)
    every = max(1, num_batches // 10)  # about ten progress lines
    # Batches add up in a Python float (float64). One batch stays in flight while the host
    # builds the next.
    result, pending = 0.0, jnp.float32(0)
    with trainer.context():
        for b, start in enumerate(range(0, n, batch)):
            ids = np.arange(start, start + batch)
            keep = (ids < n).astype(np.float32)
            samples = [windows[i if i < n else 0] for i in ids[rows]]
            length = samples[0]["inputs"].shape[0]
            ones = np.ones(length, np.float32)
            local = (
                np.stack([s["inputs"] for s in samples]).astype(np.int32),
                np.stack([s["targets"] for s in samples]).astype(np.int32),
                np.stack([s.get("weights", ones) for s in samples]).astype(np.float32),
            )
            x, y, w = (
                jax.make_array_from_process_local_data(
                    trainer.eval_sharding["inputs"], a, (batch, length)
                )
                for a in local
            )
            k = jax.make_array_from_process_local_data(keep_sharding, keep[rows], (batch,))
            result, pending = result + float(pending), summed(params, x, y, w, k)
            if log and ((b + 1) % every == 0 or b + 1 == num_batches):
                log(f"{label} {min(start + batch, n):,}/{n:,}")
    return result + float(pending)
