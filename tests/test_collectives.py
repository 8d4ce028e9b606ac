"""The compiled train step communicates exactly as the paper's section 3 says, and no more.

Read from the optimized HLO of a 2 x 4 (data x model) mesh, for GPT-2 and for BERT with either
layer-norm placement: per transformer layer, two
all-reduces over `model` forward (after the attention output and fc2) and two backward (before
QKV and fc1), each of (batch / data) x length x hidden elements.
"""

import math

import jax
import pytest
from conftest import bert_config, device_mesh, llama_config, tiny_config

from megajax import hlo
from megajax.trainer import Trainer

DATA, MODEL = 2, 4


def _collectives(cfg):
    trainer = Trainer(cfg, device_mesh(DATA, MODEL))
    compiled, _ = trainer.compile_train_step()
    return trainer, hlo.collectives(compiled.as_text(), {"data": DATA, "model": MODEL})


MODELS = {
    # 3 layers: a loop that runs once per layer cannot be mistaken for the two all-reduces of
    # each direction (BERT post-LN and Llama have 2).
    "gpt-3-layers": lambda: tiny_config(num_layers=3, dropout=0.1),
    "bert-pre": lambda: bert_config(num_layers=3, layernorm_placement="pre", dropout=0.1),
    "bert-post": lambda: bert_config(num_layers=2, layernorm_placement="post", dropout=0.1),
    # grouped-query attention, SwiGLU, RoPE, RMSNorm, no biases and an untied head: the same
    # collectives (the head's backward all-reduce is the untied head's), and with 2 key/value
    # heads on 4 model shards, their kv weight, split by rows, gathered and its gradient
    # reduce-scattered.
    "llama": lambda: llama_config(num_layers=2, dropout=0.1),
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


def _is_kv_weight(cfg, c):
    """Whether c all-gathers the whole kv weight, or reduce-scatters its gradient to rows, over
    `model`."""
    m = cfg.model
    whole = (m.hidden, 2 * m.kv_heads * m.head_dim)
    rows = (m.hidden // MODEL, whole[1])
    kinds = (("all-gather", (whole,)), ("reduce-scatter", (rows,)))
    return c.axes == ("model",) and (c.kind, c.shapes) in kinds


def test_a_kv_weight_split_by_rows_is_gathered_once_per_layer(audit):
    """With more model shards than key/value heads, each shard computes its own head from the
    whole kv weight, which is stored split by rows: one all-gather per layer forward, one
    reduce-scatter of its gradient backward (test_sequence_parallel_... checks it with SP)."""
    _check_kv_weight(*audit)


def _check_kv_weight(cfg, _, found):
    layers, by_rows = cfg.model.num_layers, cfg.model.kv_by_rows(MODEL)
    expected = [("all-gather", layers), ("reduce-scatter", layers)] if by_rows else []
    assert sorted((c.kind, c.runs) for c in found if _is_kv_weight(cfg, c)) == expected


def test_no_gather_and_no_logits_sized_collective(audit):
    cfg, trainer, found = audit
    kinds = {c.kind for c in found if not _is_kv_weight(cfg, c)}
    assert kinds == {"all-reduce"}, kinds
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


# Sequence parallelism (arXiv 2205.05198): the same bytes move as reduce-scatters and
# all-gathers. psum_scatter and all_gather in shard_map compile to true `reduce-scatter` and
# `all-gather` instructions, so the audit tells them apart from an all-reduce by their kind
# and by their result shapes: (b, s / T, h) after a reduce-scatter, (b, s, h) after a gather.
SP_MODELS = {
    "gpt-3-layers": lambda: tiny_config(num_layers=3, dropout=0.1, sequence_parallel=True),
    "bert-post": lambda: bert_config(
        num_layers=2, layernorm_placement="post", dropout=0.1, sequence_parallel=True
    ),
    "llama": lambda: llama_config(num_layers=2, dropout=0.1, sequence_parallel=True),
}


@pytest.fixture(scope="module", params=sorted(SP_MODELS))
def sp_audit(request):
    cfg = SP_MODELS[request.param]()
    return cfg, *_collectives(cfg)


def _sp_activations(cfg, found):
    """(kind, computation, runs) of each all-gather of a (b, s, h) tensor and each
    reduce-scatter to (b, s / T, h) over `model`."""
    b, s, h = cfg.train.batch_size // DATA, cfg.model.seq_len, cfg.model.hidden
    whole, shard = (b, s, h), (b, s // MODEL, h)
    return [
        (c.kind, c.computation, c.runs)
        for c in found
        if c.axes == ("model",)
        and (c.kind, c.shapes) in (("all-gather", (whole,)), ("reduce-scatter", (shard,)))
    ]


def test_sequence_parallel_gathers_and_reduce_scatters_per_layer(sp_audit):
    cfg, _, found = sp_audit
    layers = cfg.model.num_layers
    per_loop = {}
    for kind, computation, runs in _sp_activations(cfg, found):
        if runs == layers:
            counts = per_loop.setdefault(computation, {"all-gather": 0, "reduce-scatter": 0})
            counts[kind] += 1
    # Forward: an all-gather before QKV and fc1, a reduce-scatter after the attention output
    # and fc2. Backward: their transposes (2 reduce-scatters, 2 all-gathers) and the inputs of
    # QKV and fc1 gathered again, as only their shards were kept.
    assert sorted((c["all-gather"], c["reduce-scatter"]) for c in per_loop.values()) == [
        (2, 2),
        (4, 2),
    ], per_loop
    # Outside the layers: the embedding's reduce-scatter and the head's gather, transposed.
    outside = [kind for kind, _, runs in _sp_activations(cfg, found) if runs == 1]
    assert sorted(outside) == ["all-gather"] * 2 + ["reduce-scatter"] * 2


def test_sequence_parallel_leaves_no_activation_sized_allreduce(sp_audit):
    cfg, trainer, found = sp_audit
    b, s, h = cfg.train.batch_size // DATA, cfg.model.seq_len, cfg.model.hidden
    params = {
        tuple(d for d in a.sharding.shard_shape(a.shape) if d != 1)
        for a in jax.tree.leaves(trainer.abstract_state()["params"])
    }
    params |= {shape[1:] for shape in params}  # stacked layers: per-layer slices too
    for shape, _, _ in _model_tensors(found):
        # Left: the cross-entropy's (b, s) pieces, BERT's [CLS] rows (b, 1, h), and the
        # gradients of parameters replicated over `model` (layer norms, biases, BERT's heads).
        squeezed = tuple(d for d in shape if d != 1)
        assert shape in ((b, s), (b, 1, h)) or squeezed in params or squeezed == (), shape
    _check_kv_weight(*sp_audit)
