"""A model's transformer layers as one stacked Block, applied with one `lax.scan`."""

from __future__ import annotations

import jax
from flax import nnx

from megajax.config import ModelConfig
from megajax.layers import Block


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one Block whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)

    return make(rngs)


def run_stack(blocks: Block, x, *, padding, key, remat: str, num_layers: int):
    """Apply stacked blocks in order with one `lax.scan`: compile time does not grow with depth.
    remat="full" recomputes each layer from its input in the backward pass ("selective" is the
    attention core's own, see layers.Attention)."""
    graphdef, state = nnx.split(blocks)
    keys = None if key is None else jax.random.split(key, num_layers)

    def layer(x, inputs):
        layer_state, layer_key = inputs
        return nnx.merge(graphdef, layer_state)(x, padding=padding, key=layer_key), None

    if remat == "full":
        layer = jax.checkpoint(layer, prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, (state, keys))
    return x
