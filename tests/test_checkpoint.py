"""Checkpoints: exact resume, restore onto other meshes, and nothing lost to signals or crashes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import device_mesh, tiny_config

from megajax import config, run
from megajax.checkpoint import Checkpointer
from megajax.config import ConfigError
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _cfg(steps, **train):
    cfg = config.replace(
        tiny_config(vocab_size=65),
        data=dict(tokenizer="char"),
        train=dict(steps=steps, log_every=1, eval_every=0, **train),
        checkpoint=dict(every=2, keep=2),
    )
    return cfg


def _losses(history):
    return np.array([h["loss"] for h in history])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 uninterrupted steps on a 2 x 4 mesh."""
    workdir = tmp_path_factory.mktemp("straight")
    return _losses(run.train(_cfg(8), device_mesh(2, 4), workdir, log=lambda _: None))


def test_interrupted_and_resumed_run_repeats_the_same_losses(straight, tmp_path):
    first = run.train(_cfg(4), device_mesh(2, 4), tmp_path, log=lambda _: None)
    second = run.train(_cfg(8), device_mesh(2, 4), tmp_path, log=lambda _: None)
    np.testing.assert_array_equal(_losses(first + second), straight)


@pytest.mark.parametrize("data,model", [(4, 2), (1, 8), (1, 1)])
def test_resume_on_another_mesh_continues_the_same_losses(straight, tmp_path, data, model):
    run.train(_cfg(4), device_mesh(2, 4), tmp_path, log=lambda _: None)
    resumed = run.train(_cfg(8), device_mesh(data, model), tmp_path, log=lambda _: None)
    assert [h["step"] for h in resumed] == [5, 6, 7, 8]
    np.testing.assert_allclose(_losses(resumed), straight[4:], rtol=2e-6)


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    run.train(_cfg(2), device_mesh(1, 1), tmp_path, log=lambda _: None)
    wider = config.replace(_cfg(4), model=dict(hidden=128))
    with pytest.raises(ConfigError, match="another model shape.*use the config it was trained"):
        run.train(wider, device_mesh(1, 1), tmp_path, log=lambda _: None)


def test_corrupt_checkpoint_is_reported_with_what_to_do(tmp_path):
    run.train(_cfg(2), device_mesh(1, 1), tmp_path, log=lambda _: None)
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="corrupt.*remove that directory"):
        run.train(_cfg(4), device_mesh(1, 1), tmp_path, log=lambda _: None)


def test_nonfinite_step_is_skipped_and_never_saved(tmp_path):
    cfg = _cfg(2)
    trainer = Trainer(cfg, device_mesh(1, 1))
    state = trainer.init_state()
    params = jax.tree.map(np.array, jax.device_get(state["params"]))
    params["ln_f"]["scale"][0] = np.inf  # a poisoned weight makes loss and gradients non-finite
    state = {**state, "params": jax.device_put(params, trainer.state_sharding["params"])}
    step_fn, _ = trainer.compile_train_step()
    tokens = np.arange(8 * 32).reshape(8, 32) % 65
    before = jax.device_get(state)
    after, metrics = step_fn(state, trainer.put_batch({"inputs": tokens, "targets": tokens}))
    after = jax.device_get(after)
    assert not bool(metrics["finite"]) and int(after["skipped"]) == 1 and int(after["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
    np.testing.assert_array_equal(
        after["params"]["h"]["mlp"]["fc1"]["kernel"], before["params"]["h"]["mlp"]["fc1"]["kernel"]
    )


def test_the_logged_learning_rate_is_the_one_applied_after_a_skipped_step():
    cfg = config.replace(_cfg(2), optim=dict(lr=1.0, warmup_steps=10, weight_decay=0.0))
    trainer = Trainer(cfg, device_mesh(1, 1))
    state = trainer.init_state()
    # The state after one skipped step: parameters and moments untouched, optax's count at 0.
    state = {**state, "step": state["step"] + 1, "skipped": state["skipped"] + 1}
    step_fn, _ = trainer.compile_train_step()
    tokens = np.arange(8 * 32).reshape(8, 32) % 65
    before = jax.device_get(state["params"])
    after, metrics = step_fn(state, trainer.put_batch({"inputs": tokens, "targets": tokens}))
    # Warmup from 0: the update applied was the schedule's first, a learning rate of 0.
    assert float(metrics["learning_rate"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after["params"]), before)


def test_nonfinite_step_stops_the_run_when_asked(tmp_path):
    run.train(_cfg(2), device_mesh(1, 1), tmp_path, log=lambda _: None)  # a finite step 2
    cfg = config.replace(_cfg(6, on_nonfinite="stop"), optim=dict(lr=1e38, warmup_steps=0))
    cfg = config.replace(cfg, checkpoint=dict(every=1))  # would save every step it reached
    with pytest.raises(run.Stopped, match=r"step \d+: non-finite .*train.on_nonfinite=stop"):
        run.train(cfg, device_mesh(1, 1), tmp_path, log=lambda _: None)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=0, keep=10)
    trainer = Trainer(cfg, device_mesh(1, 1))
    steps = ckpt._manager.all_steps()
    assert steps and max(steps) < 6, steps  # something to check, and the run did stop
    for step in steps:  # every checkpoint written, before and after the huge learning rate
        state, _ = ckpt.restore(step, trainer.abstract_state())
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state))), step
    ckpt.close()


# --- whole processes: signals and SIGKILL -------------------------------------------------


def _train_cmd(workdir, steps, *extra):
    return [
        sys.executable, str(ROOT / "train.py"), "--config", "configs/shakespeare_char.py",
        "--cpu_devices", "2", "--mesh", "data=2", "--workdir", str(workdir),
        "--set", f"train.steps={steps}", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", *extra,
    ]  # fmt: skip


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _metrics(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in rows}


def _wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    proc = subprocess.Popen(
        _train_cmd(tmp_path, 10_000, "--set", "checkpoint.every=0"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert _wait_for(lambda: len(_metrics(tmp_path)) >= 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    saved = Checkpointer(tmp_path / "checkpoints", every=0, keep=2)
    step = saved.latest_step()
    saved.close()
    assert step is not None and step >= 3
    assert f"received SIGTERM: saved a checkpoint at step {step}" in err
    assert max(_metrics(tmp_path)) == step  # nothing trained after the signal went unsaved


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, 12), cwd=ROOT, env=_env(), check=True,
                   capture_output=True)  # fmt: skip
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(workdir, 12, "--set", "checkpoint.every=1"),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoints = workdir / "checkpoints"

    def in_save():
        saving = checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())
        return saving and len(_metrics(workdir)) >= 3

    assert _wait_for(in_save), "no save was seen in progress"
    proc.kill()
    proc.wait()
    subprocess.run(_train_cmd(workdir, 12), cwd=ROOT, env=_env(), check=True, capture_output=True)
    resumed, expected = _metrics(workdir), _metrics(reference)
    assert set(resumed) == set(expected)
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step
    shutil.rmtree(workdir)


def test_resume_with_sequence_parallelism_and_recomputation_switched(straight, tmp_path):
    """The state's layout depends on neither switch: a run saved without them resumes with
    them (on another mesh) and continues the same losses."""
    run.train(_cfg(4), device_mesh(2, 4), tmp_path, log=lambda _: None)
    switched = config.replace(_cfg(8), model=dict(sequence_parallel=True, remat="selective"))
    resumed = run.train(switched, device_mesh(4, 2), tmp_path, log=lambda _: None)
    assert [h["step"] for h in resumed] == [5, 6, 7, 8]
    np.testing.assert_allclose(_losses(resumed), straight[4:], rtol=2e-5)
