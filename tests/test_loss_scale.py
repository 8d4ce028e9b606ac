"""float16 with Megatron-LM's dynamic loss scaling: the scaler's rules, an overflowing step
skipped without a trace, and float16 losses close to float32 ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import device_mesh, real_batch, tiny_config

from megajax import config, hlo, loss_scale
from megajax.checkpoint import Checkpointer
from megajax.config import OptimConfig
from megajax.trainer import Trainer


def test_megatron_defaults():
    cfg = OptimConfig()
    assert (cfg.initial_loss_scale, cfg.min_loss_scale) == (2.0**32, 1.0)
    assert (cfg.loss_scale_window, cfg.hysteresis) == (1000, 2)


def test_scaler_trace_growth_hysteresis_backoff_and_minimum():
    cfg = OptimConfig(initial_loss_scale=8.0, min_loss_scale=2.0, loss_scale_window=3)
    # (gradients finite?, then (scale, clean steps counted, overflows left before a backoff))
    script = [
        (True, (8, 1, 2)),
        (True, (8, 2, 2)),
        (True, (16, 0, 2)),  # a full window of clean steps doubles the scale
        (False, (16, 0, 1)),  # first overflow: hysteresis absorbs it
        (True, (16, 1, 1)),  # clean steps do not re-arm the hysteresis ...
        (False, (8, 0, 0)),  # ... so the next overflow halves the scale
        (False, (4, 0, -1)),  # and every one after it
        (False, (2, 0, -2)),
        (False, (2, 0, -3)),  # never below min_loss_scale
        (True, (2, 1, -3)),
        (True, (2, 2, -3)),
        (True, (4, 0, 2)),  # growth re-arms the hysteresis
        (False, (4, 0, 1)),
    ]
    state = loss_scale.init(cfg)
    update = jax.jit(lambda s, f: loss_scale.update(s, f, cfg))
    for i, (finite, want) in enumerate(script):
        state = update(state, jnp.bool_(finite))
        got = (float(state["scale"]), int(state["growth_tracker"]))
        got += (int(state["hysteresis_tracker"]),)
        assert got == want, (i, got, want)


class Overflowing(Trainer):
    """A trainer whose gradients hold an inf at the steps `at`, as a float16 backward pass
    that overflows would (XLA:CPU may compute float16 in float32 and never overflow)."""

    def __init__(self, cfg, mesh, *, at):
        self.at = tuple(at)
        super().__init__(cfg, mesh)

    def gradients(self, state, batch):
        means, grads = super().gradients(state, batch)
        hit = jnp.any(state["step"] == jnp.asarray(self.at))
        grads["ln_f"]["scale"] = grads["ln_f"]["scale"] + jnp.where(hit, jnp.inf, 0.0)
        return means, grads


STEPS, OVERFLOWS = 6, (2, 3)


def _cfg(dtype):
    return config.replace(
        tiny_config(dropout=0.1, compute_dtype=dtype),
        optim=dict(distributed=True, initial_loss_scale=2.0**12, loss_scale_window=3),
    )


@pytest.fixture(scope="module")
def runs(shakespeare_tokens):
    """dtype -> (trainer, final state, states before each step and after the last, metrics per
    step, compiled step)."""
    out = {}
    for dtype in ("float16", "float32"):
        trainer = Overflowing(_cfg(dtype), device_mesh(2, 4), at=OVERFLOWS)
        state = trainer.init_state()
        step_fn, _ = trainer.compile_train_step()
        states, metrics = [], []
        for step in range(STEPS):
            x, y = real_batch(
                shakespeare_tokens, step=step, batch_size=8, seq_len=32, vocab_size=1100
            )
            states.append(jax.device_get(state))
            state, m = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
            metrics.append(jax.device_get(m))
        states.append(jax.device_get(state))
        out[dtype] = trainer, state, states, metrics, step_fn
    return out


def test_an_overflowing_step_leaves_params_and_moments_bit_identical(runs):
    _, _, states, metrics, _ = runs["float16"]
    for step in range(STEPS):
        before, after = states[step], states[step + 1]
        skipped = step in OVERFLOWS
        assert bool(metrics[step]["finite"]) is not skipped
        assert int(after["step"]) == step + 1
        assert int(after["skipped"]) == sum(1 for s in OVERFLOWS if s <= step)
        same = jax.tree.map(np.array_equal, before["opt_state"], after["opt_state"])
        assert all(jax.tree.leaves(same)) is skipped, step  # the moments move on clean steps
        if skipped:
            jax.tree.map(np.testing.assert_array_equal, before["params"], after["params"])
    # The scaler: 2 clean steps, then overflows at steps 2 (hysteresis) and 3 (backoff), then
    # 2 clean steps counted towards the next growth.
    scales = [float(m["loss_scale"]) for m in metrics]
    assert scales == [2.0**12] * 4 + [2.0**11] * 2
    last = states[-1]["scaler"]
    assert (int(last["growth_tracker"]), int(last["hysteresis_tracker"])) == (2, 0)


def test_float16_losses_close_to_float32(runs):
    half = [float(m["loss"]) for m in runs["float16"][3]]
    full = [float(m["loss"]) for m in runs["float32"][3]]
    np.testing.assert_allclose(half, full, rtol=2e-3)
    assert half[-1] < half[0]


def test_float16_weights_are_gathered_in_float16(runs):
    trainer, _, _, _, step_fn = runs["float16"]
    found = hlo.collectives(step_fn.as_text(), dict(trainer.mesh.shape))
    gathers = [c for c in found if c.kind == "all-gather"]
    assert gathers and all(c.bytes == 2 * c.elements and c.runs == 1 for c in gathers)


def test_scaler_is_checkpointed_and_optional_on_restore(runs, tmp_path):
    trainer, state, _, _, _ = runs["float16"]
    ckpt = Checkpointer(tmp_path / "half", every=1, keep=1, async_save=False)
    ckpt.save(STEPS, state, {}, force=True)
    back, _ = ckpt.restore(STEPS, trainer.abstract_state(), optional=trainer.optional_state())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(state))
    # A float32 run resumes from it without the scaler, and a float16 run from a float32
    # checkpoint starts the scaler afresh.
    full = Trainer(_cfg("float32"), device_mesh(2, 4))
    back, _ = ckpt.restore(STEPS, full.abstract_state(), optional=full.optional_state())
    assert "scaler" not in back
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "full", every=1, keep=1, async_save=False)
    ckpt.save(STEPS, back, {}, force=True)
    again, _ = ckpt.restore(STEPS, trainer.abstract_state(), optional=trainer.optional_state())
    ckpt.close()
    assert float(again["scaler"]["scale"]) == 2.0**12
    jax.tree.map(np.testing.assert_array_equal, again["params"], back["params"])


def test_float16_overflows_the_scaler_handles_do_not_stop_a_run(tmp_path):
    """With on_nonfinite=stop a float16 run goes on through the overflows its scaler handles
    (Megatron-LM's initial 2^32 overflows the first steps), and stops on a non-finite loss."""
    from megajax import run

    cfg = config.replace(
        tiny_config(vocab_size=65, compute_dtype="float16"),
        data=dict(tokenizer="char"),
        train=dict(steps=3, log_every=1, eval_every=0, on_nonfinite="stop"),
        checkpoint=dict(every=0),
    )
    history = run.train(cfg, device_mesh(1, 1), tmp_path / "scaled", log=lambda _: None)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[-1]["skipped_steps"] >= 1 and history[-1]["loss_scale"] < 2.0**32

    def poisoned(trainer):  # an infinite weight: the loss itself is not finite
        state = trainer.init_state()
        params = jax.tree.map(np.array, jax.device_get(state["params"]))
        params["ln_f"]["scale"][0] = np.inf
        return {**state, "params": jax.device_put(params, trainer.state_sharding["params"])}

    with pytest.raises(run.Stopped, match=r"step 1: non-finite .*train.on_nonfinite=stop"):
        run.train(cfg, device_mesh(1, 1), tmp_path / "poisoned", log=lambda _: None, init=poisoned)
