"""The model families, chosen by model.arch: how to build one, what a training sample holds,
and the objective a train step minimises."""

from __future__ import annotations

from flax import nnx

from megajax.config import ModelConfig
from megajax.models import bert, gpt


def build(cfg: ModelConfig, *, padded_vocab: int, rngs: nnx.Rngs):
    cls = gpt.GPT if cfg.arch == "gpt" else bert.BERT
    return cls(cfg, padded_vocab=padded_vocab, rngs=rngs)


def batch_fields(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Field name -> shape of one sample (int32), as the data loader yields them."""
    return (gpt if cfg.arch == "gpt" else bert).batch_fields(cfg)


def objective(cfg: ModelConfig):
    """fn(model, batch, key) -> (scalar loss, dict of scalar metrics); key=None: no dropout."""
    return {
        "gpt": gpt.objective,
        "bert": bert.pretraining_objective,
        "bert_multiple_choice": bert.multiple_choice_objective,
    }[cfg.arch]
