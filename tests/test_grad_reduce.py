"""optim.grad_reduce="step": every gradient is summed over the batch axes once per step, after
the micro-batch loop, in float32 by default; with the distributed optimizer as a true
reduce-scatter onto the master shards. The losses, gradients and parameters are those of the
default path, which sums each micro-batch's gradients as its backward pass makes them.

Read from the compiled HLO of a 2 x 4 (data x model) mesh: a GPT-2 and a Llama whose kv weight
is split by rows (2 key/value heads on 4 model shards), both with sequence parallelism; and LoRA
on a GPT-2 without it and on that Llama."""

import math

import jax
import numpy as np
import pytest
from conftest import (
    bert_batch,
    bert_config,
    device_mesh,
    llama_config,
    real_batch,
    tiny_config,
)
from test_context import SEQ, _packed_rows

from megajax import config, dropout, hlo, mesh, parallel
from megajax.config import ConfigError
from megajax.trainer import Trainer

DATA, MODEL = 2, 4
STEPS = 3
LORA = dict(rank=4, alpha=8.0, dropout=0.1, targets="qkv,proj,fc1,fc2")
MODELS = {
    "gpt-sp": lambda: tiny_config(dropout=0.1, sequence_parallel=True),
    "llama-sp-kv-rows": lambda: llama_config(dropout=0.1, sequence_parallel=True),
    # LoRA on every projection: the A of the column-parallel layers and the B of the
    # row-parallel ones are whole on every model shard, with or without sequence parallelism.
    "gpt-lora": lambda: config.replace(tiny_config(dropout=0.1), lora=LORA),
    "llama-sp-kv-rows-lora": lambda: config.replace(
        llama_config(dropout=0.1, sequence_parallel=True), lora=LORA
    ),
}


def _cfg(kind, *, reduce, micro=4, distributed=False, **model):
    cfg = MODELS[kind]()
    return config.replace(
        cfg,
        model=model,
        # two rows per data shard and micro-batch at most: 16 rows for 8 micro-batches
        train=dict(micro_batches=micro, batch_size=max(8, 2 * DATA * micro)),
        optim=dict(grad_reduce=reduce, distributed=distributed),
    )


@pytest.fixture(scope="module")
def compiled():
    """(kind, reduce, micro, distributed, model overrides) -> (trainer, compiled step)."""
    cache = {}

    def get(kind, reduce, micro=4, distributed=False, **model):
        key = (kind, reduce, micro, distributed, tuple(sorted(model.items())))
        if key not in cache:
            cfg = _cfg(kind, reduce=reduce, micro=micro, distributed=distributed, **model)
            trainer = Trainer(cfg, device_mesh(DATA, MODEL))
            cache[key] = trainer, trainer.compile_train_step()[0]
        return cache[key]

    return get


def _batch_reductions(trainer, step):
    """(kind, elements per run, bytes per element, runs) of each all-reduce and
    reduce-scatter over `data` in a compiled step (or HLO text): the gradients' sums (and,
    with the distributed optimizer, the gradient norm's scalar pieces)."""
    text = step if isinstance(step, str) else step.as_text()
    return [
        (c.kind, c.elements, c.bytes // max(c.elements, 1), c.runs)
        for c in hlo.collectives(text, dict(trainer.mesh.shape))
        if "data" in c.axes and c.kind in ("all-reduce", "reduce-scatter")
    ]


def _parameter_elements(trainer, copied=False):
    """Elements of every trainable parameter as one device computes with it (split over
    `model`); `copied`: of those alone that take one copy per model shard."""
    params = trainer.split(trainer.abstract_state()["params"])[0]
    shardings = trainer.split(trainer.compute_sharding)[0]
    with trainer.context():
        at = trainer.model_copy_axes()
    return sum(
        math.prod(s.shard_shape(p.shape))
        for p, s, a in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(shardings),
            jax.tree.leaves(at, is_leaf=lambda x: x is None),
            strict=True,
        )
        if a is not None or not copied
    )


def _counts(found):
    return sum(runs for *_, runs in found), sum(n * runs for _, n, _, runs in found)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gradients_summed_over_data_once_per_step_whatever_the_micro_batches(compiled, kind):
    """(collectives run, elements summed) over `data` per step: the same at 1 and 8
    micro-batches, every parameter's gradient summed exactly once; the default path runs its
    sums once per micro-batch."""
    counts = {}
    for reduce in ("micro_batch", "step"):
        for micro in (1, 8):
            trainer, step = compiled(kind, reduce, micro)
            counts[reduce, micro] = _counts(_batch_reductions(trainer, step))
    elements = _parameter_elements(trainer)
    assert counts["step", 1] == counts["step", 8], counts
    # Each parameter's gradient once, plus the step's loss (a scalar that XLA combines in).
    assert elements <= counts["step", 8][1] <= elements + 2, (counts, elements)
    assert counts["micro_batch", 8][0] > counts["micro_batch", 1][0], counts
    assert counts["micro_batch", 8][1] >= 8 * elements, (counts, elements)


def test_distributed_optimizer_reduce_scatters_each_gradient_once(compiled):
    """Under sequence parallelism and the distributed optimizer, each split parameter's
    gradient is one true reduce-scatter over `data` after the loop, onto its master shard;
    the parameters left whole over `data` share one all-reduce. The default path all-reduces
    each micro-batch's gradients whole and slices them (no reduce-scatter at all)."""
    trainer, step = compiled("gpt-sp", "step", 4, True)
    found = _batch_reductions(trainer, step)
    scatters = [f for f in found if f[0] == "reduce-scatter"]
    split = [
        leaf
        for leaf in jax.tree.leaves(trainer.state_sharding["params"])
        if "data" in jax.tree.leaves(tuple(leaf.spec))
    ]
    assert len(scatters) == len(split) and all(runs == 1 for *_, runs in scatters), found
    assert all(runs == 1 for *_, runs in found), found
    old_trainer, old_step = compiled("gpt-sp", "micro_batch", 4, True)
    old = _batch_reductions(old_trainer, old_step)
    assert not [f for f in old if f[0] == "reduce-scatter"]
    assert max(runs for *_, runs in old) >= 4  # inside the loop (and the layer scan)


def _gradient_shapes(trainer) -> set[tuple[int, ...]]:
    """Each trainable parameter's shape as one device computes with it (split over `model`),
    whole and one layer's, leading 1s dropped: the shapes a gradient sum can have."""
    shapes = set()
    for p, s in zip(
        jax.tree.leaves(trainer.split(trainer.abstract_state()["params"])[0]),
        jax.tree.leaves(trainer.split(trainer.compute_sharding)[0]),
        strict=True,
    ):
        shard = s.shard_shape(p.shape)
        shapes |= {_squeezed(shard), _squeezed(shard[1:])}
    return shapes - {()}


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(shape[next((i for i, d in enumerate(shape) if d != 1), len(shape)) :])


def _model_gradient_sums(trainer, step):
    """{"sums": (runs, elements), "gathers": (runs, elements)} of the all-reduces and
    reduce-scatters, and of the all-gathers, over `model` in a compiled step with a result of
    a parameter's shape: the gradients' sums (a tuple all-reduce may hold the default path's
    LoRA A of q and kv side by side), and the gathers of weights or of gradients (the
    activations' collectives have the micro-batch's rows and length in theirs)."""
    shapes = _gradient_shapes(trainer)
    found = [
        c
        for c in hlo.collectives(step.as_text(), dict(trainer.mesh.shape))
        if "model" in c.axes and any(_squeezed(s) in shapes for s in c.shapes)
    ]
    out = {}
    for name, kinds in (("sums", ("all-reduce", "reduce-scatter")), ("gathers", ("all-gather",))):
        mine = [c for c in found if c.kind in kinds]
        out[name] = sum(c.runs for c in mine), sum(c.runs * c.elements for c in mine)
    return out


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gradients_summed_over_model_once_per_step_whatever_the_micro_batches(compiled, kind):
    """The gradients that are sums over the `model` shards (under sequence parallelism the
    norms, row-parallel biases and position table; the kv weight split by rows; LoRA factors
    whole over `model`): each shard
    differentiates its own copy, summed once after the loop, so their sums over `model` are
    the same at 1 and 8 micro-batches, each such parameter's once; the default path sums them
    once per micro-batch (and layer)."""
    counts = {}
    for reduce in ("micro_batch", "step"):
        for micro in (1, 8):
            trainer, step = compiled(kind, reduce, micro)
            counts[reduce, micro] = _model_gradient_sums(trainer, step)
    copied = _parameter_elements(trainer, copied=True)
    assert copied, "no parameter is summed over model"
    # The same at 1 and 8: the sums, and the gathers (the kv weight's copies, made once).
    assert counts["step", 1] == counts["step", 8], counts
    # Each copied parameter's gradient once, where the model shards hold it (whole, or the
    # rows of the kv weight).
    assert counts["step", 8]["sums"][1] == copied, (counts, copied)
    assert counts["micro_batch", 8]["sums"][0] >= 8 * counts["step", 8]["sums"][0], counts


@pytest.mark.parametrize("switch,itemsize", [("float32", 4), ("compute", 2)])
def test_bfloat16_gradients_summed_in_float32_unless_told(switch, itemsize):
    """Read from the program as lowered, before XLA optimizes it: XLA:CPU itself promotes
    every 16-bit all-reduce to float32 (its AllReducePromotion pass), so on CPU the optimized
    program sums in float32 either way; a GPU's sums keep the dtype lowered here."""
    cfg = _cfg("gpt-sp", reduce="step", micro=2, compute_dtype="bfloat16")
    cfg = config.replace(cfg, optim=dict(grad_reduce_dtype=switch))
    trainer = Trainer(cfg, device_mesh(DATA, MODEL))
    with trainer.context():
        lowered = jax.jit(trainer._train_step).lower(
            trainer.abstract_state(), trainer.abstract_batch(micro=True)
        )
    found = _batch_reductions(trainer, lowered.as_text(dialect="hlo"))
    assert sorted(kind for kind, *_ in found) == ["all-reduce"] * len(found)
    elements = _parameter_elements(trainer)
    assert _counts(found)[1] == elements, found
    assert {size for *_, size, _ in found} == {itemsize}, found


def _train(trainer, step, tokens):
    """(loss and gradient norm of each of STEPS steps on real text, final parameters)."""
    m, state, metrics = trainer.cfg.model, trainer.init_state(), []
    for i in range(STEPS):
        rows = trainer.cfg.train.batch_size
        shape = dict(batch_size=rows, seq_len=m.seq_len, vocab_size=m.vocab_size)
        x, y = real_batch(tokens, step=i, **shape)
        state, out = step(state, trainer.put_batch({"inputs": x, "targets": y}))
        metrics.append([float(out["loss"]), float(out["grad_norm"])])
    return np.array(metrics), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def trained(compiled, shakespeare_tokens):
    """(kind, reduce, distributed) -> (losses and gradient norms per step, final params)."""
    cache = {}

    def get(kind, reduce, distributed):
        key = (kind, reduce, distributed)
        if key not in cache:
            cache[key] = _train(*compiled(kind, reduce, 4, distributed), shakespeare_tokens)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "kind,distributed",
    [
        pytest.param(
            kind, distributed, id=f"{kind}-{'distributed' if distributed else 'replicated'}"
        )
        for kind in sorted(MODELS)
        for distributed in (False, True)
        if not (distributed and "lora" in kind)  # the reduce-scatter path: the cases without
    ],
)
def test_losses_gradients_and_params_equal_the_default_path(trained, kind, distributed):
    """Dropout on, 4 micro-batches, 3 steps: the loss and gradient norm of every step and the
    parameters after the last (which the clipped gradients of all three moved) match."""
    ref_metrics, ref_params = trained(kind, "micro_batch", False)
    metrics, params = trained(kind, "step", distributed)
    assert MODELS[kind]().model.dropout > 0
    np.testing.assert_allclose(metrics, ref_metrics, rtol=2e-4)
    assert ref_metrics[-1, 0] != ref_metrics[0, 0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params
    )


def _assert_same_training(ours, reference):
    """(per-step metrics, final parameters) of two runs: equal to 2e-4."""
    np.testing.assert_allclose(ours[0], reference[0], rtol=2e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), ours[1], reference[1]
    )


def test_packed_documents_weigh_each_shard_by_its_scored_tokens(shakespeare_tokens):
    """Packed documents (each its own positions; a prompt's first targets unscored) under
    sequence parallelism: each batch shard's mean counts as many of its micro-batch's scored
    tokens as it holds, so the losses and parameters after 2 steps (dropout on, 4
    micro-batches) equal the default path's; the position table's copies read each token's
    own position."""
    rng = np.random.default_rng(0)
    batches = [_packed_rows(shakespeare_tokens, rng, 16) for _ in range(2)]
    counts = batches[0]["weights"].reshape(4, DATA, -1).sum(-1)  # (micro-batch, shard)
    assert (counts[:, 0] != counts[:, 1]).any()  # shards of unequal weight
    runs = {}
    for reduce in ("micro_batch", "step"):
        cfg = _cfg("gpt-sp", reduce=reduce, seq_len=SEQ)
        trainer = Trainer(config.replace(cfg, data=dict(format="chat")), device_mesh(DATA, MODEL))
        step, state, losses = trainer.compile_train_step()[0], trainer.init_state(), []
        for batch in batches:
            state, out = step(state, trainer.put_batch(batch))
            losses.append(float(out["loss"]))
        runs[reduce] = losses, jax.device_get(state["params"])
    _assert_same_training(runs["step"], runs["micro_batch"])


def test_bert_masked_means_weigh_each_shard_by_its_scored_positions(bert_dataset):
    """BERT (masked LM over its masked positions, sentence order over its pairs): each batch
    shard's means are its share of the micro-batch's (loss.weighted_mean), so the losses and
    parameters after 2 steps (dropout on, 4 micro-batches) equal the default path's."""
    runs = {}
    for reduce in ("micro_batch", "step"):
        cfg = bert_config(dropout=0.1)
        cfg = config.replace(
            cfg, train=dict(micro_batches=4, batch_size=16), optim=dict(grad_reduce=reduce)
        )
        trainer = Trainer(cfg, device_mesh(DATA, MODEL))
        step, state, losses = trainer.compile_train_step()[0], trainer.init_state(), []
        m = cfg.model
        for i in range(2):
            batch = bert_batch(
                bert_dataset, step=i, batch_size=16, seq_len=m.seq_len, vocab_size=m.vocab_size
            )
            state, out = step(state, trainer.put_batch(batch))
            losses.append([float(out["loss"]), float(out["grad_norm"])])
        runs[reduce] = np.array(losses), jax.device_get(state["params"])
    _assert_same_training(runs["step"], runs["micro_batch"])


def test_a_shards_dropout_bits_are_the_whole_batchs_rows():
    """Each batch shard's trace (a vmap over the shards, parallel.per_batch_shard) drops what
    the whole batch's dropout drops at its rows."""
    key = jax.random.fold_in(jax.random.key(3), 7)
    x = jax.numpy.ones((8, 3, 5, 7))

    def one_shard(rows):
        with parallel.per_batch_shard("shards"):
            return dropout.dropout(rows, 0.1, key)

    shards = jax.vmap(one_shard, axis_name="shards")(x.reshape(4, 2, 3, 5, 7))
    np.testing.assert_array_equal(shards.reshape(x.shape), dropout.dropout(x, 0.1, key))


def test_switch_values_and_what_it_does_not_cover_are_refused():
    with pytest.raises(ConfigError, match="optim.grad_reduce="):
        config.replace(tiny_config(), optim=dict(grad_reduce="once"))
    with pytest.raises(ConfigError, match="optim.grad_reduce_dtype="):
        config.replace(tiny_config(), optim=dict(grad_reduce_dtype="bfloat16"))
    moe = config.replace(tiny_config(moe_experts=4), optim=dict(grad_reduce="step"))
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        Trainer(moe, device_mesh(DATA, MODEL))
    step = config.replace(tiny_config(), optim=dict(grad_reduce="step"))
    with pytest.raises(ConfigError, match="an fsdp axis"):
        Trainer(step, mesh.make("fsdp=2,model=4", devices=jax.devices()[:8]))
