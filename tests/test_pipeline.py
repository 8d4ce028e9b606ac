"""Pipeline parallelism: a (pipeline, data, model) mesh trains with the one-stage run's losses,
bubbles change nothing, the compiled step sends activations between stages and nothing else
over `pipeline`, and checkpoints do not depend on the pipeline degree.

An 8-layer tiny model (GPT-2, Llama or BERT), 16 sequences of 32 tokens in 8 micro-batches,
dropout on, 3 steps at the full learning rate from the first (no warmup): the second loss
tests the first step's gradients, the third the moments too. The reference is the
(data=2, model=4) mesh accumulating the same 8 micro-batches one after another.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bert_batch, bert_config, llama_config, real_batch, tiny_config
from flax import nnx

from megajax import config, hlo, mesh, pipeline_arithmetic
from megajax.attention import Attend
from megajax.checkpoint import Checkpointer
from megajax.config import ConfigError
from megajax.models.pipeline_schedule import pipeline_stack, scan_layers
from megajax.trainer import Trainer

LAYERS, BATCH, MICRO, STEPS, RTOL = 8, 16, 8, 3, 2e-4
VOCAB = 1100  # BERT's head too: no 30,522-row head run on every stage
REFERENCE = (1, 2, 4, 1)  # (pipeline, data, model, repeats)
CASES = [  # each mesh once, and v = 2 wherever 8 layers and 8 micro-batches allow it
    ("gpt", (2, 2, 2, 1)),
    ("gpt", (4, 1, 2, 2)),
    ("llama", (2, 1, 4, 2)),  # grouped-query attention, its 2 KV heads' weight split by rows
    ("gpt", (8, 1, 1, 1)),
    ("bert", (2, 2, 2, 2)),
    ("bert", (4, 1, 2, 1)),
]


def _config(arch, repeats=1):
    make = {"gpt": tiny_config, "llama": llama_config, "bert": bert_config}[arch]
    cfg = make(num_layers=LAYERS, dropout=0.1, vocab_size=VOCAB)
    return config.replace(
        cfg,
        train=dict(batch_size=BATCH, micro_batches=MICRO, pipeline_repeats=repeats),
        optim=dict(warmup_steps=0),
    )


def _mesh(p, d, m):
    return mesh.make(f"pipeline={p},data={d},model={m}", devices=jax.devices()[: p * d * m])


@pytest.fixture(scope="module")
def trainers():
    """A Trainer per (arch, layout), built once for the module."""
    cache = {}

    def get(arch, layout):
        if (arch, layout) not in cache:
            cache[arch, layout] = Trainer(_config(arch, layout[3]), _mesh(*layout[:3]))
        return cache[arch, layout]

    return get


@pytest.fixture(scope="module")
def compiled(trainers):
    """(trainer, compiled train step) per (arch, layout), compiled once for the module."""
    cache = {}

    def get(arch, layout):
        if (arch, layout) not in cache:
            trainer = trainers(arch, layout)
            cache[arch, layout] = trainer, trainer.compile_train_step()[0]
        return cache[arch, layout]

    return get


@pytest.fixture(scope="module")
def batches(shakespeare_tokens, bert_dataset):
    def gpt(step):
        inputs, targets = real_batch(
            shakespeare_tokens, step=step, batch_size=BATCH, seq_len=32, vocab_size=VOCAB
        )
        return {"inputs": inputs, "targets": targets}

    def bert(step):
        return bert_batch(bert_dataset, step=step, batch_size=BATCH, seq_len=32, vocab_size=VOCAB)

    made = {arch: [make(i) for i in range(STEPS)] for arch, make in (("gpt", gpt), ("bert", bert))}
    return {**made, "llama": made["gpt"]}


def _train(trainer, step_fn, batches, state=None):
    state = trainer.init_state() if state is None else state
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, trainer.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


@pytest.fixture(scope="module")
def reference(compiled, batches):
    """The one-stage run's losses, computed for an architecture when a test first asks."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _train(*compiled(arch, REFERENCE), batches[arch])[1]
        return cache[arch]

    return get


# Every schedule and mesh runs with GPT-2 in the inner loop; Llama and BERT, 5 of the file's 9
# compiled train steps with their references, are slow.
PARAMS = [
    pytest.param(
        arch,
        layout,
        id=f"{arch}-{'x'.join(map(str, layout))}",
        marks=[] if arch == "gpt" else [pytest.mark.slow],
    )
    for arch, layout in CASES
]


@pytest.mark.parametrize("arch,layout", PARAMS)
def test_losses_equal_the_one_stage_run(compiled, batches, reference, arch, layout):
    _, losses = _train(*compiled(arch, layout), batches[arch])
    np.testing.assert_allclose(losses, reference(arch), rtol=RTOL)


def test_bubble_inputs_filled_with_nan_change_no_loss_and_no_gradient(trainers):
    """The schedule alone, 4 stages x 2 rounds: its outputs equal the layers applied to each
    micro-batch in turn, and stage buffers starting as NaN change neither them nor a gradient."""
    trainer = trainers("gpt", (4, 1, 2, 2))
    cfg = trainer.cfg.model
    blocks = trainer.model(trainer.init_state()["params"]).h
    graphdef, state = nnx.split(blocks)
    xs = np.random.default_rng(1).standard_normal((MICRO, 2, cfg.seq_len, cfg.hidden), np.float32)

    def loss(state, xs, keys, fill):
        out, _ = pipeline_stack(
            graphdef, state, xs, attend=Attend(), keys=keys, remat="none", stages=4, repeats=2,
            fill=fill,
        )  # fmt: skip
        return jnp.mean(out**2), out

    def one_by_one(state, xs, keys):
        layers = lambda x, k: scan_layers(graphdef, state, x, attend=Attend(), keys=k, remat="none")  # noqa: E731
        return jax.vmap(layers)(xs, keys)[0]

    def schedule_and_reference(state, xs, fill):  # one program for both, and for both fills
        keys = jax.random.split(jax.random.key(2), (MICRO, LAYERS))
        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        return grad(state, xs, keys, fill), one_by_one(state, xs, keys)

    with trainer.context():
        run = jax.jit(schedule_and_reference)
        ((value, out), grads), expected = run(state, xs, 0.0)
        ((nan_value, nan_out), nan_grads), _ = run(state, xs, jnp.nan)
    assert np.isfinite(float(value)) and float(value) == float(nan_value)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, nan_out)
    for g, nan_g in zip(jax.tree.leaves(grads), jax.tree.leaves(nan_grads), strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g, nan_g)


def _audit(trainer, step_fn):
    return hlo.collectives(step_fn.as_text(), dict(trainer.mesh.shape))


@pytest.mark.parametrize("layout", [(2, 2, 2, 1), (4, 1, 2, 2)], ids=["2x2x2-v1", "4x1x2-v2"])
def test_stages_exchange_activation_sized_permutes_one_per_transfer(compiled, layout):
    trainer, step_fn = compiled("gpt", layout)
    p, d, _, v = layout
    permutes = [c for c in _audit(trainer, step_fn) if c.kind == "collective-permute"]
    share = (1, BATCH // MICRO // d, trainer.cfg.model.seq_len, trainer.cfg.model.hidden)
    over_pipeline = [c for c in permutes if c.axes == ("pipeline",)]
    assert over_pipeline and all(c.shapes == (share,) for c in over_pipeline)
    assert sum(c.runs for c in over_pipeline) == pipeline_arithmetic.transfers(p, v, MICRO)
    if v == 1:  # the circular schedule's stage order moves the weights (see README)
        assert over_pipeline == permutes


def test_no_layer_weight_crosses_pipeline_and_the_model_allreduces_are_unchanged(compiled):
    trainer, step_fn = compiled("gpt", (2, 2, 2, 1))
    found = _audit(trainer, step_fn)
    assert not [c for c in found if "pipeline" in c.axes and c.kind in ("all-gather", "all-to-all")]
    # Per layer and micro-batch pass: 2 forward + 2 backward all-reduces over `model` of one
    # stage's (1, micro-batch / data, length, hidden) activations, run once per tick and layer.
    share = (1, BATCH // MICRO // 2, trainer.cfg.model.seq_len, trainer.cfg.model.hidden)
    per_layer = [
        c for c in found if c.kind == "all-reduce" and c.axes == ("model",) and share in c.shapes
    ]
    ticks = pipeline_arithmetic.ticks(2, 1, MICRO)
    assert sorted(c.runs for c in per_layer) == [ticks * LAYERS // 2] * 4
    # Weights' gradients are reduced over `data` only; over `pipeline` go scalars (the gradient
    # norm) and activations (the micro-batches entering stage 0, the outputs of the last).
    for c in found:
        if c.kind == "all-reduce" and "pipeline" in c.axes:
            assert c.axes == ("pipeline",)
            assert all(s == () or s[-2:] == share[-2:] for s in c.shapes), c


def _unpadded(trainer, state):
    """The state on the host, the vocabulary's padding (which the model degree sets) cut off."""
    cut = lambda a: a[:VOCAB] if a.shape[:1] == (trainer.padded_vocab,) else a  # noqa: E731
    return jax.tree.map(cut, jax.device_get(state))


def test_checkpoint_saved_at_two_stages_resumes_at_one_and_four(
    compiled, batches, reference, tmp_path
):
    # Saved after one update, restored whole and exactly (parameters, moments, step count),
    # then trained on: the second loss reads the restored parameters, the third the moments.
    saved_at = 1
    trainer, step_fn = compiled("gpt", (2, 2, 2, 1))
    state, _ = _train(trainer, step_fn, batches["gpt"][:saved_at])
    saved = _unpadded(trainer, state)
    ckpt = Checkpointer(tmp_path, every=0, keep=1, async_save=False)
    ckpt.save(saved_at, state, {"step": saved_at}, force=True)
    ckpt.wait()
    for layout in (REFERENCE, (4, 1, 2, 2)):
        other, other_step = compiled("gpt", layout)
        restored, _ = ckpt.restore(saved_at, other.abstract_state())
        jax.tree.map(np.testing.assert_array_equal, _unpadded(other, restored), saved)
        _, losses = _train(other, other_step, batches["gpt"][saved_at:], restored)
        np.testing.assert_allclose(losses, reference("gpt")[saved_at:], rtol=RTOL)
    ckpt.close()


def test_layers_the_stages_cannot_split_are_refused():
    with pytest.raises(ConfigError, match="num_layers=6 does not split into pipeline=4"):
        Trainer(config.replace(_config("gpt"), model=dict(num_layers=6)), _mesh(4, 1, 2))
    with pytest.raises(ConfigError, match="pipeline=2 stages x train.pipeline_repeats=8"):
        Trainer(_config("gpt", repeats=8), _mesh(2, 2, 2))
    few = config.replace(_config("gpt", repeats=2), train=dict(micro_batches=2))
    with pytest.raises(ConfigError, match="circular repeats need at least one micro-batch"):
        Trainer(few, _mesh(4, 1, 2))
    with pytest.warns(UserWarning, match="the bubble is 60% of the step"):
        Trainer(config.replace(_config("gpt"), train=dict(micro_batches=2)), _mesh(4, 1, 2))


def test_schedule_arithmetic():
    assert pipeline_arithmetic.ticks(4, 1, 8) == 11 and pipeline_arithmetic.ticks(4, 2, 8) == 19
    assert pipeline_arithmetic.bubble_fraction(4, 1, 4) == pytest.approx(3 / 7)
    assert pipeline_arithmetic.bubble_fraction(4, 2, 4) == pytest.approx(3 / 11)
    assert (
        pipeline_arithmetic.bubble_fraction(1, 1, 4) == 0
        and pipeline_arithmetic.transfers(1, 1, 4) == 0
    )
    assert pipeline_arithmetic.transfers(2, 1, 8) == 20
    assert pipeline_arithmetic.transfer_bytes(2, 1024, 8192, 2) == 2 * 1024 * 8192 * 2
    assert pipeline_arithmetic.stage_chunks(2, 2).tolist() == [[0, 2], [1, 3]]
