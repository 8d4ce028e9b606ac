"""Tensor and data parallelism change where numbers are computed, not the numbers (GPT-2, BERT
and a Llama-style decoder); sequence parallelism, recomputation, the distributed optimizer and
float16 change memory and communication, not the losses.

Each model is trained for STEPS steps with dropout on, from its own sharded initialisation, on
one device (the reference) and on each mesh; every run compiles one train step and nothing else.
The first step's gradients are read from the optimizer: Adam's first moment after one step is
(1 - beta1) times the clipped gradient, and the clipping factor follows from the gradient norm,
which is compared too. BERT's vocabulary is 1,100 word pieces (bert_batch folds the others into
it), padded differently on each model degree like GPT-2's; tests/test_bert.py and
tests/test_distributed_optimizer.py use the same models, so that a run compiles each once.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from conftest import bert_batch, bert_config, device_mesh, llama_config, real_batch, tiny_config

from megajax import config
from megajax.trainer import Trainer

STEPS = 4
VOCAB = 1100  # BERT's, as tiny_config's
# Each model on one device (the reference) and on the meshes it is compared on.
MESHES = {
    "gpt": [(8, 1), (2, 4), (4, 2), (1, 8)],
    "llama": [(2, 4), (4, 2), (1, 8)],
    "bert-pre": [(2, 4), (1, 8)],
    "bert-post": [(2, 4), (4, 2)],
}


@dataclasses.dataclass
class Run:
    metrics: list[dict]  # per step: loss, grad_norm and the objective's metrics
    grads: dict  # the first step's clipped gradients, the vocabulary's padding rows cut off
    params: dict  # after STEPS steps, padding rows cut off
    temporaries: int  # bytes of the compiled step's temporaries


def _setup(kind, shakespeare_tokens, bert_dataset):
    """A config with dropout on and STEPS batches of real text for it."""
    if kind in ("gpt", "llama"):
        cfg = tiny_config() if kind == "gpt" else llama_config()
        m = cfg.model
        shape = dict(batch_size=cfg.train.batch_size, seq_len=m.seq_len, vocab_size=m.vocab_size)
        pairs = [real_batch(shakespeare_tokens, step=i, **shape) for i in range(STEPS)]
        return cfg, [{"inputs": x, "targets": y} for x, y in pairs]
    cfg = bert_config(layernorm_placement=kind.split("-")[1], vocab_size=VOCAB)
    shape = dict(batch_size=8, seq_len=cfg.model.seq_len, vocab_size=VOCAB)
    return cfg, [bert_batch(bert_dataset, step=i, **shape) for i in range(STEPS)]


def _unpad(tree, vocab_size: int):
    """The real vocabulary rows of the vocabulary-padded leaves."""
    tree = jax.device_get(tree)
    tree["wte"]["embedding"] = tree["wte"]["embedding"][:vocab_size]
    if "head" in tree:
        tree["head"] = tree["head"][:vocab_size]
    if "mlm" in tree:
        tree["mlm"]["bias"] = tree["mlm"]["bias"][:vocab_size]
    return tree


def _run(cfg, data, model, batches) -> Run:
    trainer = Trainer(cfg, device_mesh(data, model))
    state = trainer.init_state()
    step_fn, _ = trainer.compile_train_step()
    metrics, grads = [], None
    for batch in batches:
        state, m = step_fn(state, trainer.put_batch(batch))
        metrics.append({k: float(v) for k, v in m.items() if k != "learning_rate"})
        if grads is None:
            first_moment = jax.device_get(optax.tree.get(state["opt_state"], "mu"))
            grads = jax.tree.map(lambda mu: mu / (1 - cfg.optim.beta1), first_moment)
            grads = _unpad(grads, cfg.model.vocab_size)
    params = _unpad(state["params"], cfg.model.vocab_size)
    return Run(metrics, grads, params, step_fn.memory_analysis().temp_size_in_bytes)


@pytest.fixture(scope="module")
def runs(shakespeare_tokens, bert_dataset):
    """(kind, mesh, switch) -> Run, each run once; switch None is the plain config."""
    done = {}

    def get(kind, mesh, switch=None):
        if (kind, mesh, switch) not in done:
            cfg, batches = _setup(kind, shakespeare_tokens, bert_dataset)
            if switch is not None:
                cfg = config.replace(cfg, **dict(SWITCHES)[switch][1])
            done[kind, mesh, switch] = _run(cfg, *mesh, batches)
        return done[kind, mesh, switch]

    return get


def _cases(rows):
    """pytest params of (kind, ...) rows; BERT's, the largest programs, marked slow."""
    slow = pytest.mark.slow
    return [pytest.param(*row, marks=slow if row[0].startswith("bert") else ()) for row in rows]


@pytest.mark.parametrize(
    "kind,data,model", _cases((kind, *mesh) for kind, meshes in MESHES.items() for mesh in meshes)
)
def test_metrics_grads_and_params_identical_across_meshes(runs, kind, data, model):
    ref, ours = runs(kind, (1, 1)), runs(kind, (data, model))
    for mine, theirs in zip(ours.metrics, ref.metrics, strict=True):
        assert mine.keys() == theirs.keys()
        for k in mine:
            np.testing.assert_allclose(
                mine[k], theirs[k], rtol=2e-5 if "norm" in k else 2e-6, err_msg=k
            )
    if not kind.startswith("bert"):  # BERT's steps are still in its warmup: no clear fall yet
        assert ref.metrics[-1]["loss"] < ref.metrics[0]["loss"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7), ours.grads, ref.grads
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
        ours.params,
        ref.params,
    )


def test_first_moments_are_the_gradients(runs, shakespeare_tokens):
    """The reading of the gradients above: after one step, Adam's first moment over (1 - beta1)
    equals the gradient of the loss (clipped), computed here without the optimizer."""
    cfg, batches = _setup("gpt", shakespeare_tokens, None)
    trainer = Trainer(cfg, device_mesh(1, 1))
    state = trainer.init_state()
    with trainer.context():
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)  # step 0's dropout key
        key = jax.random.fold_in(key, 0)  # its only micro-batch
        loss = lambda p, b: trainer.loss(p, b, key)[0]  # noqa: E731
        grads = jax.jit(jax.grad(loss))(state["params"], trainer.put_eval_batch(batches[0]))
    grads = _unpad(grads, cfg.model.vocab_size)  # on the host: the norm compiles nothing
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    clipped = jax.tree.map(lambda g: g * min(1.0, cfg.optim.clip_norm / norm), grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
        runs("gpt", (1, 1)).grads,
        clipped,
    )


# Sequence parallelism, recomputation, the distributed optimizer and float16 against the same
# model without them on 2 x 4: each row (name, (mesh, config sections changed)); "all" turns on
# three (SP, selective recomputation, the distributed optimizer).
ALL_THREE = dict(sequence_parallel=True, remat="selective")
SWITCHES = [
    ("sequence-parallel", ((2, 4), dict(model=dict(sequence_parallel=True)))),
    ("remat-selective", ((2, 4), dict(model=dict(remat="selective")))),
    ("remat-full", ((2, 4), dict(model=dict(remat="full")))),
    ("all-2x4", ((2, 4), dict(model=ALL_THREE, optim=dict(distributed=True)))),
    ("all-4x2", ((4, 2), dict(model=ALL_THREE, optim=dict(distributed=True)))),
    ("sp-full-1x8", ((1, 8), dict(model=dict(sequence_parallel=True, remat="full")))),
    # float16 matmuls, loss scaled from a scale that does not overflow at once: the same
    # losses to float16's rounding (GPT-2's float16 run is tests/test_loss_scale.py's).
    ("float16", ((2, 4), dict(model=dict(compute_dtype="float16"),
                              optim=dict(initial_loss_scale=2.0**12)))),
]  # fmt: skip
# Every row for GPT-2 (but float16); for BERT one row that combines the switches per layer-norm
# placement; for the Llama-style decoder all three switches on 2 x 4 (its key/value weight split
# by rows), and float16.
SWITCH_CASES = [("gpt", name) for name, _ in SWITCHES if name != "float16"] + [
    ("bert-pre", "all-4x2"),
    ("bert-post", "sp-full-1x8"),
    ("llama", "all-2x4"),
    ("llama", "float16"),
]


@pytest.mark.parametrize("kind,name", _cases(SWITCH_CASES))
def test_losses_identical_with_sequence_parallelism_and_recomputation(runs, kind, name):
    mesh, _ = dict(SWITCHES)[name]
    losses = [m["loss"] for m in runs(kind, mesh, name).metrics]
    reference = [m["loss"] for m in runs(kind, (2, 4)).metrics]
    np.testing.assert_allclose(losses, reference, rtol=2e-3 if name == "float16" else 2e-4)


@pytest.mark.parametrize("name", ["remat-selective", "remat-full"])
def test_recomputation_leaves_the_loss_and_gradients_unchanged(runs, name):
    """Recomputing in the backward pass gives the first step's loss and gradients of the step
    without it, to float32's rounding (the losses of every step: the test above)."""
    ours, ref = runs("gpt", (2, 4), name), runs("gpt", (2, 4))
    np.testing.assert_allclose(ours.metrics[0]["loss"], ref.metrics[0]["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours.grads, ref.grads
    )


def test_compiled_temporaries_shrink_from_none_to_selective_to_full(runs):
    none, selective, full = (
        runs("gpt", (2, 4), name).temporaries for name in (None, "remat-selective", "remat-full")
    )
    assert none > selective > full, (none, selective, full)
