"""Vocabulary-parallel cross-entropy equals the ordinary one on gathered logits.

Each mesh compiles one program (loss, its gradients, the per-token losses and the greedy
predictions); the reference is float64 NumPy, so that it compiles nothing."""

import jax
import numpy as np
import pytest
from conftest import device_mesh
from jax.sharding import NamedSharding

from megajax import loss, parallel

VOCAB, PADDED, HIDDEN = 1000, 1024, 16
MESHES = [(1, 1), (2, 4), (1, 8)]


def _inputs():
    """hidden (4, 8, HIDDEN), a padded table whose padding rows would win every softmax and
    argmax were they counted, and targets."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 8, HIDDEN)).astype(np.float32)
    table = rng.standard_normal((PADDED, HIDDEN)).astype(np.float32)
    table[VOCAB:] = 100.0 * np.abs(hidden).max()
    table[VOCAB + 1 :: 2] *= -1  # half the rows point the other way: one wins for every token
    assert np.all((hidden @ table.T).argmax(-1) >= VOCAB)
    targets = rng.integers(0, VOCAB, (4, 8)).astype(np.int32)
    return hidden, table, targets


def _reference(hidden, table, targets):
    """Per-token losses, the mean's gradients (hidden, table) and the argmax, in float64, over
    the real rows only: the padded rows simply do not exist."""
    h, w = hidden.astype(np.float64), table[:VOCAB].astype(np.float64)
    logits = h @ w.T
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    per_token = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    dlogits = (np.exp(logp) - np.eye(VOCAB)[targets]) / targets.size
    grad_table = np.zeros(table.shape)
    grad_table[:VOCAB] = np.einsum("bsv,bsh->vh", dlogits, h)
    return per_token, (dlogits @ w, grad_table), logits.argmax(-1)


def _put(mesh, hidden, table, targets):
    put = lambda x, *axes: jax.device_put(x, NamedSharding(mesh, parallel.spec(*axes)))  # noqa: E731
    return (
        put(hidden, "batch", "length", "embed"),
        put(table, "vocab", "embed"),
        put(targets, "batch", "length"),
    )


def _on_mesh(hidden, table, targets):
    """Mean loss and its gradients, per-token losses and argmax: one program."""
    mean = lambda h, t: loss.cross_entropy(h, t, targets, vocab_size=VOCAB).mean()  # noqa: E731
    value, grads = jax.value_and_grad(mean, argnums=(0, 1))(hidden, table)
    per_token = loss.cross_entropy(hidden, table, targets, vocab_size=VOCAB)
    return value, grads, per_token, loss.argmax(hidden, table, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def results():
    """(data, model) -> _on_mesh's results from the inputs sharded on that mesh."""
    out = {}
    for data, model in MESHES:
        mesh = device_mesh(data, model)
        with jax.set_mesh(mesh):
            out[data, model] = jax.device_get(jax.jit(_on_mesh)(*_put(mesh, *_inputs())))
    return out


@pytest.mark.parametrize("data,model", MESHES)
def test_vocab_parallel_cross_entropy_matches_full_softmax(results, data, model):
    value, grads, per_token, _ = results[data, model]
    ref_tokens, ref_grads, _ = _reference(*_inputs())
    np.testing.assert_allclose(value, ref_tokens.mean(), rtol=1e-5)
    np.testing.assert_allclose(per_token, ref_tokens, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
    assert np.all(grads[1][VOCAB:] == 0)  # padded rows never learn


@pytest.mark.parametrize("data,model", MESHES)
def test_padded_vocabulary_never_wins_argmax(results, data, model):
    *_, best = results[data, model]
    np.testing.assert_array_equal(best, _reference(*_inputs())[2])
