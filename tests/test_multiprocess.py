"""Multi-process runs for real: two processes of 4 faked CPU devices joined into one mesh."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import device_mesh, subprocess_env

from megajax import config, run, watchdog

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here starts a two-process job
SETTINGS = [
    "model.seq_len=32", "model.num_layers=2", "model.hidden=64", "model.num_heads=8",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
]  # fmt: skip


def _cfg(steps):
    cfg = config.override(config.load("configs/shakespeare_char.py"), SETTINGS)
    return config.replace(cfg, train=dict(steps=steps))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, steps, *extra, heartbeat=30, env_extra=None):
    """Start process 0 and 1 of a two-process job; returns the Popen objects."""
    port = _free_port()
    env = subprocess_env(**(env_extra or {}))
    sets = [a for s in [*SETTINGS, f"train.steps={steps}"] for a in ("--set", s)]
    procs = []
    for pid in (0, 1):
        cmd = [
            sys.executable, str(ROOT / "train.py"), "--config", "configs/shakespeare_char.py",
            "--mesh", "data=2,model=4", "--cpu_devices", "4", "--workdir", str(workdir),
            "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid),
            "--heartbeat_timeout", str(heartbeat), *sets, *extra,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six steps in this one process on the same 2 x 4 mesh of 8 devices."""
    history = run.train(_cfg(6), device_mesh(2, 4), tmp_path_factory.mktemp("single"),
                        log=lambda _: None)  # fmt: skip
    return {h["step"]: h["loss"] for h in history}


# A SIGTERM that reaches one process stops both at the same step, each saving its shards of
# one checkpoint. The test hook sends it to one process, by itself, as it begins step 3; both
# agree on the step after: step 4. Sent to process 1, the job starts from a one-process
# checkpoint (step 2) and its checkpoint continues in one process on one device; sent to
# process 0, the two processes start from scratch (sharded initialisation) and the checkpoint
# continues on the same mesh in one process.
@pytest.mark.parametrize("signalled", [1, 0])
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(reference, tmp_path, signalled):
    first = 1
    if signalled == 1:
        run.train(_cfg(2), device_mesh(1, 8), tmp_path, log=lambda _: None)
        first = 3
    procs = _launch(tmp_path, 6, env_extra={watchdog.FAULT: f"sigterm@{signalled}:3"})
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in outs]
    for i, (_, err) in enumerate(outs):
        who = "" if i == signalled else " by another process"
        assert f"received SIGTERM{who}: saved a checkpoint at step 4" in err, err[-2000:]
    assert "step 4/6" in outs[0][0] and "step" not in outs[1][0]  # process 0 alone reports
    assert not any("[Gloo]" in out for out, _ in outs)  # nor do Gloo's connections
    losses = _losses(tmp_path)
    assert max(losses) == 4
    steps = range(first, 5)
    np.testing.assert_allclose([losses[s] for s in steps], [reference[s] for s in steps], rtol=2e-6)
    resume_on = device_mesh(1, 1) if signalled == 1 else device_mesh(2, 4)
    resumed = run.train(_cfg(6), resume_on, tmp_path, log=lambda _: None)
    np.testing.assert_allclose([h["loss"] for h in resumed], [reference[5], reference[6]],
                               rtol=2e-6)  # fmt: skip


def test_a_frozen_process_stops_the_other_with_a_clear_message(tmp_path):
    procs = _launch(tmp_path, 100_000, heartbeat=20)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(_losses(tmp_path)) >= 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGSTOP)  # alive, but none of its threads run
    stopped_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert time.time() - stopped_at < 60
    assert "error: process 1 of 2 has been silent" in err, err[-2000:]


def test_a_stalled_loop_stops_every_process_naming_it(tmp_path):
    # Process 1's loop stalls loading the data of step 3; its threads (heartbeat) live on.
    # 10 s, so that the first step's compilation (allowed 3 x 10 s) stays inside it while
    # another test process compiles beside this job.
    procs = _launch(tmp_path, 100_000, "--step_timeout", "10",
                    env_extra={watchdog.FAULT: "stall@1:3"})  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 3, err[-2000:]
        line = [x for x in err.splitlines() if x.startswith("error: ")][-1]
        assert "no training step finished for 10s after step 2" in line, line
        assert "stuck at process 1 of 2 (loading data for step 3)" in line, line
    assert max(_losses(tmp_path)) == 2
