"""GPT-2 computes what it claims: causal, Megatron's init, remat and bf16 as pure options.

That recomputation changes memory and not the gradients is proven on the train steps of
tests/test_parallel_equivalence.py (test_recomputation_leaves_the_loss_and_gradients_unchanged)."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bert_config, device_mesh, tiny_config

from megajax import config
from megajax.trainer import Trainer


def _trainer(cfg, data=1, model=1):
    return Trainer(cfg, device_mesh(data, model))


def test_future_tokens_never_change_earlier_positions():
    trainer = _trainer(tiny_config(), 2, 4)
    state = trainer.init_state()
    ids = np.arange(8 * 32).reshape(8, 32) % 1100
    changed = ids.copy()
    changed[:, 20:] = (changed[:, 20:] + 7) % 1100
    with trainer.context():
        hidden = jax.jit(lambda p, x: trainer.model(p)(x))
        a, b = (
            np.asarray(
                hidden(
                    state["params"], trainer.put_eval_batch({"inputs": x, "targets": x})["inputs"]
                )
            )
            for x in (ids, changed)
        )
    np.testing.assert_allclose(a[:, :20], b[:, :20], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 20:], b[:, 20:])


def test_init_scales_residual_outputs_and_zeroes_padding():
    cfg = tiny_config()  # the one-device reference of tests/test_parallel_equivalence.py
    params = jax.device_get(_trainer(cfg).init_state()["params"])
    std = cfg.model.init_std
    out_std = std / np.sqrt(2 * cfg.model.num_layers)
    np.testing.assert_allclose(params["h"]["attn"]["qkv"]["kernel"].std(), std, rtol=0.05)
    np.testing.assert_allclose(params["h"]["mlp"]["fc1"]["kernel"].std(), std, rtol=0.05)
    np.testing.assert_allclose(params["h"]["attn"]["proj"]["kernel"].std(), out_std, rtol=0.05)
    np.testing.assert_allclose(params["h"]["mlp"]["fc2"]["kernel"].std(), out_std, rtol=0.05)
    wte = params["wte"]["embedding"]
    assert wte.shape[0] % 128 == 0 and wte.shape[0] > cfg.model.vocab_size
    assert np.all(wte[cfg.model.vocab_size :] == 0)
    np.testing.assert_allclose(wte[: cfg.model.vocab_size].std(), std, rtol=0.05)
    assert np.all(params["h"]["attn"]["qkv"]["bias"] == 0)


def _grads(cfg, data=2, model=4):
    """(loss, gradients) of a fixed batch; tests/test_optim.py compiles the same program."""
    trainer = _trainer(cfg, data, model)
    state = trainer.init_state()
    ids = np.arange(8 * 32).reshape(8, 32) * 37 % 1100
    with trainer.context():
        batch = trainer.put_eval_batch({"inputs": ids, "targets": np.roll(ids, -1, axis=1)})
        loss_fn = jax.value_and_grad(lambda p, b, k: trainer.loss(p, b, k)[0])
        return jax.device_get(jax.jit(loss_fn)(state["params"], batch, jax.random.key(3)))


@pytest.fixture(scope="module")
def reference():
    """_grads of the model without dropout, which each option below is compared with."""
    return _grads(tiny_config(dropout=0.0))


def _saved_residual_shapes(cfg):
    """Shapes of what the backward pass of the loss keeps, as jax's print_saved_residuals
    lists them (global shapes; stacked layers lead with num_layers)."""
    trainer = _trainer(cfg)
    params = trainer.abstract_state()["params"]
    batch = trainer.abstract_batch(micro=False)
    out = io.StringIO()
    with trainer.context(), contextlib.redirect_stdout(out):
        loss = lambda p, b: trainer.loss(p, b, jax.random.key(0))[0]  # noqa: E731
        jax.ad_checkpoint.print_saved_residuals(loss, params, batch)
    dims = re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), flags=re.M)
    return [tuple(int(d) for d in x.split(",") if d) for x in dims]


def test_selective_remat_saves_no_length_by_length_tensor():
    cfg = tiny_config(dropout=0.1)  # attention dropout: its mask is (b, heads, s, s) too
    s, b, h = cfg.model.seq_len, cfg.train.batch_size, cfg.model.hidden
    layers = cfg.model.num_layers

    def split(shapes):
        """Per-layer residuals (stacked by the scan): the (s, s) ones, the (b, s, ...) ones."""
        stacked = [x for x in shapes if x[:1] == (layers,)]
        scores = [x for x in stacked if x[-2:] == (s, s)]
        return scores, sorted(x for x in stacked if x not in scores and x[1:3] == (b, s))

    scores, large = split(_saved_residual_shapes(cfg))
    assert scores  # without recomputation they are kept
    kept_scores, kept_large = split(
        _saved_residual_shapes(config.replace(cfg, model=dict(remat="selective")))
    )
    assert not kept_scores, kept_scores
    # What the paper lists (its Table 2) is kept: per layer the two layer norms' inputs, the
    # QKV and fc1 inputs, the attention output (b, s, h); q, k and v (b, s, heads, head_dim);
    # GeLU's input and output (b, s, 4h); and the two residual dropout masks.
    n, L, a, f = (layers, b, s, h), layers, cfg.model.num_heads, cfg.model.mlp_hidden
    d = h // a
    assert sorted(kept_large) == sorted([n] * 7 + [(L, b, s, a, d)] * 3 + [(L, b, s, f)] * 2)
    assert set(kept_large) <= set(large)


def test_bf16_compute_keeps_fp32_master_weights_and_close_loss(reference):
    loss, _ = reference
    loss_bf16, grads_bf16 = _grads(tiny_config(dropout=0.0, compute_dtype="bfloat16"))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_bf16))
    np.testing.assert_allclose(loss_bf16, loss, rtol=2e-2)
    assert loss_bf16 != loss  # the matmuls really ran in bf16


def test_config_is_frozen():
    cfg = tiny_config()
    try:
        cfg.model.hidden = 3
    except dataclasses.FrozenInstanceError:
        return
    raise AssertionError("configs must be immutable")


def _spy_on_fused_attention(monkeypatch) -> list[dict]:
    """The keyword arguments of every jax.nn.dot_product_attention call traced from now on."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def test_attention_implementations_agree(reference, monkeypatch):
    """attention=xla (as cudnn) gives the einsum path's loss and gradients, and is told GPT's
    mask as is_causal, not given a mask, so that a fused kernel keeps its mask type."""
    calls = _spy_on_fused_attention(monkeypatch)
    loss_xla, grads_xla = _grads(tiny_config(dropout=0.0, attention="xla"))
    loss, grads = reference
    np.testing.assert_allclose(loss_xla, loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_xla, grads
    )
    (gpt,) = calls  # one trace of the stacked layers
    assert gpt["is_causal"] and gpt.get("mask") is None and gpt["key_value_seq_lengths"] is None


def test_fused_attention_is_told_key_lengths_not_given_a_mask(monkeypatch):
    """attention=xla passes BERT's padding as key lengths, so that a fused kernel keeps its
    mask type; the results equal the einsum path's. (GPT's is_causal: the test above.)"""
    calls = _spy_on_fused_attention(monkeypatch)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (8, 32))
    lengths = rng.integers(5, 33, 8)
    padding = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int32)

    def hidden(trainer, params):
        model = trainer.model(params)
        with trainer.context():
            return np.asarray(jax.jit(lambda x, m: model(x, 0 * x, m))(tokens, padding))

    # tests/test_parallel_equivalence.py's one-device BERT (no dropout without a key).
    cfg = bert_config(vocab_size=1100)
    trainer = _trainer(cfg)
    params = trainer.init_state()["params"]  # the same whatever the attention
    fused = _trainer(config.replace(cfg, model=dict(attention="xla", dropout=0.0)))
    outputs = [hidden(trainer, params), hidden(fused, params)]
    # Padded positions attend, but are never attended to.
    outputs = [np.where(padding[..., None], x, 0) for x in outputs]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    (bert,) = calls  # one trace of the stacked layers
    assert not bert["is_causal"] and bert.get("mask") is None
    assert bert["key_value_seq_lengths"] is not None


def test_fused_attention_refuses_dropout():
    with pytest.raises(config.ConfigError, match="no attention dropout"):
        _trainer(tiny_config(dropout=0.1, attention="cudnn"))
