"""A megajax run's newest parameters as the starting point of another run (train.py
--init_from RUN): full fine-tuning, or LoRA with fresh adapters on top.

The new run takes the model of RUN/config.json (its shape and training options; the config's
compute options, as a Hugging Face checkpoint's are taken, config.with_model_of) and starts at
step 0 with a fresh optimizer and data position. A LoRA run's adapters are merged into its
weights first: what RUN computes is what the new run starts from, whatever either's lora.rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from megajax import config
from megajax.config import Config, ConfigError


def _run_config(run: str | Path) -> Config:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--init_from {run}: no {path.name} there; name a work directory "
                          "that train.py wrote")  # fmt: skip
    return config.from_dict(json.loads(path.read_text()))


def with_run_model(cfg: Config, run: str | Path, *, overrides=()) -> Config:
    """`cfg` with the model of the megajax run `run` (config.with_model_of); where the config
    leaves data.tokenizer at its default, the run's tokenizer too."""
    theirs = _run_config(run)
    model = config.to_dict(theirs)["model"]
    cfg = config.with_model_of(cfg, model, overrides=overrides, source=f"the run {run}")
    explicit = any(s.startswith(("data.tokenizer=", "data.vocab_dir=")) for s in overrides)
    if cfg.data.tokenizer == config.DataConfig.tokenizer and not explicit:
        data = theirs.data
        cfg = config.replace(cfg, data=dict(tokenizer=data.tokenizer, vocab_dir=data.vocab_dir))
    return cfg


def params_from_run(sharded, run: str | Path, *, log=print):
    """The parameters for `sharded` (a ShardedModel, or a Trainer) from the newest checkpoint of
    the run `run`: its weights, adapters merged, laid out for `sharded`; LoRA adapters of
    `sharded` (lora.rank > 0) freshly initialised."""
    import jax

    from megajax import lora
    from megajax.checkpoint import Checkpointer
    from megajax.sharded_model import ShardedModel

    source = ShardedModel(_run_config(run), sharded.mesh)
    ckpt = Checkpointer(Path(run) / "checkpoints", every=0, keep=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"--init_from {run}: no checkpoint in {ckpt.directory}")
        params = source.merged_params(ckpt.restore_params(step, source.abstract_params()))
    finally:
        ckpt.close()
    frozen = lora.split(sharded.param_sharding, sharded.cfg.lora)[1]
    base = frozen if sharded.cfg.lora.rank else sharded.param_sharding
    params = jax.device_put(params, base)
    rank = source.cfg.lora.rank
    merged = f" (its rank-{rank} LoRA adapters merged)" if rank else ""
    log(f"initialised from {run}, step {step}{merged}")
    return lora.join(params, sharded.fresh_adapters())
