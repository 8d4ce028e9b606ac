"""Evaluation windows fed to the mesh in batches, sharded over `data` like training batches.

A window is a dict of (seq_len,) arrays: 'inputs', 'targets' and 'weights' (1 where a target is
scored, 0 elsewhere; all ones when absent), and for packed documents 'segments' and
'positions' (models.gpt.batch_fields). A per-row function of a (batch, seq_len) batch gives
one value per window (or a tuple of them); the sum over all windows comes back as a replicated
scalar (or a tuple), so nothing larger than a scalar crosses to the host and every process of a
multi-host job reads it.
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

# (params, {field: (batch, seq_len)}) -> (batch,) values, or a tuple of them; traced under
# sharded.context(). The fields are the windows': inputs and targets, weights (float32),
# segments and positions where the windows have them.
RowFn = Callable[[object, dict], jax.Array | tuple[jax.Array, ...]]
FIELDS = ("inputs", "targets", "weights", "segments", "positions")


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
):
    """Sum of row_fn over every window (a tuple of sums where row_fn gives a tuple), in batches
    of train.batch_size (padded_batches; the filler windows weigh nothing): float32 values are
    summed in float32 per batch, integers exactly."""
    batch, n = sharded.cfg.train.batch_size, len(windows)

    summed = jax.jit(
        lambda p, fields, keep: jax.tree.map(lambda v: _kept_sum(v, keep), row_fn(p, fields))
    )
    keep_sharding = NamedSharding(sharded.mesh, P(parallel.BATCH))
    row_sharding = sharded.eval_sharding["inputs"]  # (batch, length) split over `data`
    # Batches add up in Python numbers (float64, or int). One batch stays in flight while the
    # host builds the next.
    result, pending = None, None
    with sharded.context():
        for start, rows in padded_batches(sharded, windows, log=log, label=label):
            keep = np.arange(start, start + batch) < n
            rows.setdefault("weights", np.ones_like(rows["inputs"], np.float32))
            shape = (batch, rows["inputs"].shape[1])
            fields = {
                k: jax.make_array_from_process_local_data(
                    row_sharding, rows[k].astype(np.float32 if k == "weights" else np.int32), shape
                )
                for k in FIELDS
                if k in rows
            }
            k = jax.make_array_from_process_local_data(
                keep_sharding, keep[sharded.eval_rows], (batch,)
            )
            result, pending = _add(result, pending), summed(params, fields, k)
    return _add(result, pending)


def _kept_sum(values: jax.Array, keep: jax.Array) -> jax.Array:
    """The sum of the kept rows' values: float32 for floating values, exact for integers."""
    if jnp.issubdtype(values.dtype, jnp.integer):
        return jnp.where(keep, values, 0).sum()
    return jnp.where(keep, values, 0).sum(dtype=jnp.float32)


def _add(result, pending):
    """result + pending (a batch's device sums, or None), in Python numbers on the host."""
    if pending is None:
        return result
    done = jax.tree.map(lambda v: v.item(), pending)
    return done if result is None else jax.tree.map(lambda a, b: a + b, result, done)
