"""Transformer layers whose parameters carry logical axis names (mapped to the mesh in parallel.py).

The math is written for one device; `parallel.constrain` pins activation layouts so that
`jax.jit` compiles Megatron's column/row splits: QKV and fc1 are column-parallel (no
communication), the attention output and fc2 are row-parallel (one all-reduce each). The
residual stream between them is laid out as `residual_length` says: with sequence parallelism
the all-reduces become a reduce-scatter after each row-parallel matmul and an all-gather before
each column-parallel one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import context_attention, parallel
from megajax.config import ConfigError
from megajax.dropout import dropout, kept
from megajax.parallel import constrain
from megajax.rope import rope


def _normal(std: float, *axes: str | None):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _zeros(*axes: str | None):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _ones(*axes: str | None):
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


def split_key(key):
    """A model's dropout key as (the embedding's, the stacked layers'); (None, None) without
    dropout."""
    return (None, None) if key is None else tuple(jax.random.split(key))


class LayerNorm(nnx.Module):
    """Layer norm computed in float32 whatever the compute dtype; replicated on model shards.
    `recompute`: keep only the input for the backward pass, not its float32 intermediates."""

    def __init__(self, dim: int, *, eps: float, recompute: bool = False, bias: bool = True):
        self.scale = nnx.Param(_ones("embed")(None, (dim,)))
        self.bias = nnx.Param(_zeros("embed")(None, (dim,))) if bias else None
        self.eps = eps
        self.recompute = recompute

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(_layer_norm, eps=self.eps)
        if self.recompute:
            norm = jax.checkpoint(norm, prevent_cse=False)
        scale, bias = self.scale[...], None if self.bias is None else self.bias[...]
        if parallel.model_copies(scale, 1):  # one per model shard: each on its chunk
            return parallel.per_chunk(norm, x, scale, bias)
        return norm(x, scale, bias)


def _layer_norm(x, scale, bias, *, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + (0.0 if bias is None else bias)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale (Llama's), in float32 whatever the compute dtype; replicated."""

    def __init__(self, dim: int, *, eps: float, recompute: bool = False):
        self.scale = nnx.Param(_ones("embed")(None, (dim,)))
        self.eps = eps
        self.recompute = recompute

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(_rms_norm, eps=self.eps)
        if self.recompute:
            norm = jax.checkpoint(norm, prevent_cse=False)
        if parallel.model_copies(self.scale[...], 1):  # one per model shard (LayerNorm)
            return parallel.per_chunk(norm, x, self.scale[...])
        return norm(x, self.scale[...])


def _rms_norm(x, scale, *, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def norm(cfg, *, recompute: bool = False) -> LayerNorm | RMSNorm:
    """The normalization model.norm names."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden, eps=cfg.layernorm_eps, recompute=recompute)
    return LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, recompute=recompute, bias=cfg.bias)


def _times(x, kernel, keep, rate):
    """x, under dropout where `keep` (a mask) is given, times kernel."""
    return jnp.einsum("...i,io->...o", x if keep is None else _drop(x, keep, rate), kernel)


def _drop(x, keep, rate):
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _gathered_matmul(x, kernels, keeps, dims, rate=0.0, whole=None):
    """_summed_matmul with the batch axes in force where the forward pass is traced: its
    backward pass, traced later, must sum the kernels' gradients over those."""
    return _summed_matmul(x, kernels, keeps, dims, rate, whole, parallel.gradient_axes())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _summed_matmul(x, kernels, keeps, dims, rate, whole, batch_axes):
    """Inside shard_map: x all-gathered over `model` along `dims`, times each of `kernels` (a
    LoRA adapter's A beside its layer's kernel shares the gather), each under dropout where
    `keeps` holds a mask for it. As Megatron-LM does, the backward pass gathers x again rather
    than keep the whole sequence (only the 1 / T shard is saved) and reduce-scatters x's
    gradient, all kernels' terms summed first. `whole`: which kernels are whole on every model
    shard (a LoRA A; None: none).

    With no `dims` it is the plain matmuls, whose backward pass reads the kernels as they were
    passed in: a frozen layer's kernel, sliced from the stacked layers, is read there again
    rather than copied out per layer as a residual (as autodiff of a shard_map would)."""
    gathered = parallel.gather_over_model(x, dims)
    return tuple(_times(gathered, k, m, rate) for k, m in zip(kernels, keeps, strict=True))


def _summed_matmul_fwd(x, kernels, keeps, dims, rate, whole, batch_axes):
    return _summed_matmul(x, kernels, keeps, dims, rate, whole, batch_axes), (x, kernels, keeps)


def _summed_matmul_bwd(dims, rate, whole, batch_axes, saved, dys):
    x, kernels, keeps = saved
    gathered = parallel.gather_over_model(x, dims)
    batch_dims = tuple(range(gathered.ndim - 1))
    dkernels, dx = [], 0
    for i, (kernel, keep, dy) in enumerate(zip(kernels, keeps, dys, strict=True)):
        seen = gathered if keep is None else _drop(gathered, keep, rate)
        dkernel = jax.lax.dot_general(dy, seen, ((batch_dims, batch_dims), ((), ()))).T
        # A kernel the same on every `data` shard (and an adapter's A, the same on every
        # `model` shard too) has the sum of theirs as its gradient, in float32. A frozen
        # kernel's gradient is never used, and XLA drops it.
        axes = batch_axes + ((parallel.MODEL,) if whole and whole[i] else ())
        dkernels.append(jax.lax.psum(dkernel.astype(jnp.float32), axes).astype(kernel.dtype))
        term = jnp.einsum("...o,io->...i", dy, kernel)
        dx = dx + (term if keep is None else _drop(term, keep, rate))
    for dim in dims:
        dx = jax.lax.psum_scatter(dx, parallel.MODEL, scatter_dimension=dim, tiled=True)
    no_gradient = tuple(None if m is None else np.zeros(m.shape, jax.dtypes.float0) for m in keeps)
    return dx, tuple(dkernels), no_gradient


_summed_matmul.defvjp(_summed_matmul_fwd, _summed_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered_rows(w, dtype):
    """Inside shard_map: a weight split by rows over `model`, all-gathered whole in the compute
    `dtype`; the backward pass reduce-scatters its gradient back to the rows in the weight's
    dtype (float32), so that the shards' partial gradients are summed at full precision."""
    return jax.lax.all_gather(w.astype(dtype), parallel.MODEL, axis=0, tiled=True)


def _gathered_rows_fwd(w, dtype):
    return _gathered_rows(w, dtype), jnp.empty((0,), w.dtype)  # keeps only w's dtype


def _gathered_rows_bwd(dtype, empty_w, dw):
    return (jax.lax.psum_scatter(dw.astype(empty_w.dtype), parallel.MODEL, tiled=True),)


_gathered_rows.defvjp(_gathered_rows_fwd, _gathered_rows_bwd)


class Dense(nnx.Module):
    """y = x @ kernel + bias, with logical axes (in_axis, out_axis) on the kernel."""

    def __init__(
        self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, rngs, bias=True
    ):
        key = rngs.params()
        self.kernel = nnx.Param(_normal(std, *axes)(key, (d_in, d_out)))
        self.bias = nnx.Param(_zeros(axes[1])(None, (d_out,))) if bias else None
        self.axes = axes
        self.lora = nnx.data(None)  # a LoRA adapter (megajax.lora.attach), or none

    def __call__(self, x: jax.Array, *, key=None) -> jax.Array:
        """`key`: the LoRA adapter's dropout (none without one)."""
        kernel = self.kernel[...].astype(x.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel)
        if self.lora is not None:
            y = y + self.lora(x, key)
        return _add_bias(y, self._bias())

    def _bias(self):
        """The bias, or a zero-size stand-in for a layer without one (passed to shard_map)."""
        return jnp.zeros((0,)) if self.bias is None else self.bias[...]

    def column_parallel(self, x: jax.Array, *in_axes: str | None, key=None) -> jax.Array:
        """This layer on (batch, length, d_in) input laid out as the logical axes `in_axes`
        say, its d_out split over `model`: no communication, or an all-gather first where
        `in_axes` split a dimension over `model` (sequence parallelism; the backward pass
        then reduce-scatters the input's gradient). A LoRA adapter's x A comes from the same
        input on every shard, times B's columns; `key`: its dropout."""
        in_spec = parallel.spec(*in_axes)
        if self.lora is None and not parallel.model_dims(in_spec):
            return self(constrain(x, *in_axes))
        dims = tuple(parallel.model_dims(in_spec))
        adapter, adapter_specs = self._adapter_args(x, key, parallel.spec("batch", "length"))

        def local(x, kernel, bias, *adapter):
            y = column_matmuls(x, (kernel.astype(x.dtype),), dims, *adapter[:2], self.lora)
            if adapter:
                y = (y[0] + self.lora.up(y[1], adapter[2]),)
            return _add_bias(y[0], bias)

        return jax.shard_map(
            local,
            in_specs=(in_spec, parallel.spec(*self.axes), self._bias_spec(), *adapter_specs),
            out_specs=parallel.spec("batch", "length", self.axes[1]),
        )(constrain(x, *in_axes), self.kernel[...], self._bias(), *adapter)

    def row_parallel(self, x: jax.Array, *out: str | None, key=None) -> jax.Array:
        """This layer on (batch, length, d_in) input whose d_in is split over `model`, laid out
        as the logical axes `out` say: one all-reduce of the partial sums, or a reduce-scatter
        where `out` splits a dimension over `model` (sequence parallelism). A LoRA adapter's
        partial sums x_s A_s B join the layer's before that one collective; `key`: its
        dropout."""
        out_spec = parallel.spec(*out)
        if self.lora is None and not parallel.model_dims(out_spec):
            return constrain(self(x), *out)
        in_spec = parallel.spec("batch", "length", self.axes[0])
        adapter, adapter_specs = self._adapter_args(x, key, in_spec)

        def local(x, kernel, bias, *adapter):
            if not adapter:
                partial = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
            else:
                keep, a, b = adapter
                b = b[0] if parallel.model_copies(b, 2) else b  # this shard's own copy
                kernels, keeps = (kernel.astype(x.dtype), a.astype(x.dtype)), (None, keep)
                partial, low = _gathered_matmul(x, kernels, keeps, (), self.lora.rate)
                partial = partial + self.lora.up(low, b)
            if parallel.model_copies(bias, 1):  # this shard's own copy (_bias_spec)
                bias = bias[0]
            return _add_bias(parallel.sum_over_model(partial, out_spec), bias)

        return jax.shard_map(
            local,
            in_specs=(in_spec, parallel.spec(*self.axes), self._bias_spec(), *adapter_specs),
            out_specs=out_spec,
        )(x, self.kernel[...], self._bias(), *adapter)

    def _adapter_args(self, x, key, keep_spec):
        """The LoRA adapter's shard_map arguments (dropout mask or None, A, B) and their
        specs; none without an adapter. The mask is drawn here, outside shard_map, over x's
        whole shape laid out as `keep_spec` says, so that its bits depend on the position
        alone, not on the mesh."""
        if self.lora is None:
            return (), ()
        keep = self.lora.keep_mask(x.shape, key)
        if keep is not None:
            keep = jax.lax.with_sharding_constraint(keep, keep_spec)
        keep_spec = None if keep is None else keep_spec
        return (keep, *self.lora.factors()), (keep_spec, *self.lora.specs())

    def _bias_spec(self):
        if self.bias is not None and parallel.model_copies(self.bias[...], 1):
            return P(parallel.MODEL)  # one copy per model shard (parallel.model_copy_axis)
        return parallel.spec(None if self.bias is None else self.axes[1])


def column_matmuls(x, kernels, dims, keep=None, a=None, adapter=None):
    """Inside shard_map: x, gathered over `model` along `dims` (if any), times each of
    `kernels`, and with a LoRA adapter's A (whole on every shard) dropout(x) A last. x is
    taken as varying over `model`, so that each shard's terms of x's gradient are summed in the
    base layer's one collective (an all-reduce when x is whole, a reduce-scatter under sequence
    parallelism) and those of A's gradient in its own gradient's reduction, not before; or,
    where A arrives as this shard's own copy (parallel.model_copy_axis), left on the shard."""
    if a is None:
        if dims:
            return _gathered_matmul(x, kernels, (None,) * len(kernels), dims)
        return tuple(jnp.einsum("...i,io->...o", x, k) for k in kernels)
    copied = parallel.model_copies(a, 2)
    a, keeps = (a[0] if copied else a).astype(x.dtype), (None,) * len(kernels) + (keep,)
    if not dims:  # x is the same on every shard: its gradient, varying, is summed once
        x = jax.lax.pcast(x, parallel.MODEL, to="varying")
    whole = (False,) * len(kernels) + (not copied,)
    return _gathered_matmul(x, (*kernels, a), keeps, dims, adapter.rate, whole)


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y if bias.size == 0 else y + bias.astype(y.dtype)


def padded_normal(std: float, real_rows: int):
    """N(0, std) rows for the real vocabulary, zeros for the padding rows after them.

    The real rows do not depend on how far the table is padded, so the same seed gives the same
    model on every model degree; padded rows get no gradient (their logits are masked) and stay 0.
    """
    normal = nnx.initializers.normal(std)

    def init(key, shape, dtype=jnp.float32):
        real = normal(key, (real_rows, *shape[1:]), dtype)
        return jnp.pad(real, ((0, shape[0] - real_rows), (0, 0)))

    return init


class VocabEmbedding(nnx.Module):
    """Word embedding split by vocabulary rows over `model` (Megatron's VocabParallelEmbedding).

    Each model shard looks up the ids in its own row range, writes zeros for the others, and
    one all-reduce over `model` sums the pieces (a reduce-scatter over the sequence with
    sequence parallelism): the table is never gathered.
    """

    def __init__(self, vocab: int, padded_vocab: int, dim: int, *, std: float, rngs):
        init = nnx.with_partitioning(padded_normal(std, vocab), ("vocab", "embed"))
        self.embedding = nnx.Param(init(rngs.params(), (padded_vocab, dim)))

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        table = self.embedding[...].astype(dtype)

        def lookup(table, ids):  # table: (vocab / T, embed); ids: (batch / D, length)
            start = jax.lax.axis_index(parallel.MODEL) * table.shape[0]
            local = ids - start
            inside = (local >= 0) & (local < table.shape[0])
            rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
            return parallel.sum_over_model(jnp.where(inside[..., None], rows, 0), out_spec)

        out_spec = parallel.spec("batch", "residual_length", "embed")
        return jax.shard_map(
            lookup,
            in_specs=(parallel.spec("vocab", "embed"), parallel.spec("batch", "length")),
            out_specs=out_spec,
        )(table, ids)


class Attend(NamedTuple):
    """What attention reads besides the activations, each (batch, length) or None:
    `padding` True on real tokens, which come first (BERT); `segments` the document of each
    position, from 1, 0 on padding (packed documents attend only within their own); `positions`
    each token's position within its document (RoPE's; a packed row restarts them)."""

    padding: jax.Array | None = None
    segments: jax.Array | None = None
    positions: jax.Array | None = None
    # Each slot's position in the original sequence, when the sequence is reordered (context
    # parallelism's causal load balance): causal masks and dropout bits follow it.
    order: jax.Array | None = None


def same_document(segments: jax.Array) -> jax.Array:
    """(batch, 1, query, key) bool: both positions in the same document, the key a real one."""
    same = segments[:, :, None] == segments[:, None, :]
    return (same & (segments[:, None, :] > 0))[:, None]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused, head-interleaved QKV projection.

    QKV columns are laid out (head, {q, k, v}, head_dim), so splitting them over `model` gives
    each shard whole heads and their q, k and v: the heads run locally and the only
    communication is the all-reduce after the row-parallel output projection. Grouped-query
    attention (model.num_kv_heads below num_heads) has a q weight, split by heads, and a kv
    weight, (kv_head, {k, v}, head_dim), split by key/value heads; each shard concatenates its
    pieces into one matmul, so the communication is the same. With more model shards than
    key/value heads the kv weight is split by rows instead (the plan's `kv_embed` row): each
    shard all-gathers it, computes the one head that its query heads share, and its gradient
    is reduce-scattered back to the rows. A causal model (GPT) masks future keys; `padding`
    masks the keys after each sequence's length (BERT); `segments` keep packed documents
    apart. model.positions="rope" turns q and k by their positions, head by head (megajax/rope.py,
    scaled as model.rope_scaling says). With the sequence split over `context` the core is
    megajax/context_attention.py's: K and V, at key/value-slot width, travel between the
    context ranks, and masks follow each slot's original position (Attend.order).
    """

    def __init__(self, cfg, *, out_std: float, rngs):
        h = cfg.hidden
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.kv_heads, self.grouped = cfg.kv_heads, cfg.grouped_query
        self.rope_theta = cfg.rope_theta if cfg.positions == "rope" else None
        self.rope_scaling = cfg.rope_scaling
        self.dropout_rate = cfg.dropout
        self.implementation = cfg.attention
        self.causal = cfg.arch == "gpt"
        self.context_attention = cfg.context_attention
        # Selective recomputation: the core (scores, softmax, dropout, values) is recomputed in
        # the backward pass, so no (batch, heads, length, length) tensor is kept for it.
        self.recompute_core = cfg.remat == "selective"
        if cfg.attention not in ("einsum", "xla", "cudnn"):
            raise ConfigError(f"model.attention={cfg.attention!r}: use einsum, xla or cudnn")
        if cfg.attention != "einsum" and cfg.dropout > 0:
            raise ConfigError(
                f"model.attention={cfg.attention} has no attention dropout: set model.dropout=0 "
                "or model.attention=einsum"
            )
        dense = functools.partial(Dense, rngs=rngs, bias=cfg.bias, std=cfg.init_std)
        if self.grouped:
            self.q = dense(h, h, ("embed", "heads"))
            self.kv = dense(h, 2 * cfg.kv_heads * cfg.head_dim, ("kv_embed", "kv_heads"))
        else:
            self.qkv = dense(h, 3 * h, ("embed", "heads"))
        self.proj = Dense(h, h, ("heads", "embed"), std=out_std, rngs=rngs, bias=cfg.bias)

    def _project(self, x, positions, *in_axes: str | None, key=None):
        """q (batch, length, heads, head_dim) and k, v (..., kv slots, head_dim) of x, laid out
        as the logical axes `in_axes` say; q and k turned by `positions`. The kv slots are the
        key/value heads, or one per model shard where the shards outnumber them. `key`: LoRA
        adapters' dropout."""
        b, s, d = x.shape[0], x.shape[1], self.head_dim
        if self.grouped:
            q, kv = self._grouped_projection(x, *in_axes, key=key)
            kv = constrain(kv.reshape(b, s, -1, 2, d), "batch", "length", "heads", None, None)
        else:
            qkv = self.qkv.column_parallel(x, *in_axes, key=key)
            qkv = qkv.reshape(b, s, self.num_heads, 3, d)
            qkv = constrain(qkv, "batch", "length", "heads", None, None)
            q, kv = qkv[..., 0, :], qkv[..., 1:, :]
        q = constrain(q.reshape(b, s, self.num_heads, d), "batch", "length", "heads", None)
        k, v = kv[..., 0, :], kv[..., 1, :]
        if self.rope_theta is not None:
            turn = functools.partial(rope, theta=self.rope_theta, scaling=self.rope_scaling)
            q, k = turn(q, positions), turn(k, positions)
        return q, k, v

    def _grouped_projection(self, x, *in_axes: str | None, key=None):
        """Grouped-query attention's q and kv projections as one column-parallel matmul per
        shard, over [this shard's q columns | its key/value heads' columns] (see
        Dense.column_parallel for the input's layout and its all-gather). LoRA adapters on
        both (lora.targets "qkv") share that matmul with their A side by side; `key`: their
        dropout."""
        in_spec = parallel.spec(*in_axes)
        dims = tuple(parallel.model_dims(in_spec))
        width = 2 * self.head_dim  # one key/value head's k and v columns
        by_rows = parallel.spec("kv_embed")[0] == parallel.MODEL
        q, kv = self.q, self.kv

        def local(x, wq, bq, wkv, bkv, *lora):  # lora: keep, q's A and B, kv's A and B
            start = 0
            if by_rows:
                # Gathered whole, the backward pass reduce-scattering its gradient; or this
                # shard's own whole copy (parallel.model_copy_axis), its gradient left here.
                copied = parallel.model_copies(wkv, 2)
                wkv = wkv[0].astype(x.dtype) if copied else _gathered_rows(wkv, x.dtype)
                t = jax.lax.axis_size(parallel.MODEL)
                start = jax.lax.axis_index(parallel.MODEL) // (t // self.kv_heads) * width
                wkv = jax.lax.dynamic_slice_in_dim(wkv, start, width, axis=1)
                bkv = bkv[0] if parallel.model_copies(bkv, 1) else bkv
                bkv = bkv if bkv.size == 0 else jax.lax.dynamic_slice_in_dim(bkv, start, width)
            kernel = jnp.concatenate([wq.astype(x.dtype), wkv.astype(x.dtype)], axis=1)
            if not lora:
                (y,) = column_matmuls(x, (kernel,), dims)
            else:
                keep, a_q, b_q, a_kv, b_kv = lora
                # (hidden, 2 rank), or both shards' copies (1, hidden, 2 rank): one matmul
                a = jnp.concatenate([a_q, a_kv], axis=-1)
                y, low = column_matmuls(x, (kernel,), dims, keep, a, q.lora)
                if by_rows:  # B whole on every shard, each taking its head's columns: its
                    # gradient is summed over `data` and `model` in one collective (or this
                    # shard's own copy's, left on the shard)
                    if parallel.model_copies(b_kv, 2):
                        b_kv = b_kv[0]
                    else:
                        axes = (*parallel.gradient_axes(), parallel.MODEL)
                        b_kv = jax.lax.pcast(b_kv, axes, to="varying")
                    b_kv = jax.lax.dynamic_slice_in_dim(b_kv, start, width, axis=1)
                r = a_q.shape[-1]
                low_q, low_kv = low[..., :r], low[..., r:]
                y = y + jnp.concatenate([q.lora.up(low_q, b_q), kv.lora.up(low_kv, b_kv)], -1)
            y = _add_bias(y, jnp.concatenate([bq, bkv]))
            return y[..., : wq.shape[1]], y[..., wq.shape[1] :]

        # One dropout mask serves both adapters: they read the same input.
        lora_args, lora_specs = q._adapter_args(x, key, parallel.spec("batch", "length"))
        if lora_args:
            lora_args, lora_specs = lora_args + kv.lora.factors(), lora_specs + kv.lora.specs()
        out = parallel.spec("batch", "length", "heads")
        kv_spec = parallel.spec(*kv.axes)
        if parallel.model_copies(kv.kernel[...], 2):
            kv_spec = P(parallel.MODEL)
        return jax.shard_map(
            local,
            in_specs=(in_spec, parallel.spec(*q.axes), q._bias_spec())
            + (kv_spec, kv._bias_spec(), *lora_specs),
            out_specs=(out, out),
        )(x, q.kernel[...], q._bias(), kv.kernel[...], kv._bias(), *lora_args)

    def _repeat(self, kv):
        """(batch, length, kv slots, head_dim) -> (..., heads, ...): each query head's own."""
        group = self.num_heads // kv.shape[2]
        return kv if group == 1 else jnp.repeat(kv, group, axis=2)

    def __call__(self, x, *, attend: Attend, key) -> jax.Array:
        b, s = x.shape[0], x.shape[1]
        keys = [None] * 2 if key is None else [jax.random.fold_in(key, i) for i in (1, 2)]
        positions = jnp.arange(s)[None] if attend.positions is None else attend.positions
        q, k, v = self._project(x, positions, "batch", "residual_length", "embed", key=keys[0])
        policy = None
        if parallel.length_axes():  # the sequence split over `context`: K and V travel
            original = jnp.arange(s)[None] if attend.order is None else attend.order
            core = functools.partial(self._context_attention, positions=original)
            policy = context_attention.RECOMPUTE  # keeps the gathered K/V
        else:
            k, v = self._repeat(k), self._repeat(v)
            core = self._fused if self.implementation != "einsum" else self._einsum_attention
        # The ring core (context_attention="ring") recomputes block by block in its own
        # backward pass and keeps no scores: checkpointing it would only run the ring twice.
        ring = policy is not None and self.context_attention == "ring"
        if self.recompute_core and not ring:
            core = jax.checkpoint(core, prevent_cse=False, policy=policy)
        out = core(q, k, v, attend, key).reshape(b, s, -1)
        out = constrain(out, "batch", "length", "heads")
        return self.proj.row_parallel(out, "batch", "residual_length", "embed", key=keys[1])

    def _context_attention(self, q, k, v, attend, key, *, positions):
        """Attention with the sequence split over `context` (megajax/context_attention.py):
        k and v at key/value-slot width, masks and dropout bits from each slot's original
        position in the sequence, `positions` (batch or 1, length)."""
        positions = constrain(jnp.broadcast_to(positions, q.shape[:2]), "batch", "length")
        return context_attention.attention(
            q, k, v, positions=positions, segments=attend.segments, padding=attend.padding,
            causal=self.causal, key=key, rate=self.dropout_rate, name=self.context_attention,
        )  # fmt: skip

    def _fused(self, q, k, v, attend, key):
        """jax.nn.dot_product_attention told the mask's kind, not given a dense mask, so that a
        fused kernel keeps its causal mask type and skips the masked tiles; packed documents
        add their block-diagonal mask."""
        del key  # no attention dropout (checked in __init__)
        padding = attend.padding
        lengths = None if padding is None else padding.sum(-1, dtype=jnp.int32)
        mask = None if attend.segments is None else same_document(attend.segments)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=self.causal,
            key_value_seq_lengths=lengths,
            implementation=self.implementation,
        )

    def extend(self, x, k_cache, v_cache, *, start, positions, mask):
        """Attention of new tokens over a KV cache, for decoding: x (batch, new, hidden) sits at
        cache slots start .. start + new - 1 and at `positions` (batch, new); k_cache and
        v_cache are (batch, slots, kv slots, head_dim) (see _project), split over `model`,
        keys already turned by their positions. `mask` (batch, 1, new, slots) is True where a
        query may attend a slot. Returns the output and the new tokens' keys and values
        (batch, new, kv slots, head_dim); the caller writes them into its cache."""
        b, s, _ = x.shape
        q, k, v = self._project(x, positions, "batch", "length", "embed")
        k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
        k_all, v_all = self._repeat(k_all.astype(q.dtype)), self._repeat(v_all.astype(q.dtype))
        out = self._masked_attention(q, k_all, v_all, mask, None)
        out = constrain(out.reshape(b, s, -1), "batch", "length", "heads")
        return constrain(self.proj(out), "batch", "length", "embed"), k, v

    def _einsum_attention(self, q, k, v, attend, key):
        """softmax(q k^T / sqrt(d)) v with float32 scores, (batch, length, heads, head_dim)."""
        s = q.shape[1]
        mask = jnp.ones((1, 1, s, s), bool)  # (batch, heads, query, key)
        if self.causal:
            mask = jnp.tril(mask)
        if attend.padding is not None:
            mask = mask & attend.padding[:, None, None, :]
        if attend.segments is not None:
            mask = mask & same_document(attend.segments)
        return self._masked_attention(q, k, v, mask, key)

    def _masked_attention(self, q, k, v, mask, key):
        """The core under a mask broadcastable to (batch, heads, query, key)."""
        rate = self.dropout_rate
        keep = None
        if key is not None and rate > 0:
            scores = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (batch, heads, q, k)
            keep = kept(key, rate, scores)
        return context_attention.softmax_attention(q, k, v, mask, keep=keep, rate=rate)


def gelu(x: jax.Array, activation: str) -> jax.Array:
    """ "gelu_tanh" (GPT-2's tanh approximation) or "gelu" (the exact erf form, BERT's)."""
    return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


def swiglu(y: jax.Array) -> jax.Array:
    """fc1's (..., mlp * 2) output, gate and up interleaved unit by unit -> silu(gate) * up."""
    y = y.reshape(*y.shape[:-1], -1, 2)
    return jax.nn.silu(y[..., 0]) * y[..., 1]


class MLP(nnx.Module):
    """fc1 split by columns (GeLU stays local), fc2 split by rows (one all-reduce). SwiGLU
    fuses its gate and up projections into fc1, column j of each at fc1 columns 2j and 2j + 1,
    so that a shard's columns hold matching gate and up units."""

    def __init__(self, cfg, *, out_std: float, rngs):
        f, h = cfg.mlp_hidden, cfg.hidden
        dense = functools.partial(Dense, rngs=rngs, bias=cfg.bias)
        width = 2 * f if cfg.mlp == "swiglu" else f
        self.fc1 = dense(h, width, ("embed", "mlp"), std=cfg.init_std)
        self.fc2 = dense(f, h, ("mlp", "embed"), std=out_std)
        self.activation = cfg.activation
        self.swiglu = cfg.mlp == "swiglu"
        self.recompute_gelu = cfg.remat == "selective"

    def __call__(self, x: jax.Array, *, key=None) -> jax.Array:
        """`key`: LoRA adapters' dropout."""
        keys = [None] * 2 if key is None else [jax.random.fold_in(key, i) for i in (1, 2)]
        y = self.fc1.column_parallel(x, "batch", "residual_length", "embed", key=keys[0])
        act = swiglu if self.swiglu else functools.partial(gelu, activation=self.activation)
        if self.recompute_gelu:
            act = jax.checkpoint(act, prevent_cse=False)
        y = constrain(act(y), "batch", "length", "mlp")
        return self.fc2.row_parallel(y, "batch", "residual_length", "embed", key=keys[1])


class Block(nnx.Module):
    """A transformer layer, its layer norms placed as model.layernorm_placement says:
    "pre" (GPT-2; the paper's BERT): x + attn(ln_1(x)), then y + mlp(ln_2(y));
    "post" (the original BERT): ln_1(x + attn(x)), then ln_2(y + mlp(y)).
    The parameters are the same; only the order of operations differs. `feed_forward`: the
    class of the MLP's place (layers.MLP, or moe.MoE, which also returns router statistics)."""

    def __init__(self, cfg, *, rngs, feed_forward=None):
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2's residual-branch scaling
        # Selective recomputation keeps what the paper counts (its Table 2): a layer norm's
        # input, not its float32 intermediates; GeLU's input and output, not its insides.
        selective = cfg.remat == "selective"
        self.ln_1 = norm(cfg, recompute=selective)
        self.attn = Attention(cfg, out_std=out_std, rngs=rngs)
        self.ln_2 = norm(cfg, recompute=selective)
        self.mlp = (feed_forward or MLP)(cfg, out_std=out_std, rngs=rngs)
        self.dropout_rate = cfg.dropout
        self.post_ln = cfg.layernorm_placement == "post"

    def __call__(self, x, *, attend: Attend, key) -> jax.Array:
        """x: (batch, length, hidden), split over `model` along the length under sequence
        parallelism; `attend` as Attention reads it."""
        return self.forward(x, attend=attend, key=key)[0]

    def forward(self, x, *, attend: Attend, key) -> tuple[jax.Array, dict]:
        """The layer's output and its feed-forward block's statistics (a MoE router's; {}
        for an MLP)."""
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        rate = self.dropout_rate
        x = constrain(x, "batch", "residual_length", "embed")
        drop = functools.partial(dropout, rate=rate, order=attend.order)
        if self.post_ln:
            x = self.ln_1(x + drop(self.attn(x, attend=attend, key=keys[0]), key=keys[1]))
            y, stats = self._feed_forward(x, keys[2])
            return self.ln_2(x + drop(y, key=keys[2])), stats
        x = x + drop(self.attn(self.ln_1(x), attend=attend, key=keys[0]), key=keys[1])
        y, stats = self._feed_forward(self.ln_2(x), keys[2])
        return x + drop(y, key=keys[2]), stats

    def _feed_forward(self, x, key) -> tuple[jax.Array, dict]:
        y = self.mlp(x, key=key)
        return y if isinstance(y, tuple) else (y, {})

    def extend(self, x, k_cache, v_cache, *, start, positions, mask):
        """The layer on new tokens attending a KV cache (Attention.extend), without dropout:
        (output, new keys, new values)."""
        at = dict(start=start, positions=positions, mask=mask)
        if self.post_ln:
            y, k, v = self.attn.extend(x, k_cache, v_cache, **at)
            x = self.ln_1(x + y)
            return self.ln_2(x + self._feed_forward(x, None)[0]), k, v
        y, k, v = self.attn.extend(self.ln_1(x), k_cache, v_cache, **at)
        x = x + y
        return x + self._feed_forward(self.ln_2(x), None)[0], k, v
