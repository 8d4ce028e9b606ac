"""The 1F1B pipeline schedule (Narayanan et al. 2021, arXiv 2104.04473, section 2.2) in one
jitted step: each stage holds at most 2P - 1 micro-batches' stage inputs, whatever m.

The step runs inside `shard_map`, manual over `pipeline` (auto over the other axes, so tensor
and data parallelism inside a stage are the plan's as everywhere else): each pipeline rank is
one stage and holds its L / P consecutive layers. One `lax.scan` over m + 2P - 2 ticks; at tick
t, stage s
- runs the forward of micro-batch f = t - s on its input (stage 0 embeds it first) and keeps
  that input in a ring buffer of 2P - 1 slots;
- runs the backward of micro-batch b = t - (2P - 2 - s): `jax.vjp` of the stage on the saved
  input (the stage recomputed, with model.remat inside) and the cotangent that arrived from
  stage s + 1. The last stage (b = f there) instead applies the head and the objective to its
  own output and starts the backward from their gradient: the head runs on the last stage
  only. Stage 0 takes the embedding's backward on from the cotangent of its input.
- sends its output on (stage s -> s + 1) and its input's cotangent back (s -> s - 1): two
  collective-permutes of one micro-batch's (b / D, length, hidden) share per tick.
Weight gradients are summed over the ticks in float32. Each part runs under a `lax.cond` on the
rank's stage and its micro-batch numbers, so bubble ticks compute nothing: the warm-up ticks
cost a forward, the cool-down ticks a backward, and the step the time of (m + P - 1) forward
and backward passes, GPipe's bubble (P - 1) / (m + P - 1).

Why 2P - 1 slots: stage s keeps micro-batch i's input from tick i + s to tick i + 2P - 2 - s,
so stage 0 holds 2P - 1 at once (Megatron-LM, whose forward and backward are separate time
slots, counts P). The recomputing backward needs nothing else kept between ticks.

Interleaved (v = train.pipeline_repeats > 1 chunks per stage, chunk r P + s on stage s): the
same loop over v m + v P + P - 2 ticks in Megatron-LM's order (_schedule), 2 v P - 1 slots; the
permutes close the ring, the last stage feeding stage 0 the next round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from megajax import lora, parallel
from megajax.pipeline_arithmetic import saved_inputs, stage_chunks, ticks


class StepFns(NamedTuple):
    """The model's pieces as the schedule calls them; `params` are nested parameter dicts
    (the stacked layers' leaves this stage's slice, (L / P, ...))."""

    embed: Callable  # (params, micro_batch, key) -> the stack's input (b, length, hidden)
    stage: Callable  # (stack_params, x, micro_batch, key, first_layer) -> the stage's output
    head: Callable  # (params, x, micro_batch, share) -> (differentiated value, metrics)


def run(fns, trainable, frozen, batch, key, shares, scale, *, stages, repeats=1, stack="h",
        reduce_once=None):  # fmt: skip
    """(sums over the micro-batches of the head's metrics, float32 sums of the trainable
    parameters' gradients) of m micro-batches `batch` ({field: (m, b, ...)}); `shares` (m,)
    weigh them, `scale` (a scalar) multiplies the differentiated value (float16's loss scale).
    `stack` names the parameters of the stacked layers, whose leading axis the plan splits
    over `pipeline`; the others are replicated over it. With v = `repeats` > 1 the layers are
    first put in stage order (chunk r P + s to stage s), which moves them over `pipeline`.

    `reduce_once` (optim.grad_reduce="step"): the dtype in which the gradients are summed over
    the batch axes once, after the loop. The schedule is then manual over the batch axes too:
    each device runs its own rows (parallel.per_batch_shard), its gradients summed over the
    ticks on the device and over the batch shards at the end (their mean: each shard's
    objective is the mean over its rows, or its share of a mean over scored positions,
    loss.weighted_mean). Without it the partitioner sums each tick's gradients over the batch
    axes as the tick makes them."""
    axis = parallel.spec("stage")[0]
    batch_axes = parallel.batch_axes() if reduce_once is not None else ()
    t_stack, t_rest = _part(trainable, stack)
    f_stack, f_rest = _part(frozen, stack)
    order = stage_chunks(stages, repeats).reshape(-1)  # stage-major: stage s's v chunks

    def by_stage(w, order):  # (L, ...) in chunks, reordered
        if repeats == 1:
            return w
        chunks = w.reshape(stages * repeats, -1, *w.shape[1:])
        return jnp.take(chunks, order, axis=0).reshape(w.shape)

    stacked = P(axis)
    rows = P(None, batch_axes) if batch_axes else P()
    specs = (stacked, stacked, P(), P(), rows, P(), P(), P())
    out = (P(), stacked, P())

    def body(t_stack, f_stack, t_rest, f_rest, batch, key, shares, scale):
        run = lambda: _schedule(  # noqa: E731
            fns, t_stack, f_stack, t_rest, f_rest, batch, key, shares, scale,
            stages=stages, repeats=repeats, axis=axis, stack=stack,
        )  # fmt: skip
        if not batch_axes:
            return run()
        return parallel.mean_over_batch_shards(run, batch_axes, reduce_once)

    # check_vma=False: the scan's carry starts replicated and turns stage-dependent through the
    # conds on the stage index, which the varying-axes checker refuses as a type change.
    manual = {axis, *batch_axes}
    shard = jax.shard_map(body, in_specs=specs, out_specs=out, axis_names=manual, check_vma=False)
    in_order = lambda tree: jax.tree.map(lambda w: by_stage(w, order), tree)  # noqa: E731
    sums, g_stack, g_rest = shard(
        in_order(t_stack), in_order(f_stack), t_rest, f_rest, batch, key, shares, scale
    )
    g_stack = jax.tree.map(lambda g: by_stage(g, np.argsort(order)), g_stack)
    return sums, lora.join(g_rest, {stack: g_stack} if g_stack else {})


def _part(tree: dict, stack: str):
    """(the stacked layers' subtree or {}, the rest)."""
    return tree.get(stack, {}), {k: v for k, v in tree.items() if k != stack}


def _zeros(shapes, dtype=None):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype or s.dtype), shapes)


def _schedule(fns, t_stack, f_stack, t_rest, f_rest, batch, key, shares, scale, *, stages,
              repeats, axis, stack):  # fmt: skip
    """One stage's view (inside shard_map): the tick loop and its gradient sums.

    Work is numbered as Megatron-LM's interleaved schedule orders it: the micro-batches go in
    groups of P, each group through chunk round 0, then round 1, ... (v P forward passes per
    group). Forward pass w (round r = (w mod vP) // P of micro-batch (w // vP) P + w mod P) runs
    on stage s at tick w + s; backward pass u (the same numbering, rounds reversed) at tick
    u + (P - 1 - s) + (v P - 1), so the last chunk's backward of a micro-batch runs on the tick
    of its forward, and each cotangent reaches the previous chunk one tick later."""
    me = jax.lax.axis_index(axis)
    first, last = me == 0, me == stages - 1
    v, group = repeats, repeats * stages
    m = shares.shape[0]
    slots = saved_inputs(stages, repeats, m, "1f1b")
    per_chunk = jax.tree.leaves(lora.join(t_stack, f_stack))[0].shape[0] // v

    def params(t_rest):  # the whole model's, this stage's layers in place of the stack
        return lora.join(lora.join(t_rest, f_rest), {stack: lora.join(t_stack, f_stack)})

    def micro(i):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), batch)

    def key_of(i):
        return None if key is None else jax.random.fold_in(key, i)

    def embed(t_rest, i):
        return fns.embed(params(t_rest), micro(i), key_of(i))

    def stage(t_stack_, x, i, r):
        """This stage's chunk of round r on micro-batch i (the chunk's slice of the layers)."""
        chunk = lambda w: jax.lax.dynamic_slice_in_dim(w, r * per_chunk, per_chunk)  # noqa: E731
        layers = jax.tree.map(chunk, lora.join(t_stack_, f_stack))
        return fns.stage(layers, x, micro(i), key_of(i), (r * stages + me) * per_chunk)

    def head(t_rest, y, i):
        return fns.head(params(t_rest), y, micro(i), shares[i])

    def pass_of(n):
        """(micro-batch, round, in range) of pass number n (unclipped)."""
        on = (n >= 0) & (n < v * m)
        n = jnp.clip(n, 0, v * m - 1)
        return (n // group) * stages + n % stages, (n % group) // stages, on

    x_shape = jax.eval_shape(embed, t_rest, 0)
    head_shapes = jax.eval_shape(head, t_rest, x_shape, 0)
    zero_x = jnp.zeros(x_shape.shape, x_shape.dtype)
    f32 = lambda tree: _zeros(jax.eval_shape(lambda: tree), jnp.float32)  # noqa: E731
    # With v > 1 the last stage's output goes round to stage 0 (the next round's chunk), and
    # stage 0's cotangent back to the last stage: the permutes close the ring.
    ring_pairs = [(s, s + 1) for s in range(stages - 1 if v == 1 else stages)]
    forward_pairs = [(a, b % stages) for a, b in ring_pairs]
    backward_pairs = [(b % stages, a) for a, b in ring_pairs]

    def backward(x_b, ct_in, i, r):
        """Stage s's backward of micro-batch i, round r, from its saved input (recomputed);
        the last chunk's from the head: (metrics, rest gradient, stack gradient, cotangent)."""
        y, pull = jax.vjp(lambda w, x: stage(w, x, i, r), t_stack, x_b)

        def with_head():
            _, head_pull, metrics = jax.vjp(lambda w, y: head(w, y, i), t_rest, y, has_aux=True)
            g_rest, ct = head_pull(jnp.asarray(scale, head_shapes[0].dtype))
            return metrics, g_rest, ct.astype(y.dtype)

        def without_head():
            return _zeros(head_shapes[1]), _zeros(jax.eval_shape(lambda: t_rest)), ct_in

        metrics, g_rest, ct = jax.lax.cond(last & (r == v - 1), with_head, without_head)
        g_stack, dx = pull(ct)
        return metrics, g_rest, g_stack, dx

    backward_shapes = jax.eval_shape(backward, zero_x, zero_x, 0, 0)

    def tick(carry, t):
        fwd_in, bwd_in, ring, g_stack, g_rest, sums = carry
        w = t - me  # this stage's forward pass
        u = t - (stages - 1 - me) - (group - 1)  # and backward pass, rounds reversed
        f, f_round, f_on = pass_of(w)
        b, b_reversed, b_on = pass_of(u)
        b_round = v - 1 - b_reversed
        w_of_b = (u // group) * group + b_round * stages + u % stages  # its forward pass

        # Forward: stage 0 embeds micro-batch f in round 0; every other input arrived.
        x_f = jax.lax.cond(
            first & (f_round == 0) & f_on,
            lambda: embed(t_rest, f).astype(zero_x.dtype),
            lambda: fwd_in,
        )
        # Slot w mod (2 v P - 1): the inputs still awaiting their backward keep theirs.
        ring = jax.lax.dynamic_update_index_in_dim(ring, x_f, jnp.mod(w, slots), 0)
        # The last chunk's forward is its backward's recomputation (same tick): not run twice.
        last_chunk = last & (f_round == v - 1)
        y_f = jax.lax.cond(
            f_on & ~last_chunk, lambda: stage(t_stack, x_f, f, f_round), lambda: zero_x
        )

        # Backward from the saved input (for the last chunk, x_f itself).
        x_b = jax.lax.dynamic_index_in_dim(ring, jnp.mod(w_of_b, slots), keepdims=False)
        metrics, g_head, g_layers, dx = jax.lax.cond(
            b_on, lambda: backward(x_b, bwd_in, b, b_round), lambda: _zeros(backward_shapes)
        )
        # Stage 0 carries the cotangent of round 0's input into the embedding.
        g_embed = jax.lax.cond(
            first & (b_round == 0) & b_on,
            lambda: jax.vjp(lambda w: embed(w, b).astype(dx.dtype), t_rest)[1](dx)[0],
            lambda: _zeros(jax.eval_shape(lambda: t_rest)),
        )
        add = lambda acc, g: acc + g.astype(jnp.float32)  # noqa: E731
        g_stack = jax.tree.map(add, g_stack, g_layers)
        g_rest = jax.tree.map(add, jax.tree.map(add, g_rest, g_head), g_embed)
        sums = jax.tree.map(jnp.add, sums, metrics)
        # One collective-permute each way: outputs one stage on, cotangents one stage back.
        fwd_in = jax.lax.ppermute(y_f, axis, forward_pairs)
        bwd_in = jax.lax.ppermute(dx, axis, backward_pairs)
        return (fwd_in, bwd_in, ring, g_stack, g_rest, sums), None

    ring = jnp.zeros((slots, *x_shape.shape), x_shape.dtype)
    carry = (zero_x, zero_x, ring, f32(t_stack), f32(t_rest), _zeros(head_shapes[1]))
    carry, _ = jax.lax.scan(tick, carry, jnp.arange(ticks(stages, v, m, "1f1b")))
    *_, g_stack, g_rest, sums = carry
    # The head's gradient is the last stage's, the embedding's the first's (both, for a tied
    # embedding): one all-reduce over `pipeline` gives every stage the sum.
    return jax.lax.psum(sums, axis), g_stack, jax.lax.psum(g_rest, axis)
