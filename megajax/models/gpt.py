"""GPT-2: learned positions, pre-LN blocks stacked with a scan, LM head tied to the embedding.

The same model is a Llama with model.norm="rmsnorm", positions="rope" (no position table: the
blocks turn q and k), mlp="swiglu", num_kv_heads, bias=false and tie_embeddings=false (its own
vocabulary-parallel head, (padded_vocab, hidden) split by rows like the embedding); a Mixtral
with model.moe_experts, each layer's MLP a Mixture-of-Experts block (megajax/moe.py) whose
router losses join the objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megajax import loss, moe, parallel
from megajax.attention import Attend
from megajax.config import ModelConfig
from megajax.dropout import dropout
from megajax.layers import VocabEmbedding, _normal, norm, padded_normal, split_key
from megajax.models.stack import extend_stack, layer_stacks, run_stack
from megajax.parallel import constrain


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, padded_vocab: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = VocabEmbedding(
            cfg.vocab_size, padded_vocab, cfg.hidden, std=cfg.init_std, rngs=rngs
        )
        if cfg.positions == "learned":
            wpe_init = _normal(cfg.init_std, "position", "embed")
            self.wpe = nnx.Param(wpe_init(rngs.params(), (cfg.seq_len, cfg.hidden)))
        # Every layer; or with model.moe_every > 1 the dense layers, the MoE ones in h_moe.
        self.h, self.h_moe = layer_stacks(cfg, rngs)
        self.ln_f = norm(cfg)
        if not cfg.tie_embeddings:
            head_init = nnx.with_partitioning(
                padded_normal(cfg.init_std, cfg.vocab_size), ("vocab", "embed")
            )
            self.head = nnx.Param(head_init(rngs.params(), (padded_vocab, cfg.hidden)))

    def __call__(self, ids: jax.Array, *, key=None, segments=None, positions=None) -> jax.Array:
        """Final hidden states (batch, length, hidden); `key` turns dropout on. Packed
        documents: `segments` (batch, length), each position's document (from 1; 0 padding),
        which attention keeps apart, and `positions`, each token's within its document."""
        return self.hidden_and_stats(ids, key=key, segments=segments, positions=positions)[0]

    def hidden_and_stats(self, ids, *, key=None, segments=None, positions=None, order=None):
        """The final hidden states and the layers' router statistics (moe.MoE; {} when
        dense), summed over the layers. `order` (batch, length): each slot's position in the
        original sequence, when the batch comes reordered (attention.Attend)."""
        x = self.embed(ids, key=key, positions=positions, order=order)
        attend = Attend(segments=segments, positions=positions, order=order)
        x, stats = self.layers(x, attend=attend, key=key)
        return self.ln_f(x), stats

    def embed(self, ids, *, key=None, positions=None, order=None):
        """The layers' input (batch, length, hidden): word (and learned position) embeddings
        with dropout, whose key is the first half of `key` (the model's dropout key); a
        reordered sequence (`order`) drops what its original order drops."""
        cfg, (_, s) = self.cfg, ids.shape
        dtype = jnp.dtype(cfg.compute_dtype)
        x = self.wte(ids, dtype)
        if cfg.positions == "learned" and parallel.model_copies(self.wpe[...], 2):
            x = constrain(x, "batch", "residual_length", "embed")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(s), ids.shape)
            x = parallel.per_chunk(_chunk_positions, x, self.wpe[...], along=(positions,))
        elif cfg.positions == "learned":
            table = self.wpe[:s] if positions is None else jnp.take(self.wpe[...], positions, 0)
            x = x + table.astype(dtype)
        x = constrain(x, "batch", "residual_length", "embed")
        return dropout(x, cfg.dropout, split_key(key)[0], order)

    def layers(self, x, *, attend: Attend, key=None):
        """The stacked layers on x, their dropout keyed by the second half of `key`: (x,
        router statistics)."""
        cfg = self.cfg
        return run_stack(
            self.h, x, attend=attend, key=split_key(key)[1], remat=cfg.remat,
            num_layers=cfg.num_layers, sparse=self.h_moe,
        )  # fmt: skip

    def extend(self, ids, cache: dict, *, start, positions, mask):
        """Final hidden states of new tokens `ids` (batch, new) at cache slots start ..
        start + new - 1 and at `positions` (batch, new), attending the KV cache where `mask`
        (batch, 1, new, slots) allows (models.stack.extend_stack); returns (hidden, cache).
        The training forward above does not go through here."""
        dtype = jnp.dtype(self.cfg.compute_dtype)
        x = self.wte(ids, dtype)
        if self.cfg.positions == "learned":
            x = x + jnp.take(self.wpe[...], positions, axis=0).astype(dtype)
        x = constrain(x, "batch", "length", "embed")
        x, cache = extend_stack(
            self.h, x, cache, start=start, positions=positions, mask=mask, sparse=self.h_moe
        )
        return self.ln_f(x), cache

    def empty_cache(self, batch: int, slots: int) -> dict:
        """A zero KV cache for `batch` sequences of `slots` tokens: "k" and "v", (layers,
        batch, slots, kv slots, head_dim) in the compute dtype, split over `model` by heads
        (ModelConfig.kv_slots: a key/value head per shard where the shards outnumber them)."""
        cfg = self.cfg
        heads = cfg.kv_slots(parallel.model_degree())
        shape = (cfg.num_layers, batch, slots, heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.compute_dtype))
        kv = constrain(zeros, "layers", "batch", "length", "heads", None)
        return {"k": kv, "v": kv}

    @property
    def lm_head(self) -> jax.Array:
        """The output embedding, tied or its own, (padded_vocab, hidden), split over `model` by
        rows."""
        return self.wte.embedding[...] if self.cfg.tie_embeddings else self.head[...]

    def token_losses(self, inputs, targets, *, key=None, segments=None, positions=None):
        """Next-token cross-entropy per position, (batch, length)."""
        return self.token_losses_and_stats(
            inputs, targets, key=key, segments=segments, positions=positions
        )[0]

    def token_losses_and_stats(
        self, inputs, targets, *, key=None, segments=None, positions=None, order=None
    ):
        """token_losses, and the router statistics of hidden_and_stats."""
        hidden, stats = self.hidden_and_stats(
            inputs, key=key, segments=segments, positions=positions, order=order
        )
        losses = loss.cross_entropy(hidden, self.lm_head, targets, vocab_size=self.cfg.vocab_size)
        return losses, stats


def batch_fields(cfg: ModelConfig, *, documents: bool = False) -> dict[str, tuple[int, ...]]:
    """Each field of a training sample and its shape (all int32). With `documents` (packed
    conversations or documents): `weights` (1 where the target is trained on), `segments` (the
    document of each position, from 1; 0 on padding) and `positions` (within the document)."""
    s = (cfg.seq_len,)
    fields = {"inputs": s, "targets": s}
    if documents:
        fields |= {"weights": s, "segments": s, "positions": s}
    return fields


def objective(model: GPT, batch: dict, key) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy: over every position, or with documents (batch_fields)
    over the targets whose weight is 1. A MoE model adds its router losses times their
    coefficients (model.moe_aux_loss, moe_z_loss) and reports them, the cross-entropy alone
    ("lm_loss") and the choices its experts' capacity dropped; a dense one no metrics."""
    x, stats = model.layers(embed(model, batch, key), attend=attend(batch), key=key)
    return head(model, x, batch, stats)


# The objective cut at the stacked layers (models.Pieces), for a schedule that runs them itself.


def embed(model: GPT, batch: dict, key) -> jax.Array:
    """The layers' input for a batch."""
    return model.embed(
        batch["inputs"], key=key, positions=batch.get("positions"), order=batch.get("order")
    )


def attend(batch: dict) -> Attend:
    """What the layers' attention reads besides the activations."""
    return Attend(
        segments=batch.get("segments"), positions=batch.get("positions"), order=batch.get("order")
    )


def head(model: GPT, x, batch: dict, stats=None) -> tuple[jax.Array, dict]:
    """The objective of the layers' output x: final norm, LM head, cross-entropy (the router
    losses of `stats` added for a MoE model)."""
    hidden = model.ln_f(x)
    cfg = model.cfg
    losses = loss.cross_entropy(hidden, model.lm_head, batch["targets"], vocab_size=cfg.vocab_size)
    if "weights" not in batch:
        value = losses.mean()
    else:
        value = loss.weighted_mean(losses, batch["weights"].astype(jnp.float32))
    if not cfg.moe:
        return value, {}
    router = moe.router_losses(stats, cfg.moe_experts)
    total = value + cfg.moe_aux_loss * router["moe_aux_loss"]
    total = total + cfg.moe_z_loss * router["moe_z_loss"]
    return total, {"lm_loss": value, **router}


def _chunk_positions(x, tables, positions):
    """x (batch, chunks, length / chunks, hidden) plus the rows of its `positions` (batch,
    chunks, length / chunks), chunk i's from copy i of the position table (tables: (chunks,
    1, seq_len, hidden), parallel.per_chunk), each chunk reading its own copy."""
    rows = jax.vmap(lambda t, p: jnp.take(t, p, axis=0), in_axes=(0, 1), out_axes=1)(
        tables[:, 0], positions
    )
    return x + rows.astype(x.dtype)
