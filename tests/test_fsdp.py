"""Fully sharded data parallelism (the `fsdp` mesh axis, ZeRO-3): the same numbers as `data`,
every parameter and its Adam moments held split over `fsdp`, each layer's weights gathered
inside the layer scan (forward, and again in the backward pass) with its gradients reduced
onto the fsdp shards there, and checkpoints that move between fsdp, data and the distributed
optimizer bit for bit.

Each mesh's train step is compiled once per module (`runs`) and shared by the claims."""

import math

import jax
import numpy as np
import pytest
from conftest import llama_config, real_batch, tiny_config

from megajax import config, hlo, mesh
from megajax.checkpoint import Checkpointer
from megajax.config import ConfigError
from megajax.trainer import Trainer

STEPS = 3
MOE = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_shared_experts=1)
MODELS = {
    "gpt": lambda: tiny_config(dropout=0.1),
    "llama": lambda: llama_config(dropout=0.1, remat="full"),  # recomputed layers gather again
    # a Mixtral in miniature (tests/test_moe.py's), its experts split over `expert`
    "mixtral": lambda: llama_config(dropout=0.1, **MOE),
    # the sequence split over `context` too
    "gpt-context": lambda: tiny_config(dropout=0.1),
    # LoRA adapters (the only trainable parameters) under sequence parallelism
    "gpt-lora-sp": lambda: config.replace(
        tiny_config(dropout=0.1, sequence_parallel=True), lora=dict(rank=4)
    ),
}
# (fsdp mesh, the data-parallel mesh it must equal)
MESHES = {
    "gpt": ("fsdp=4,model=2", "data=4,model=2"),
    "llama": ("fsdp=4,model=2", "data=4,model=2"),
    "mixtral": ("fsdp=2,expert=2,model=2", "data=2,expert=2,model=2"),
    "gpt-context": ("context=2,fsdp=2,model=2", "context=2,data=2,model=2"),
    "gpt-lora-sp": ("data=2,fsdp=2,model=2", "data=4,model=2"),
}


def _cfg(kind, distributed=False):
    return config.replace(MODELS[kind](), optim=dict(distributed=distributed))


@pytest.fixture(scope="module")
def runs(shakespeare_tokens):
    """(kind, mesh string, distributed) -> (trainer, compiled step, metrics, final state)."""
    cache = {}

    def get(kind, text, distributed=False):
        key = (kind, text, distributed)
        if key not in cache:
            cfg = _cfg(kind, distributed)
            trainer = Trainer(cfg, mesh.make(text))
            state = trainer.init_state()
            step_fn, _ = trainer.compile_train_step()
            metrics = []
            m = cfg.model
            for i in range(STEPS):
                x, y = real_batch(
                    shakespeare_tokens,
                    step=i,
                    batch_size=cfg.train.batch_size,
                    seq_len=m.seq_len,
                    vocab_size=m.vocab_size,
                )
                state, out = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
                metrics.append({k: float(v) for k, v in out.items()})
            cache[key] = trainer, step_fn, metrics, state
        return cache[key]

    return get


def _assert_same_metrics(ours, reference):
    for a, b in zip(ours, reference, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, err_msg=k)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fsdp_losses_equal_data_parallel_losses(runs, kind):
    """Losses, gradient norms (and a MoE model's router losses) of 3 steps with dropout."""
    fsdp, data = MESHES[kind]
    trainer, _, ours, _ = runs(kind, fsdp)
    _, _, reference, _ = runs(kind, data)
    assert trainer.cfg.model.dropout > 0
    _assert_same_metrics(ours, reference)


@pytest.mark.slow
def test_fsdp_in_pipeline_stages_equals_data_parallel(runs, shakespeare_tokens):
    """Two pipeline stages, each stage's layers gathered one at a time over fsdp."""
    cfg = config.replace(_cfg("gpt"), train=dict(micro_batches=2))
    metrics = {}
    for text in ("pipeline=2,fsdp=2,model=2", "pipeline=2,data=2,model=2"):
        trainer = Trainer(cfg, mesh.make(text))
        state, (step_fn, _) = trainer.init_state(), trainer.compile_train_step()
        metrics[text] = []
        for i in range(STEPS):
            x, y = real_batch(shakespeare_tokens, step=i, batch_size=8, seq_len=32, vocab_size=1100)
            state, out = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
            metrics[text].append({k: float(v) for k, v in out.items()})
    _assert_same_metrics(*metrics.values())


def _local(x):
    return x.addressable_shards[0].data.shape


def test_parameters_and_moments_are_split_over_fsdp(runs):
    fsdp, _, _, state = runs("gpt", "fsdp=4,model=2")
    _, _, _, ref = runs("gpt", "data=4,model=2")
    assert fsdp.param_sharding == fsdp.rest_sharding
    mu = state["opt_state"][1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(state["params"]),
        jax.tree.leaves(mu),
        jax.tree.leaves(ref["params"]),
        strict=True,
    )
    for (path, p), m, r in leaves:
        # This device holds a quarter of what a data-parallel device holds, of every
        # parameter and of its moment; the stacked layers' axis is never the one split.
        assert math.prod(_local(p)) * 4 == math.prod(_local(r)), jax.tree_util.keystr(path)
        assert _local(m) == _local(p)
        if jax.tree_util.keystr(path).startswith("['h']"):
            assert _local(p)[0] == p.shape[0]
    state_bytes = lambda s: sum(math.prod(_local(x)) for x in jax.tree.leaves(s))  # noqa: E731
    assert state_bytes(state) * 3.9 < state_bytes(ref)


def _by_axes(found, axes):
    return [c for c in found if c.axes == axes]


def _model_collectives(found):
    """(kind, shape, runs) of each tensor moved over `model`, scalars left out: XLA combines
    tensors into one collective as it sees fit."""
    return sorted(
        (c.kind, s, c.runs) for c in _by_axes(found, ("model",)) for s in c.shapes if s != ()
    )


def test_fsdp_collectives_one_gather_per_parameter_per_layer_and_reduce_scatters(runs):
    """The fsdp program against the data=4 one (GPT, 2 layers, fsdp=4, model=2):
    - over `model`: the very same collectives (the Megatron plan is untouched);
    - forward layer loop: one all-gather over `fsdp` per stacked parameter, of one layer's
      slice, once per layer; the backward layer loop gathers the kernels again (the remat
      policy keeps no gathered copy), so no (layers, ...) stack of whole weights is saved;
    - every gradient is reduced over `fsdp` and cut to this device's quarter right after: GSPMD's
      reduce-scatter, which XLA:CPU prints as an all-reduce whose users keep a 1/4 slice
      (hlo.reduce_scatter_factors); the stacked layers' inside the backward loop, one per
      parameter per layer;
    - the embedding, position table and final norm gathered once, outside the loops;
    - nothing over `data` (degree 1) and nothing over two axes but the scalars of the
      gradient norm and the loss."""
    trainer, compiled, _, state = runs("gpt", "fsdp=4,model=2")
    ref_trainer, ref_compiled, _, _ = runs("gpt", "data=4,model=2")
    shape = dict(trainer.mesh.shape)
    found = hlo.collectives(compiled.as_text(), shape)
    ref = hlo.collectives(ref_compiled.as_text(), dict(ref_trainer.mesh.shape))
    assert _model_collectives(found) == _model_collectives(ref)
    assert not [c for c in found if "data" in c.axes]
    for c in found:
        if len(c.axes) > 1:
            assert c.kind == "all-reduce" and all(math.prod(s) == 1 for s in c.shapes), c

    layers = trainer.cfg.model.num_layers
    params = state["params"]
    # Each parameter's layout in the forward pass: split over `model` only.
    compute = {
        jax.tree_util.keystr(p): s.shard_shape(x.shape)
        for (p, x), s in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree.leaves(trainer.compute_sharding),
            strict=True,
        )
    }
    stacked = sorted((1, *v[1:]) for k, v in compute.items() if k.startswith("['h']"))
    outside = sorted(v for k, v in compute.items() if not k.startswith("['h']"))
    gathers = [c for c in found if c.kind == "all-gather"]
    assert all(c.axes == ("fsdp",) for c in gathers)
    loops = {}
    for c in gathers:
        if c.runs == layers:
            loops.setdefault(c.computation, []).extend(c.shapes)
    forward, backward = sorted(loops.values(), key=len, reverse=True)
    assert sorted(forward) == stacked  # every stacked parameter, once per layer
    kernels = sorted(s for s in stacked if len(s) == 3)
    assert sorted(set(backward)) == kernels  # the matmuls' weights, gathered again
    assert sorted(s for c in gathers if c.runs == 1 for s in c.shapes) == outside

    # Gradients: every reduction over `fsdp` of a parameter-shaped tensor is a reduce-scatter.
    # Shapes up to order and unit dimensions: a kernel's gradient may be reduced transposed.
    squeezed = lambda s: tuple(sorted(d for d in s if d != 1))  # noqa: E731
    grads = {squeezed(s) for s in stacked} | {squeezed(s) for s in outside}
    reduced = []
    for c, factors in hlo.reduce_scatter_factors(compiled.as_text(), shape):
        if c.axes != ("fsdp",):
            continue
        for s, factor in zip(c.shapes, factors, strict=True):
            if math.prod(s) > 1:
                assert squeezed(s) in grads and factor == 4, (s, factor)
                reduced.append((squeezed(s), c.runs))
    per_layer = sorted(s for s, runs in reduced if runs == layers)
    assert per_layer == sorted(squeezed(s) for s in stacked)
    # Outside the loop: the tied embedding's two uses (lookup and head), the positions, the
    # final norm's scale and bias.
    once = sorted(s for s, runs in reduced if runs == 1)
    assert len(once) == len(outside) + 1 and set(once) == {squeezed(s) for s in outside}


def _assert_same_leaves(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "saved,restored",
    [(("fsdp=4,model=2", False), ("data=4,model=2", True)),
     (("data=4,model=2", True), ("fsdp=4,model=2", False))],
)  # fmt: skip
def test_checkpoint_moves_between_fsdp_and_the_distributed_optimizer(
    runs, tmp_path, saved, restored
):
    _, _, _, state = runs("gpt", *saved)
    ckpt = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    ckpt.save(STEPS, state, {"step": STEPS}, force=True)
    trainer = Trainer(_cfg("gpt", restored[1]), mesh.make(restored[0]))
    target = trainer.abstract_state()
    back, _ = ckpt.restore(STEPS, target, optional=trainer.optional_state())
    ckpt.close()
    for x, want in zip(jax.tree.leaves(back), jax.tree.leaves(target), strict=True):
        assert x.sharding.is_equivalent_to(want.sharding, x.ndim)
    before, after = jax.device_get(state), jax.device_get(back)
    _assert_same_leaves(after["params"], before["params"])
    _assert_same_leaves(after["opt_state"], before["opt_state"])


def test_fsdp_splits_the_batch_and_checks_it():
    assert mesh.resolve(mesh.parse("data=2,fsdp=4,model=1"), 8) == (1, 2, 4, 1, 1, 1)
    with pytest.raises(ConfigError, match=r"data degree 8 \(data x fsdp x expert"):
        Trainer(config.replace(_cfg("gpt"), train=dict(batch_size=4)), mesh.make("fsdp=8"))
    with pytest.raises(ConfigError, match="model.remat=selective does not combine with an fsdp"):
        Trainer(config.replace(_cfg("gpt"), model=dict(remat="selective")), mesh.make("fsdp=8"))
