"""Self-attention with the Megatron split (arXiv 1909.08053, section 3): the fused QKV
projection (or grouped-query attention's q and kv) split by columns over `model`, whole heads
per shard, the output projection split by rows; the attention core (einsum, XLA's or cuDNN's
fused kernel, or context parallelism's) on each shard's heads."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import context_attention, parallel
from megajax.config import ConfigError
from megajax.dropout import kept
from megajax.layers import Dense, _add_bias, column_matmuls
from megajax.parallel import constrain
from megajax.rope import rope


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
