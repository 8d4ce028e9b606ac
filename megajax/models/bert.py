"""BERT on the same tensor-parallel layers as GPT-2: a bidirectional encoder with padding masks,
its layer norms before ("pre", the paper's Figure 7) or after ("post", the original) each
sublayer, a masked-LM head tied to the word embedding, a pooled [CLS] with a binary
sentence-pair head (sentence order or next sentence), or a multiple-choice head (RACE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megajax import loss
from megajax.attention import Attend
from megajax.config import ModelConfig
from megajax.dropout import dropout
from megajax.layers import Dense, LayerNorm, VocabEmbedding, _normal, _zeros, gelu, split_key
from megajax.models.stack import run_stack, stacked_blocks
from megajax.parallel import constrain

IGNORE = -1  # label of positions and samples that are not scored


def _optional(present: bool, make):
    """A submodule the configuration may leave out (None then, and no parameters)."""
    return nnx.data(make() if present else None)


class MLMHead(nnx.Module):
    """dense, GeLU, layer norm; the decoder is the word embedding, plus this output bias."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, *, rngs):
        self.dense = Dense(cfg.hidden, cfg.hidden, ("embed", "embed"), std=cfg.init_std, rngs=rngs)
        self.ln = LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.bias = nnx.Param(_zeros("vocab")(None, (padded_vocab,)))
        self.activation = cfg.activation

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.ln(gelu(self.dense(hidden), self.activation))


class BERT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, padded_vocab: int, rngs: nnx.Rngs):
        self.cfg = cfg
        h, std = cfg.hidden, cfg.init_std
        self.wte = VocabEmbedding(cfg.vocab_size, padded_vocab, h, std=std, rngs=rngs)
        self.wpe = nnx.Param(_normal(std, "position", "embed")(rngs.params(), (cfg.seq_len, h)))
        self.wtt = nnx.Param(_normal(std, None, "embed")(rngs.params(), (cfg.type_vocab_size, h)))
        # The original BERT normalizes the embeddings; the rearranged one the encoder's output.
        post, choice = cfg.layernorm_placement == "post", cfg.arch == "bert_multiple_choice"
        binary = not choice and cfg.binary_head != "none"
        self.ln_embed = _optional(post, lambda: LayerNorm(h, eps=cfg.layernorm_eps))
        self.h = stacked_blocks(cfg, rngs)
        self.ln_f = _optional(not post, lambda: LayerNorm(h, eps=cfg.layernorm_eps))
        dense = lambda d_out, axes: Dense(h, d_out, axes, std=std, rngs=rngs)  # noqa: E731
        self.pooler = _optional(choice or binary, lambda: dense(h, ("embed", "embed")))
        self.mlm = _optional(not choice, lambda: MLMHead(cfg, padded_vocab, rngs=rngs))
        self.binary = _optional(binary, lambda: dense(2, ("embed", None)))
        self.choice = _optional(choice, lambda: dense(1, ("embed", None)))

    def __call__(self, tokens, token_types, padding_mask, *, key=None) -> jax.Array:
        """Hidden states (batch, length, hidden) of (batch, length) token ids, segment ids and
        padding masks (1 on real tokens); `key` turns dropout on."""
        x = self.embed(tokens, token_types, key=key)
        return self.finish(self.layers(x, padding_mask, key=key))

    def embed(self, tokens, token_types, *, key=None) -> jax.Array:
        """The layers' input: word, position and type embeddings (normalized in post-LN),
        with dropout keyed by the first half of `key` (the model's dropout key)."""
        cfg, (_, s) = self.cfg, tokens.shape
        dtype = jnp.dtype(cfg.compute_dtype)
        types = jnp.take(self.wtt[...], token_types, axis=0)
        x = self.wte(tokens, dtype) + (self.wpe[:s] + types).astype(dtype)
        x = constrain(x, "batch", "residual_length", "embed")
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        return dropout(x, cfg.dropout, split_key(key)[0])

    def layers(self, x, padding_mask, *, key=None) -> jax.Array:
        """The stacked layers on x, their dropout keyed by the second half of `key`."""
        x, _ = run_stack(
            self.h,
            x,
            attend=attend({"padding_mask": padding_mask}),
            key=split_key(key)[1],
            remat=self.cfg.remat,
            num_layers=self.cfg.num_layers,
        )
        return x

    def finish(self, x) -> jax.Array:
        """The encoder's output: the layers' with the final norm of the pre-LN arrangement."""
        return x if self.ln_f is None else self.ln_f(x)

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """tanh(dense(hidden of [CLS])), (batch, hidden)."""
        return jnp.tanh(self.pooler(hidden[:, 0]))


def batch_fields(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each field of a training sample and its shape (all int32): BertPairs' samples, or
    RaceQuestions' (options, length) for multiple choice."""
    s = (cfg.seq_len,)
    if cfg.arch == "bert_multiple_choice":
        s = (cfg.num_choices, cfg.seq_len)
        return {"tokens": s, "token_types": s, "padding_mask": s, "label": ()}
    fields = {"tokens": s, "token_types": s, "padding_mask": s, "labels": s}
    if cfg.binary_head != "none":
        fields["sentence_label"] = ()
    return fields


def _classify(logits, labels):
    """Mean softmax cross-entropy and accuracy of (batch, classes) logits; labels IGNORE (-1)
    are not counted."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    weights = (labels != IGNORE).astype(jnp.float32)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    return loss.weighted_mean(-picked, weights), loss.weighted_mean(correct, weights)


def pretraining_objective(model: BERT, batch: dict, key) -> tuple[jax.Array, dict]:
    """Masked-LM loss over the masked positions only, plus the binary head's loss."""
    x = model.layers(embed(model, batch, key), batch["padding_mask"], key=key)
    return pretraining_head(model, x, batch)


# The pretraining objective cut at the stacked layers (models.Pieces).


def embed(model: BERT, batch: dict, key) -> jax.Array:
    """The layers' input for a batch."""
    return model.embed(batch["tokens"], batch["token_types"], key=key)


def attend(batch: dict) -> Attend:
    """Attention keeps to the real tokens (padding comes last)."""
    return Attend(padding=batch["padding_mask"].astype(bool))


def pretraining_head(model: BERT, x, batch: dict, stats=None) -> tuple[jax.Array, dict]:
    """The pretraining objective of the layers' output x (stats: unused, a dense model's)."""
    cfg = model.cfg
    hidden = model.finish(x)
    labels = batch["labels"]
    token_loss, correct = loss.cross_entropy_and_correct(
        model.mlm(hidden),
        model.wte.embedding[...],
        labels,
        vocab_size=cfg.vocab_size,
        bias=model.mlm.bias[...],
    )
    masked = (labels != IGNORE).astype(jnp.float32)
    metrics = {
        "mlm_loss": loss.weighted_mean(token_loss, masked),
        "mlm_accuracy": loss.weighted_mean(correct, masked),
    }
    total = metrics["mlm_loss"]
    if model.binary is not None:
        logits = model.binary(model.pooled(hidden))
        binary_loss, accuracy = _classify(logits, batch["sentence_label"])
        metrics |= {f"{cfg.binary_head}_loss": binary_loss, f"{cfg.binary_head}_accuracy": accuracy}
        total = total + binary_loss
    return total, metrics


def choice_logits(model: BERT, batch: dict, key=None) -> jax.Array:
    """(batch, options) scores of each option's pooled [CLS]; `key` turns dropout on."""
    b, c, s = batch["tokens"].shape
    flat = [batch[k].reshape(b * c, s) for k in ("tokens", "token_types", "padding_mask")]
    keys = (None, None) if key is None else jax.random.split(key)
    pooled = model.pooled(model(*flat, key=keys[0]))
    return model.choice(dropout(pooled, model.cfg.dropout, keys[1])).reshape(b, c)


def multiple_choice_objective(model: BERT, batch: dict, key) -> tuple[jax.Array, dict]:
    """Softmax over each question's options of a score of its pooled [CLS] (BERT on RACE)."""
    choice_loss, accuracy = _classify(choice_logits(model, batch, key), batch["label"])
    return choice_loss, {"accuracy": accuracy}
