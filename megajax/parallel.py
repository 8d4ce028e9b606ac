"""The Megatron-LM plan (arXiv 1909.08053, section 3) as one table: logical axis -> mesh axis.

Model code names only logical axes. With T = the `model` degree:
- `heads` splits the fused QKV columns (whole heads per shard) and the attention output rows;
  with grouped-query attention, `heads` splits the q columns and `kv_heads` the key/value
  weight's, whole heads per shard; with more shards than key/value heads, `kv_embed` splits
  that weight by rows instead, and each shard gathers it whole to compute its own head;
- `mlp` splits fc1's columns and fc2's rows;
- `vocab` splits the word embedding by rows; the tied LM head then yields vocabulary-sharded
  logits, which the cross-entropy reduces without gathering them;
- `batch` splits the data over `data`, `fsdp` and `expert`; everything else is replicated on
  every model shard;
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

Fully sharded data parallelism (ZeRO-3) is the one rule outside the table, because it splits
parameters and never activations (an activation's `embed` stays whole where a weight's is
split): `at_rest` adds `fsdp` to one dimension of every parameter, the first that the table
leaves whole, that is not the stacked `layers` axis and that the fsdp degree divides. The
parameters, their Adam moments and float32 masters are held so; `gathered` undoes the split
where the forward pass reads a weight (each layer's inside the layer scan), so only that
layer's whole copy is alive, and its gradient is reduced back onto the fsdp shards there.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from flax.core import spmd
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from megajax.mesh import (  # noqa: F401 (the mesh axes the table maps onto)
    CONTEXT,
    DATA,
    EXPERT,
    FSDP,
    MODEL,
    PIPELINE,
)

# The mesh axes that split the batch, outside the Mixture-of-Experts layers, in the mesh's
# order (a batch shard's index is its devices' position in the mesh).
BATCH = (DATA, FSDP, EXPERT)
# The name gathered() gives a gathered weight, so that the layer's remat policy drops it: the
# backward pass gathers it again rather than keep every layer's whole copy.
GATHERED = "fsdp_gathered"
# Logical axes that fsdp never splits: the layer scan slices the stacked layers one at a time.
UNSPLIT_BY_FSDP = ("layers", "stage")


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


def degree(axis: str) -> int:
    """The degree of mesh axis `axis` on the mesh being traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def model_degree() -> int:
    """The `model` degree of the mesh being traced under (1 without one)."""
    return degree(MODEL)


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes that a PartitionSpec entry (or a row of the table) names: None, an axis,
    or a tuple of them."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_axes() -> tuple[str, ...]:
    """The mesh axes that split the batch: those a replicated weight's gradient is summed
    over (none inside `per_batch_shard`, where each device keeps its own rows' gradients)."""
    return entry_axes(_active()["batch"])


# The vmap axis over the batch shards while per_batch_shard is in force (innermost last).
_shard_axis: list[str] = []


@contextlib.contextmanager
def per_batch_shard(axis_name):
    """Trace model code inside this block as one batch shard's: the body of a jax.vmap over
    the batch shards (axis `axis_name`, laid out over the batch axes by spmd_axis_name), or of
    a shard_map manual over the batch axes (`axis_name` their tuple). The
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


def mean_over_batch_shards(run, axes: tuple[str, ...], dtype):
    """Inside a shard_map manual over the batch `axes`: run() traced as one batch shard's
    (per_batch_shard), then the mean over the shards of every array it returns, one sum
    each in `dtype` (optim.grad_reduce="step"'s one reduction), back in the array's dtype."""
    n = jax.lax.psum(1, axes)
    with per_batch_shard(axes):
        out = run()
    return jax.tree.map(lambda g: (jax.lax.psum(g.astype(dtype), axes) / n).astype(g.dtype), out)


def batch_shard():
    """The axis (a vmap axis, or a tuple of manual mesh axes) over the batch shards of the code
    being traced (per_batch_shard), or None."""
    return _shard_axis[-1] if _shard_axis else None


def length_axes() -> tuple[str, ...]:
    """The mesh axes that split the sequence (`context`, or none)."""
    return entry_axes(_active()["length"])


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


def at_rest(shape: tuple[int, ...], compute: P, names, degrees: dict[str, int]) -> P:
    """The layout a parameter is held in on a mesh of these axis `degrees`: its compute spec
    (the table's) with `fsdp` on the first dimension that the spec leaves whole, that `names`
    (its logical axes) do not call `layers` or `stage` and that the fsdp degree divides; else
    within the first dimension the spec splits over one axis whose shards it divides; the
    compute spec itself when no dimension qualifies (a vector whose length fsdp does not
    divide stays whole, a few bytes)."""
    f = degrees.get(FSDP, 1)
    if f == 1:
        return compute
    dims = tuple(compute) + (None,) * (len(shape) - len(compute))
    names = tuple(names or ()) + (None,) * (len(shape) - len(names or ()))
    for i, (size, axis, name) in enumerate(zip(shape, dims, names, strict=True)):
        if axis is None and name not in UNSPLIT_BY_FSDP and size % f == 0:
            return P(*dims[:i], FSDP, *dims[i + 1 :])
    # Else a dimension the table splits over one mesh axis, further split within each of its
    # shards (a column-parallel layer's bias: `model`, then `fsdp`).
    for i, (size, axis, name) in enumerate(zip(shape, dims, names, strict=True)):
        if isinstance(axis, str) and name not in UNSPLIT_BY_FSDP:
            if size % (f * degrees.get(axis, 1)) == 0:
                return P(*dims[:i], (axis, FSDP), *dims[i + 1 :])
    return compute


def model_copy_axis(compute: P, names, *, adapter: bool = False) -> int | None:
    """Where a parameter takes its axis of one copy per `model` shard under
    optim.grad_reduce="step" (after the stacked `layers` axis, else first), or None: for a
    parameter whose gradient is a sum of the model shards' partial ones. Under sequence
    parallelism that is each one the table leaves whole over `model` (norms, row-parallel
    biases, position rows: each shard applies it to its own chunk of the sequence); a
    key/value weight split by rows and its bias (each shard reads them whole for its own
    heads); and a LoRA factor whole over `model` (`adapter`: a column-parallel layer's A, a
    row-parallel one's B, each applied to the shard's own part of the layer). Each shard
    then differentiates its own copy, so that the step sums the copies once, after the
    micro-batch loop, rather than each micro-batch's backward pass over `model`."""
    names = tuple(names or ())
    kv = "kv_embed" in names or "kv_heads" in names
    by_rows = kv and MODEL in entry_axes(_active()["kv_embed"])
    sequence_parallel = MODEL in entry_axes(_active()["residual_length"])
    whole = not any(MODEL in entry_axes(e) for e in compute)
    if degree(MODEL) == 1 or not (by_rows or (whole and (sequence_parallel or adapter))):
        return None
    return 1 if names[:1] and names[0] in UNSPLIT_BY_FSDP else 0


def model_copies(x: jax.Array, ndim: int) -> bool:
    """Whether a parameter that has `ndim` dimensions arrives as one copy per `model` shard
    (model_copy_axis) in front of them."""
    return x.ndim == ndim + 1


def per_chunk(f, x: jax.Array, *copies: jax.Array, along: tuple = ()) -> jax.Array:
    """f(x, *copies, *along) with each parameter of `copies` held as one copy per `model`
    shard (model_copies): copy i applies to the i-th of x's equal chunks along its length
    (dimension 1), as laid out under sequence parallelism, so that no shard reads another's
    copy. f takes x's chunks (batch, chunks, length / chunks, ...), the copies as (chunks,
    1, ...) (None stays None) and the (batch, length, ...) arrays of `along` chunked as x."""

    def chunked(a):
        b, s, *rest = a.shape
        return constrain(a.reshape(b, chunks, s // chunks, *rest), "batch", "residual_length")

    chunks = copies[0].shape[0]
    spread = tuple(None if c is None else c[:, None] for c in copies)
    return f(chunked(x), *spread, *map(chunked, along)).reshape(x.shape)


def fsdp_degree() -> int:
    """The `fsdp` degree of the mesh being traced under (1 without one)."""
    return degree(FSDP)


def gathered(x: jax.Array, names) -> jax.Array:
    """A parameter held split over `fsdp` (at_rest), constrained to the layout the table gives
    its logical `names` (the last x.ndim of them: a layer's slice of a stacked weight drops
    `layers`): one all-gather over `fsdp` where it is read; its transpose, in the backward pass,
    sums the batch shards' gradients onto the fsdp shards (a reduce-scatter). Without an fsdp
    axis, x itself, so that the program is the one built without it."""
    if fsdp_degree() == 1 or names is None:
        return x
    names = tuple(names)[len(names) - x.ndim :]
    return checkpoint_name(jax.lax.with_sharding_constraint(x, spec(*names)), GATHERED)


def keep_all_but_gathered(prim, *_, **params) -> bool:
    """A remat policy (jax.checkpoint's `policy`) that saves every value of a layer for its
    backward pass but the weights gathered over `fsdp`, which the backward pass gathers again
    from the shards. A gathered weight is the `GATHERED`-named output of a sharding constraint
    whose layout names no batch axis (an activation's always splits the batch over `fsdp`);
    both must be unsaved, or the constraint's output is saved in the name's place."""
    if prim.name == "name":
        return params.get("name") != GATHERED
    if prim.name == "sharding_constraint":
        axes = jax.tree.leaves(tuple(getattr(params["sharding"], "spec", ())))
        return FSDP in axes
    return True


def gathered_variables(state, *, stacked: bool = True):
    """gathered() on each parameter of an nnx State, reading its logical names from its
    Variable's metadata; with `stacked=False` only those outside the stacked layers (which
    the layer scan gathers one layer at a time)."""

    def gather(v):
        names = v.get_metadata().get("out_sharding")
        if not stacked and names and names[0] in UNSPLIT_BY_FSDP:
            return v
        return v.replace(gathered(v[...], names))

    if fsdp_degree() == 1:
        return state
    return jax.tree.map(gather, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
