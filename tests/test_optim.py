"""Megatron-LM's schedule, the weight-decay mask, and gradient accumulation."""

import jax
import numpy as np
import optax
import pytest
from conftest import bert_config, device_mesh, real_batch, tiny_config

from megajax import config, optim
from megajax.config import OptimConfig
from megajax.trainer import Trainer


def test_warmup_then_cosine_to_min_lr_over_decay_steps():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    steps = np.array([0, 5, 10, 60, 110, 500])
    lr = np.asarray(jax.jit(optim.schedule(cfg))(steps))  # one program, not one per operation
    assert float(lr[0]) == 0.0
    assert float(lr[1]) == pytest.approx(0.5)
    assert float(lr[2]) == pytest.approx(1.0)
    assert float(lr[3]) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert float(lr[4]) == pytest.approx(0.1)
    assert float(lr[5]) == pytest.approx(0.1)  # past decay_steps: min_lr, whatever train.steps
    linear = optim.schedule(
        OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=100, schedule="linear")
    )
    assert float(jax.jit(linear)(25)) == pytest.approx(0.75)


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
    """Four micro-batches of 2 accumulate the loss and the gradient of the batch of 8, read from
    the step's first Adam moment (tests/test_parallel_equivalence.py proves that reading)."""
    cfg = config.replace(tiny_config(dropout=0.0), train=dict(batch_size=8, micro_batches=4))
    trainer = Trainer(cfg, device_mesh(2, 4))
    state = trainer.init_state()
    x, y = real_batch(shakespeare_tokens, step=0, batch_size=8, seq_len=32, vocab_size=1100)
    # The batch of 8 at once: tests/test_model.py's program (_grads), so compiled once a run.
    with trainer.context():
        loss_fn = jax.value_and_grad(lambda p, b, k: trainer.loss(p, b, k)[0])
        batch = trainer.put_eval_batch({"inputs": x, "targets": y})
        loss, grads = jax.device_get(jax.jit(loss_fn)(state["params"], batch, jax.random.key(3)))
    step_fn, _ = trainer.compile_train_step()
    state, metrics = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    clip = min(1.0, cfg.optim.clip_norm / norm)
    first_moment = jax.device_get(optax.tree.get(state["opt_state"], "mu"))
    jax.tree.map(
        lambda mu, g: np.testing.assert_allclose(
            mu / (1 - cfg.optim.beta1), g * clip, rtol=1e-5, atol=1e-7
        ),
        first_moment,
        grads,
    )
