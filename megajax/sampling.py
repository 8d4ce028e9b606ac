"""Next-token sampling from vocabulary-sharded logits, never gathering them.

Each model shard holds the logits of its vocabulary rows (the tied LM head is split like the
word embedding). Every choice is made as a threshold on those local logits plus all-reduces of
one number per sequence over `model`:
- greedy: the largest logit, ties to the lowest id (max, then min of the candidate ids);
- sampling: the Gumbel-max trick, argmax(logit / temperature + Gumbel noise), the noise of
  token id i drawn from (key, i) alone, so the same seed gives the same tokens on every mesh;
- top-k and top-p keep the tokens whose scaled logit is at least a threshold: for top-k the
  largest t with at least k logits >= t, for top-p the largest t whose tokens hold at least
  p of the probability (the smallest such set, as Megatron-LM and Hugging Face define it). The
  threshold is found by bisection, each halving summing a count or a probability over `model`:
  after 40 halvings the kept set is exact but for logits within 2^-40 of the logit range of
  the threshold (ties at the threshold are all kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megajax import loss, parallel

BISECTIONS = 40


def sample(hidden, table, keys, *, temperature, top_k, top_p, vocab_size: int):
    """(tokens (batch,) int32, their log-probabilities (batch,) under the model's own
    distribution) for hidden (batch, hidden) and the tied head `table` (padded_vocab, hidden)
    split over `model`. `keys` (batch, 2) uint32 key data, one key per sequence and step;
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off (scalars, traced)."""
    scalar = parallel.spec()
    return jax.shard_map(
        lambda h, t, k, temp, kk, pp: _sample_shard(h, t, k, temp, kk, pp, vocab_size),
        in_specs=(
            parallel.spec("batch", "embed"),
            parallel.spec("vocab", "embed"),
            parallel.spec("batch", None),
            scalar,
            scalar,
            scalar,
        ),
        out_specs=(parallel.spec("batch"), parallel.spec("batch")),
    )(hidden, table, keys, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def _sample_shard(hidden, table, keys, temperature, top_k, top_p, vocab_size):
    logits, start = loss.local_logits(hidden[:, None], table, None, vocab_size)
    logits = logits[:, 0]  # (batch / D, vocab / T), padded rows at -inf
    ids = start + jnp.arange(logits.shape[-1])
    sampled = temperature > 0
    scaled = logits / jnp.where(sampled, temperature, 1.0)
    # A filter switched off costs nothing: all shards take the same branch, no collective runs.
    scaled = jax.lax.cond(top_k > 0, _keep_top_k, lambda s, _: s, scaled, top_k)
    scaled = jax.lax.cond(top_p < 1, _keep_top_p, lambda s, _: s, scaled, top_p)
    noise = jax.lax.cond(
        sampled,
        lambda: jax.vmap(_gumbel, in_axes=(0, None))(keys, ids),
        lambda: jnp.zeros_like(scaled),
    )
    token = loss.global_argmax(scaled + noise, start)
    # log p(token) = logit - log sum exp(logits), every term reduced over the shards.
    row_max = jax.lax.pmax(logits.max(-1), parallel.MODEL)
    sum_exp = jax.lax.psum(jnp.exp(logits - row_max[:, None]).sum(-1), parallel.MODEL)
    picked = jax.lax.psum(jnp.where(ids == token[:, None], logits, 0.0).sum(-1), parallel.MODEL)
    return token, picked - row_max - jnp.log(sum_exp)


def _gumbel(key_data, ids):
    """Standard Gumbel noise for each token id, a function of (key, id) alone."""
    key = jax.random.wrap_key_data(key_data)
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(ids)


def _keep_top_k(scaled, top_k):
    """scaled with all but the top_k largest per row at -inf."""
    threshold = _threshold(scaled, jnp.ones_like(scaled), top_k.astype(jnp.float32))
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


def _keep_top_p(scaled, top_p):
    """scaled with all but the smallest set of most likely tokens holding top_p of the
    probability at -inf."""
    row_max = jax.lax.pmax(scaled.max(-1), parallel.MODEL)
    unnormalized = jnp.exp(scaled - row_max[:, None])
    probs = unnormalized / jax.lax.psum(unnormalized.sum(-1), parallel.MODEL)[:, None]
    threshold = _threshold(scaled, probs, top_p)
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


def _threshold(scores, weights, target):
    """Per row, the largest t with sum(weights where scores >= t) >= target over all shards,
    by bisection between the smallest and largest finite score."""

    def mass(t):
        return jax.lax.psum(jnp.where(scores >= t[:, None], weights, 0.0).sum(-1), parallel.MODEL)

    finite = jnp.isfinite(scores)
    lo = jax.lax.pmin(jnp.where(finite, scores, jnp.inf).min(-1), parallel.MODEL)
    hi = jax.lax.pmax(jnp.where(finite, scores, -jnp.inf).max(-1), parallel.MODEL)

    def halve(_, bounds):  # invariant: mass(lo) >= target (or lo is the smallest score)
        lo, hi = bounds
        mid = lo + (hi - lo) / 2
        enough = mass(mid) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTIONS, halve, (lo, hi))
    return jnp.where(mass(hi) >= target, hi, lo)
