"""A model's transformer layers as one stacked Block, applied with one `lax.scan`."""

from __future__ import annotations

import jax
from flax import nnx

from megajax import moe, pipeline_arithmetic
from megajax.config import ModelConfig
from megajax.layers import Attend, Block
from megajax.models.pipeline_schedule import run_in_pipeline, scan_layers


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one Block whose parameters have a leading `layers` axis; with
    model.moe_experts, each Block's MLP is a Mixture-of-Experts block."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs, feed_forward=moe.MoE if cfg.moe else None)

    return make(rngs)


def run_stack(blocks: Block, x, *, attend: Attend, key, remat: str, num_layers: int):
    """Apply stacked blocks in order with one `lax.scan`: compile time does not grow with depth.
    remat="full" recomputes each layer from its input in the backward pass ("selective" is the
    attention core's own, see layers.Attention). While the train step traces a pipeline
    schedule (megajax.pipeline_arithmetic.scheduled), the layers run as its stages instead.
    Returns the output and the layers' summed statistics (a MoE router's; {} when dense, and
    through a pipeline, which MoE models do not take yet)."""
    schedule = pipeline_arithmetic.current()
    if schedule is not None:
        return run_in_pipeline(
            blocks, x, attend=attend, key=key, remat=remat, num_layers=num_layers,
            schedule=schedule,
        ), {}  # fmt: skip
    graphdef, state = nnx.split(blocks)
    keys = None if key is None else jax.random.split(key, num_layers)
    return scan_layers(graphdef, state, x, attend=attend, keys=keys, remat=remat)


def extend_stack(blocks: Block, x, cache: dict, *, start, positions, mask):
    """Apply stacked blocks to new tokens at cache slot `start` (Block.extend), in one scan.

    `cache` holds "k" and "v", (layers, batch, slots, kv slots, head_dim). Each layer reads its
    slice and returns only its new keys and values; one update after the scan writes them all,
    so inside a decode loop XLA updates the cache in place instead of copying it per layer.
    Returns (x, cache)."""
    graphdef, state = nnx.split(blocks)

    def layer(x, inputs):
        layer_state, k_cache, v_cache = inputs
        block = nnx.merge(graphdef, layer_state)
        x, k, v = block.extend(x, k_cache, v_cache, start=start, positions=positions, mask=mask)
        return x, (k, v)

    x, (k, v) = jax.lax.scan(layer, x, (state, cache["k"], cache["v"]))
    at = (0, 0, start, 0, 0)
    return x, {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at),
    }
