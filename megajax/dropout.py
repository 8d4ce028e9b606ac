"""Inverted dropout whose bits do not depend on how the batch or the sequence is split.

JAX's partitionable Threefry (the default since JAX 0.5) draws each element's bits from its
row-major index in the whole array. `bernoulli_at` rebuilds that index for any elements, so a
piece of an array draws the whole array's bits at its place: one batch shard's rows in the
train step's per-shard loss (optim.grad_reduce="step", parallel.per_batch_shard), a sequence
reordered and split over `context` (context_attention.balance), a shard's block of the
attention scores (context_attention.keep_mask). tests/test_context.py and
tests/test_grad_reduce.py check the bits against jax.random.bernoulli's, and fail loudly if a
JAX release changes the scheme.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from megajax import parallel


def dropout(x: jax.Array, rate: float, key: jax.Array | None, order=None) -> jax.Array:
    """Inverted dropout; `key=None` (evaluation) or rate 0 leaves x unchanged. x leads with
    the batch; its mask is kept()'s."""
    if key is None or rate == 0.0:
        return x
    keep = kept(key, rate, x.shape, order)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def kept(key: jax.Array, rate: float, shape, order=None) -> jax.Array:
    """The bool mask of the elements that dropout at `rate` keeps in an array of `shape`
    leading with the batch. In one batch shard's trace (parallel.per_batch_shard) the array
    holds that shard's rows; a reordered sequence ((batch, length, ...), `order` (batch,
    length): each slot's original position) keeps its original positions: either way each
    element is kept as it is in the whole batch in the original order."""
    shard = parallel.batch_shard()
    if shard is None and order is None:
        return jax.random.bernoulli(key, 1.0 - rate, shape)
    ndim = len(shape)
    index = [jnp.arange(n).reshape((-1,) + (1,) * (ndim - 1 - i)) for i, n in enumerate(shape)]
    if shard is not None:
        index[0] = index[0] + jax.lax.axis_index(shard) * shape[0]
    if order is not None:
        index[1] = order.reshape(order.shape + (1,) * (ndim - 2))
    return bernoulli_at(key, 1.0 - rate, shape, index)


def bernoulli_at(key, p: float, shape, index):
    """The elements at `index` (one integer array per dimension, broadcast together) of
    jax.random.bernoulli(key, p, shape), bit for bit: JAX's partitionable Threefry (on by
    default) hashes each element's row-major index in `shape`, and jax.random.uniform turns 23
    of the bits into a float in [0, 1). So a reordered sequence (the causal load balance) or a
    shard's piece of a larger matrix draws the unsplit run's bits."""
    hi, lo = flat_index(shape, index)
    data = jax.random.key_data(key)
    bits1, bits2 = threefry2x32_p.bind(data[0], data[1], hi, lo)
    bits = bits1 ^ bits2
    one = np.array(1.0, np.float32).view(np.uint32)  # exponent 0: [1, 2), minus 1
    uniform = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0
    return uniform < jnp.float32(p)


def flat_index(shape, index):
    """(high, low) 32-bit halves of the row-major index in `shape` of the elements at `index`
    (one integer array per dimension), computed in 64 bits held as four 16-bit limbs: x64 is
    off, and a long context's s^2 passes 2^32."""
    flat = None
    for size, at in zip(shape, index, strict=True):
        limbs = _limbs(jnp.asarray(at).astype(jnp.uint32))
        flat = limbs if flat is None else _plus(_times(flat, size), limbs)
    lo, hi = flat[0] | (flat[1] << 16), flat[2] | (flat[3] << 16)
    return tuple(jnp.broadcast_arrays(hi, lo))


# A 64-bit unsigned integer as four uint32 arrays of 16 bits each, lowest first: XLA has no
# 64-bit integers here (x64 is off), and products of 16-bit limbs fit 32 bits.


def _limbs(x):
    zero = jnp.zeros_like(x)
    return [x & 0xFFFF, x >> 16, zero, zero]


def _times(limbs, m: int):
    """limbs * m for a static m < 2^32 (mod 2^64)."""
    low, high = m & 0xFFFF, m >> 16
    return _plus(_times16(limbs, low), [jnp.zeros_like(limbs[0])] + _times16(limbs, high)[:3])


def _times16(limbs, m: int):
    out, carry = [], 0
    for limb in limbs:
        t = limb * jnp.uint32(m) + carry
        out.append(t & 0xFFFF)
        carry = t >> 16
    return out


def _plus(a, b):
    out, carry = [], 0
    for x, y in zip(a, b, strict=True):  # broadcasting: a and b may differ in shape
        t = x + y + carry
        out.append(t & 0xFFFF)
        carry = t >> 16
    return out
