"""The compiled train step communicates exactly as the paper's section 3 says, and no more.

Read from the optimized HLO of a 2 x 4 (data x model) mesh, for GPT-2 and for BERT with either
layer-norm placement: per transformer layer, two
all-reduces over `model` forward (after the attention output and fc2) and two backward (before
QKV and fc1), each of (batch / data) x length x hidden elements.
"""

import math

import jax
import pytest
from conftest import bert_config, device_mesh, tiny_config

from megajax import hlo
from megajax.trainer import Trainer

DATA, MODEL = 2, 4


def _collectives(cfg):
    trainer = Trainer(cfg, device_mesh(DATA, MODEL))
    compiled, _ = trainer.compile_train_step()
    return trainer, hlo.collectives(compiled.as_text(), {"data": DATA, "model": MODEL})


MODELS = {
    "gpt-2-layers": lambda: tiny_config(num_layers=2, dropout=0.1),
    "gpt-3-layers": lambda: tiny_config(num_layers=3, dropout=0.1),
    "bert-pre": lambda: bert_config(num_layers=3, layernorm_placement="pre", dropout=0.1),
    "bert-post": lambda: bert_config(num_layers=2, layernorm_placement="post", dropout=0.1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def audit(request):
    cfg = MODELS[request.param]()
    return cfg, *_collectives(cfg)


def _model_tensors(found):
    """(shape, computation, runs) of every tensor all-reduced over `model`. XLA may combine
    several tensors into one all-reduce; the communication is per tensor."""
    return [
        (shape, c.computation, c.runs)
        for c in found
        if c.kind == "all-reduce" and c.axes == ("model",)
        for shape in c.shapes
    ]


def test_two_allreduces_per_layer_forward_and_two_backward(audit):
    cfg, _, found = audit
    layers = cfg.model.num_layers
    b, s, h = cfg.train.batch_size // DATA, cfg.model.seq_len, cfg.model.hidden
    acts = [t for t in _model_tensors(found) if t[0] == (b, s, h)]
    by_loop = {}
    for _, computation, runs in acts:
        if runs == layers:
            by_loop[computation] = by_loop.get(computation, 0) + 1
    # One loop is the forward scan, the other the backward scan: two each, once per layer.
    assert sorted(by_loop.values()) == [2, 2], by_loop
    # Outside the layers: the vocabulary-parallel embedding (forward) and the tied head (backward).
    assert sum(1 for t in acts if t[2] == 1) == 2
    assert sum(t[2] for t in acts) == 4 * layers + 2


def test_cross_entropy_reduces_only_token_sized_tensors(audit):
    cfg, _, found = audit
    b, s, h = cfg.train.batch_size // DATA, cfg.model.seq_len, cfg.model.hidden
    tensors = _model_tensors(found)
    assert sum(1 for t in tensors if t[0] == (b, s)) == 3  # max, sum of exp, target logit
    for shape, _, _ in tensors:
        # else only the scalar pieces of the global gradient norm
        assert shape in ((b, s), (b, s, h)) or math.prod(shape) == 1, shape


def test_no_gather_and_no_logits_sized_collective(audit):
    cfg, trainer, found = audit
    assert {c.kind for c in found} == {"all-reduce"}, {c.kind for c in found}
    logits_local = (
        (cfg.train.batch_size // DATA) * cfg.model.seq_len * trainer.padded_vocab // MODEL
    )
    largest = max(math.prod(shape) for c in found for shape in c.shapes)
    assert largest < logits_local, largest


def test_gradient_allreduce_only_over_data_with_parameter_shapes(audit):
    _, trainer, found = audit

    def squeezed(shape):  # a bias's gradient may be reduced as (1, 1, n)
        return tuple(d for d in shape if d != 1)

    shard_shapes = set()
    for arr in jax.tree.leaves(trainer.abstract_state()["params"]):
        local = squeezed(arr.sharding.shard_shape(arr.shape))
        shard_shapes |= {local, local[1:]}  # stacked layers: per-layer slices too
    data_reduces = [c for c in found if "data" in c.axes]
    assert data_reduces
    for c in data_reduces:
        assert c.axes == ("data",), c
        for shape in map(squeezed, c.shapes):
            assert shape == () or shape in shard_shapes or shape[::-1] in shard_shapes, shape
