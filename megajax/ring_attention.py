"""Ring attention: exact attention over a sequence split on a mesh axis, K/V passed around.

Called inside `jax.shard_map` manual over `axis` (C ranks): each rank holds its queries and
its own key/value block, attends to it, and passes the block on to the next rank in a ring
(`ppermute`), so after C - 1 transfers every query has seen every key without any rank
holding more than two blocks (the one being attended and the one arriving). Each block is
folded into an online softmax (running max, sum and accumulator in float32, as flash
attention does), and the next block's transfer is issued before the current block's compute,
which does not depend on it, so that the two overlap.

Positions and document ids travel with the keys, so the chunks may sit anywhere in the
sequence (the causal load balance gives rank c chunks c and 2C - 1 - c): masks are built from
positions, never from offsets. The loop is unrolled (C is a mesh axis size, a few to a few
dozen), which leaves XLA free to schedule each transfer beside the previous block's compute.

Cost per call, with n = batch * k_len * heads * head_dim local elements of K (and of V):
- forward: C - 1 steps, each two collective-permutes: K and V stacked (2n elements, in
  their dtype) and the keys' positions and document ids stacked (2 * batch * k_len int32;
  the same in every layer, so XLA hoists them out of a layer loop: once per step);
- backward (custom_vjp, recomputed block by block as flash attention does): the same C - 1
  K/V transfers again, and C - 1 transfers of the blocks' partial dK/dV sums (2n float32
  elements; each rank's own contribution never leaves it), each overlapping a block's
  compute. For bfloat16 that is 4n bytes per step forward and 12n backward, per rank;
- memory: the backward keeps q, the stacked K/V, the output and two float32 numbers per
  query row and head (running max and sum); the largest temporary is one block's
  (batch, heads, q_len, k_len) float32 scores. Autodiff through the loop would instead keep
  every block received (the whole sequence's K/V on each rank) and its probabilities, and
  save the backward's C - 1 K/V transfers.

A query row with no valid key at all gets what layers.Attention._masked_attention gives: the
masked scores are finfo(float32).min added to the scores, so the row averages every key's
value uniformly (and its gradients are the reference's too). Attention dropout is not
supported: the reference draws one (batch, heads, length, length) mask, and a rank knows
neither its batch and head offsets nor, cheaply, the bits of its blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)  # added to a masked score, as the reference does


def ring_attention(
    q, k, v, *, q_pos, k_pos, causal, axis, q_seg=None, k_seg=None, k_valid=None,
    scale=None, dropout_rate=0.0, key=None,
):  # fmt: skip
    """softmax(q k^T * scale) v over the whole sequence split on `axis` (see the module).

    q (batch, q_len, heads, head_dim), k and v (batch, k_len, heads, head_dim): this rank's
    chunks; q_pos, k_pos (batch, len): their positions in the sequence (`causal`: a query
    attends keys at positions <= its own); q_seg, k_seg (batch, len): packed-document ids (a
    query attends keys of its own document, ids > 0); k_valid (batch, k_len): key padding.
    dropout_rate > 0 with a key raises ValueError (no attention dropout); without a key
    (evaluation) it means no dropout, as layers.dropout.
    Returns (batch, q_len, heads, head_dim) in q.dtype.
    """
    if dropout_rate > 0 and key is not None:
        raise ValueError(
            "ring attention has no attention dropout: set dropout_rate=0 or pass key=None"
        )
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both q_seg and k_seg, or neither")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # One id per key folds documents and padding together: 0 marks a key no query attends.
    q_doc = jnp.ones_like(q_pos) if q_seg is None else q_seg
    k_doc = jnp.ones_like(k_pos) if k_seg is None else k_seg
    if k_valid is not None:
        k_doc = jnp.where(k_valid, k_doc, 0)
    q_ids = jnp.stack([q_pos, q_doc]).astype(jnp.int32)  # (2, batch, q_len)
    k_ids = jnp.stack([k_pos, k_doc]).astype(jnp.int32)  # (2, batch, k_len): one transfer
    kv = jnp.stack([k, v])  # (2, batch, k_len, heads, head_dim): one transfer
    return _ring(bool(causal), axis, scale, q, kv, q_ids, k_ids)


def _blocks(axis, *block):
    """The C key blocks this rank attends, its own first; each next block's transfer is issued
    before the current one is handed out (no transfer after the last)."""
    n = jax.lax.axis_size(axis)
    for step in range(n):
        arriving = _pass_on(axis, block) if step < n - 1 else None
        yield block
        block = arriving


def _pass_on(axis, x):
    """x sent one rank on around the ring: one collective-permute per array."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def _scores(q, k, q_ids, k_ids, causal, scale):
    """(batch, heads, q_len, k_len) float32 scores of q against one key block, masked ones
    pushed to finfo.min by addition (as the reference does)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    (q_pos, q_doc), (k_pos, k_doc) = q_ids[:, :, :, None], k_ids[:, :, None, :]
    mask = (q_doc == k_doc) & (k_doc > 0)
    if causal:
        mask &= q_pos >= k_pos
    return s + jnp.where(mask, 0.0, _MASKED)[:, None]


def _rows(x):
    """(batch, heads, q_len) -> (batch, q_len, heads, 1), to scale rows of an output."""
    return jnp.swapaxes(x, 1, 2)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(causal, axis, scale, q, kv, q_ids, k_ids):
    return _forward(causal, axis, scale, q, kv, q_ids, k_ids)[0]


def _forward(causal, axis, scale, q, kv, q_ids, k_ids):
    b, s, h, d = q.shape
    m = jnp.full((b, h, s), _MASKED, jnp.float32)  # running max of each query row
    total = jnp.zeros((b, h, s), jnp.float32)  # running sum of exp(score - m)
    acc = jnp.zeros((b, s, h, d), jnp.float32)  # running sum of exp(score - m) v
    for block, ids in _blocks(axis, kv, k_ids):
        scores = _scores(q, block[0], q_ids, ids, causal, scale)
        m_new = jnp.maximum(m, scores.max(-1))
        # A row masked in every block so far has m = m_new = finfo.min: p = 1, no NaN; the
        # first real score makes alpha 0 and wipes those terms out.
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        total = alpha * total + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(kv.dtype), block[1],
                        preferred_element_type=jnp.float32)  # fmt: skip
        acc = _rows(alpha) * acc + pv
        m = m_new
    out = (acc / _rows(total)).astype(q.dtype)  # total >= 1: its max term is exp(0)
    return out, (q, kv, q_ids, k_ids, out, m, total)


def _backward(causal, axis, scale, residuals, d_out):
    q, kv, q_ids, k_ids, out, m, total = residuals
    # sum_k p dp = d_out . out, per query row (flash attention's D)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    own = travelling = None  # this rank's dK/dV of its own block; another block's partial sum
    for step, (block, ids) in enumerate(_blocks(axis, kv, k_ids)):
        p = jnp.exp(_scores(q, block[0], q_ids, ids, causal, scale) - m[..., None])
        p = p / total[..., None]
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, block[1], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq += jnp.einsum("bhqk,bkhd->bqhd", ds, block[0], preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out,
                        preferred_element_type=jnp.float32)  # fmt: skip
        d_block = jnp.stack([dk, dv])
        # The block seen at step i belongs to the rank i back; its partial sum came from the
        # previous rank with it (sent while this step computed) and goes on to the next.
        if step == 0:
            own = d_block
        else:
            travelling = d_block if travelling is None else _pass_on(axis, travelling) + d_block
    # After the last step the partial sum is one rank short of its owner: send it home.
    d_kv = own if travelling is None else own + _pass_on(axis, travelling)
    return dq.astype(q.dtype), d_kv.astype(kv.dtype), None, None


_ring.defvjp(_forward, _backward)
