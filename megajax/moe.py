"""Mixture-of-Experts feed-forward block (Mixtral's sparse MoE) and expert parallelism.

A router (hidden -> experts, in float32) picks each token's top-k experts. The experts are
SwiGLU MLPs stacked into one weight per projection: w1 (experts, hidden, 2 ffn), gate and up
interleaved unit by unit as layers.MLP's fc1 holds them, and w2 (experts, ffn, hidden).

Dropless: a token's k choices become k rows, the rows are sorted by expert, and each
projection is one grouped matmul over the sorted rows (`jax.lax.ragged_dot`: every row times
its own expert's weight, nothing padded or dropped); the outputs are put back in token order
and summed with the router's weights. With model.moe_capacity_factor, each expert takes at
most C = ceil(factor * seq_len * k / experts) choices per sequence, all first choices before
any second ones and earlier tokens first (GShard); the others are dropped and counted.

Expert parallelism (the plan's `experts` row -> `expert`): each expert shard holds experts / X
whole experts and routes the tokens of its own batch rows. One all-to-all sends each choice to
the shard holding its expert (dispatch) and one brings the outputs back (combine); a third, of
X x experts / X integers, tells each shard how many rows of each of its experts arrive. The
backward pass transposes the two of rows. XLA:CPU has no ragged all-to-all, so a shard sends
each destination a block sized for all of its own choices, the rows packed at its front: the
exchange stays dropless whatever the routing, at X times the bytes of the rows themselves.
With a capacity a block needs only as many rows as the shard's sequences may send the
destination's experts (experts / X x sequences x C, when that is fewer).
Each expert's inner width is split over `model` (`expert_mlp`, expert tensor parallelism) and
the partial outputs are summed by one all-reduce after the combine, as after a dense fc2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.layers import MLP, _normal, swiglu


class MoE(nnx.Module):
    """The MoE block on (batch, length, hidden): (output, router statistics). The statistics
    are sums over this call's tokens (router_losses turns them into losses): "counts"
    (experts,) choices per expert, "probs" (experts,) router probabilities, "z" the squared
    log-sum-exp of the logits, "tokens", and "dropped" choices (capacity only)."""

    def __init__(self, cfg, *, out_std: float, rngs):
        e, h, f = cfg.moe_experts, cfg.hidden, cfg.expert_hidden
        self.router = nnx.Param(_normal(cfg.init_std, "embed", None)(rngs.params(), (h, e)))
        w1_init = _normal(cfg.init_std, "experts", "embed", "expert_mlp")
        self.w1 = nnx.Param(w1_init(rngs.params(), (e, h, 2 * f)))
        w2_init = _normal(out_std, "experts", "expert_mlp", "embed")
        self.w2 = nnx.Param(w2_init(rngs.params(), (e, f, h)))
        shared = None
        if cfg.moe_shared_experts:  # always-on experts: one SwiGLU MLP of their summed width
            width = cfg.moe_shared_experts * f
            shared_cfg = dataclasses.replace(cfg, mlp="swiglu", ffn_hidden=width)
            shared = MLP(shared_cfg, out_std=out_std, rngs=rngs)
        self.shared = nnx.data(shared)
        self.num_experts, self.top_k = e, cfg.moe_top_k
        self.router_kind, self.capacity_factor = cfg.moe_router, cfg.moe_capacity_factor
        self.staged = False  # in pipeline stages: the one-hot experts (for_stages)

    def __call__(self, x: jax.Array, *, key=None) -> tuple[jax.Array, dict]:
        del key  # no dropout inside the block (the residual branch's is the Block's)
        in_spec = parallel.spec("batch", "residual_length", "embed")
        gathered = tuple(parallel.model_dims(in_spec))  # sequence parallelism: length
        split_width = parallel.spec("expert_mlp")[0] is not None
        expert_axis = parallel.spec("experts")[0]
        batch_axes = parallel.batch_axes()

        def local(x, router, w1, w2):
            x = parallel.gather_over_model(x, gathered)
            if split_width and not gathered:
                # Taken as varying over `model` (each shard's experts see a slice of the
                # width): the shards' terms of its gradient are then summed once, over the
                # (tokens, hidden) input, not over the k x X times larger rows they became.
                x = jax.lax.pcast(x, parallel.MODEL, to="varying")
            b, s, h = x.shape
            tokens = x.reshape(b * s, h)
            logits = jnp.einsum("nh,he->ne", tokens.astype(jnp.float32), router)
            choice, weight, stats = self.route(logits, sequences=b)
            rows = self._experts_of(tokens, choice, w1, w2, expert_axis, sequences=b)
            y = jnp.einsum("nkh,nk->nh", rows, weight.astype(rows.dtype)).reshape(b, s, h)
            if split_width:  # each model shard's experts hold a slice of the inner width
                y = parallel.sum_over_model(y, in_spec)
            stats = jax.tree.map(lambda v: jax.lax.psum(v, batch_axes), stats)
            if gathered or split_width:  # every model shard routed the same tokens: one copy
                stats = jax.tree.map(lambda v: jax.lax.pmean(v, parallel.MODEL), stats)
            return y, stats

        stats_spec = {k: P() for k in ("counts", "probs", "z", "tokens", "dropped")}
        y, stats = jax.shard_map(
            local,
            in_specs=(
                in_spec,
                parallel.spec("embed", None),
                parallel.spec("experts", "embed", "expert_mlp"),
                parallel.spec("experts", "expert_mlp", "embed"),
            ),
            out_specs=(in_spec, stats_spec),
        )(x, self.router[...], self.w1[...], self.w2[...])
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats

    def route(self, logits: jax.Array, *, sequences: int):
        """Each token's (tokens, k) experts and weights, and the router statistics, from its
        float32 logits (tokens, experts), the tokens `sequences` rows of equal length. A
        choice dropped by the capacity gets expert number `experts` and weight 0."""
        n, e, k = *logits.shape, self.top_k
        probs = jax.nn.softmax(logits, axis=-1)
        top, choice = jax.lax.top_k(logits, k)
        if self.router_kind == "topk_softmax":
            weight = jax.nn.softmax(top, axis=-1)
        else:
            weight = jnp.take_along_axis(probs, choice, axis=-1)
        stats = {
            "counts": jax.nn.one_hot(choice, e, dtype=jnp.float32).sum((0, 1)),
            "probs": probs.sum(0),
            "z": jnp.square(jax.nn.logsumexp(logits, axis=-1)).sum(),
            "tokens": jnp.float32(n),
            "dropped": jnp.float32(0),
        }
        if self.capacity_factor:
            s, capacity = n // sequences, self.capacity(n // sequences)
            # Choices in priority order per sequence: (k, length), first choices first.
            hot = jax.nn.one_hot(choice, e, dtype=jnp.int32).reshape(sequences, s, k, e)
            hot = hot.transpose(0, 2, 1, 3).reshape(sequences, k * s, e)
            place = ((jnp.cumsum(hot, axis=1) - 1) * hot).sum(-1)  # within its expert's queue
            place = place.reshape(sequences, k, s).transpose(0, 2, 1).reshape(n, k)
            keep = place < capacity
            choice, weight = jnp.where(keep, choice, e), jnp.where(keep, weight, 0.0)
            stats["dropped"] = (~keep).sum().astype(jnp.float32)
        return choice, weight, stats

    def capacity(self, seq_len: int) -> int:
        """The choices of one sequence an expert takes (model.moe_capacity_factor)."""
        return math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts)

    def _experts_of(self, tokens, choice, w1, w2, expert_axis, *, sequences: int):
        """Each choice's expert output, (tokens, k, hidden): the choices sorted by expert, run
        through their experts (across expert shards if `expert_axis` splits them), put back.
        The exchange's blocks hold all n k rows, or with a capacity at most what this shard's
        sequences may send one shard's experts."""
        n, k = choice.shape
        flat = choice.reshape(-1)  # the expert of each of the n k rows; `experts`: dropped
        order = jnp.argsort(flat, stable=True)
        rows = tokens[order // k]  # (n k, hidden), by expert
        sizes = (flat[:, None] == jnp.arange(self.num_experts)).sum(0, dtype=jnp.int32)
        experts = one_hot_swiglu if self.staged else grouped_swiglu
        if expert_axis is None or jax.lax.axis_size(expert_axis) == 1:
            out = experts(rows, sizes, w1, w2)
        else:
            block = n * k
            if self.capacity_factor:
                block = min(block, w1.shape[0] * sequences * self.capacity(n // sequences))
            out = _exchange(rows, flat[order], sizes, w1, w2, expert_axis, block, experts)
        return jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)


def grouped_swiglu(rows, sizes, w1, w2):
    """SwiGLU experts on rows sorted by expert, sizes[i] of them expert i's, as two grouped
    matmuls; rows after the last group (dropped or padding) come out as zeros."""
    dtype = rows.dtype
    y = swiglu(jax.lax.ragged_dot(rows, w1.astype(dtype), sizes))
    y = jax.lax.ragged_dot(y, w2.astype(dtype), sizes)
    grouped = jnp.arange(rows.shape[0]) < sizes.sum()
    return jnp.where(grouped[:, None], y, 0)


def one_hot_swiglu(rows, sizes, w1, w2):
    """grouped_swiglu computed densely: each row through every expert (an einsum over the
    expert axis), its own expert's output kept by a one-hot mask. The same numbers at
    experts / k times the FLOPs; vectorizable over pipeline stages, which ragged_dot (JAX
    0.10) is not unless every operand is batched on its first axis."""
    ends = jnp.cumsum(sizes)
    expert = (jnp.arange(rows.shape[0])[:, None] >= ends[None, :]).sum(-1)  # experts: none
    hidden = swiglu(jnp.einsum("rh,ehf->erf", rows, w1.astype(rows.dtype)))
    out = jnp.einsum("erf,efh->erh", hidden, w2.astype(rows.dtype))
    mask = jax.nn.one_hot(expert, w1.shape[0], dtype=rows.dtype)  # (rows, experts)
    return jnp.einsum("erh,re->rh", out, mask)


def for_stages(model: nnx.Module) -> nnx.Module:
    """Make `model`'s MoE blocks run their experts as one_hot_swiglu (in place): the pipeline
    vectorizes its stages, and ragged_dot's batching rule does not take what that gives it."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, MoE):
            m.staged = True
    return model


def _exchange(rows, experts, sizes, w1, w2, axis, block, run):
    """Inside shard_map: rows (n k, hidden) sorted by their `experts` (number `experts` for a
    dropped one), sizes (experts,) per expert, run on the expert shards of `axis` that hold
    their experts (w1, w2: this shard's experts / X) and returned in the same order. `block`:
    the most rows one shard sends another; `run`: the experts' function (grouped_swiglu)."""
    x_deg, local, (a, h) = jax.lax.axis_size(axis), w1.shape[0], rows.shape
    dest = experts // local  # the shard holding each row's expert; x_deg for a dropped row
    per_dest = sizes.reshape(x_deg, local).sum(1)
    slot = jnp.arange(a) - (jnp.cumsum(per_dest) - per_dest)[jnp.minimum(dest, x_deg - 1)]
    # Dispatch: block j of `send` holds the rows for shard j at its front.
    send = jnp.zeros((x_deg, block, h), rows.dtype).at[dest, slot].set(rows, mode="drop")
    arrived = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # (source, block, hidden)
    counts = jax.lax.all_to_all(sizes.reshape(x_deg, local), axis, 0, 0, tiled=True)
    # Each arrived row's expert among this shard's (`local` for the padding after a block's
    # rows), then the rows of all sources sorted by it for the grouped matmuls.
    bounds = jnp.cumsum(counts, axis=1)  # (source, local)
    mine = (jnp.arange(block)[None, :, None] >= bounds[:, None, :]).sum(-1).reshape(-1)
    order = jnp.argsort(mine, stable=True)
    out = run(arrived.reshape(-1, h)[order], counts.sum(0), w1, w2)
    out = jnp.zeros_like(out).at[order].set(out).reshape(x_deg, block, h)
    # Combine: block j comes back to the shard that sent it, in the order it was sent.
    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)
    kept = dest < x_deg
    picked = back[jnp.minimum(dest, x_deg - 1), jnp.where(kept, slot, 0)]
    return jnp.where(kept[:, None], picked, 0)


def router_losses(stats: dict, num_experts: int) -> dict:
    """The load-balancing loss, the router z-loss and the dropped choices from router
    statistics summed over the layers (MoE's): aux = experts * sum_e f_e P_e, with f_e the
    choices of expert e per token and P_e its mean router probability, both over every layer's
    tokens together (as transformers computes Mixtral's); z = mean squared log-sum-exp."""
    tokens = stats["tokens"]
    aux = num_experts * jnp.sum((stats["counts"] / tokens) * (stats["probs"] / tokens))
    return {"moe_aux_loss": aux, "moe_z_loss": stats["z"] / tokens, "moe_dropped": stats["dropped"]}
