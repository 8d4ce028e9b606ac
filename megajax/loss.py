"""Cross-entropy over vocabulary-sharded logits, never gathering them (Megatron, section 3).

Each model shard computes the logits of its vocabulary rows; three all-reduces over `model` of
(batch, length) scalars (max, sum of exponentials, target logit) give the exact softmax loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megajax import parallel


def local_logits(hidden, table, bias, vocab_size):
    """This shard's logits, (batch, length, vocab / T), with padded vocabulary rows at -inf."""
    logits = jnp.einsum(
        "bsh,vh->bsv", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    start = jax.lax.axis_index(parallel.MODEL) * table.shape[0]
    if table.shape[0] * jax.lax.axis_size(parallel.MODEL) == vocab_size:
        return logits, start  # no padding rows anywhere: skip a (b, s, V / T) select
    ids = start + jnp.arange(table.shape[0])
    return jnp.where(ids < vocab_size, logits, -jnp.inf), start


def _cross_entropy_shard(hidden, table, bias, targets, vocab_size):
    logits, start = local_logits(hidden, table, bias, vocab_size)
    row_max = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), parallel.MODEL)
    shifted = logits - row_max[..., None]
    sum_exp = jax.lax.psum(jnp.exp(shifted).sum(-1), parallel.MODEL)
    # The target's logit by comparison with the local ids, not by indexing: the backward pass is
    # then an elementwise select that fuses, where take_along_axis's is a scatter into zeros.
    # Targets of other shards match no local id and contribute 0.
    hit = (targets - start)[..., None] == jnp.arange(table.shape[0])
    picked = jnp.where(hit, shifted, 0.0).sum(-1)
    target_logit = jax.lax.psum(picked, parallel.MODEL)
    # The target is the greedy prediction iff its logit is the maximum: no further collective.
    return jnp.log(sum_exp) - target_logit, target_logit >= 0


def global_argmax(scores, start):
    """The id of the largest score over all model shards, from this shard's scores (..., vocab
    / T) whose first id is `start`: ties go to the lowest id, as a single-device argmax breaks
    them (the max, then the min of the candidate ids, over `model`)."""
    best = scores.max(-1)
    global_best = jax.lax.pmax(best, parallel.MODEL)
    candidate = jnp.where(best == global_best, start + scores.argmax(-1), jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidate, parallel.MODEL)


def _argmax_shard(hidden, table, bias, vocab_size):
    logits, start = local_logits(hidden, table, bias, vocab_size)
    return global_argmax(logits, start)


def _vocab_sharded(fn, hidden, table, bias, *rest, vocab_size, out_specs):
    """Run fn(hidden, table, bias, *rest, vocab_size) on each model shard; `bias` (optional,
    (padded_vocab,)) is split like the table's rows, `rest` are (batch, length) arrays."""
    row = parallel.spec("batch", "length")
    # Hidden states split over the sequence (sequence parallelism) are gathered in here, so
    # that their gradient is reduce-scattered, not all-reduced.
    hidden_spec = parallel.spec("batch", "residual_length", "embed")
    specs = [hidden_spec, parallel.spec("vocab", "embed")]
    args = [hidden, table]
    if bias is not None:
        specs.append(parallel.spec("vocab"))
        args.append(bias)
    specs += [row] * len(rest)

    def local(h, t, *more):
        b, more = (more[0], more[1:]) if bias is not None else (None, more)
        h = parallel.gather_over_model(h, parallel.model_dims(hidden_spec))
        return fn(h, t, b, *more, vocab_size)

    return jax.shard_map(local, in_specs=tuple(specs), out_specs=out_specs)(*args, *rest)


def cross_entropy_and_correct(hidden, table, targets, *, vocab_size: int, bias=None):
    """Per-token loss (batch, length) in float32, and whether each target is the greedy
    prediction, for hidden (batch, length, hidden) and the tied head `table` (padded_vocab,
    hidden) split over `model` (plus an output `bias` if given); ids >= vocab_size are
    padding. A target outside [0, vocab_size) gets loss log-sum-exp and is never correct: mask
    such positions out of the mean."""
    row = parallel.spec("batch", "length")
    return _vocab_sharded(
        _cross_entropy_shard,
        hidden,
        table,
        bias,
        targets,
        vocab_size=vocab_size,
        out_specs=(row, row),
    )


def cross_entropy(hidden, table, targets, *, vocab_size: int, bias=None) -> jax.Array:
    """Per-token loss (batch, length): cross_entropy_and_correct's first output."""
    return cross_entropy_and_correct(hidden, table, targets, vocab_size=vocab_size, bias=bias)[0]


def argmax(hidden, table, *, vocab_size: int, bias=None) -> jax.Array:
    """Greedy predictions (batch, length) from vocabulary-sharded logits; padding never wins."""
    return _vocab_sharded(
        _argmax_shard,
        hidden,
        table,
        bias,
        vocab_size=vocab_size,
        out_specs=parallel.spec("batch", "length"),
    )


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / sum(weights) (a denominator of at least 1): a loss or metric
    over the scored positions or samples of a batch. In one batch shard's trace
    (parallel.per_batch_shard) the shard's share of the whole batch's mean, times the number
    of shards, the scored count summed over the shards (one scalar): the mean of the shards'
    values is then the batch's, however the scored positions fall between them."""
    total, count = (values * weights).sum(), weights.sum()
    shard = parallel.batch_shard()
    if shard is None:
        return total / jnp.maximum(count, 1)
    return total * jax.lax.psum(1, shard) / jnp.maximum(jax.lax.psum(count, shard), 1)
