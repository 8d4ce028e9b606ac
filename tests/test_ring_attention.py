"""Ring attention (megajax/ring_attention.py) equals full attention on the unsplit sequence,
forward and backward, and communicates only its C - 1 ring steps each way.

The sequence is laid out as the causal load balance has it: 2C chunks, rank c holding chunks
c and 2C - 1 - c, with their original positions; results are put back in sequence order and
compared with a plain einsum + mask + softmax reference in float32. C = 1 (no ring) runs the
same code without any transfer.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from megajax import hlo
from megajax.ring_attention import ring_attention

BATCH, HEADS, KV_HEADS, HEAD_DIM, CHUNK = 2, 4, 2, 8, 3


def reference(q, k, v, *, causal, seg=None, valid=None):
    """Full attention over the whole sequence, (batch, length, heads, head_dim), in float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.ones((1, 1, s, s), bool)
    if causal:
        mask = jnp.tril(mask)
    if seg is not None:
        mask = mask & ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def balanced_order(c: int) -> np.ndarray:
    """Sequence positions in the order the ranks hold them: chunks c and 2C - 1 - c on rank c."""
    chunks = [i for r in range(c) for i in (r, 2 * c - 1 - r)]
    return np.concatenate([np.arange(i * CHUNK, (i + 1) * CHUNK) for i in chunks])


def repeat_heads(x):
    """(batch, length, kv heads, head_dim) -> each query head's own, as the reference needs
    (the ring takes K/V at kv-head width)."""
    return jnp.repeat(x, HEADS // KV_HEADS, axis=2)


def inputs(length, *, dtype=jnp.float32, seed=0):
    """q (query heads), k and v (KV_HEADS heads) and an output cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, length, HEADS, HEAD_DIM))
    k, v = (jax.random.normal(x, (BATCH, length, KV_HEADS, HEAD_DIM)) for x in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), d_out.astype(dtype)


def context_mesh(c):
    return Mesh(np.array(jax.devices()[:c]), ("context",))


def ring_vjp(mesh, *, causal, seg=None, valid=None):
    """A jitted (q, k, v, d_out) -> (out, dq, dk, dv) of ring attention on `mesh`, all in
    sequence order: inputs permuted to the balanced layout, split over `context`, and back."""
    c = mesh.shape["context"]
    order = balanced_order(c)
    back = np.argsort(order)
    pos = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (BATCH, len(order)))
    extras = {name: x[:, order] for name, x in (("seg", seg), ("valid", valid)) if x is not None}
    split = P(None, "context")

    def local(q, k, v, pos, extras):
        ids = {"q_seg": extras.get("seg"), "k_seg": extras.get("seg")}
        return ring_attention(
            q, k, v, q_pos=pos, k_pos=pos, causal=causal, axis="context",
            k_valid=extras.get("valid"), **ids,
        )  # fmt: skip

    sharded = jax.shard_map(local, mesh=mesh, in_specs=split, out_specs=split)

    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda *a: sharded(*a, pos, extras), *(x[:, order] for x in (q, k, v)))
        return out[:, back], *(g[:, back] for g in vjp(d_out[:, order]))

    return run


def reference_vjp(q, k, v, d_out, **mask):
    f = lambda q, k, v: reference(q, repeat_heads(k), repeat_heads(v), **mask)  # noqa: E731
    out, vjp = jax.vjp(f, q, k, v)
    return out, *vjp(d_out)


def packed_segments(length):
    """Documents of 5, 7, 2... tokens packed back to back, the last tokens padding (id 0)."""
    ids = np.zeros((BATCH, length), np.int32)
    for row, sizes in enumerate(([5, 7, 2, 9], [11, 1, 6])):
        bounds = np.cumsum([0, *sizes])
        for doc, (a, z) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            ids[row, a : min(z, length)] = doc + 1
    return jnp.asarray(ids)


# Mask kinds: causal (GPT), causal with packed documents, bidirectional with key padding
# (BERT). Causality leaves whole query rows masked in some blocks of the balanced layout, and
# padding-document queries (id 0) have no valid key at all: both must match the reference.
CASES = {
    "causal": lambda s: dict(causal=True),
    "causal-packed": lambda s: dict(causal=True, seg=packed_segments(s)),
    "bidirectional-padded": lambda s: dict(
        causal=False, valid=jnp.arange(s)[None] < jnp.array([[s - 5], [s // 2 + 1]])
    ),
}


@pytest.mark.parametrize("c", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_output_and_gradients_equal_full_attention(c, case):
    length = 2 * c * CHUNK
    mask = CASES[case](length)
    q, k, v, d_out = inputs(length)
    got = ring_vjp(context_mesh(c), **mask)(q, k, v, d_out)
    want = reference_vjp(q, k, v, d_out, **mask)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_query_rows_without_any_valid_key_average_uniformly_as_the_reference():
    """A batch row whose keys are all padding: every query averages all values uniformly,
    with the reference's gradients (the other row keeps real keys, so it is not uniform)."""
    length = 2 * 2 * CHUNK
    valid = jnp.array([[False] * length, [True] * 3 + [False] * (length - 3)])
    q, k, v, d_out = inputs(length, seed=1)
    got = ring_vjp(context_mesh(2), causal=False, valid=valid)(q, k, v, d_out)
    want = reference_vjp(q, k, v, d_out, causal=False, valid=valid)
    uniform = jnp.broadcast_to(repeat_heads(v)[0].mean(0), got[0][0].shape)
    np.testing.assert_allclose(got[0][0], uniform, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    c, length = 4, 2 * 4 * CHUNK
    q, k, v, d_out = inputs(length, dtype=jnp.bfloat16)
    out, dq, dk, dv = ring_vjp(context_mesh(c), causal=True)(q, k, v, d_out)
    assert out.dtype == dq.dtype == jnp.bfloat16
    want = reference_vjp(*(x.astype(jnp.float32) for x in (q, k, v, d_out)), causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want, strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=5e-2, rtol=5e-2, err_msg=name)


def test_attention_dropout_is_refused_and_evaluation_runs_without_it():
    """A dropout key raises; dropout_rate > 0 without a key (evaluation) is no dropout."""
    x = jnp.zeros((1, 2, 1, 4))
    pos = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="no attention dropout"):
        ring_attention(x, x, x, q_pos=pos, k_pos=pos, causal=True, axis="context",
                       dropout_rate=0.1, key=jax.random.key(0))  # fmt: skip
    q = inputs(4 * CHUNK)[0]
    pos = jnp.broadcast_to(jnp.asarray(balanced_order(2), jnp.int32), q.shape[:2])

    def run(rate):
        f = lambda q, pos: ring_attention(  # noqa: E731
            q, q, q, q_pos=pos, k_pos=pos, causal=True, axis="context", dropout_rate=rate
        )
        split = P(None, "context")
        return jax.shard_map(f, mesh=context_mesh(2), in_specs=split, out_specs=split)(q, pos)

    np.testing.assert_array_equal(run(0.1), run(0.0))


def test_scale_multiplies_the_scores():
    """scale=x attends as the default 1/sqrt(head_dim) does to queries x sqrt(head_dim) times
    larger."""
    q, k, v, _ = inputs(4 * CHUNK)
    pos = jnp.broadcast_to(jnp.asarray(balanced_order(2), jnp.int32), q.shape[:2])
    k, v = repeat_heads(k), repeat_heads(v)

    def run(q, **scale):
        f = lambda q, k, v, pos: ring_attention(  # noqa: E731
            q, k, v, q_pos=pos, k_pos=pos, causal=True, axis="context", **scale
        )
        split = P(None, "context")
        return jax.shard_map(f, mesh=context_mesh(2), in_specs=split, out_specs=split)(q, k, v, pos)

    scaled = run(q, scale=0.7)
    np.testing.assert_allclose(scaled, run(q * 0.7 * np.sqrt(HEAD_DIM)), atol=1e-5, rtol=1e-5)
    assert not np.allclose(scaled, run(q), atol=1e-3)


def test_segments_need_both_sides():
    x, pos = jnp.zeros((1, 2, 1, 4)), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="both q_seg and k_seg"):
        ring_attention(x, x, x, q_pos=pos, k_pos=pos, causal=True, axis="context", q_seg=pos)


# The compiled program ------------------------------------------------------------------------
# Two layers in a scan, as megajax stacks them, on a (context 4, model 2) mesh with the heads
# split over `model` (also manual in the shard_map), bfloat16 activations; the backward pass
# from jax.vjp with a given cotangent, so that no loss reduction adds collectives.
C, MODEL, LAYERS = 4, 2, 2


@pytest.fixture(scope="module")
def ring_program():
    """(lowered StableHLO text, collectives of the compiled HLO, K/V block shape, ids shape)."""
    mesh = Mesh(np.array(jax.devices()[: C * MODEL]).reshape(C, MODEL), ("context", "model"))
    length = 2 * C * CHUNK
    heads = P(None, "context", "model")

    def local(x, pos):
        def layer(x, _):
            out = ring_attention(x, x, x, q_pos=pos, k_pos=pos, causal=True, axis="context")
            return x + out, None

        return jax.lax.scan(layer, x, length=LAYERS)[0]

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(heads, P(None, "context")), out_specs=heads)
    pos = jnp.broadcast_to(jnp.asarray(balanced_order(C), jnp.int32), (BATCH, length))

    def step(x, d_out):
        out, vjp = jax.vjp(lambda x: sharded(x, pos), x)
        return out, vjp(d_out)

    x = jnp.ones((BATCH, length, HEADS, HEAD_DIM), jnp.bfloat16)
    lowered = jax.jit(step).lower(x, x)
    found = hlo.collectives(lowered.compile().as_text(), {"context": C, "model": MODEL})
    block = (BATCH, length // C, HEADS // MODEL, HEAD_DIM)
    return lowered.as_text(), found, (2, *block), (2, BATCH, length // C)


def test_only_collective_permutes_over_context(ring_program):
    _, found, kv, ids = ring_program
    assert {(c.kind, c.axes) for c in found} == {("collective-permute", ("context",))}
    assert {c.shapes for c in found} == {(kv,), (ids,)}  # K/V blocks (or dK/dV), key ids


def test_c_minus_1_kv_steps_per_layer_forward_and_backward(ring_program):
    """Per layer, forward: C - 1 permutes of the K/V block (K and V stacked in one);
    backward: C - 1 of the K/V block again (recomputed, not kept) and C - 1 of the blocks'
    partial dK/dV sums (the same shape): 3 (C - 1) a layer, counted as the compiled loops
    (the layers' scan, the ring steps' scans inside it) run them."""
    _, found, kv, _ = ring_program
    assert sum(c.runs for c in found if c.shapes == (kv,)) == 3 * (C - 1) * LAYERS


def test_positions_and_document_ids_travel_once_per_step(ring_program):
    """The keys' positions and ids (one stacked int32 array per step) are the same in every
    layer: XLA hoists their C - 1 permutes out of the layer loops, and the backward pass
    reuses the forward's."""
    _, found, _, ids = ring_program
    assert sum(c.runs for c in found if c.shapes == (ids,)) == C - 1


def test_kv_travels_in_its_dtype_and_gradient_sums_in_float32(ring_program):
    """In the program as JAX emits it (XLA:CPU later widens bfloat16 permutes to float32):
    K/V blocks move in bfloat16, the partial dK/dV sums in float32, the key ids in int32."""
    text, _, kv, ids = ring_program
    moved = re.findall(r'"stablehlo.collective_permute".*-> tensor<([\dx]+)x(\w+)>', text)
    shape = lambda dims: "x".join(map(str, dims))  # noqa: E731
    assert set(moved) == {(shape(kv), "bf16"), (shape(kv), "f32"), (shape(ids), "i32")}, moved
