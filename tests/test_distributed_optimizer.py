"""The distributed optimizer (optim.distributed, ZeRO stage 1) moves the optimizer state, not the
numbers: the same losses, one all-gather of each parameter per step, gradients reduce-scattered,
optimizer state divided by the data degree, and checkpoints that cross the switch.

The models are tests/test_parallel_equivalence.py's (BERT with its 1,100-token vocabulary), so
that a run compiles the steps without the switch once."""

import math

import jax
import numpy as np
import pytest
from conftest import bert_batch, bert_config, device_mesh, real_batch, tiny_config

from megajax import config, hlo
from megajax.checkpoint import Checkpointer
from megajax.trainer import Trainer

STEPS = 5
VOCAB = 1100  # BERT's, as tiny_config's


def _cfg(kind, distributed):
    cfg = tiny_config(dropout=0.1) if kind == "gpt" else bert_config(dropout=0.1, vocab_size=VOCAB)
    return config.replace(cfg, optim=dict(distributed=distributed))


@pytest.fixture(scope="module")
def runs(shakespeare_tokens, bert_dataset):
    """(kind, distributed, data, model) -> (trainer, compiled step, metrics, final state)."""
    cache = {}

    def batches(kind, cfg):
        if kind == "gpt":
            m = cfg.model
            shape = dict(batch_size=8, seq_len=m.seq_len, vocab_size=m.vocab_size)
            pairs = [real_batch(shakespeare_tokens, step=i, **shape) for i in range(STEPS)]
            return [{"inputs": x, "targets": y} for x, y in pairs]
        shape = dict(batch_size=8, seq_len=cfg.model.seq_len, vocab_size=VOCAB)
        return [bert_batch(bert_dataset, step=i, **shape) for i in range(STEPS)]

    def get(kind, distributed, data, model):
        key = (kind, distributed, data, model)
        if key not in cache:
            cfg = _cfg(kind, distributed)
            trainer = Trainer(cfg, device_mesh(data, model))
            state = trainer.init_state()
            step_fn, _ = trainer.compile_train_step()
            metrics = []
            for batch in batches(kind, cfg):
                state, m = step_fn(state, trainer.put_batch(batch))
                metrics.append({k: float(v) for k, v in m.items()})
            cache[key] = trainer, step_fn, metrics, state
        return cache[key]

    return get


BERT = pytest.param("bert", 2, 4, marks=pytest.mark.slow)  # the largest programs


@pytest.mark.parametrize("kind,data,model", [("gpt", 2, 4), ("gpt", 4, 2), ("gpt", 1, 8), BERT])
def test_losses_equal_with_and_without_the_distributed_optimizer(runs, kind, data, model):
    _, _, reference, _ = runs(kind, False, 2, 4)
    trainer, _, metrics, _ = runs(kind, True, data, model)
    assert trainer.cfg.model.dropout > 0
    for ours, ref in zip(metrics, reference, strict=True):
        assert ours.keys() == ref.keys()
        for k in ours:
            np.testing.assert_allclose(ours[k], ref[k], rtol=2e-4, err_msg=k)


def _replicated(keystr: str, trainer) -> bool:
    """Whether a leaf (a parameter or one of its moments) is one left whole over `data`."""
    names = ["".join(f"['{k}']" for k in name.split("/")) for name in trainer.replicated_over_data]
    return any(keystr.endswith(name) for name in names)


def _shard_bytes(tree) -> dict:
    return {
        jax.tree_util.keystr(path): math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_optimizer_state_per_device_divided_by_the_data_degree(runs):
    off, off_step, _, _ = runs("gpt", False, 2, 4)
    on, on_step, _, _ = runs("gpt", True, 2, 4)
    data = 2
    assert on.replicated_over_data == ["h/attn/qkv/bias", "h/mlp/fc1/bias"]
    before = off.abstract_state()
    after = on.abstract_state()
    for part in ("params", "opt_state"):
        old, new = _shard_bytes(before[part]), _shard_bytes(after[part])
        for path, nbytes in old.items():
            whole = _replicated(path, on)
            scalar = nbytes <= 4  # Adam's step counts
            expected = nbytes if whole or scalar else nbytes // data
            assert new[path] == expected, path
        assert sum(new.values()) < 0.55 * sum(old.values())
    # The compiled program's arguments (state and batch) shrink by exactly as much.
    saved = sum(_shard_bytes(before).values()) - sum(_shard_bytes(after).values())
    assert saved > 0
    off_args = off_step.memory_analysis().argument_size_in_bytes
    on_args = on_step.memory_analysis().argument_size_in_bytes
    assert off_args - on_args == saved


def _data_reductions(trainer, compiled):
    found = hlo.reduce_scatter_factors(compiled.as_text(), dict(trainer.mesh.shape))
    return [
        (shape, factor)
        for c, factors in found
        if c.axes == ("data",)
        for shape, factor in zip(c.shapes, factors, strict=True)
        if shape
    ]


def test_each_parameter_gathered_once_per_step_and_gradients_reduce_scattered(runs):
    trainer, compiled, _, _ = runs("gpt", True, 2, 4)
    mesh_shape = dict(trainer.mesh.shape)
    found = hlo.collectives(compiled.as_text(), mesh_shape)
    params = trainer.abstract_state()["params"]
    shapes = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    # The shard each device computes with (split over `model` only).
    compute = {
        jax.tree_util.keystr(path): sharding.shard_shape(shapes[jax.tree_util.keystr(path)])
        for path, sharding in jax.tree_util.tree_leaves_with_path(trainer.compute_sharding)
    }
    split = {k: v for k, v in compute.items() if not _replicated(k, trainer)}
    gathers = [c for c in found if c.kind == "all-gather"]
    assert all(c.axes == ("data",) and c.runs == 1 for c in gathers), gathers
    gathered = sorted(shape for c in gathers for shape in c.shapes)
    assert gathered == sorted(split.values())  # one gather per parameter, once per step
    # Every gradient reduced over `data` is cut to this device's 1/D slice right after (GSPMD's
    # reduce-scatter as XLA:CPU prints it), save the parameters that stay replicated.
    replicated = set()
    for path, shape in compute.items():
        if _replicated(path, trainer):
            replicated |= {shape, shape[1:]}  # stacked layers: reduced layer by layer
    reductions = _data_reductions(trainer, compiled)
    assert sum(1 for _, f in reductions if f == 2) >= len(split)
    for shape, factor in reductions:
        assert factor == 2 or shape in replicated, (shape, factor)
    # Without the switch the same audit sees whole all-reduces only and no gathers.
    off, off_compiled, _, _ = runs("gpt", False, 2, 4)
    assert all(f == 1 for _, f in _data_reductions(off, off_compiled))
    assert not [
        c for c in hlo.collectives(off_compiled.as_text(), mesh_shape) if c.kind != "all-reduce"
    ]


def _assert_same_leaves(a, b):
    """Bit-identical leaves; vocabulary-padded leaves compared over their common rows, the
    rest of the longer one zero."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        rows = min(x.shape[0], y.shape[0]) if x.ndim else None
        if x.shape != y.shape:
            assert x.shape[1:] == y.shape[1:]
            assert not x[rows:].any() and not y[rows:].any()
            x, y = x[:rows], y[:rows]
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "saved,restored", [((True, 2, 4), (False, 1, 8)), ((False, 2, 4), (True, 4, 2))]
)
def test_checkpoint_crosses_the_switch_and_the_mesh_bit_identically(
    runs, tmp_path, saved, restored
):
    _, _, _, state = runs("gpt", *saved)
    ckpt = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    ckpt.save(STEPS, state, {"step": STEPS}, force=True)
    distributed, data, model = restored
    trainer = Trainer(_cfg("gpt", distributed), device_mesh(data, model))
    target = trainer.abstract_state()
    back, _ = ckpt.restore(STEPS, target, optional=trainer.optional_state())
    ckpt.close()
    for x, want in zip(jax.tree.leaves(back), jax.tree.leaves(target), strict=True):
        assert x.sharding.is_equivalent_to(want.sharding, x.ndim)
    before = jax.device_get(state)
    after = jax.device_get(back)
    _assert_same_leaves(after["params"], before["params"])
    _assert_same_leaves(after["opt_state"], before["opt_state"])
    assert int(after["step"]) == STEPS
