"""Checkpoints: exact resume, restore onto other meshes, and nothing lost to signals or crashes."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import device_mesh, subprocess_env, tiny_config

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


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run stopped after 4 of those steps (checkpoints at 2 and 4): (workdir, its losses)."""
    workdir = tmp_path_factory.mktemp("four_steps")
    return workdir, _losses(run.train(_cfg(4), device_mesh(2, 4), workdir, log=lambda _: None))


def _copy(four_steps, tmp_path) -> Path:
    """A work directory of its own holding the four-step run's checkpoints."""
    return Path(shutil.copytree(four_steps[0], tmp_path / "run"))


def test_interrupted_and_resumed_run_repeats_the_same_losses(straight, four_steps, tmp_path):
    second = run.train(_cfg(8), device_mesh(2, 4), _copy(four_steps, tmp_path), log=lambda _: None)
    np.testing.assert_array_equal(np.concatenate([four_steps[1], _losses(second)]), straight)


# The state's layout depends neither on the mesh nor on sequence parallelism and recomputation:
# a run saved on 2 x 4 without them resumes on other meshes, or with them, and continues the
# same losses.
RESUME = [((4, 2), {}), ((1, 8), {}), ((1, 1), {}),
          ((4, 2), dict(sequence_parallel=True, remat="selective"))]  # fmt: skip


@pytest.mark.parametrize("mesh,model", RESUME, ids=["4x2", "1x8", "1x1", "4x2-sp-selective"])
def test_resume_on_another_mesh_continues_the_same_losses(
    straight, four_steps, tmp_path, mesh, model
):
    cfg = config.replace(_cfg(8), model=model)
    resumed = run.train(cfg, device_mesh(*mesh), _copy(four_steps, tmp_path), log=lambda _: None)
    assert [h["step"] for h in resumed] == [5, 6, 7, 8]
    np.testing.assert_allclose(_losses(resumed), straight[4:], rtol=2e-5 if model else 2e-6)


def test_checkpoint_of_another_model_shape_is_refused(four_steps, tmp_path):
    wider = config.replace(_cfg(6), model=dict(hidden=128))
    with pytest.raises(ConfigError, match="another model shape.*use the config it was trained"):
        run.train(wider, device_mesh(1, 1), _copy(four_steps, tmp_path), log=lambda _: None)


def test_corrupt_checkpoint_is_reported_with_what_to_do(four_steps, tmp_path):
    workdir = _copy(four_steps, tmp_path)
    for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="corrupt.*remove that directory"):
        run.train(_cfg(6), device_mesh(1, 1), workdir, log=lambda _: None)


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


# --- whole processes: SIGKILL and SIGTERM --------------------------------------------------


def _train_cmd(workdir, steps, *extra):
    return [
        sys.executable, str(ROOT / "train.py"), "--config", "configs/shakespeare_char.py",
        "--cpu_devices", "2", "--mesh", "data=2", "--workdir", str(workdir),
        "--set", f"train.steps={steps}", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", *extra,
    ]  # fmt: skip


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


@pytest.mark.slow
def test_kill_during_a_save_then_sigterm_lose_no_step(tmp_path):
    """`kill -9` in the middle of a save leaves the newest complete checkpoint to resume from;
    SIGTERM to the resumed run saves a checkpoint at the step it is on and exits 128 + 15.
    Every logged loss equals the uninterrupted run's (the same command's, in this process)."""
    cfg = config.override(
        config.load("configs/shakespeare_char.py"),
        ["train.steps=40", "train.log_every=1", "train.eval_every=0"],
    )
    reference = run.train(cfg, device_mesh(2, 1), tmp_path / "reference", log=lambda _: None)
    expected = {h["step"]: h["loss"] for h in reference}
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(workdir, 12, "--set", "checkpoint.every=1"),
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoints = workdir / "checkpoints"

    def in_save():
        saving = checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())
        return saving and len(_metrics(workdir)) >= 3

    assert _wait_for(in_save), "no save was seen in progress"
    proc.kill()
    proc.wait()
    killed_at = max(_metrics(workdir))
    # Resumed with checkpoints at the end only, and stopped by SIGTERM a few steps on.
    proc = subprocess.Popen(
        _train_cmd(workdir, 40, "--set", "checkpoint.every=0"),
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert _wait_for(lambda: max(_metrics(workdir)) >= killed_at + 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    saved = Checkpointer(checkpoints, every=0, keep=2)
    step = saved.latest_step()
    saved.close()
    assert step is not None and step >= killed_at + 3 and step < 40
    assert f"received SIGTERM: saved a checkpoint at step {step}" in err
    losses = _metrics(workdir)
    assert max(losses) == step  # nothing trained after the signal went unsaved
    for s, loss in losses.items():
        assert loss == pytest.approx(expected[s], rel=1e-6), s
