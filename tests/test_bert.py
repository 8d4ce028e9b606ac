"""BERT computes what it claims: both layer-norm placements against a float64 NumPy layer,
padding that never reaches real positions, a masked-LM loss over masked positions only, and a
binary head that learns a separable case.

The pretraining models have a 1,100-token vocabulary (word pieces folded into it, bert_batch) and
are the ones tests/test_parallel_equivalence.py and tests/test_distributed_optimizer.py train, so
that a run compiles their initialisations and train step once; the multiple-choice model is
tests/test_race.py's."""

import jax
import numpy as np
import pytest
from conftest import bert_batch, bert_config, device_mesh
from flax import nnx
from scipy.special import erf

from megajax import config
from megajax.attention import Attend
from megajax.block import Block
from megajax.models import bert
from megajax.trainer import Trainer


def _numpy_layer(p, x, keys, *, post, eps, heads):
    """One encoder layer in float64: Devlin et al.'s order (post) or the paper's (pre)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def ln(x, q):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * q["scale"] + q[
            "bias"
        ]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    def attention(x):
        b, s, h = x.shape
        qkv = dense(x, p["attn"]["qkv"]).reshape(b, s, heads, 3, h // heads)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(h // heads)
        scores = np.where(keys[:, None, None, :], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return dense(np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h), p["attn"]["proj"])

    def mlp(x):
        y = dense(x, p["mlp"]["fc1"])
        return dense(0.5 * y * (1 + erf(y / np.sqrt(2))), p["mlp"]["fc2"])

    if post:
        y = ln(x + attention(x), p["ln_1"])
        return ln(y + mlp(y), p["ln_2"])
    y = x + attention(ln(x, p["ln_1"]))
    return y + mlp(ln(y, p["ln_2"]))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_layer_norm_placements_compute_their_formula(placement):
    cfg = bert_config(layernorm_placement=placement, dropout=0.0)
    trainer = Trainer(cfg, device_mesh(1, 1))
    with trainer.context():
        graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Block(cfg.model, rngs=nnx.Rngs(3))))
    # Random weights and biases drawn on the host (nothing to compile), and non-trivial layer
    # norms, so that their place matters.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), nnx.to_pure_dict(shapes)
    )
    for norm in (params["ln_1"], params["ln_2"]):
        norm["scale"] = 1 + 0.3 * rng.standard_normal(cfg.model.hidden).astype(np.float32)
        norm["bias"] = 0.3 * rng.standard_normal(cfg.model.hidden).astype(np.float32)
    x = rng.standard_normal((2, 16, cfg.model.hidden)).astype(np.float32)
    keys = np.arange(16)[None, :] < np.array([[16], [11]])  # the second row is padded
    with trainer.context():
        nnx.replace_by_pure_dict(shapes, params)
        layer = lambda p, x, m: nnx.merge(graphdef, p)(x, attend=Attend(padding=m), key=None)  # noqa: E731
        block = jax.jit(layer)
        out = block(shapes, x, keys)
    expected = _numpy_layer(
        params, x, keys, post=placement == "post", eps=cfg.model.layernorm_eps, heads=8
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    other = _numpy_layer(
        params, x, keys, post=placement != "post", eps=cfg.model.layernorm_eps, heads=8
    )
    assert np.abs(expected - other).max() > 0.1  # the two orders differ on this case


VOCAB = 1100  # the pretraining models' vocabulary: word pieces folded into it (bert_batch)


@pytest.fixture(scope="module")
def pretrained_init():
    """placement -> (trainer, initial parameters) of the BERT tests/test_parallel_equivalence.py
    trains on 2 x 4 (the same initialisation program, compiled once)."""
    done = {}

    def get(placement):
        if placement not in done:
            cfg = bert_config(layernorm_placement=placement, vocab_size=VOCAB)
            trainer = Trainer(cfg, device_mesh(2, 4))
            done[placement] = trainer, trainer.init_state()["params"]
        return done[placement]

    return get


def _hidden(trainer, params, *batches):
    """The encoder's output for each batch (one program, traced once)."""
    with trainer.context():
        f = jax.jit(lambda p, b: trainer.model(p)(b["tokens"], b["token_types"], b["padding_mask"]))
        return [np.asarray(f(params, trainer.put_eval_batch(b))) for b in batches]


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_padding_never_changes_real_positions(bert_dataset, pretrained_init, placement):
    trainer, params = pretrained_init(placement)
    batch = bert_batch(bert_dataset, step=0, batch_size=8, seq_len=32, vocab_size=VOCAB)
    # Shorten the pairs to 8..31 tokens: [SEP] at the end, padding after it.
    lengths = np.random.default_rng(0).integers(8, 32, 8)
    real = np.arange(32)[None, :] < lengths[:, None]
    batch["tokens"] = np.where(real, batch["tokens"], 0)
    batch["tokens"][np.arange(8), lengths - 1] = 102
    batch["padding_mask"] = real.astype(np.int32)
    noisy = dict(batch)
    rng = np.random.default_rng(1)
    noisy["tokens"] = np.where(real, batch["tokens"], rng.integers(0, VOCAB, real.shape))
    noisy["token_types"] = np.where(real, batch["token_types"], 1)
    a, b = _hidden(trainer, params, batch, noisy)
    np.testing.assert_allclose(a[real], b[real], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[~real], b[~real])


def test_masked_lm_loss_counts_only_masked_positions(bert_dataset, pretrained_init):
    trainer, params = pretrained_init("pre")
    batch = bert_batch(bert_dataset, step=1, batch_size=8, seq_len=32, vocab_size=VOCAB)

    def objective_and_logits(p, b):  # the objective without dropout, and every logit gathered
        model = trainer.model(p)
        h = model.mlm(model(b["tokens"], b["token_types"], b["padding_mask"]))
        return trainer.loss(p, b, None)[1], h @ model.wte.embedding[...].T + model.mlm.bias[...]

    with trainer.context():
        f = jax.jit(objective_and_logits)
        metrics, logits = jax.device_get(f(params, trainer.put_eval_batch(batch)))
    logits = np.asarray(logits, np.float64)[..., :VOCAB]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    where = batch["labels"] != bert.IGNORE
    assert 0 < where.sum() < (batch["padding_mask"] == 1).sum() / 4
    picked = np.take_along_axis(logp, np.maximum(batch["labels"], 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(metrics["mlm_loss"], -picked[where].mean(), rtol=1e-5)
    accuracy = (logits.argmax(-1) == batch["labels"])[where].mean()
    np.testing.assert_allclose(metrics["mlm_accuracy"], accuracy, rtol=1e-6)


def test_binary_head_learns_a_separable_case(bert_dataset):
    """The sentence label is whether the words of the pair are all 'the' or all 'a': 40 steps
    of the pretraining recipe (dropout on, its warmup) must separate it. The model and its
    train step are tests/test_parallel_equivalence.py's one-device reference."""
    trainer = Trainer(bert_config(vocab_size=VOCAB), device_mesh(1, 1))
    state = trainer.init_state()
    step_fn, _ = trainer.compile_train_step()
    the, a = 1996 % VOCAB, 1037  # 'the' and 'a' in the BERT vocabulary, folded as bert_batch does
    for step in range(40):
        batch = bert_batch(bert_dataset, step=step, batch_size=8, seq_len=32, vocab_size=VOCAB)
        label = np.random.default_rng(step).integers(0, 2, 8)
        words = (batch["tokens"] > 102) & (batch["padding_mask"] == 1)  # not [CLS], [SEP]
        batch["tokens"] = np.where(words, np.where(label == 1, the, a)[:, None], batch["tokens"])
        batch["sentence_label"] = label.astype(np.int32)
        state, metrics = step_fn(state, trainer.put_batch(batch))
    assert float(metrics["sop_accuracy"]) == 1.0 and float(metrics["sop_loss"]) < 0.1, metrics


def test_multiple_choice_scores_each_option_of_a_question():
    cfg = bert_config(arch="bert_multiple_choice", seq_len=64)  # tests/test_race.py's model
    assert cfg.model.num_choices == 4
    trainer = Trainer(cfg, device_mesh(2, 4))
    params = trainer.init_state()["params"]
    rng = np.random.default_rng(0)
    shape = (8, 4, 64)
    batch = {
        "tokens": rng.integers(1000, 30000, shape).astype(np.int32),
        "token_types": np.zeros(shape, np.int32),
        "padding_mask": np.ones(shape, np.int32),
        "label": rng.integers(0, 4, 8).astype(np.int32),
    }
    with trainer.context():
        on_device = trainer.put_eval_batch(batch)
        logits = np.asarray(
            jax.jit(lambda p, b: bert.choice_logits(trainer.model(p), b))(params, on_device)
        )
        value, metrics = jax.jit(lambda p, b: trainer.loss(p, b, None))(params, on_device)
        # Option 2 of question 0 alone, as a batch of one-option questions: the same score.
        single = {k: v[:, 2:3] if v.ndim == 3 else v * 0 for k, v in batch.items()}
        one = config.replace(cfg, model=dict(num_choices=1))
        alone = Trainer(one, device_mesh(2, 4))
        with alone.context():
            f = jax.jit(lambda p, b: bert.choice_logits(alone.model(p), b))
            score = np.asarray(f(params, alone.put_eval_batch(single)))
    np.testing.assert_allclose(score[:, 0], logits[:, 2], rtol=1e-5, atol=1e-6)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss = -logp[np.arange(8), batch["label"]].mean()
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == batch["label"]).mean())
    np.testing.assert_allclose(float(value), loss, rtol=1e-5)
