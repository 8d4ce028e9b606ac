"""Stacked layers run as a pipeline schedule (megajax/pipeline_arithmetic.py) inside one jitted
step.

The layers' leading axis, split over `pipeline` in consecutive blocks by the plan table, is
reshaped into (stages, chunks per stage, layers per chunk). One `lax.scan` over the ticks
applies every stage at once (a vmap over the stage axis, laid out over `pipeline`) and rolls
the stages' outputs one stage on: on a stage-split axis the roll compiles to one
collective-permute. Autodiff gives the backward pass (the permutes run the other way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.pipeline_arithmetic import MICRO, stage_chunks


def scan_layers(graphdef, state, x, *, attend, keys, remat: str):
    """Apply stacked layers (state leaves lead with the layer axis) in order, in one scan:
    the output, and the layers' statistics (block.Block.forward's) summed over them. Weights
    held split over `fsdp` are gathered one layer at a time (parallel.gathered_variables) and
    gathered again in the backward pass (a remat policy that keeps everything else), so that
    one layer's whole weights are alive at a time; their gradients are reduced onto the fsdp
    shards per layer."""

    def layer(x, inputs):
        layer_state, layer_key = inputs
        layer_state = parallel.gathered_variables(layer_state)
        return nnx.merge(graphdef, layer_state).forward(x, attend=attend, key=layer_key)

    x, stats = jax.lax.scan(rematted(layer, remat), x, (state, keys))
    return x, jax.tree.map(lambda v: v.sum(0), stats)


def rematted(layer, remat: str):
    """A layer's function as its backward pass recomputes it: remat="full" keeps only its
    inputs; split over `fsdp`, it keeps all but its gathered weights (gathered again)."""
    if remat == "full":
        return jax.checkpoint(layer, prevent_cse=False)
    if parallel.fsdp_degree() > 1:
        return jax.checkpoint(layer, prevent_cse=False, policy=parallel.keep_all_but_gathered)
    return layer


def run_in_pipeline(blocks, x, *, attend, key, remat: str, num_layers: int, schedule):
    """One micro-batch's view of the pipeline, called under `jax.vmap(axis_name=MICRO)`: the
    micro-batches' inputs, attention masks (attention.Attend) and per-layer dropout keys (the ones
    the plain scan would use) are gathered along the vmap axis, which costs no communication,
    and each micro-batch takes its own output back."""
    gather = lambda a: jax.tree.map(lambda x: jax.lax.all_gather(x, MICRO), a)  # noqa: E731
    keys = None if key is None else jax.random.split(key, num_layers)
    graphdef, state = nnx.split(blocks)
    out, stats = pipeline_stack(
        graphdef, state, gather(x), attend=gather(attend), keys=gather(keys), remat=remat,
        stages=schedule.stages, repeats=schedule.repeats,
    )  # fmt: skip
    mine = jax.lax.axis_index(MICRO)
    return out[mine], jax.tree.map(lambda v: v[mine], stats)


def _on_stages(a):
    """Pin a (stages, ...) array's leading axis to the plan's `stage` mesh axis."""
    rest = (P.UNCONSTRAINED,) * (a.ndim - 1)
    return jax.lax.with_sharding_constraint(a, P(parallel.spec("stage")[0], *rest))


def _shift(a):
    """Each stage's slice of `a` (stages, ...) sent on to the next stage, the last stage's to
    the first: one collective-permute over the stage axis (and one back in the backward pass)."""
    axis, n = parallel.spec("stage")[0], a.shape[0]
    if axis is None:  # no pipeline axis in the plan: the stages are all local
        return jnp.roll(a, 1, axis=0)
    ring = [(i, (i + 1) % n) for i in range(n)]
    send = lambda x: jax.lax.ppermute(x, axis, ring)  # noqa: E731
    return jax.shard_map(send, in_specs=P(axis), out_specs=P(axis), axis_names={axis})(a)


@jax.checkpoint
def _select(pred, a, b):
    """jnp.where(pred, a, b) for a per-stage predicate pred (stages,): checkpointed, so the
    backward pass keeps the predicate, not its broadcast to a's shape (per tick, that would be
    one byte per element of every stage buffer)."""
    return jnp.where(pred.reshape(-1, *(1,) * (a.ndim - 1)), a, b)


def pipeline_stack(graphdef, state, xs, *, attend, keys, remat, stages, repeats, fill=0.0):
    """The layers applied to m micro-batches xs (m, batch, length, hidden) as the schedule
    (stages P, repeats v) runs them. attend: attention.Attend of (m, batch, length) arrays (or
    None); keys: (m, layers) or None. The stage buffers start as `fill` (0; a test sets NaN):
    a stage's input on a bubble tick is replaced by zeros, so bubbles give finite values and
    zero gradients.
    Returns (m, batch, length, hidden) and the layers' statistics (block.Block.forward's)
    summed per micro-batch, (m, ...) each: a bubble tick's are left out."""
    m, num_layers = xs.shape[0], jax.tree.leaves(state)[0].shape[0]
    per_chunk = num_layers // (stages * repeats)
    chunks = stage_chunks(stages, repeats)  # (P, v) chunk numbers in stored order

    def by_stage(w):  # (layers, ...) -> (P, v, per_chunk, ...), stage s holding chunks[s]
        w = w.reshape(stages * repeats, per_chunk, *w.shape[1:])
        if repeats > 1:  # circular: chunk r P + s lives on stage s, not in stored order
            w = jnp.take(w, chunks.reshape(-1), axis=0)
        return _on_stages(w.reshape(stages, repeats, *w.shape[1:]))

    stage_state = jax.tree.map(by_stage, state)
    layer_ids = jnp.asarray(chunks[..., None] * per_chunk + np.arange(per_chunk))  # (P, v, .)
    stage_ids = jnp.arange(stages)

    def stage(chunk_state, ids, x, repeat, micro):
        """One stage at one tick: its chunk for round `repeat`, on micro-batch `micro`."""
        # A static index when each stage holds one chunk: the weights are then the same on
        # every tick and autodiff keeps no copy of them per tick.
        layers = jax.tree.map(lambda w: w[0] if repeats == 1 else w[repeat], chunk_state)
        mine = jax.tree.map(lambda a: a[micro], attend)
        layer_keys = None if keys is None else keys[micro][ids[repeat]]
        return scan_layers(graphdef, layers, x, attend=mine, keys=layer_keys, remat=remat)

    run = jax.vmap(stage, spmd_axis_name=parallel.spec("stage")[0])

    def keep_finished(outputs, done, t):
        """Roll the stages' outputs one stage on (stage s-1 -> s, the last to stage 0: one
        collective-permute); what arrives on stage 0 is micro-batch t - P's pass through the
        last stage, kept in `done` for its next round or as the result."""
        shifted = _shift(outputs)
        finished = t - stages
        old = jax.lax.dynamic_index_in_dim(done, finished % m, 1, keepdims=False)
        kept = _select((stage_ids == 0) & (finished >= 0), shifted, old)
        return shifted, _on_stages(
            jax.lax.dynamic_update_index_in_dim(done, kept[:, None], finished % m, 1)
        )

    def tick(carry, t):
        outputs, done, stats = carry
        shifted, done = keep_finished(outputs, done, t)
        work = t - stage_ids  # (P,) each stage's micro-batch pass: round * m + micro-batch
        micro, repeat = work % m, work // m
        # Stage 0 takes a new micro-batch in round 0 and the last stage's output after it.
        first = _select(jnp.full(stages, t < m), new[:, t % m], done[:, t % m])
        inputs = _select(stage_ids == 0, first, shifted)
        active = (work >= 0) & (work < repeats * m)
        inputs = _on_stages(_select(active, inputs, jnp.zeros_like(inputs)).astype(xs.dtype))
        outputs, tick_stats = run(
            stage_state, layer_ids, inputs, jnp.clip(repeat, 0, repeats - 1), micro
        )
        # Each stage's statistics go to the micro-batch it worked on, a bubble's nowhere.
        owner = jax.nn.one_hot(micro, m) * active[:, None]  # (P, m)
        stats = jax.tree.map(
            lambda acc, v: acc + jnp.einsum("pm,p...->m...", owner.astype(v.dtype), v),
            stats,
            tick_stats,
        )
        return (_on_stages(outputs), done, stats), None

    # The micro-batches as every stage's local copy (only stage 0 reads it): no transfer per
    # tick, and one all-reduce of their gradient over `pipeline` after the backward loop.
    new = _on_stages(jnp.broadcast_to(xs, (stages, *xs.shape)))
    outputs = _on_stages(jnp.full((stages, *xs.shape[1:]), fill, xs.dtype))
    done = _on_stages(jnp.full((stages, *xs.shape), fill, xs.dtype))
    total = repeats * m + stages - 1
    # The statistics' shapes: a stage's call on the first micro-batch, traced, never run.
    first_stats = jax.eval_shape(
        lambda: run(stage_state, layer_ids, outputs, jnp.zeros(stages, int), jnp.zeros(stages, int))
    )[1]
    stats = jax.tree.map(lambda v: jnp.zeros((m, *v.shape[1:]), v.dtype), first_stats)
    (outputs, done, stats), _ = jax.lax.scan(tick, (outputs, done, stats), jnp.arange(total))
    # The last micro-batch leaves the last stage on the last tick: one more shift collects it.
    _, done = keep_finished(outputs, done, total)
    return done[0], stats
