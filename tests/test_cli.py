"""train.py end to end, and bad input ending in one clear line and a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from megajax import cli

ROOT = Path(__file__).resolve().parents[1]


def _plain_env() -> dict:
    """This environment without the test run's XLA flags and platform: a user's shell."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _train(*args, env) -> subprocess.Popen:
    """`python train.py ARGS`, started (text stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# An execution-bound run (30 steps over a 50,257-token head, 128 tokens each): XLA's -O1
# compiles about as fast as the tests' -O0 and runs the steps several times faster.
E2E_XLA_FLAGS = "--xla_backend_optimization_level=1"


@pytest.mark.slow
def test_trains_on_real_text_and_logs_every_metric(tmp_path):
    proc = _train(
        "--config",
        "configs/gpt2_tiny.py",
        "--mesh",
        "data=2,model=4",
        "--cpu_devices",
        "8",
        "--workdir",
        str(tmp_path),
        "--set",
        "train.steps=30",
        "--set",
        "model.seq_len=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_every=15",
        env=subprocess_env(XLA_FLAGS=E2E_XLA_FLAGS),
    )
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for row in rows:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= set(row)
        assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
    assert "val_loss" in rows[2] and "val_loss" in rows[5]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5  # real text: the loss falls clearly
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "step 30/30" in stdout and "tok/s" in stdout


BAD_INPUT = {
    "missing-config": (["--config", "configs/nope.py"], "config file not found: configs/nope.py"),
    "unknown-key": (
        ["--config", "configs/gpt2_tiny.py", "--set", "train.stepz=3"],
        "unknown config key 'train.stepz'",
    ),
    "bad-value": (
        ["--config", "configs/gpt2_tiny.py", "--set", "train.steps=many"],
        "expected a value of type int",
    ),
    "mesh-mismatch": (
        ["--config", "configs/gpt2_tiny.py", "--cpu_devices", "4", "--mesh", "data=2,model=4"],
        "needs 8 devices but 4 are present",
    ),
    "heads": (
        ["--config", "configs/gpt2_tiny.py", "--cpu_devices", "3", "--mesh", "model=3"],
        "num_heads=8 is not divisible by the model degree 3",
    ),
    "bad-axis": (
        ["--config", "configs/gpt2_tiny.py", "--mesh", "tensor=2"],
        "expected pipeline=P,data=D,fsdp=F,expert=E,context=C,model=M",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict:
    """name -> (exit status, stderr) of train.py on each BAD_INPUT, the processes run at once."""
    procs = {
        name: _train(*args, "--workdir", str(tmp_path_factory.mktemp(name)), env=_plain_env())
        for name, (args, _) in BAD_INPUT.items()
    }
    results = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        results[name] = proc.returncode, stderr
    return results


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_ends_in_one_clear_line(bad_runs, case):
    code, stderr = bad_runs[case]
    assert code == 2
    lines = stderr.strip().splitlines()
    message = BAD_INPUT[case][1]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


RESTART = """
import os, sys
print("pid", os.getpid(), flush=True)
from megajax import cli
cli.restart_with_huge_page_malloc()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
"""


def _restart(env_extra, script=RESTART):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cli.KEEP_MALLOC)}
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


@pytest.mark.skipif(
    cli._transparent_huge_pages() != "madvise", reason="huge pages are not opt-in here"
)
def test_restarts_once_with_huge_page_malloc_keeping_the_users_tunables():
    lines = _restart({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=123456"})
    pids = [line for line in lines if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1]  # one restart, in place
    assert lines[-1] == "tunables glibc.malloc.trim_threshold=123456:glibc.malloc.hugetlb=1"


@pytest.mark.skipif(
    cli._transparent_huge_pages() != "madvise", reason="huge pages are not opt-in here"
)
def test_restarts_at_most_once_even_where_the_tunables_are_lost():
    # A launcher or a secure-execution mode that drops GLIBC_TUNABLES must not make a loop.
    dropped = RESTART.replace(
        "from megajax", "os.environ.pop('GLIBC_TUNABLES', None)\nfrom megajax"
    )
    lines = _restart({}, script=dropped)
    assert len([line for line in lines if line.startswith("pid")]) == 2


def test_no_restart_when_asked_not_to_or_already_set():
    kept = _restart({cli.KEEP_MALLOC: "1"})
    assert len(kept) == 2 and kept[-1] == "tunables "
    own = _restart({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert len(own) == 2 and own[-1] == "tunables glibc.malloc.hugetlb=0"


def test_an_early_failure_surfaces_as_itself(tmp_path):
    import train

    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise RuntimeError('the config is broken')\n")
    with pytest.raises(RuntimeError, match="the config is broken"):
        train.main(["--config", str(broken), "--workdir", str(tmp_path)])
