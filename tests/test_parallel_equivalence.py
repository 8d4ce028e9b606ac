"""Tensor and data parallelism change where numbers are computed, not the numbers."""

import jax
import numpy as np
import pytest
from conftest import device_mesh, real_batch, tiny_config

from megajax.trainer import Trainer

MESHES = [(1, 1), (8, 1), (2, 4), (4, 2), (1, 8)]
STEPS = 3


def _run(cfg, data, model, tokens):
    """Losses of STEPS train steps, first-step gradients and final params (real vocab rows)."""
    trainer = Trainer(cfg, device_mesh(data, model))
    state = trainer.init_state()
    step_fn, _ = trainer.compile_train_step()
    batches = [
        real_batch(
            tokens,
            step=i,
            batch_size=cfg.train.batch_size,
            seq_len=cfg.model.seq_len,
            vocab_size=cfg.model.vocab_size,
        )
        for i in range(STEPS)
    ]
    with trainer.context():
        key = jax.random.key(7)
        x, y = trainer.put_eval_batch(*batches[0])
        grads = jax.jit(jax.grad(trainer.loss))(state["params"], x, y, key)
    losses = []
    for x, y in batches:
        state, metrics = step_fn(state, *trainer.put_batch(x, y))
        losses.append(float(metrics["loss"]))
    real = cfg.model.vocab_size

    def unpad(tree):
        tree = jax.device_get(tree)
        tree["wte"]["embedding"] = tree["wte"]["embedding"][:real]
        return tree

    return np.array(losses), unpad(grads), unpad(state["params"])


@pytest.fixture(scope="module")
def reference(shakespeare_tokens):
    cfg = tiny_config()
    return cfg, _run(cfg, 1, 1, shakespeare_tokens)


@pytest.mark.parametrize("data,model", MESHES[1:])
def test_loss_grads_and_params_identical_across_meshes(reference, shakespeare_tokens, data, model):
    cfg, (ref_losses, ref_grads, ref_params) = reference
    assert cfg.model.dropout > 0  # dropout masks must not depend on the sharding either
    losses, grads, params = _run(cfg, data, model, shakespeare_tokens)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    assert ref_losses[-1] < ref_losses[0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7), grads, ref_grads
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params
    )
