"""Megatron-LM's schedule, the weight-decay mask, and gradient accumulation."""

import jax
import numpy as np
import pytest
from conftest import bert_config, device_mesh, real_batch, tiny_config

from megajax import config, optim
from megajax.config import OptimConfig
from megajax.trainer import Trainer


def test_warmup_then_cosine_to_min_lr_over_decay_steps():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    lr = optim.schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert float(lr(110)) == pytest.approx(0.1)
    assert float(lr(500)) == pytest.approx(0.1)  # past decay_steps: min_lr, whatever train.steps
    linear = optim.schedule(
        OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=100, schedule="linear")
    )
    assert float(linear(25)) == pytest.approx(0.75)


@pytest.mark.parametrize("arch", ["gpt", "bert", "bert_multiple_choice"])
def test_weight_decay_takes_every_matrix_and_no_bias_or_norm(arch):
    cfg = tiny_config() if arch == "gpt" else bert_config(arch=arch)
    params = Trainer(cfg, device_mesh(1, 1)).abstract_state()["params"]
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    vectors = {k for k in flat if k.endswith(("['bias']", "['scale']"))}
    assert decayed == set(flat) - vectors  # embeddings (BERT's token types too) and kernels
    assert "['h']['attn']['qkv']['kernel']" in decayed and "['wpe']" in decayed
    if arch != "gpt":
        assert "['wtt']" in decayed and "['mlm']['bias']" not in decayed


def test_gradient_accumulation_equals_one_large_batch(shakespeare_tokens):
    results = []
    for micro in (1, 4):
        cfg = config.replace(
            tiny_config(dropout=0.0), train=dict(batch_size=8, micro_batches=micro)
        )
        trainer = Trainer(cfg, device_mesh(2, 2))
        state = trainer.init_state()
        step_fn, _ = trainer.compile_train_step()
        x, y = real_batch(shakespeare_tokens, step=0, batch_size=8, seq_len=32, vocab_size=1100)
        state, metrics = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (m1, p1), (m4, p4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p4, p1)
