"""Packed documents are the documents run one per row: the same token-weighted loss and the same
gradients, with learned positions and with RoPE, on one device and on a 2 x 4 mesh. Attention
never crosses a document boundary, and positions restart at each document."""

import jax
import numpy as np
import pytest
from conftest import device_mesh, llama_config, tiny_config

from megajax import config
from megajax.trainer import Trainer

SEQ = 32
# Document lengths in tokens, packed greedily into rows of SEQ input positions: a document of
# n tokens takes n - 1 positions (its next-token pairs).
ROWS = [[12, 9, 13], [33], [7, 20], [5, 5, 5, 5, 5, 5], [17, 16], [24], [10, 10, 10], [3, 30]]


def _documents(tokens, vocab):
    """Real text cut into the documents of ROWS, each with a loss mask that leaves out its
    first few targets (as a prompt would be)."""
    docs, at = [], 0
    for lengths in ROWS:
        for n in lengths:
            ids = tokens[at : at + n] % vocab
            mask = (np.arange(n) >= min(3, n - 1)).astype(np.int32)
            docs.append((ids, mask))
            at += n
    return docs


def _packed(docs, rows=None):
    """The documents packed as ROWS says: inputs, targets, weights, segments and positions;
    rows of padding after them up to `rows`."""
    names = ("inputs", "targets", "weights", "segments", "positions")
    fields = {k: np.zeros((rows or len(ROWS), SEQ), np.int32) for k in names}
    it = iter(docs)
    for r, lengths in enumerate(ROWS):
        at = 0
        for segment, n in enumerate(lengths, 1):
            ids, mask = next(it)
            span = slice(at, at + n - 1)
            fields["inputs"][r, span], fields["targets"][r, span] = ids[:-1], ids[1:]
            fields["weights"][r, span], fields["segments"][r, span] = mask[1:], segment
            fields["positions"][r, span] = np.arange(n - 1)
            at += n - 1
        assert at <= SEQ
    return fields


def _one_per_row(docs):
    """Each document alone in a row of its own, padded (and rows of padding up to a multiple
    of 8): the same fields."""
    names = ("inputs", "targets", "weights", "segments", "positions")
    rows = -(-len(docs) // 8) * 8
    fields = {k: np.zeros((rows, SEQ), np.int32) for k in names}
    for r, (ids, mask) in enumerate(docs):
        n = len(ids)
        fields["inputs"][r, : n - 1], fields["targets"][r, : n - 1] = ids[:-1], ids[1:]
        fields["weights"][r, : n - 1], fields["segments"][r, : n - 1] = mask[1:], 1
        fields["positions"][r, : n - 1] = np.arange(n - 1)
    return fields


def _cfg(kind, batch):
    make = tiny_config if kind == "learned" else llama_config
    cfg = make(seq_len=SEQ, dropout=0.0)
    return config.replace(cfg, data=dict(format="chat"), train=dict(batch_size=batch))


@pytest.fixture(scope="module")
def docs(shakespeare_tokens):
    return _documents(shakespeare_tokens, 1100)


_PROGRAMS = {}  # (kind, mesh) -> (trainer, params, loss and gradients compiled once)


def _loss_and_grads(kind, mesh, batch):
    if (kind, mesh) not in _PROGRAMS:
        trainer = Trainer(_cfg(kind, len(batch["inputs"])), device_mesh(*mesh))
        with trainer.context():
            value = lambda p, b: trainer.loss(p, b, None)[0]  # noqa: E731
            program = jax.jit(jax.value_and_grad(value))
        _PROGRAMS[kind, mesh] = trainer, trainer.init_state()["params"], program
    trainer, params, program = _PROGRAMS[kind, mesh]
    with trainer.context():
        loss, grads = program(params, trainer.put_eval_batch(batch))
    grads = jax.device_get(grads)
    grads["wte"]["embedding"] = grads["wte"]["embedding"][:1100]
    if "head" in grads:
        grads["head"] = grads["head"][:1100]
    return float(loss), grads


@pytest.mark.parametrize("kind", ["learned", "rope"])
@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=["1x1", "2x4"])
def test_packed_documents_give_the_loss_and_gradients_of_one_per_row(docs, kind, mesh):
    alone = _one_per_row(docs)
    packed = _loss_and_grads(kind, mesh, _packed(docs, rows=len(alone["inputs"])))
    alone = _loss_and_grads(kind, mesh, alone)
    # The token-weighted mean over the same scored targets, whatever the rows.
    np.testing.assert_allclose(packed[0], alone[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), packed[1], alone[1]
    )


def test_a_document_never_sees_the_one_before_it(docs):
    """Changing every token of a row's first document changes nothing of the second's hidden
    states; without segments (one sequence) it does."""
    trainer = Trainer(_cfg("rope", 8), device_mesh(1, 1))
    params = trainer.init_state()["params"]
    batch = _packed(docs)
    changed = {k: v.copy() for k, v in batch.items()}
    first, second = batch["segments"] == 1, batch["segments"] == 2
    changed["inputs"][first] = (batch["inputs"][first] + 1) % 1100
    with trainer.context():
        f = jax.jit(lambda p, x, s, q: trainer.model(p)(x, segments=s, positions=q))
        whole = jax.jit(lambda p, x, q: trainer.model(p)(x, positions=q))
        apart = [np.asarray(f(params, b["inputs"], b["segments"], b["positions"]))
                 for b in (batch, changed)]  # fmt: skip
        joined = [np.asarray(whole(params, b["inputs"], b["positions"])) for b in (batch, changed)]
    assert second.any()
    np.testing.assert_array_equal(apart[0][second], apart[1][second])
    assert not np.allclose(joined[0][second], joined[1][second])
