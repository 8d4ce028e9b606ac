"""A model's transformer layers as one stacked Block, applied with one `lax.scan`.

A Mixture-of-Experts model with model.moe_every = n > 1 has two stacks: its MoE layers
(layers 0, n, 2n, ..., as Megatron-LM's --moe-layer-freq places them) and its dense ones. One
scan then runs over the groups of n layers, each a MoE layer followed by a scan over its n - 1
dense layers."""

from __future__ import annotations

import jax
from flax import nnx

from megajax import moe, parallel, pipeline_arithmetic
from megajax.attention import Attend
from megajax.block import Block
from megajax.config import ModelConfig
from megajax.models.pipeline_schedule import rematted, run_in_pipeline, scan_layers


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, *, sparse: bool | None = None) -> Block:
    """Blocks as one Block whose parameters have a leading `layers` axis: every layer, or
    with `sparse` given (model.moe_every > 1), the MoE layers (True) or the dense ones
    (False). Without it, each Block's MLP is a MoE block if the model has experts."""
    sparse_every = cfg.moe and cfg.moe_every > 1
    count = cfg.num_layers if not sparse_every else cfg.moe_layers
    if sparse_every and not sparse:
        count = cfg.num_layers - cfg.moe_layers
    sparse = cfg.moe if sparse is None else sparse

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs, feed_forward=moe.MoE if sparse else None)

    return make(rngs)


def layer_stacks(cfg: ModelConfig, rngs: nnx.Rngs) -> tuple[Block, Block | None]:
    """(h, h_moe): every layer in h, or with model.moe_every > 1 the dense layers in h and the
    MoE layers in h_moe."""
    if not (cfg.moe and cfg.moe_every > 1):
        return stacked_blocks(cfg, rngs), None
    return stacked_blocks(cfg, rngs, sparse=False), stacked_blocks(cfg, rngs, sparse=True)


def run_stack(blocks: Block, x, *, attend: Attend, key, remat: str, num_layers: int, sparse=None):
    """Apply stacked blocks in order with one `lax.scan`: compile time does not grow with depth.
    remat="full" recomputes each layer from its input in the backward pass ("selective" is the
    attention core's own, see attention.Attention). While the train step traces a pipeline
    schedule (megajax.pipeline_arithmetic.scheduled), the layers run as its stages instead.
    `sparse`: the MoE layers of a model whose dense ones are `blocks` (layer_stacks). Returns
    the output and the layers' summed statistics (a MoE router's; {} when dense)."""
    schedule = pipeline_arithmetic.current()
    if schedule is not None:
        return run_in_pipeline(
            blocks, x, attend=attend, key=key, remat=remat, num_layers=num_layers,
            schedule=schedule,
        )  # fmt: skip
    graphdef, state = nnx.split(blocks)
    keys = None if key is None else jax.random.split(key, num_layers)
    if sparse is None:
        return scan_layers(graphdef, state, x, attend=attend, keys=keys, remat=remat)
    sparse_graphdef, sparse_state = nnx.split(sparse)
    groups = jax.tree.leaves(sparse_state)[0].shape[0]
    dense = _grouped(state, groups)  # (groups, every - 1, ...)
    keys = None if keys is None else keys.reshape(groups, -1)

    def group(x, inputs):
        sparse_layer, dense_layers, group_keys = inputs
        first, rest = (None, None) if group_keys is None else (group_keys[0], group_keys[1:])

        def sparse_forward(x, layer, key):
            block = nnx.merge(sparse_graphdef, parallel.gathered_variables(layer))
            return block.forward(x, attend=attend, key=key)

        x, stats = rematted(sparse_forward, remat)(x, sparse_layer, first)
        x, _ = scan_layers(graphdef, dense_layers, x, attend=attend, keys=rest, remat=remat)
        return x, stats

    x, stats = jax.lax.scan(group, x, (sparse_state, dense, keys))
    return x, jax.tree.map(lambda v: v.sum(0), stats)


def _grouped(tree, groups: int):
    """Stacked leaves (layers, ...) -> (groups, layers / groups, ...)."""
    return jax.tree.map(lambda a: a.reshape(groups, -1, *a.shape[1:]), tree)


def extend_stack(blocks: Block, x, cache: dict, *, start, positions, mask, sparse=None):
    """Apply stacked blocks to new tokens at cache slot `start` (Block.extend), in one scan
    (`sparse`: as run_stack's).

    `cache` holds "k" and "v", (layers, batch, slots, kv slots, head_dim). Each layer reads its
    slice and returns only its new keys and values; one update after the scan writes them all,
    so inside a decode loop XLA updates the cache in place instead of copying it per layer.
    Returns (x, cache)."""
    graphdef, state = nnx.split(blocks)
    at = dict(start=start, positions=positions, mask=mask)

    def layer_of(graphdef):
        def layer(x, inputs):
            layer_state, k_cache, v_cache = inputs
            x, k, v = nnx.merge(graphdef, layer_state).extend(x, k_cache, v_cache, **at)
            return x, (k, v)

        return layer

    if sparse is None:
        x, (k, v) = jax.lax.scan(layer_of(graphdef), x, (state, cache["k"], cache["v"]))
    else:  # the cache's layers in groups: the MoE layer first, then the dense ones
        sparse_graphdef, sparse_state = nnx.split(sparse)
        groups = jax.tree.leaves(sparse_state)[0].shape[0]
        k_all, v_all = _grouped(cache["k"], groups), _grouped(cache["v"], groups)

        def group(x, inputs):
            sparse_layer, dense_layers, k_cache, v_cache = inputs
            x, (k, v) = layer_of(sparse_graphdef)(x, (sparse_layer, k_cache[0], v_cache[0]))
            x, (ks, vs) = jax.lax.scan(
                layer_of(graphdef), x, (dense_layers, k_cache[1:], v_cache[1:])
            )
            return x, (jax.numpy.concatenate([k[None], ks]), jax.numpy.concatenate([v[None], vs]))

        inputs = (sparse_state, _grouped(state, groups), k_all, v_all)
        x, (k, v) = jax.lax.scan(group, x, inputs)
        k, v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    slot = (0, 0, start, 0, 0)
    return x, {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), slot),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), slot),
    }
