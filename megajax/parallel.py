"""The Megatron-LM plan (arXiv 1909.08053, section 3) as one table: logical axis -> mesh axis.

Model code names only logical axes. With T = the `model` degree:
- `heads` splits the fused QKV columns (whole heads per shard) and the attention output rows;
  with grouped-query attention, `heads` splits the q columns and `kv_heads` the key/value
  weight's, whole heads per shard; with more shards than key/value heads, `kv_embed` splits
  that weight by rows instead, and each shard gathers it whole to compute its own head;
- `mlp` splits fc1's columns and fc2's rows;
- `vocab` splits the word embedding by rows; the tied LM head then yields vocabulary-sharded
  logits, which the cross-entropy reduces without gathering them;
- `batch` splits the data over `data` and `expert`; everything else is replicated on every
  model shard;
- `experts` splits a Mixture-of-Experts layer's experts over `expert`: there the tokens travel
  to their experts' shards and back by all-to-all (megajax/moe.py), and everywhere else
  `expert` is one more data-parallel axis; `expert_mlp` splits each expert's inner width over
  `model` (expert tensor parallelism: one all-reduce after the experts, as after fc2);
- `layers` (the stacked layers' leading axis) and `stage` (the pipeline's stage axis, which
  those layers are reshaped into) split over `pipeline`: each pipeline rank holds consecutive
  layers, and with one pipeline rank (the default) nothing changes;
- `residual_length` is the length of the residual stream between the tensor-parallel regions
  (layer norms, dropout, residual adds). Sequence parallelism (arXiv 2205.05198) splits it over
  `model`: each all-reduce after a row-parallel matmul becomes a reduce-scatter, and each
  column-parallel matmul all-gathers its input first (`layers.Dense.row_parallel` and
  `column_parallel` read the table and emit them as true collectives).
- `length` (every activation's sequence) splits over `context` on a mesh with context > 1
  (context parallelism): weights are replicated there and their gradients summed over it, as
  over `data`; attention gathers the other ranks' keys and values (context_attention.py).
  With sequence parallelism the residual stream splits over (context, model): each context
  rank's chunk further split over `model`.
Changing the plan is a change to the table alone.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from megajax.mesh import (  # noqa: F401 (the mesh axes the table maps onto)
    CONTEXT,
    DATA,
    EXPERT,
    MODEL,
    PIPELINE,
)

# The mesh axes that split the batch, outside the Mixture-of-Experts layers.
BATCH = (DATA, EXPERT)


def rules(
    *, sequence_parallel: bool = False, kv_by_rows: bool = False, context: bool = False
) -> tuple[tuple[str, str | None], ...]:
    """The plan's table; `sequence_parallel` and `kv_by_rows` decide a row each, `context`
    (a mesh with context > 1) the two length rows. Without it the table is the one every
    mesh without a context axis compiled with, so those programs do not change."""
    length = CONTEXT if context else None
    residual = length
    if sequence_parallel:
        residual = (CONTEXT, MODEL) if context else MODEL
    return (
        ("batch", BATCH),
        ("experts", EXPERT),
        ("expert_mlp", MODEL),
        ("vocab", MODEL),
        ("heads", MODEL),
        ("kv_heads", None if kv_by_rows else MODEL),
        ("kv_embed", MODEL if kv_by_rows else None),
        ("mlp", MODEL),
        ("embed", None),
        ("length", length),
        ("residual_length", residual),
        ("position", None),
        ("layers", PIPELINE),
        ("stage", PIPELINE),
    )


RULES = rules()


def _active() -> dict[str, str | None]:
    """The table set by `nnx.logical_axis_rules` (the trainer's context), else the default."""
    return dict(spmd.get_logical_axis_rules() or RULES)


def spec(*logical: str | None) -> P:
    """PartitionSpec for a tensor whose dimensions carry these logical names."""
    table = _active()
    return P(*(None if name is None else table[name] for name in logical))


def model_degree() -> int:
    """The `model` degree of the mesh being traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(MODEL, 1)


def batch_axes() -> tuple[str, ...]:
    """The mesh axes that split the batch: those a replicated weight's gradient is summed
    over (none inside `batch_manual`, where each device keeps its own rows' gradients)."""
    axes = _active()["batch"]
    return axes if isinstance(axes, tuple) else tuple(a for a in (axes,) if a is not None)


# The vmap axis over the batch shards while per_batch_shard is in force (innermost last).
_shard_axis: list[str] = []


@contextlib.contextmanager
def per_batch_shard(axis_name: str):
    """Trace model code inside this block as one batch shard's: the body of a jax.vmap over
    the batch shards (axis `axis_name`, laid out over the batch axes by spmd_axis_name). The
    table's `batch` row is None, since each call holds only its shard's rows, so that the
    layers' own shard_maps over `model` leave the batch alone and sum no gradient over it;
    `dropout.dropout` draws each row the bits the whole batch would give it (batch_shard)."""
    table = tuple((name, None if name == "batch" else axis) for name, axis in _active().items())
    _shard_axis.append(axis_name)
    try:
        with nnx.logical_axis_rules(table):
            yield
    finally:
        _shard_axis.pop()


def batch_shard() -> str | None:
    """The vmap axis over the batch shards of the code being traced (per_batch_shard), or
    None."""
    return _shard_axis[-1] if _shard_axis else None


def length_axes() -> tuple[str, ...]:
    """The mesh axes that split the sequence (`context`, or none)."""
    axes = _active()["length"]
    return () if axes is None else (axes,) if isinstance(axes, str) else axes


def gradient_axes() -> tuple[str, ...]:
    """The mesh axes a replicated weight's gradient is summed over: those that split the
    batch and those that split the sequence."""
    return batch_axes() + length_axes()


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Pin an activation's layout so the compiler emits the plan's collectives, no others."""
    return jax.lax.with_sharding_constraint(x, spec(*logical))


def model_dims(p: P) -> list[int]:
    """The dimensions that a PartitionSpec splits over `model` (alone, or innermost under
    `context`: each context chunk split over `model`)."""
    return [
        i
        for i, axis in enumerate(p)
        if axis == MODEL or (isinstance(axis, tuple) and MODEL in axis)
    ]


def sum_over_model(x: jax.Array, out_spec: P) -> jax.Array:
    """Inside shard_map: the sum of x's partial values over `model`, all-reduced, or
    reduce-scattered along the dimension that `out_spec` splits over `model`."""
    split = model_dims(out_spec)
    if not split:
        return jax.lax.psum(x, MODEL)
    return jax.lax.psum_scatter(x, MODEL, scatter_dimension=split[0], tiled=True)


def gather_over_model(x: jax.Array, dims) -> jax.Array:
    """Inside shard_map: x whole along `dims`, which are split over `model`, all-gathered (the
    transpose, in the backward pass, is a reduce-scatter)."""
    for dim in dims:
        x = jax.lax.all_gather(x, MODEL, axis=dim, tiled=True)
    return x
