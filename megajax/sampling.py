"""Next-token sampling from vocabulary-sharded logits, never gathering them.

Each model shard holds the logits of its vocabulary rows (the tied LM head is split like the
word embedding). Every choice is made as a threshold on those local logits plus all-reduces of
one number per sequence over `model`:
- greedy: the largest logit, ties to the lowest id (max, then min of the candidate ids);
- sampling: the Gumbel-max trick, argmax(logit / temperature + Gumbel noise), the noise of
  token id i drawn from (key, i) alone, so the same seed gives the same tokens on every mesh;
- temperature, top-k and top-p are scalars or one value per sequence (a server's batch mixes
  requests): a filter runs where any sequence of the shard asks for it, and changes only those;
- top-k and top-p keep the tokens whose scaled logit is at least a threshold: for top-k the
  largest t with at least k logits >= t, for top-p the largest t whose tokens hold at least
  p of the probability (the smallest such set, as Megatron-LM and Hugging Face define it). The
  threshold is found by bisection, each halving summing a count or a probability over `model`:
  after 40 halvings the kept set is exact but for logits within 2^-40 of the logit range of
  the threshold (ties at the threshold are all kept).
`score` gives a token's log-probability with the n most likely tokens beside it, from one
log-sum-exp, so a greedy token's value equals the best alternative's exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megajax import loss, parallel

BISECTIONS = 40


def sample(hidden, table, keys, *, temperature, top_k, top_p, vocab_size: int, top: int = 0):
    """(tokens (batch,) int32, their log-probabilities (batch,) under the model's own
    distribution) for hidden (batch, hidden) and the tied head `table` (padded_vocab, hidden)
    split over `model`. `keys` (batch, 2) uint32 key data, one key per sequence and step;
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off (each a traced
    scalar or (batch,) array, one value per sequence). With `top`, also the `top` most likely
    tokens' log-probabilities and ids, (batch, top) each, as `score` gives them, from the same
    logits."""
    batch = hidden.shape[0]
    rows = [
        jnp.broadcast_to(jnp.asarray(x, dtype), (batch,))
        for x, dtype in ((temperature, jnp.float32), (top_k, jnp.int32), (top_p, jnp.float32))
    ]
    row = parallel.spec("batch")
    return jax.shard_map(
        lambda h, t, k, temp, kk, pp: _sample_shard(h, t, k, temp, kk, pp, vocab_size, top),
        in_specs=(
            parallel.spec("batch", "embed"),
            parallel.spec("vocab", "embed"),
            parallel.spec("batch", None),
            row,
            row,
            row,
        ),
        out_specs=(row, row, *[parallel.spec("batch", None)] * (2 if top else 0)),
        check_vma=not top,  # the gathered candidates are the same on every model shard
    )(hidden, table, keys, *rows)


def _sample_shard(hidden, table, keys, temperature, top_k, top_p, vocab_size, top):
    logits, start = loss.local_logits(hidden[:, None], table, None, vocab_size)
    logits = logits[:, 0]  # (batch / D, vocab / T), padded rows at -inf
    ids = start + jnp.arange(logits.shape[-1])
    sampled = temperature > 0  # (batch / D,)
    scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
    # A filter no sequence asks for costs nothing: the model shards of a row of the mesh hold
    # the same sequences, so they take the same branch, and no collective runs.
    scaled = jax.lax.cond(jnp.any(top_k > 0), _keep_top_k, lambda s, _: s, scaled, top_k)
    scaled = jax.lax.cond(jnp.any(top_p < 1), _keep_top_p, lambda s, _: s, scaled, top_p)
    noise = jax.lax.cond(
        jnp.any(sampled),
        lambda: jax.vmap(_gumbel, in_axes=(0, None))(keys, ids),
        lambda: jnp.zeros_like(scaled),
    )
    token = loss.global_argmax(scaled + jnp.where(sampled[:, None], noise, 0.0), start)
    return token, *_logprobs(logits, start, token, top)


def _logprobs(logits, start, tokens, n):
    """(log p of `tokens`,) from this shard's logits, every term reduced over the shards, and
    with n > 0 the n best (log-probabilities, ids): one log-sum-exp for all, so a greedy
    token's value equals the best one's exactly. Each shard takes its own n best, the shards'
    candidates are gathered (n x T numbers per sequence, never the logits), the n best kept."""
    ids = start + jnp.arange(logits.shape[-1])
    row_max = jax.lax.pmax(logits.max(-1), parallel.MODEL)
    shifted = logits - row_max[:, None]
    log_sum = jnp.log(jax.lax.psum(jnp.exp(shifted).sum(-1), parallel.MODEL))
    picked = jax.lax.psum(jnp.where(ids == tokens[:, None], shifted, 0.0).sum(-1), parallel.MODEL)
    if not n:
        return (picked - log_sum,)
    values, where = jax.lax.top_k(shifted, min(n, logits.shape[-1]))
    values = jax.lax.all_gather(values, parallel.MODEL, axis=1, tiled=True)  # (batch, n x T)
    candidates = jax.lax.all_gather(start + where, parallel.MODEL, axis=1, tiled=True)
    values, best = jax.lax.top_k(values, n)
    return picked - log_sum, values - log_sum[:, None], jnp.take_along_axis(candidates, best, 1)


def _gumbel(key_data, ids):
    """Standard Gumbel noise for each token id, a function of (key, id) alone."""
    key = jax.random.wrap_key_data(key_data)
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(ids)


def _keep_top_k(scaled, top_k):
    """scaled with all but the top_k largest per row at -inf (rows with top_k 0: all kept)."""
    threshold = _threshold(scaled, jnp.ones_like(scaled), top_k.astype(jnp.float32))
    keep = (scaled >= threshold[:, None]) | (top_k <= 0)[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


def _keep_top_p(scaled, top_p):
    """scaled with all but the smallest set of most likely tokens holding top_p of the
    probability at -inf."""
    row_max = jax.lax.pmax(scaled.max(-1), parallel.MODEL)
    unnormalized = jnp.exp(scaled - row_max[:, None])
    probs = unnormalized / jax.lax.psum(unnormalized.sum(-1), parallel.MODEL)[:, None]
    threshold = _threshold(scaled, probs, top_p)
    keep = (scaled >= threshold[:, None]) | (top_p >= 1)[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


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


def score(hidden, table, tokens, *, n: int, vocab_size: int):
    """(log p of `tokens`, (values, ids) of the n most likely tokens, largest first) for
    hidden (batch, hidden) and the head `table` split over `model`: shapes (batch,),
    (batch, n), (batch, n)."""
    row = parallel.spec("batch")

    def local(h, t, x):
        logits, start = loss.local_logits(h[:, None], t, None, vocab_size)
        return _logprobs(logits[:, 0], start, x, n)

    return jax.shard_map(
        local,
        in_specs=(parallel.spec("batch", "embed"), parallel.spec("vocab", "embed"), row),
        out_specs=(row, parallel.spec("batch", None), parallel.spec("batch", None)),
        check_vma=False,  # the gathered candidates are the same on every model shard
    )(hidden, table, tokens)
