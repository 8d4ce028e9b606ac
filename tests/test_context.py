"""Context parallelism: a sequence split over the `context` mesh axis trains with the unsplit
run's losses and gradients, moves K and V by one all-gather per layer (and its reduce-scatter
backward), and never holds a full-length activation.

Each case trains its model for STEPS steps with dropout on (residual and attention: both
exact, dropout.bernoulli_at) on one device and on a context mesh. The first step's
gradients are read from Adam's first moment (tests/test_parallel_equivalence.py). The length,
48, is no other size of these models, so that the audit can tell a full-length buffer by its
shape. CORES lists the attention cores under test: a new core is one more entry.
"""

import dataclasses
import math
import re

import jax
import numpy as np
import optax
import pytest
from conftest import bert_batch, bert_config, llama_config, real_batch, tiny_config

from megajax import config, context_attention, dropout, hlo, mesh, parallel
from megajax.config import ConfigError
from megajax.sharded_model import ShardedModel
from megajax.trainer import Trainer

STEPS, SEQ, VOCAB = 3, 48, 1100
CORES = ["allgather", "ring"]
# Each property once: learned positions with tensor and sequence parallelism and selective
# recomputation; RoPE with grouped-query attention (2 kv heads for 16 query heads) beside
# data parallelism; packed documents; pipeline stages (the one-device reference accumulates
# the same micro-batches), GPipe and 1F1B; bidirectional BERT with its padding.
# The pipeline cases: 4 layers in 2 stages, 4 micro-batches of 2 sequences.
PIPELINE = dict(num_layers=4), dict(micro_batches=4)
ONE_F_ONE_B = dict(num_layers=4), dict(micro_batches=4, pipeline_schedule="1f1b")
CASES = {
    "gpt-sp": ("gpt", "context=2,model=2", dict(sequence_parallel=True, remat="selective")),
    "llama-gqa": ("llama", "data=2,context=4", {}),
    "gpt-packed": ("packed", "context=4", {}),
    "gpt-pipeline": ("gpt", "pipeline=2,context=2,model=2", PIPELINE),
    "gpt-1f1b": ("gpt", "pipeline=2,context=2,model=2", ONE_F_ONE_B),
    "bert": ("bert", "context=2,model=2", {}),
}


def _config(kind, core, model):
    make = {"gpt": tiny_config, "packed": tiny_config, "llama": llama_config}.get(kind)
    model, train = model if isinstance(model, tuple) else (model, {})
    # The ring core has no attention dropout (megajax/ring_attention.py): it runs without.
    dropout = 0.1 if core == "allgather" else 0.0
    fields = dict(seq_len=SEQ, dropout=dropout, context_attention=core, **model)
    cfg = bert_config(vocab_size=VOCAB, **fields) if kind == "bert" else make(**fields)
    if kind == "packed":
        cfg = config.replace(cfg, data=dict(format="chat"))
    return config.replace(cfg, optim=dict(warmup_steps=0), train=train)


def _packed_rows(tokens, rng, rows):
    """Rows of documents packed end to end: inputs, targets, weights (a prompt's first
    targets left out), segments (from 1; 0 on the padding after the last) and positions."""
    fields = {k: np.zeros((rows, SEQ), np.int32) for k in ("inputs", "targets", "weights")}
    fields |= {k: np.zeros((rows, SEQ), np.int32) for k in ("segments", "positions")}
    for r in range(rows):
        at, segment = 0, 1
        while at < SEQ - 4:
            n = min(int(rng.integers(4, 20)), SEQ - at)
            start = int(rng.integers(0, len(tokens) - n - 1))
            ids = tokens[start : start + n + 1] % VOCAB
            span = slice(at, at + n)
            fields["inputs"][r, span], fields["targets"][r, span] = ids[:-1], ids[1:]
            fields["weights"][r, span] = np.arange(n) >= 2
            fields["segments"][r, span], fields["positions"][r, span] = segment, np.arange(n)
            at, segment = at + n, segment + 1
    return fields


def _batches(kind, tokens, bert_dataset):
    if kind == "bert":
        return [bert_batch(bert_dataset, step=i, batch_size=8, seq_len=SEQ, vocab_size=VOCAB)
                for i in range(STEPS)]  # fmt: skip
    if kind == "packed":
        rng = np.random.default_rng(0)
        return [_packed_rows(tokens, rng, 8) for _ in range(STEPS)]
    shape = dict(batch_size=8, seq_len=SEQ, vocab_size=VOCAB)
    pairs = [real_batch(tokens, step=i, **shape) for i in range(STEPS)]
    return [{"inputs": x, "targets": y} for x, y in pairs]


@dataclasses.dataclass
class Run:
    losses: list[float]
    grads: dict
    trainer: Trainer
    hlo: str


def _unpad(tree):
    tree = jax.device_get(tree)
    tree["wte"]["embedding"] = tree["wte"]["embedding"][:VOCAB]
    for name in ("head",):
        if name in tree:
            tree[name] = tree[name][:VOCAB]
    if "mlm" in tree:
        tree["mlm"]["bias"] = tree["mlm"]["bias"][:VOCAB]
    return tree


def _train(cfg, text, batches) -> Run:
    n = int(np.prod(list(mesh.parse(text).values())))
    trainer = Trainer(cfg, mesh.make(text, devices=jax.devices()[:n]))
    state = trainer.init_state()
    step, _ = trainer.compile_train_step()
    losses, grads = [], None
    for batch in batches:
        state, metrics = step(state, trainer.put_batch(batch))
        losses.append(float(metrics["loss"]))
        if grads is None:
            mu = optax.tree.get(state["opt_state"], "mu")
            grads = _unpad(jax.tree.map(lambda m: m / (1 - cfg.optim.beta1), mu))
    return Run(losses, grads, trainer, step.as_text())


@pytest.fixture(scope="module")
def runs(shakespeare_tokens, bert_dataset):
    """(case, core, mesh) -> Run, each trained once; mesh None: the case's mesh."""
    done = {}

    def get(case, core, text=None):
        kind, case_mesh, model = CASES[case]
        text = text or case_mesh
        if (case, core, text) not in done:
            cfg = _config(kind, core, model)
            batches = _batches(kind, shakespeare_tokens, bert_dataset)
            done[case, core, text] = _train(cfg, text, batches)
        return done[case, core, text]

    return get


@pytest.mark.parametrize(
    "case,core",
    [
        pytest.param(c, core, marks=[pytest.mark.slow] if c == "bert" else [])
        for c in CASES
        for core in CORES
        if (c, core) != ("gpt-1f1b", "ring")  # refused: test_1f1b_refuses_the_ring
    ],
)
def test_losses_and_gradients_equal_the_unsplit_run(runs, case, core):
    ours, ref = runs(case, core), runs(case, core, "data=1")
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=2e-4)
    assert len(set(ref.losses)) == STEPS  # the steps trained: each loss differs
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7), ours.grads, ref.grads
    )


# The audit, on the compiled steps of the decoder cases (each trained above) -----------------

AUDITED = ["gpt-sp", "llama-gqa"]


def _kv_exchanges(run):
    """(kind, shape, runs) of each collective over `context` of a K/V-shaped tensor (batch,
    length, 2, kv slots, head_dim)."""
    m, shape = run.trainer.cfg.model, dict(run.trainer.mesh.shape)
    found = hlo.collectives(run.hlo, shape)
    return [
        (c.kind, c.shapes[0], c.runs)
        for c in found
        if c.axes == ("context",) and len(c.shapes[0]) == 5 and c.shapes[0][-1] == m.head_dim
    ], found


@pytest.mark.parametrize("case", AUDITED)
def test_kv_all_gathered_once_per_layer_forward_and_reduce_scattered_backward(runs, case):
    run = runs(case, CORES[0])
    m, mesh_shape = run.trainer.cfg.model, dict(run.trainer.mesh.shape)
    c, t = mesh_shape["context"], mesh_shape["model"]
    b = 8 // mesh_shape["data"]
    slots = m.kv_slots(t) // t  # grouped-query attention gathers its kv heads alone
    kv, found = _kv_exchanges(run)
    assert sorted(kv) == [
        ("all-gather", (b, SEQ, 2, slots, m.head_dim), m.num_layers),
        ("reduce-scatter", (b, SEQ // c, 2, slots, m.head_dim), m.num_layers),
    ], kv
    # Over `context` besides: the original positions gathered once (hoisted out of the
    # layers), and the replicated weights' gradients summed, as over `data`: no activation.
    params = {
        tuple(d for d in a.sharding.shard_shape(a.shape) if d != 1)
        for a in jax.tree.leaves(run.trainer.abstract_state()["params"])
    }
    params |= {shape[1:] for shape in params}
    for x in found:
        if "context" not in x.axes or (x.kind, x.shapes[0][-1:]) in {
            (k, (m.head_dim,)) for k in ("all-gather", "reduce-scatter")
        }:
            continue
        if x.kind == "all-gather":
            assert x.shapes == ((b, SEQ),) and x.runs == 1, x
            continue
        assert x.kind == "all-reduce", x
        for shape in x.shapes:
            squeezed = tuple(d for d in shape if d != 1)
            # a weight's gradient (or several side by side): no length dimension
            assert squeezed in params or not {SEQ, SEQ // c} & set(squeezed), x


@pytest.mark.parametrize("case", AUDITED)
def test_ring_passes_kv_blocks_c_minus_1_times_per_layer_each_way(runs, case):
    """The ring core moves K and V (stacked, at this shard's kv-slot width) by C - 1
    collective-permutes per layer forward, and 2 (C - 1) backward (the blocks again and their
    dK/dV sums, megajax/ring_attention.py), as the compiled loops run them; nothing
    K/V-shaped is all-gathered."""
    run = runs(case, "ring")
    m, mesh_shape = run.trainer.cfg.model, dict(run.trainer.mesh.shape)
    c, t = mesh_shape["context"], mesh_shape["model"]
    block = (2, 8 // mesh_shape["data"], SEQ // c, m.kv_slots(t) // t, m.head_dim)
    found = [x for x in hlo.collectives(run.hlo, mesh_shape) if x.shapes == (block,)]
    assert {(x.kind, x.axes) for x in found} == {("collective-permute", ("context",))}, found
    assert sum(x.runs for x in found) == 3 * (c - 1) * m.num_layers, found
    kv, _ = _kv_exchanges(run)
    assert not [x for x in kv if x[0] == "all-gather"], kv


def test_sequence_parallel_collectives_run_on_each_context_chunk(runs):
    """The plan's existing collectives over `model` are unchanged, on each rank's chunk: per
    layer forward 2 all-gathers of (b, s / C, h) and 2 reduce-scatters to (b, s / (C T), h);
    backward 4 and 2 (tests/test_collectives.py's counts at full length)."""
    run = runs("gpt-sp", CORES[0])
    m, mesh_shape = run.trainer.cfg.model, dict(run.trainer.mesh.shape)
    c, t = mesh_shape["context"], mesh_shape["model"]
    chunk, shard = (8, SEQ // c, m.hidden), (8, SEQ // (c * t), m.hidden)
    per_loop = {}
    for x in hlo.collectives(run.hlo, mesh_shape):
        if x.axes != ("model",) or x.runs != m.num_layers:
            continue
        counts = per_loop.setdefault(x.computation, {"all-gather": 0, "reduce-scatter": 0})
        if (x.kind, x.shapes) in (("all-gather", (chunk,)), ("reduce-scatter", (shard,))):
            counts[x.kind] += 1
    assert sorted((n["all-gather"], n["reduce-scatter"]) for n in per_loop.values()) == [
        (2, 2),
        (4, 2),
    ], per_loop


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("case", AUDITED)
def test_no_full_length_activation_on_a_device(runs, case, core):
    """Every floating-point buffer in the compiled step that spans the whole sequence is the
    gathered K/V (last dimension head_dim) or attention scores against it (last dimension
    the length): nothing (batch, length, hidden)-like, and no full-length logits. The ring
    holds none at all. A buffer spans it when it holds a device's rows over the whole length
    (the rows and the length's chunk flattened into one dimension can also be SEQ long)."""
    run = runs(case, core)
    m = run.trainer.cfg.model
    rows = 8 // math.prod(run.trainer.mesh.shape[a] for a in parallel.BATCH)
    spans = set()
    for dims in re.findall(r"\b(?:f32|bf16|f16)\[([\d,]*)\]", run.hlo):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if SEQ in shape and len(shape) >= 3 and math.prod(shape) >= rows * SEQ * shape[-1]:
            spans.add(shape)
    assert bool(spans) == (core == "allgather"), spans  # the gathered K/V at least
    for shape in spans:
        assert shape[-1] in (m.head_dim, SEQ), shape
        assert m.hidden not in shape and m.mlp_hidden not in shape, shape


@pytest.mark.parametrize("core", CORES)
def test_dry_run_predicts_the_kv_exchange_and_the_memory(core):
    """The plan's K/V all-gathers and reduce-scatters (the ring's collective-permutes) are the
    compiled step's, and its activation estimate (length / C, scores (s / C, s) or the ring's
    block (s / C, s / C), the gathered K/V) its temporaries."""
    from megajax.plan.compiled import make_plan

    cfg = llama_config(seq_len=SEQ, dropout=0.0, context_attention=core)
    plan = make_plan(cfg, mesh.make("context=4,model=2", devices=jax.devices()[:8]))
    cp, layers = plan["context"], cfg.model.num_layers
    want = cp["predicted"]
    if core == "ring":
        assert cp["permutes_compiled"] == want["collective_permute"][0] == 3 * 3 * layers
        assert (cp["all_gathers_compiled"], cp["reduce_scatters_compiled"]) == (0, 0)
        assert cp["bytes_compiled"] == 4 * want["collective_permute"][1]
    else:
        assert (cp["all_gathers_compiled"], cp["reduce_scatters_compiled"]) == (layers, layers)
        assert (want["all_gather"][0], want["reduce_scatter"][0]) == (layers, layers)
        assert cp["bytes_compiled"] == 4 * (want["all_gather"][1] + want["reduce_scatter"][1])
    compiled = plan["memory"]["compiled"]["temporaries"]
    analytic = plan["memory"]["analytic_as_compiled"]["temporaries"]
    assert abs(analytic - compiled) < 0.25 * compiled, (analytic, compiled)


# Exact dropout bits -------------------------------------------------------------------------


def test_dropout_bits_at_an_index_are_jax_bernoullis():
    key = jax.random.fold_in(jax.random.key(3), 7)
    shape = (2, 3, 8, 8)
    whole = np.asarray(jax.random.bernoulli(key, 0.9, shape))
    index = np.indices(shape)
    assert np.array_equal(np.asarray(dropout.bernoulli_at(key, 0.9, shape, index)), whole)
    # a reordered piece: rows 5, 1 of the third dimension, every other column
    rows, cols = np.array([5, 1]), np.arange(0, 8, 2)
    piece = dropout.bernoulli_at(
        key, 0.9, shape, (np.arange(2)[:, None, None, None], np.arange(3)[None, :, None, None],
                          rows[None, None, :, None], cols[None, None, None, :])
    )  # fmt: skip
    assert np.array_equal(np.asarray(piece), whole[:, :, rows][..., cols])


def test_flat_index_is_exact_past_32_bits():
    shape = (4, 32, 131072, 131072)  # a long context's score matrix: 2^41 elements
    at = [np.array([3, 1]), np.array([31, 0]), np.array([131071, 5]), np.array([131070, 9])]
    hi, lo = dropout.flat_index(shape, at)
    got = (np.asarray(hi).astype(np.uint64) << np.uint64(32)) | np.asarray(lo).astype(np.uint64)
    want = [int(np.ravel_multi_index(tuple(int(a[i]) for a in at), shape)) for i in range(2)]
    assert got.tolist() == want


def test_balanced_order_gives_rank_c_chunks_c_and_2c_minus_1_minus_c():
    order = context_attention.balanced_order(16, 4)  # 8 chunks of 2
    ranks = order.reshape(4, 2, 2)[:, :, 0] // 2
    assert ranks.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert sorted(order.tolist()) == list(range(16))


# Refusals -----------------------------------------------------------------------------------


def _sharded(cfg, text):
    n = int(np.prod(list(mesh.parse(text).values())))
    return ShardedModel(cfg, mesh.make(text, devices=jax.devices()[:n]))


def test_generation_refuses_a_context_mesh():
    from megajax import generate

    sharded = _sharded(tiny_config(seq_len=SEQ), "context=2")
    with pytest.raises(ConfigError, match="decode on a mesh without context"):
        generate.Generator(sharded, params=None)


@pytest.mark.parametrize(
    "model,text,message",
    [
        (dict(seq_len=36), "context=4", "not divisible by 2 x the context degree 4"),
        (dict(sequence_parallel=True, seq_len=36), "context=2,model=4", "context x model = 8"),
        (dict(context_attention="ring", dropout=0.1), "context=2", "ring has no attention drop"),
        (dict(attention="xla", dropout=0.0), "context=2", "set model.attention=einsum"),
    ],
)
def test_a_layout_context_cannot_split_is_refused(model, text, message):
    with pytest.raises(ConfigError, match=message):
        _sharded(tiny_config(**{"seq_len": SEQ, **model}), text)


def test_1f1b_refuses_the_ring():
    cfg = tiny_config(seq_len=SEQ, num_layers=4, context_attention="ring", dropout=0.0)
    cfg = config.replace(cfg, train=dict(micro_batches=2, pipeline_schedule="1f1b"))
    with pytest.raises(ConfigError, match="runs the allgather context core only"):
        _sharded(cfg, "pipeline=2,context=2")


def test_lora_on_a_context_mesh_is_refused():
    cfg = config.replace(tiny_config(seq_len=SEQ), lora=dict(rank=4))
    with pytest.raises(ConfigError, match="not proven yet: use context=1"):
        _sharded(cfg, "context=2")


def test_unknown_context_attention_is_refused():
    with pytest.raises(ConfigError, match="context_attention='ulysses': use one of"):
        tiny_config(context_attention="ulysses")
