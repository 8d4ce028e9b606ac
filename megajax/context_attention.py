"""Context parallelism: attention over a sequence split over the `context` mesh axis.

The plan table splits every activation's length over `context` (parallel.rules), so a context
rank holds 1 / C of each sequence's queries, keys and values. Attention needs every key a query
may see; model.context_attention says how they travel:
- "allgather" (`gathered_attention`, Llama 3's choice, arXiv 2407.21783 section 3.3.2): one
  all-gather of K and V per layer over `context`, at key/value-head width (grouped-query
  attention gathers only its kv heads, then repeats them), and the local queries attend the
  whole gathered sequence. Autodiff makes the backward pass one reduce-scatter of their
  gradient. Each rank receives (C - 1) / C of the layer's K and V: 2 b s h_kv bytes per element
  size, the same whatever C; it holds the whole sequence's K and V while the layer runs;
- "ring": blocks of K and V passed round the ranks, C - 1 collective-permutes per layer, an
  online softmax over the blocks, never the whole sequence's K/V on a rank
  (megajax/ring_attention.py; no attention dropout).
Both cores take the same arguments, inside a shard_map manual over the mesh: local chunks of
q, k, v and their original positions, packed-document segments and key padding.

Causal load balance (`balance`): with C ranks, the sequence is cut into 2 C chunks and rank c
holds chunks c and 2 C - 1 - c, so each rank's queries see the same number of keys. The batch
is reordered once, inside the step, by a static permutation of its sequence axis (the batch
arrives unsplit over `context`: each rank takes its own chunks, no communication); positions
(learned rows, RoPE) and causal masks use the original positions that travel with it, and a
token-mean loss does not depend on the order.

Attention dropout stays exact: `keep_mask` draws each (query, key) bit as
jax.random.bernoulli draws the whole (batch, heads, length, length) score matrix's, from the
original positions, so a context-split run drops what the unsplit run drops, with no score
matrix larger than the local one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from megajax import parallel
from megajax.config import ConfigError
from megajax.dropout import bernoulli_at
from megajax.ring_attention import ring_attention

CORES = ("allgather", "ring")
# The name of the gathered K/V: selective recomputation (RECOMPUTE) keeps it and recomputes
# the scores from it, rather than gathering again in the backward pass.
GATHERED = "context_gathered_kv"
RECOMPUTE = jax.checkpoint_policies.save_only_these_names(GATHERED)


def softmax_attention(q, k, v, mask, *, scale=None, keep=None, rate: float = 0.0):
    """softmax(q k^T * scale) v with float32 scores, q (batch, q_len, heads, head_dim), k and v
    (batch, k_len, heads, head_dim), under a mask broadcastable to (batch, heads, q_len,
    k_len); `keep` (that shape) drops probabilities at `rate`. Returns q's shape and dtype."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if scale is None:
        scores = scores / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    else:
        scores = scores * jnp.float32(scale)
    # Masked by adding a (query, key) bias rather than a select: adding 0 leaves a score
    # exact, and the backward pass needs no (batch, heads, query, key) zeros to select from.
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs / (1.0 - rate), 0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(q.dtype), v)


def position_mask(q_pos, k_pos, *, causal, q_seg=None, k_seg=None, k_valid=None):
    """(batch, 1, q_len, k_len) bool from (batch, len) original positions (causal: q_pos >=
    k_pos), packed-document segments (the same one, a real key: k_seg > 0) and key padding."""
    mask = jnp.ones((q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]), bool)
    if causal:
        mask = q_pos[:, :, None] >= k_pos[:, None, :]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :].astype(bool)
    return mask[:, None]


def gathered_attention(
    q, k, v, *, q_pos, k_pos, causal, axis, q_seg=None, k_seg=None, k_valid=None, scale=None,
    dropout_rate=0.0, key=None,
):  # fmt: skip
    """Inside shard_map manual over `axis`: the local queries' attention over every rank's
    keys, K and V all-gathered over `axis` in one collective (its transpose, in the backward
    pass, one reduce-scatter), with their positions, segments and padding. q (batch, q_len,
    heads, head_dim); k, v (batch, k_len, kv heads, head_dim) local chunks, kv heads dividing
    heads (repeated after the gather, so grouped-query attention moves only its kv heads);
    q_pos, k_pos (batch, len) original positions; q_seg, k_seg packed-document ids; k_valid
    key padding; `key` with `dropout_rate` drops probabilities as the unsplit run does.
    Returns (batch, q_len, heads, head_dim) in q.dtype."""

    def gather(x):
        return None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)

    kv = gather(jnp.stack([k, v.astype(k.dtype)], axis=2))  # (batch, length, 2, kv, head_dim)
    kv = checkpoint_name(kv, GATHERED)  # what a recomputed core keeps: no second gather
    k, v = kv[:, :, 0], kv[:, :, 1].astype(v.dtype)
    k_pos, k_seg, k_valid = gather(k_pos), gather(k_seg), gather(k_valid)
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    mask = position_mask(q_pos, k_pos, causal=causal, q_seg=q_seg, k_seg=k_seg, k_valid=k_valid)
    keep = None
    if key is not None and dropout_rate > 0:
        keep = keep_mask(key, dropout_rate, q_pos, k_pos, heads=q.shape[2], axis=axis)
    return softmax_attention(q, k, v, mask, scale=scale, keep=keep, rate=dropout_rate)


def check(cfg) -> None:
    """Refuse what a context-split run cannot do exactly: a core that is not available, or
    attention dropout under the ring core, or dropout with JAX's partitionable Threefry turned off
    (bernoulli_at follows its bits)."""
    core(cfg.context_attention)
    if cfg.context_attention == "ring" and cfg.dropout > 0:
        raise ConfigError(
            f"model.context_attention=ring has no attention dropout (model.dropout="
            f"{cfg.dropout}): set model.dropout=0, or use model.context_attention=allgather, "
            "whose dropout is the unsplit run's"
        )
    if cfg.dropout > 0 and not jax.config.jax_threefry_partitionable:
        raise ConfigError(
            f"model.dropout={cfg.dropout} on a context mesh draws its bits as JAX's "
            "partitionable Threefry does, which is turned off (jax_threefry_partitionable): "
            "turn it on, or set model.dropout=0"
        )


def core(name: str):
    """The attention core model.context_attention names."""
    if name == "allgather":
        return gathered_attention
    if name == "ring":
        return ring_attention
    raise ConfigError(f"model.context_attention={name!r}: use one of {', '.join(CORES)}")


def attention(q, k, v, *, positions, segments, padding, causal, key, rate, name):
    """Attention of q (batch, length, heads, head_dim) over k, v (batch, length, kv slots,
    head_dim), laid out as the plan says (length split over `context`, heads over `model`),
    by the core model.context_attention names (`name`), in a shard_map manual over the whole
    mesh. positions (batch, length): each token's original position; segments, padding:
    attention.Attend's, or None."""
    attend = core(name)
    row = parallel.spec("batch", "length")
    heads = parallel.spec("batch", "length", "heads", None)
    (axis,) = parallel.length_axes()
    optional = {"seg": segments, "valid": padding}
    given = {k: x for k, x in optional.items() if x is not None}

    def local(q, k, v, pos, key, **given):
        seg, valid = given.get("seg"), given.get("valid")
        return attend(
            q, k, v, q_pos=pos, k_pos=pos, causal=causal, axis=axis, q_seg=seg, k_seg=seg,
            k_valid=valid, dropout_rate=rate, key=key,
        )  # fmt: skip

    key_spec = None if key is None else jax.sharding.PartitionSpec()
    run = jax.shard_map(
        lambda q, k, v, pos, key, given: local(q, k, v, pos, key, **given),
        in_specs=(heads, heads, heads, row, key_spec, {k: row for k in given}),
        out_specs=heads,
        # The ring's custom_vjp, vmapped over pipeline stages (spmd_axis_name), mixes values
        # that vary over the stages with ones that do not, which JAX 0.10's check of varying
        # axes refuses inside the transformation; the ring sums nothing over an axis, so the
        # check guards nothing there.
        check_vma=name != "ring",
    )
    return run(q, k, v, positions, key, given)


def keep_mask(key, rate: float, q_pos, k_pos, *, heads: int, axis: str):
    """Inside shard_map: the (batch, heads, q_len, k_len) dropout keep mask of this shard's
    rows of the unsplit run's (batch, heads, length, length) scores, bit for bit as
    jax.random.bernoulli(key, 1 - rate, that shape) draws it (bernoulli_at), each element
    addressed by the shard's place on the mesh (its batch rows, its heads) and the query's and
    key's original positions."""
    batch_axes, head_axes = parallel.spec("batch")[0], parallel.spec("heads")[0]
    b, length = q_pos.shape[0], q_pos.shape[1] * jax.lax.axis_size(axis)
    rows = _axis_index(batch_axes) * b + jnp.arange(b)
    hs = _axis_index(head_axes) * heads + jnp.arange(heads)
    shape = (b * _axis_size(batch_axes), heads * _axis_size(head_axes), length, length)
    index = (rows[:, None, None, None], hs[None, :, None, None])
    index += (q_pos[:, None, :, None], k_pos[:, None, None, :])
    return bernoulli_at(key, 1.0 - rate, shape, index)


def _axis_index(axes):
    if axes is None:
        return 0
    return jax.lax.axis_index(axes)


def _axis_size(axes):
    return int(np.prod([jax.lax.axis_size(a) for a in parallel.entry_axes(axes)]))


@functools.lru_cache
def balanced_order(seq_len: int, context: int) -> np.ndarray:
    """The sequence positions in the order the context ranks hold them: 2 C chunks, rank c
    holding chunks c and 2 C - 1 - c (so each rank's causal attention does the same work)."""
    chunks = np.arange(seq_len).reshape(2 * context, -1)
    order = [chunks[i] for c in range(context) for i in (c, 2 * context - 1 - c)]
    return np.concatenate(order)


def balance(batch: dict, *, seq_len: int, context: int) -> dict:
    """A decoder's batch ({field: (batch, seq_len)}) with every field's sequence in
    balanced_order, each constrained to the plan's (batch, length) split: a static permutation
    of a sequence that arrives whole on every context rank, so each rank takes its chunks
    without communication. Adds "order", each slot's original position (masks and dropout
    bits follow it), and "positions" (the same, unless packed documents bring their own)."""
    if context == 1:
        return batch
    rows = next(iter(batch.values())).shape[0]
    original = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len))
    fields = {"positions": original, **batch, "order": original}
    order = balanced_order(seq_len, context)
    return {
        k: parallel.constrain(jnp.take(x, order, axis=1), "batch", "length")
        for k, x in fields.items()
    }
