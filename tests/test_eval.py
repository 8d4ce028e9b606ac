"""eval.py: every held-out token scored once, the same on any mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import device_mesh, tiny_config

from megajax import config, run
from megajax.evals import perplexity
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_perplexity_scores_every_window_once_whatever_the_batch(shakespeare_tokens):
    cfg = tiny_config()
    tokens = shakespeare_tokens[: 11 * 32 + 1] % cfg.model.vocab_size
    windows = [{"inputs": tokens[i : i + 32], "targets": tokens[i + 1 : i + 33]}
               for i in range(0, 11 * 32, 32)]  # fmt: skip
    scores = []
    for mesh_shape, batch in (((2, 4), 8), ((1, 1), 1)):
        trainer = Trainer(
            config.replace(cfg, train=dict(batch_size=batch)), device_mesh(*mesh_shape)
        )
        scores.append(perplexity.score(trainer, trainer.init_state()["params"], windows))
    assert (
        scores[0]["tokens"] == scores[1]["tokens"] == 11 * 32
    )  # 8 + 3: the padding is not counted
    assert scores[0]["nll"] == pytest.approx(scores[1]["nll"], rel=1e-5)
    assert scores[0]["ppl"] == pytest.approx(np.exp(scores[0]["nll"] / (11 * 32)))


@pytest.mark.parametrize(
    "flags", [["--cpu_devices", "1"], ["--cpu_devices", "8", "--mesh", "data=2,model=4"]]
)
def test_eval_restores_the_checkpoint_on_any_mesh(tmp_path_factory, flags):
    workdir = tmp_path_factory.getbasetemp() / "eval_run"
    cfg = config.replace(
        tiny_config(vocab_size=65),
        data=dict(tokenizer="char"),
        train=dict(steps=3, eval_every=0),
    )
    if not (workdir / "checkpoints").exists():
        run.train(cfg, device_mesh(2, 4), workdir, log=lambda _: None)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--workdir", str(workdir), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((workdir / "eval.json").read_text())
    assert result["step"] == 3 and f"perplexity {result['ppl']:.2f}" in out.stdout
    assert result["ppl"] == pytest.approx(np.exp(result["loss"]))
    assert result["loss"] == pytest.approx(4.05, abs=0.15)  # near ln(65) after 3 steps
    expected = workdir / "expected_loss"
    if expected.exists():
        assert result["loss"] == pytest.approx(float(expected.read_text()), rel=1e-5)
    expected.write_text(repr(result["loss"]))
