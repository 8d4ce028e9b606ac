"""GPT-2: learned positions, pre-LN blocks stacked with a scan, LM head tied to the embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megajax.config import ModelConfig
from megajax.layers import Block, LayerNorm, VocabEmbedding, _normal, dropout
from megajax.parallel import constrain


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one Block whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)

    return make(rngs)


def run_stack(blocks: Block, x, *, mask, key, remat: bool, num_layers: int):
    """Apply stacked blocks in order with one `lax.scan`: compile time does not grow with depth."""
    graphdef, state = nnx.split(blocks)
    keys = None if key is None else jax.random.split(key, num_layers)

    def layer(x, inputs):
        layer_state, layer_key = inputs
        return nnx.merge(graphdef, layer_state)(x, mask=mask, key=layer_key), None

    if remat:
        layer = jax.checkpoint(layer, prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, (state, keys))
    return x


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, padded_vocab: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = VocabEmbedding(
            cfg.vocab_size, padded_vocab, cfg.hidden, std=cfg.init_std, rngs=rngs
        )
        wpe_init = _normal(cfg.init_std, "position", "embed")
        self.wpe = nnx.Param(wpe_init(rngs.params(), (cfg.seq_len, cfg.hidden)))
        self.h = stacked_blocks(cfg, rngs)
        self.ln_f = LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)

    def __call__(self, ids: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Final hidden states (batch, length, hidden); `key` turns dropout on."""
        cfg, (_, s) = self.cfg, ids.shape
        dtype = jnp.dtype(cfg.compute_dtype)
        embed_key, layers_key = (None, None) if key is None else jax.random.split(key)
        x = self.wte(ids, dtype) + self.wpe[:s].astype(dtype)
        x = dropout(constrain(x, "batch", "length", "embed"), cfg.dropout, embed_key)
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))  # (query, key)
        x = run_stack(
            self.h, x, mask=causal, key=layers_key, remat=cfg.remat, num_layers=cfg.num_layers
        )
        return self.ln_f(x)

    @property
    def lm_head(self) -> jax.Array:
        """The tied output embedding, (padded_vocab, hidden), split over `model` by rows."""
        return self.wte.embedding[...]
