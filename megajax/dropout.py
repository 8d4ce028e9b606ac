"""Inverted dropout, and its bits for one batch shard's rows.

Partitionable threefry (JAX's default since 0.5) draws each element's bits from its row-major
index in the whole array, so a shard's rows can be drawn alone, at the whole array's bits: what
the train step's per-shard loss (optim.grad_reduce="step", parallel.per_batch_shard) needs to
drop what the whole-batch path drops.
"""

from __future__ import annotations

import math

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

from megajax import parallel


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `key=None` (evaluation) or rate 0 leaves x unchanged. x leads with
    the batch; in one batch shard's trace (parallel.per_batch_shard), x holds that shard's
    rows and its bits are the whole batch's at those rows (rows_bernoulli)."""
    if key is None or rate == 0.0:
        return x
    shard = parallel.batch_shard()
    if shard is not None:
        first = jax.lax.axis_index(shard) * x.shape[0]
        keep = rows_bernoulli(key, 1.0 - rate, x.shape, first)
    else:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rows_bernoulli(key: jax.Array, p: float, shape: tuple[int, ...], first) -> jax.Array:
    """Rows first .. first + shape[0] - 1 of jax.random.bernoulli(key, p, whole), `whole` being
    `shape` with more rows, computed for these rows alone: partitionable threefry (JAX's
    default) draws each element's bits from its row-major index in the whole array, so the
    bits are threefry of (key, first * row size + the local index) as a 64-bit count. The same
    work per element as the whole array's draw; tests/test_grad_reduce.py checks it equals
    jax.random's."""
    row = math.prod(shape[1:])
    local = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(1, len(shape))):
        local = local + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
        stride *= shape[d]
    rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + jnp.asarray(first, jnp.uint32)
    hi, lo = _mul_add_u64(rows, row, local)
    data = jax.random.key_data(key)
    bits1, bits2 = jax.extend.random.threefry2x32_p.bind(data[0], data[1], hi, lo)
    # jax.random.uniform's float32 from 32 bits: 23 mantissa bits under exponent 0, minus 1.
    one = jnp.uint32(np.float32(1.0).view(np.uint32))
    mantissa = jax.lax.shift_right_logical(bits1 ^ bits2, jnp.uint32(9)) | one
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    return jnp.maximum(jnp.float32(0.0), uniform) < jnp.float32(p)


def _mul_add_u64(a: jax.Array, b: int, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (high, low) uint32 words of a * b + c for uint32 arrays a, c and an int b < 2**32,
    by 16-bit halves (JAX computes in 32 bits unless x64 is on)."""
    half = jnp.uint32(0xFFFF)
    a_lo, a_hi = a & half, jax.lax.shift_right_logical(a, jnp.uint32(16))
    b_lo, b_hi = jnp.uint32(b & 0xFFFF), jnp.uint32(b >> 16)
    hi, lo = a_hi * b_hi, a_lo * b_lo
    for middle in (a_hi * b_lo, a_lo * b_hi, None):
        add = c if middle is None else jax.lax.shift_left(middle, jnp.uint32(16))
        if middle is not None:
            hi = hi + jax.lax.shift_right_logical(middle, jnp.uint32(16))
        total = lo + add
        hi, lo = hi + (total < lo).astype(jnp.uint32), total
    return hi, lo
