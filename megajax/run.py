"""The training loop: resume, steps, validation, metrics, checkpoints and signals."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import config as config_lib
from megajax import metrics, watchdog
from megajax.checkpoint import Checkpointer
from megajax.config import Config, ConfigError
from megajax.data import loader
from megajax.sharded_model import ShardedModel
from megajax.trainer import Trainer


class Stopped(Exception):
    """The run stopped early and saved what it could; the message says why and what to do."""

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def evaluate(
    sharded: ShardedModel, eval_fn, params, val_data: loader.Loader, batches: int
) -> dict[str, float]:
    """The loss and the objective's metrics averaged over the first `batches` fixed batches of
    held-out samples, without dropout (eval_fn: ShardedModel.compile_eval_step)."""
    results = [eval_fn(params, sharded.put_eval_batch(val_data.batch(i))) for i in range(batches)]
    results = jax.device_get(results)
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


@contextlib.contextmanager
def _signals_caught():
    """Record SIGTERM/SIGINT instead of dying, so the loop can finish its step and save."""
    caught: list[int] = []
    handler = lambda signum, frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _AgreedSignal:
    """The signal any process caught, agreed by all processes at the same step.

    Each step every process contributes the number of the signal it caught (0: none) to a
    max over all devices, dispatched after the step, and reads the previous step's max: the
    read waits for that step only, so the host stays one step ahead of the devices. In a
    single process the caught list is read directly.
    """

    def __init__(self, mesh, caught: list[int]):
        self.caught, self.pending = caught, None
        self.multi = jax.process_count() > 1
        if self.multi:
            flat = jax.sharding.Mesh(mesh.devices.reshape(-1), ("all",))
            self.sharding = NamedSharding(flat, P("all"))
            self.size = flat.devices.size
            self.max = jax.jit(jnp.max, out_shardings=NamedSharding(flat, P()))

    def poll(self) -> int:
        """The agreed signal number (0: none) as of the previous call; starts this step's."""
        mine = self.caught[0] if self.caught else 0
        if not self.multi:
            return mine
        flags = jax.make_array_from_callback(
            (self.size,), self.sharding, lambda index: np.full(1, mine, np.int32)
        )
        agreed = 0 if self.pending is None else int(self.pending.addressable_data(0))
        self.pending = self.max(flags)
        return agreed


def _restore_or_init(trainer: Trainer, ckpt: Checkpointer, train_data: loader.Loader, log, init):
    """The newest checkpoint's state, with the loader moved to its position; or a new state."""
    latest = ckpt.latest_step()
    if latest is None:
        return init(trainer) if init else trainer.init_state()
    start = time.perf_counter()
    state, meta = ckpt.restore(latest, trainer.abstract_state(), optional=trainer.optional_state())
    if "data" in meta:  # an imported checkpoint (step 0) has no data position yet
        train_data.restore(meta["data"], log=log)
    saved_mesh = meta.get("mesh", {})
    log(
        f"resumed from step {latest} in {ckpt.directory} ({time.perf_counter() - start:.1f}s; "
        f"saved on mesh data={saved_mesh.get('data')} model={saved_mesh.get('model')})"
    )
    return state


def _size(data: loader.Loader) -> str:
    if data.num_tokens:
        return f"{data.num_tokens:,} tokens"
    return f"{sum(len(d) for d in data.datasets):,} samples"


def train(cfg: Config, mesh, workdir: str | Path, *, log=print, init=None) -> list[dict]:
    """Train from the newest checkpoint in workdir (else from `init(trainer)`, a state, or from
    scratch) up to train.steps.

    Returns the logged scalars, one dict per logged step. Raises Stopped on a signal (after
    saving) or on a non-finite step when train.on_nonfinite is "stop".
    """
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    trainer = Trainer(cfg, mesh)
    tokenizer, train_data, val_data = loader.loaders(
        cfg,
        workdir=workdir,
        log=log,
        train_rows=trainer.train_rows,
        eval_rows=trainer.eval_rows,
        lead=lead,
    )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the {cfg.data.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {cfg.model.vocab_size}: "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
    mesh_degrees = {axis: int(mesh.shape[axis]) for axis in mesh.axis_names}
    degrees = " ".join(f"{axis}={d}" for axis, d in mesh_degrees.items())
    log(
        f"model {trainer.num_params:,} parameters (vocabulary {cfg.model.vocab_size} padded to "
        f"{trainer.padded_vocab}) | mesh {degrees} on {jax.device_count()} "
        f"{jax.devices()[0].platform} "
        f"devices | {_size(train_data)} train / {_size(val_data)} val"
    )
    ckpt = Checkpointer(
        workdir / "checkpoints",
        every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    state = _restore_or_init(trainer, ckpt, train_data, log, init)
    start = int(jax.device_get(state["step"]))
    if start >= cfg.train.steps:
        log(f"nothing to do: the checkpoint is at step {start} >= train.steps={cfg.train.steps}")
        ckpt.close()
        return []
    if train_data.step != start:
        raise ConfigError(
            f"checkpoint step {start} holds no data position for its step: the loader is at "
            f"step {train_data.step}; resume from a checkpoint train.py wrote"
        )
    step_fn, compile_s = trainer.compile_train_step()
    eval_fn = trainer.compile_eval_step() if cfg.train.eval_every else None  # never evaluates
    log(f"compiled the train step in {compile_s:.1f}s")

    def meta(step: int) -> dict:
        """The checkpoint's JSON record: the loader's position, the mesh, the model."""
        model = config_lib.to_dict(cfg)["model"]
        return {"step": step, "data": train_data.state(), "mesh": mesh_degrees, "model": model}

    writer = metrics.Writer(workdir, enabled=lead)
    peak = metrics.peak_flops_per_device(jax.devices()[0]) * jax.device_count()
    tokens_per_step = cfg.train.batch_size * cfg.model.tokens_per_sample
    flops_per_token = cfg.model.flops_per_token()
    history, began = [], time.perf_counter()
    clock, steps_timed, unchecked = time.perf_counter(), 0, []

    def check_faults():
        """Report steps whose update was skipped for a fault (not a float16 overflow, which the
        loss scaler handles); stop the run if so configured."""
        for step, fault in unchecked:
            if bool(fault):
                why = f"step {step}: non-finite loss or gradient norm; the update was skipped"
                if cfg.train.on_nonfinite == "stop":
                    latest = ckpt.latest_step()
                    saved = (
                        f"the newest checkpoint is step {latest} in {ckpt.directory}"
                        if latest is not None
                        else f"no checkpoint has been saved in {ckpt.directory}"
                    )
                    raise Stopped(
                        f"{why} and the run stops (train.on_nonfinite=stop); {saved}",
                        exit_code=3,
                    )
                log(why)
        unchecked.clear()

    process = jax.process_index()
    with _signals_caught() as caught:
        agreed = _AgreedSignal(mesh, caught)
        watchdog.progress(start, stretched=True)  # the first step runs compiled code anew
        try:
            for step in range(start, cfg.train.steps):
                watchdog.doing("loading data for", step + 1)
                watchdog.fault(step + 1, process)
                b = next(train_data)  # this process's rows of global batch `step`
                watchdog.doing("running", step + 1)
                state, step_metrics = step_fn(state, trainer.put_batch(b))
                signum = agreed.poll()  # waits for the previous step, not this one
                done, steps_timed = step + 1, steps_timed + 1
                unchecked.append((done, step_metrics["fault"]))
                if cfg.train.on_nonfinite == "stop":
                    check_faults()
                evaluate_now = cfg.train.eval_every and (
                    done % cfg.train.eval_every == 0 or done == cfg.train.steps
                )
                if done % cfg.train.log_every == 0 or done == cfg.train.steps or evaluate_now:
                    check_faults()
                    scalars = jax.device_get(step_metrics)
                    scalars = {
                        k: float(v) for k, v in scalars.items() if k not in ("finite", "fault")
                    }
                    scalars["skipped_steps"] = int(jax.device_get(state["skipped"]))
                    seconds = time.perf_counter() - clock
                    scalars["tokens_per_sec"] = steps_timed * tokens_per_step / seconds
                    scalars["mfu"] = scalars["tokens_per_sec"] * flops_per_token / peak
                    if evaluate_now:
                        watchdog.stretch()
                        watchdog.doing("evaluating after", done)
                        held_out = evaluate(
                            trainer, eval_fn, state["params"], val_data, cfg.train.eval_batches
                        )
                        scalars |= {f"val_{k}": v for k, v in held_out.items()}
                    writer.write(done, scalars)
                    history.append({"step": done, **scalars})
                    elapsed = time.perf_counter() - began
                    log(metrics.progress_line(done, cfg.train.steps, scalars, elapsed))
                    clock, steps_timed = time.perf_counter(), 0
                if signum:
                    check_faults()
                    watchdog.stretch()
                    watchdog.doing("saving", done)
                    ckpt.save(done, state, meta(done), force=True)
                    ckpt.wait()
                    name = signal.Signals(signum).name
                    who = "" if caught else " by another process"
                    raise Stopped(
                        f"received {name}{who}: saved a checkpoint at step {done} in "
                        f"{ckpt.directory}; run the same command to resume",
                        exit_code=128 + signum,
                    )
                if ckpt.every > 0 and done % ckpt.every == 0:
                    watchdog.stretch()
                    watchdog.doing("saving", done)
                    ckpt.save(done, state, meta(done))
                watchdog.progress(done)
            check_faults()
            watchdog.stretch()
            watchdog.doing("saving", cfg.train.steps)
            ckpt.save(cfg.train.steps, state, meta(cfg.train.steps), force=True)
        finally:
            writer.close()
            ckpt.close()
    return history
