"""The model families, chosen by model.arch: how to build one, what a training sample holds,
and the objective a train step minimises."""

from __future__ import annotations

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
