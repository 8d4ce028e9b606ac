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
positions, never from offsets. The ring steps are a `lax.scan`, so that one block's scores
live at a time whatever C is (an unrolled loop let XLA keep all C blocks' at once: the whole
(length / C, length) score matrix); each step issues the next block's transfer before its
own block's compute, which does not depend on it.

Cost per call, with n = batch * k_len * kv heads * head_dim local elements of K (and of V;
grouped-query attention sends its key/value heads only):
- forward: C - 1 steps, each one collective-permute of K and V stacked (2n elements, in
  their dtype); the keys' positions and document ids (2 * batch * k_len int32) go round
  before the steps, C - 1 permutes that are the same in every layer, so XLA hoists them out
  of a layer loop: once per step;
- backward (custom_vjp, recomputed block by block as flash attention does): the same C - 1
  K/V transfers again, and C - 1 transfers of the blocks' partial dK/dV sums (2n float32
  elements; each rank's own contribution never leaves it), each overlapping a block's
  compute. For bfloat16 that is 4n bytes per step forward and 12n backward, per rank;
- memory: the backward keeps q, the stacked K/V, the output and two float32 numbers per
  query row and head (running max and sum); the largest temporary is one block's
  (batch, heads, q_len, k_len) float32 scores. Autodiff through the loop would instead keep
  every block received (the whole sequence's K/V on each rank) and its probabilities, and
  save the backward's C - 1 K/V transfers.

A query row with no valid key at all gets what attention.Attention._masked_attention gives: the
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

    q (batch, q_len, heads, head_dim), k and v (batch, k_len, kv heads, head_dim): this
    rank's chunks, kv heads dividing heads (grouped-query attention: the blocks travel at
    kv-head width, each group of query heads reading its key/value head); q_pos, k_pos
    (batch, len): their positions in the sequence (`causal`: a query attends keys at
    positions <= its own); q_seg, k_seg (batch, len): packed-document ids (a query attends
    keys of its own document, ids > 0); k_valid (batch, k_len): key padding. dropout_rate > 0
    with a key raises ValueError (no attention dropout); without a key (evaluation) it means
    no dropout, as megajax.dropout does.
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
    kv = jnp.stack([k, v])  # (2, batch, k_len, kv heads, head_dim): one transfer
    return _ring(bool(causal), axis, scale, q, kv, q_ids, k_ids)


def _pass_on(axis, x):
    """x sent one rank on around the ring: one collective-permute per array."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def _key_ids(axis, k_ids):
    """(C, 2, batch, k_len): the ids of the key block this rank attends at each ring step, its
    own first (C - 1 permutes; the same in every layer, so XLA hoists them out of a layer
    loop, and the backward pass reuses them)."""
    ids = [k_ids]
    for _ in range(jax.lax.axis_size(axis) - 1):
        ids.append(_pass_on(axis, ids[-1]))
    return jnp.stack(ids)


def _scores(q, k, q_ids, k_ids, causal, scale):
    """(batch, heads, q_len, k_len) float32 scores of q against one key block, masked ones
    pushed to finfo.min by addition (as the reference does)."""
    s = _by_keys(q, k) * scale
    (q_pos, q_doc), (k_pos, k_doc) = q_ids[:, :, :, None], k_ids[:, :, None, :]
    mask = (q_doc == k_doc) & (k_doc > 0)
    if causal:
        mask &= q_pos >= k_pos
    return s + jnp.where(mask, 0.0, _MASKED)[:, None]


def _by_keys(q, k):
    """(batch, heads, q_len, k_len) float32 products of q (batch, q_len, heads, head_dim) with
    k (batch, k_len, kv heads, head_dim), each group of heads / kv heads query heads with its
    key/value head (as jnp.repeat(k, heads // kv_heads, axis=2) would pair them)."""
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(b, s, kv_heads, h // kv_heads, d)
    out = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, k, preferred_element_type=jnp.float32)
    return out.reshape(b, h, s, k.shape[1])


def _by_values(p, v):
    """(batch, q_len, heads, head_dim) float32: p (batch, heads, q_len, k_len) times v
    (batch, k_len, kv heads, head_dim), grouped as _by_keys."""
    b, h, s, t = p.shape
    kv_heads = v.shape[2]
    grouped = p.reshape(b, kv_heads, h // kv_heads, s, t)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", grouped, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, v.shape[-1])


def _to_keys(p, x, *, kv_heads: int):
    """(batch, k_len, kv heads, head_dim) float32: p (batch, heads, q_len, k_len) transposed
    onto x (batch, q_len, heads, head_dim), each group's query heads summed into its key/value
    head (the gradient of K or V)."""
    b, h, s, t = p.shape
    grouped = p.reshape(b, kv_heads, h // kv_heads, s, t)
    x = x.reshape(b, s, kv_heads, h // kv_heads, x.shape[-1])
    return jnp.einsum("bhgqk,bqhgd->bkhd", grouped, x, preferred_element_type=jnp.float32)


def _varying(x, axis, *like):
    """x cast to vary over `axis` and the manual mesh axes that the arrays `like` vary over,
    as a scan's carry must when its body sends it round the ring (nothing to do where
    shard_map does not check them)."""
    have = _varying_axes(x)
    if have is None:
        return x
    axes = frozenset({axis}).union(*(_varying_axes(y) or () for y in like)) - have
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _varying_axes(x):
    """The manual mesh axes x varies over, or None where they are not tracked."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10
    return manual.varying if manual is not None else getattr(aval, "vma", None)


def _rows(x):
    """(batch, heads, q_len) -> (batch, q_len, heads, 1), to scale rows of an output."""
    return jnp.swapaxes(x, 1, 2)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(causal, axis, scale, q, kv, q_ids, k_ids):
    return _forward(causal, axis, scale, q, kv, q_ids, k_ids)[0]


def _forward(causal, axis, scale, q, kv, q_ids, k_ids):
    b, s, h, d = q.shape
    ids = _key_ids(axis, k_ids)

    def attend(state, block, block_ids):
        """The online softmax's state after one more key block."""
        m, total, acc = state
        scores = _scores(q, block[0], q_ids, block_ids, causal, scale)
        m_new = jnp.maximum(m, scores.max(-1))
        # A row masked in every block so far has m = m_new = finfo.min: p = 1, no NaN; the
        # first real score makes alpha 0 and wipes those terms out.
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = _by_values(p.astype(kv.dtype), block[1])
        return m_new, alpha * total + p.sum(-1), _rows(alpha) * acc + pv

    def step(carry, block_ids):  # the next block's transfer is issued before this one's compute
        state, block = carry
        arriving = _pass_on(axis, block)
        return (attend(state, block, block_ids), arriving), None

    state = (
        jnp.full((b, h, s), _MASKED, jnp.float32),  # running max of each query row
        jnp.zeros((b, h, s), jnp.float32),  # running sum of exp(score - max)
        jnp.zeros((b, s, h, d), jnp.float32),  # running sum of exp(score - max) v
    )
    state, block = jax.tree.map(lambda x: _varying(x, axis, q, kv, q_ids, ids), (state, kv))
    # A scan, not an unrolled loop: one block's scores live at a time whatever C is.
    (state, block), _ = jax.lax.scan(step, (state, block), ids[:-1])
    m, total, acc = attend(state, block, ids[-1])
    out = (acc / _rows(total)).astype(q.dtype)  # total >= 1: its max term is exp(0)
    return out, (q, kv, q_ids, ids, out, m, total)


def _backward(causal, axis, scale, residuals, d_out):
    q, kv, q_ids, ids, out, m, total = residuals
    n = ids.shape[0]
    # sum_k p dp = d_out . out, per query row (flash attention's D)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=jnp.float32)

    def grads(block, block_ids):
        """This block's part of dq, and its dK/dV (float32, stacked)."""
        p = jnp.exp(_scores(q, block[0], q_ids, block_ids, causal, scale) - m[..., None])
        p = p / total[..., None]
        dp = _by_keys(d_out, block[1])
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = _by_values(ds, block[0])
        dk = _to_keys(ds, q, kv_heads=kv.shape[3])
        dv = _to_keys(p.astype(d_out.dtype), d_out, kv_heads=kv.shape[3])
        return dq, jnp.stack([dk, dv])

    # The block seen at step i belongs to the rank i back; from step 1 on, its partial dK/dV
    # sum travels with it: it came from the previous rank (sent while this step computed) and
    # goes on to the next. Steps 0 and 1 and the last are peeled off the scan, so that no
    # transfer runs empty: C - 1 of the blocks and C - 1 of the sums.
    block = _pass_on(axis, kv) if n > 1 else None
    dq, own = grads(kv, ids[0])  # this rank's dK/dV of its own block never leaves it
    if n == 1:
        return dq.astype(q.dtype), own.astype(kv.dtype), None, None
    arriving = _pass_on(axis, block) if n > 2 else None
    dq_step, travelling = grads(block, ids[1])
    dq, block = dq + dq_step, arriving

    def step(carry, block_ids):
        dq, travelling, block = carry
        arriving = _pass_on(axis, block)
        dq_step, d_block = grads(block, block_ids)
        return (dq + dq_step, _pass_on(axis, travelling) + d_block, arriving), None

    if n > 3:
        (dq, travelling, block), _ = jax.lax.scan(step, (dq, travelling, block), ids[2:-1])
    if n > 2:  # the last block: nothing passed on but its sum
        dq_step, d_block = grads(block, ids[-1])
        dq, travelling = dq + dq_step, _pass_on(axis, travelling) + d_block
    # After the last step the partial sum is one rank short of its owner: send it home.
    d_kv = own + _pass_on(axis, travelling)
    return dq.astype(q.dtype), d_kv.astype(kv.dtype), None, None


_ring.defvjp(_forward, _backward)
