"""Cross-entropy over vocabulary-sharded logits, never gathering them (Megatron, section 3).

Each model shard computes the logits of its vocabulary rows; three all-reduces over `model` of
(batch, length) scalars (max, sum of exponentials, target logit) give the exact softmax loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megajax import parallel


def _local_logits(hidden, table, vocab_size):
    """This shard's logits, (batch, length, vocab / T), with padded vocabulary rows at -inf."""
    logits = jnp.einsum(
        "bsh,vh->bsv", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    start = jax.lax.axis_index(parallel.MODEL) * table.shape[0]
    if table.shape[0] * jax.lax.axis_size(parallel.MODEL) == vocab_size:
        return logits, start  # no padding rows anywhere: skip a (b, s, V / T) select
    ids = start + jnp.arange(table.shape[0])
    return jnp.where(ids < vocab_size, logits, -jnp.inf), start


def _cross_entropy_shard(hidden, table, targets, vocab_size):
    logits, start = _local_logits(hidden, table, vocab_size)
    row_max = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), parallel.MODEL)
    shifted = logits - row_max[..., None]
    sum_exp = jax.lax.psum(jnp.exp(shifted).sum(-1), parallel.MODEL)
    # The target's logit by comparison with the local ids, not by indexing: the backward pass is
    # then an elementwise select that fuses, where take_along_axis's is a scatter into zeros.
    # Targets of other shards match no local id and contribute 0.
    hit = (targets - start)[..., None] == jnp.arange(table.shape[0])
    picked = jnp.where(hit, shifted, 0.0).sum(-1)
    target_logit = jax.lax.psum(picked, parallel.MODEL)
    return jnp.log(sum_exp) - target_logit


def _argmax_shard(hidden, table, vocab_size):
    logits, start = _local_logits(hidden, table, vocab_size)
    best = logits.max(-1)
    global_best = jax.lax.pmax(best, parallel.MODEL)
    # Lowest id among the shards holding the maximum, as a single-device argmax breaks ties.
    candidate = jnp.where(best == global_best, start + logits.argmax(-1), jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidate, parallel.MODEL)


def cross_entropy(hidden, table, targets, *, vocab_size: int) -> jax.Array:
    """Per-token loss (batch, length) in float32 for hidden (batch, length, hidden) and the tied
    head `table` (padded_vocab, hidden) split over `model`; ids >= vocab_size are padding."""
    fn = jax.shard_map(
        lambda h, t, y: _cross_entropy_shard(h, t, y, vocab_size),
        in_specs=(
            parallel.spec("batch", "length", "embed"),
            parallel.spec("vocab", "embed"),
            parallel.spec("batch", "length"),
        ),
        out_specs=parallel.spec("batch", "length"),
    )
    return fn(hidden, table, targets)


def argmax(hidden, table, *, vocab_size: int) -> jax.Array:
    """Greedy predictions (batch, length) from vocabulary-sharded logits; padding never wins."""
    fn = jax.shard_map(
        lambda h, t: _argmax_shard(h, t, vocab_size),
        in_specs=(parallel.spec("batch", "length", "embed"), parallel.spec("vocab", "embed")),
        out_specs=parallel.spec("batch", "length"),
    )
    return fn(hidden, table)
