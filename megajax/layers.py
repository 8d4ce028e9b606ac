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

import jax
import jax.numpy as jnp
from flax import nnx

from megajax import parallel
from megajax.config import ConfigError
from megajax.parallel import constrain


def _normal(std: float, *axes: str | None):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _zeros(*axes: str | None):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _ones(*axes: str | None):
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `key=None` (evaluation) or rate 0 leaves x unchanged."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm computed in float32 whatever the compute dtype; replicated on model shards.
    `recompute`: keep only the input for the backward pass, not its float32 intermediates."""

    def __init__(self, dim: int, *, eps: float, recompute: bool = False):
        self.scale = nnx.Param(_ones("embed")(None, (dim,)))
        self.bias = nnx.Param(_zeros("embed")(None, (dim,)))
        self.eps = eps
        self.recompute = recompute

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(_layer_norm, eps=self.eps)
        if self.recompute:
            norm = jax.checkpoint(norm, prevent_cse=False)
        return norm(x, self.scale[...], self.bias[...])


def _layer_norm(x, scale, bias, *, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gathered_matmul(x, kernel, dims):
    """Inside shard_map: x all-gathered over `model` along `dims`, times kernel. As Megatron-LM
    does, the backward pass gathers x again rather than keep the whole sequence (only the
    1 / T shard is saved) and reduce-scatters x's gradient."""
    return jnp.einsum("...i,io->...o", parallel.gather_over_model(x, dims), kernel)


def _gathered_matmul_fwd(x, kernel, dims):
    return _gathered_matmul(x, kernel, dims), (x, kernel)


def _gathered_matmul_bwd(dims, saved, dy):
    x, kernel = saved
    whole = parallel.gather_over_model(x, dims)
    batch_dims = tuple(range(whole.ndim - 1))
    dkernel = jax.lax.dot_general(dy, whole, ((batch_dims, batch_dims), ((), ()))).T
    # The kernel is the same on every `data` shard: its gradient sums theirs, in float32.
    dkernel = jax.lax.psum(dkernel.astype(jnp.float32), parallel.DATA).astype(kernel.dtype)
    dx = jnp.einsum("...o,io->...i", dy, kernel)
    for dim in dims:
        dx = jax.lax.psum_scatter(dx, parallel.MODEL, scatter_dimension=dim, tiled=True)
    return dx, dkernel


_gathered_matmul.defvjp(_gathered_matmul_fwd, _gathered_matmul_bwd)


class Dense(nnx.Module):
    """y = x @ kernel + bias, with logical axes (in_axis, out_axis) on the kernel."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, rngs):
        key = rngs.params()
        self.kernel = nnx.Param(_normal(std, *axes)(key, (d_in, d_out)))
        self.bias = nnx.Param(_zeros(axes[1])(None, (d_out,)))
        self.axes = axes

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        return jnp.einsum("...i,io->...o", x, kernel) + self.bias[...].astype(x.dtype)

    def column_parallel(self, x: jax.Array, *in_axes: str | None) -> jax.Array:
        """This layer on (batch, length, d_in) input laid out as the logical axes `in_axes`
        say, its d_out split over `model`: no communication, or an all-gather first where
        `in_axes` split a dimension over `model` (sequence parallelism; the backward pass
        then reduce-scatters the input's gradient)."""
        in_spec = parallel.spec(*in_axes)
        if parallel.MODEL not in in_spec:
            return self(constrain(x, *in_axes))

        def local(x, kernel, bias):
            dims = tuple(parallel.model_dims(in_spec))
            return _gathered_matmul(x, kernel.astype(x.dtype), dims) + bias.astype(x.dtype)

        return jax.shard_map(
            local,
            in_specs=(in_spec, parallel.spec(*self.axes), parallel.spec(self.axes[1])),
            out_specs=parallel.spec("batch", "length", self.axes[1]),
        )(x, self.kernel[...], self.bias[...])

    def row_parallel(self, x: jax.Array, *out: str | None) -> jax.Array:
        """This layer on (batch, length, d_in) input whose d_in is split over `model`, laid out
        as the logical axes `out` say: one all-reduce of the partial sums, or a reduce-scatter
        where `out` splits a dimension over `model` (sequence parallelism)."""
        out_spec = parallel.spec(*out)
        if parallel.MODEL not in out_spec:
            return constrain(self(x), *out)

        def local(x, kernel, bias):
            partial = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
            return parallel.sum_over_model(partial, out_spec) + bias.astype(x.dtype)

        in_spec = parallel.spec("batch", "length", self.axes[0])
        return jax.shard_map(
            local,
            in_specs=(in_spec, parallel.spec(*self.axes), parallel.spec(self.axes[1])),
            out_specs=out_spec,
        )(x, self.kernel[...], self.bias[...])


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


class Attention(nnx.Module):
    """Multi-head self-attention with a fused, head-interleaved QKV projection.

    QKV columns are laid out (head, {q, k, v}, head_dim), so splitting them over `model` gives
    each shard whole heads and their q, k and v: the heads run locally and the only
    communication is the all-reduce after the row-parallel output projection. A causal model
    (GPT) masks future keys; `padding` masks the keys after each sequence's length (BERT).
    """

    def __init__(self, cfg, *, out_std: float, rngs):
        h = cfg.hidden
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.dropout_rate = cfg.dropout
        self.implementation = cfg.attention
        self.causal = cfg.arch == "gpt"
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
        self.qkv = Dense(h, 3 * h, ("embed", "heads"), std=cfg.init_std, rngs=rngs)
        self.proj = Dense(h, h, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, padding, key) -> jax.Array:
        """`padding`: (batch, key) bool, True on real tokens, which come first; or None."""
        b, s = x.shape[0], x.shape[1]
        qkv = self.qkv.column_parallel(x, "batch", "residual_length", "embed")
        qkv = qkv.reshape(b, s, self.num_heads, 3, self.head_dim)
        qkv = constrain(qkv, "batch", "length", "heads", None, None)
        q, k, v = (
            qkv[:, :, :, 0],
            qkv[:, :, :, 1],
            qkv[:, :, :, 2],
        )  # (batch, length, heads, head_dim)
        core = self._fused if self.implementation != "einsum" else self._einsum_attention
        if self.recompute_core:
            core = jax.checkpoint(core, prevent_cse=False)
        out = core(q, k, v, padding, key).reshape(b, s, -1)
        out = constrain(out, "batch", "length", "heads")
        return self.proj.row_parallel(out, "batch", "residual_length", "embed")

    def _fused(self, q, k, v, padding, key):
        """jax.nn.dot_product_attention told the mask's kind, not given a dense mask, so that a
        fused kernel keeps its causal mask type and skips the masked tiles."""
        del key  # no attention dropout (checked in __init__)
        lengths = None if padding is None else padding.sum(-1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=self.causal,
            key_value_seq_lengths=lengths,
            implementation=self.implementation,
        )

    def extend(self, x, k_cache, v_cache, *, start, mask):
        """Attention of new tokens over a KV cache, for decoding: x (batch, new, hidden) sits at
        cache slots start .. start + new - 1; k_cache and v_cache are (batch, slots, heads,
        head_dim), split over `model` by heads like the QKV columns. `mask` (batch, 1, new,
        slots) is True where a query may attend a slot. Returns the output and the new tokens'
        keys and values (batch, new, heads, head_dim); the caller writes them into its cache."""
        b, s, _ = x.shape
        qkv = self.qkv(x).reshape(b, s, self.num_heads, 3, self.head_dim)
        qkv = constrain(qkv, "batch", "length", "heads", None, None)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
        out = self._masked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, None)
        out = constrain(out.reshape(b, s, -1), "batch", "length", "heads")
        return constrain(self.proj(out), "batch", "length", "embed"), k, v

    def _einsum_attention(self, q, k, v, padding, key):
        """softmax(q k^T / sqrt(d)) v with float32 scores, (batch, length, heads, head_dim)."""
        s = q.shape[1]
        mask = jnp.ones((1, 1, s, s), bool)  # (batch, heads, query, key)
        if self.causal:
            mask = jnp.tril(mask)
        if padding is not None:
            mask = mask & padding[:, None, None, :]
        return self._masked_attention(q, k, v, mask, key)

    def _masked_attention(self, q, k, v, mask, key):
        """The core under a mask broadcastable to (batch, heads, query, key)."""
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(self.head_dim).astype(jnp.float32)
        # Masked by adding a (query, key) bias rather than a select: adding 0 leaves a score
        # exact, and the backward pass needs no (batch, heads, query, key) zeros to select from.
        scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, self.dropout_rate, key).astype(q.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def gelu(x: jax.Array, activation: str) -> jax.Array:
    """ "gelu_tanh" (GPT-2's tanh approximation) or "gelu" (the exact erf form, BERT's)."""
    return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


class MLP(nnx.Module):
    """fc1 split by columns (GeLU stays local), fc2 split by rows (one all-reduce)."""

    def __init__(self, cfg, *, out_std: float, rngs):
        self.fc1 = Dense(cfg.hidden, cfg.mlp_hidden, ("embed", "mlp"), std=cfg.init_std, rngs=rngs)
        self.fc2 = Dense(cfg.mlp_hidden, cfg.hidden, ("mlp", "embed"), std=out_std, rngs=rngs)
        self.activation = cfg.activation
        self.recompute_gelu = cfg.remat == "selective"

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc1.column_parallel(x, "batch", "residual_length", "embed")
        act = functools.partial(gelu, activation=self.activation)
        if self.recompute_gelu:
            act = jax.checkpoint(act, prevent_cse=False)
        y = constrain(act(y), "batch", "length", "mlp")
        return self.fc2.row_parallel(y, "batch", "residual_length", "embed")


class Block(nnx.Module):
    """A transformer layer, its layer norms placed as model.layernorm_placement says:
    "pre" (GPT-2; the paper's BERT): x + attn(ln_1(x)), then y + mlp(ln_2(y));
    "post" (the original BERT): ln_1(x + attn(x)), then ln_2(y + mlp(y)).
    The parameters are the same; only the order of operations differs."""

    def __init__(self, cfg, *, rngs):
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2's residual-branch scaling
        # Selective recomputation keeps what the paper counts (its Table 2): a layer norm's
        # input, not its float32 intermediates; GeLU's input and output, not its insides.
        selective = cfg.remat == "selective"
        self.ln_1 = LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, recompute=selective)
        self.attn = Attention(cfg, out_std=out_std, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, recompute=selective)
        self.mlp = MLP(cfg, out_std=out_std, rngs=rngs)
        self.dropout_rate = cfg.dropout
        self.post_ln = cfg.layernorm_placement == "post"

    def __call__(self, x, *, padding, key) -> jax.Array:
        """x: (batch, length, hidden), split over `model` along the length under sequence
        parallelism; `padding` as Attention takes it."""
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        rate = self.dropout_rate
        x = constrain(x, "batch", "residual_length", "embed")
        if self.post_ln:
            x = self.ln_1(x + dropout(self.attn(x, padding=padding, key=keys[0]), rate, keys[1]))
            return self.ln_2(x + dropout(self.mlp(x), rate, keys[2]))
        x = x + dropout(self.attn(self.ln_1(x), padding=padding, key=keys[0]), rate, keys[1])
        return x + dropout(self.mlp(self.ln_2(x)), rate, keys[2])

    def extend(self, x, k_cache, v_cache, *, start, mask):
        """The layer on new tokens attending a KV cache (Attention.extend), without dropout:
        (output, new keys, new values)."""
        if self.post_ln:
            y, k, v = self.attn.extend(x, k_cache, v_cache, start=start, mask=mask)
            x = self.ln_1(x + y)
            return self.ln_2(x + self.mlp(x)), k, v
        y, k, v = self.attn.extend(self.ln_1(x), k_cache, v_cache, start=start, mask=mask)
        x = x + y
        return x + self.mlp(self.ln_2(x)), k, v
