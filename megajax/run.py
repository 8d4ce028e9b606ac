"""The training loop: data, steps, periodic validation, metrics and progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from megajax import config as config_lib
from megajax import metrics, parallel
from megajax.config import Config, ConfigError
from megajax.data import loader
from megajax.trainer import Trainer


def evaluate(trainer: Trainer, eval_fn, params, val_data: loader.Loader) -> float:
    """Mean loss over train.eval_batches fixed batches of held-out tokens, without dropout."""
    losses = []
    for i in range(trainer.cfg.train.eval_batches):
        b = val_data.batch(i)
        losses.append(eval_fn(params, *trainer.put_eval_batch(b["inputs"], b["targets"])))
    return float(np.mean(jax.device_get(losses)))


def train(cfg: Config, mesh, workdir: str | Path, *, log=print) -> list[dict]:
    """Train from step 0 to train.steps; returns the logged scalars, one dict per logged step."""
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    tokenizer, train_data, val_data = loader.gpt_loaders(cfg, workdir=workdir, log=log)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the {cfg.data.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {cfg.model.vocab_size}: "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )
    trainer = Trainer(cfg, mesh)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
    data_deg, model_deg = mesh.shape[parallel.DATA], mesh.shape[parallel.MODEL]
    log(
        f"model {trainer.num_params:,} parameters (vocabulary {cfg.model.vocab_size} padded to "
        f"{trainer.padded_vocab}) | mesh data={data_deg} model={model_deg} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices | "
        f"{train_data.num_tokens:,} train / {val_data.num_tokens:,} val tokens"
    )
    state = trainer.init_state()
    step_fn, compile_s = trainer.compile_train_step()
    eval_fn = trainer.compile_eval_step()
    log(f"compiled the train step in {compile_s:.1f}s")

    writer = metrics.Writer(workdir, enabled=lead)
    peak = metrics.peak_flops_per_device(jax.devices()[0]) * jax.device_count()
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    flops_per_token = cfg.model.flops_per_token()
    history, began = [], time.perf_counter()
    start = int(jax.device_get(state["step"]))
    clock, steps_timed = time.perf_counter(), 0
    if train_data.step != start:
        raise ConfigError(
            f"the data loader is at step {train_data.step} but training resumes at step {start}: "
            f"restore the loader's state from the same checkpoint (train_data.restore)"
        )
    try:
        for step in range(start, cfg.train.steps):
            b = next(train_data)  # batch `step`; train_data.state() is what a checkpoint keeps
            state, step_metrics = step_fn(state, *trainer.put_batch(b["inputs"], b["targets"]))
            steps_timed += 1
            done = step + 1
            evaluate_now = cfg.train.eval_every and (
                done % cfg.train.eval_every == 0 or done == cfg.train.steps
            )
            if not (done % cfg.train.log_every == 0 or done == cfg.train.steps or evaluate_now):
                continue
            scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            seconds = time.perf_counter() - clock
            scalars["tokens_per_sec"] = steps_timed * tokens_per_step / seconds
            scalars["mfu"] = scalars["tokens_per_sec"] * flops_per_token / peak
            if evaluate_now:
                scalars["val_loss"] = evaluate(trainer, eval_fn, state["params"], val_data)
            writer.write(done, scalars)
            history.append({"step": done, **scalars})
            log(metrics.progress_line(done, cfg.train.steps, scalars, time.perf_counter() - began))
            clock, steps_timed = time.perf_counter(), 0
    finally:
        writer.close()
    return history
