"""The model families, chosen by model.arch: how to build one, what a training sample holds,
and the objective a train step minimises."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from flax import nnx

from megajax.config import ConfigError, ModelConfig
from megajax.models import bert, gpt


def build(cfg: ModelConfig, *, padded_vocab: int, rngs: nnx.Rngs):
    cls = gpt.GPT if cfg.arch == "gpt" else bert.BERT
    return cls(cfg, padded_vocab=padded_vocab, rngs=rngs)


def batch_fields(cfg: ModelConfig, *, documents: bool = False) -> dict[str, tuple[int, ...]]:
    """Field name -> shape of one sample (int32), as the data loader yields them; `documents`:
    a GPT's samples carry their documents' bounds (DataConfig.documents)."""
    if cfg.arch != "gpt":
        if documents:
            raise ConfigError(
                "data.format=chat and data.reset_attention are for a GPT (model.arch=gpt)"
            )
        return bert.batch_fields(cfg)
    return gpt.batch_fields(cfg, documents=documents)


def objective(cfg: ModelConfig):
    """fn(model, batch, key) -> (scalar loss, dict of scalar metrics); key=None: no dropout."""
    return {
        "gpt": gpt.objective,
        "bert": bert.pretraining_objective,
        "bert_multiple_choice": bert.multiple_choice_objective,
    }[cfg.arch]


class Pieces(NamedTuple):
    """A model's objective cut where its stacked layers are, for a pipeline schedule that runs
    the layers itself (models/pipeline_1f1b.py): objective(model, batch, key) is
    head(model, x, batch) of x = the layers (model.<stack>, their dropout keyed by
    layers.split_key(key)[1], reading attend(batch)) applied to embed(model, batch, key)."""

    embed: Callable  # (model, batch, key) -> the layers' input (batch, length, hidden)
    attend: Callable  # batch -> attention.Attend
    head: Callable  # (model, x, batch) -> (value, metrics)
    stack: str = "h"  # the attribute (and parameter key) of the stacked Block


def pieces(cfg: ModelConfig) -> Pieces:
    """The objective's pieces; a ConfigError for a model that has none."""
    if cfg.moe:
        raise ConfigError(
            "train.pipeline_schedule=1f1b: Mixture-of-Experts layers (their router statistics) "
            "do not run in it yet: use train.pipeline_schedule=gpipe"
        )
    if cfg.arch == "gpt":
        return Pieces(gpt.embed, gpt.attend, gpt.head)
    if cfg.arch == "bert":
        return Pieces(bert.embed, bert.attend, bert.pretraining_head)
    raise ConfigError(
        f"train.pipeline_schedule=1f1b: model.arch={cfg.arch} is not cut into pieces for it: "
        "use train.pipeline_schedule=gpipe"
    )
