"""Vocabulary-parallel cross-entropy equals the ordinary one on gathered logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import device_mesh
from jax.sharding import NamedSharding

from megajax import loss, parallel

VOCAB, PADDED, HIDDEN = 1000, 1024, 16


def _inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (4, 8, HIDDEN))
    table = jax.random.normal(k2, (PADDED, HIDDEN))
    targets = jax.random.randint(k3, (4, 8), 0, VOCAB)
    return hidden, table, targets


def _put(mesh, hidden, table, targets):
    put = lambda x, *axes: jax.device_put(x, NamedSharding(mesh, parallel.spec(*axes)))  # noqa: E731
    return (
        put(hidden, "batch", "length", "embed"),
        put(table, "vocab", "embed"),
        put(targets, "batch", "length"),
    )


def _reference(hidden, table, targets):
    logits = hidden @ table[:VOCAB].T  # the padded rows simply do not exist
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4), (1, 8)])
def test_vocab_parallel_cross_entropy_matches_full_softmax(data, model):
    mesh = device_mesh(data, model)
    hidden, table, targets = _inputs()
    f = lambda h, t, y: loss.cross_entropy(h, t, y, vocab_size=VOCAB).mean()  # noqa: E731
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
            *_put(mesh, hidden, table, targets)
        )
    ref_value, ref_grads = jax.value_and_grad(
        lambda h, t: _reference(h, t, targets).mean(), argnums=(0, 1)
    )(hidden, table)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads[1])[VOCAB:] == 0)  # padded rows never learn


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4)])
def test_padded_vocabulary_never_wins_argmax(data, model):
    mesh = device_mesh(data, model)
    hidden, table, targets = _inputs(1)
    table = table.at[VOCAB:].set(100.0 * jnp.abs(hidden).max())  # padding rows would dominate
    with jax.set_mesh(mesh):
        h, t, _ = _put(mesh, hidden, table, targets)
        best = jax.jit(lambda h, t: loss.argmax(h, t, vocab_size=VOCAB))(h, t)
        per_token = jax.jit(lambda h, t, y: loss.cross_entropy(h, t, y, vocab_size=VOCAB))(
            h, t, _put(mesh, hidden, table, targets)[2]
        )
    np.testing.assert_array_equal(best, jnp.argmax(hidden @ table[:VOCAB].T, -1))
    np.testing.assert_allclose(per_token, _reference(hidden, table, targets), rtol=1e-5)
