"""GPT-2: learned positions, pre-LN blocks stacked with a scan, LM head tied to the embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megajax import loss
from megajax.config import ModelConfig
from megajax.layers import LayerNorm, VocabEmbedding, _normal, dropout
from megajax.models.stack import run_stack, stacked_blocks
from megajax.parallel import constrain


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
        x = dropout(constrain(x, "batch", "residual_length", "embed"), cfg.dropout, embed_key)
        x = run_stack(
            self.h, x, padding=None, key=layers_key, remat=cfg.remat, num_layers=cfg.num_layers
        )
        return self.ln_f(x)

    @property
    def lm_head(self) -> jax.Array:
        """The tied output embedding, (padded_vocab, hidden), split over `model` by rows."""
        return self.wte.embedding[...]

    def token_losses(self, inputs, targets, *, key=None) -> jax.Array:
        """Next-token cross-entropy per position, (batch, length)."""
        hidden = self(inputs, key=key)
        return loss.cross_entropy(hidden, self.lm_head, targets, vocab_size=self.cfg.vocab_size)


def batch_fields(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each field of a training sample and its shape (all int32)."""
    return {"inputs": (cfg.seq_len,), "targets": (cfg.seq_len,)}


def objective(model: GPT, batch: dict, key) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy, and no further metrics."""
    return model.token_losses(batch["inputs"], batch["targets"], key=key).mean(), {}
