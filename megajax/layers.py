"""The parts of a transformer layer whose parameters carry logical axis names (mapped to the
mesh in parallel.py): norms, Dense with its column- and row-parallel forms, the
vocabulary-parallel embedding, the MLP. Attention is attention.py's, the layer block.py's.

The math is written for one device; `parallel.constrain` pins activation layouts so that
`jax.jit` compiles Megatron's column/row splits: QKV and fc1 are column-parallel (no
communication), the attention output and fc2 are row-parallel (one all-reduce each). The
residual stream between them is laid out as `residual_length` says: with sequence parallelism
the all-reduces become a reduce-scatter after each row-parallel matmul and an all-gather before
each column-parallel one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.parallel import constrain


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
