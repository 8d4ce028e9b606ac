"""Mixture-of-Experts: the layer equals a NumPy reference of the same math; expert parallelism
changes where the experts run, not the numbers; the compiled step exchanges tokens by the
all-to-alls the plan predicts and gathers nothing; bad layouts are refused with the fix.

The layer is compared on a fixed batch (outputs, router statistics and, with a capacity
factor, the dropped choices) in float64 NumPy. The meshes train the same model for STEPS steps
with dropout on and read the first step's gradients from Adam's first moment, as
tests/test_parallel_equivalence.py does.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import llama_config, real_batch
from flax import nnx

from megajax import config, hlo, mesh, moe, parallel
from megajax.attention import Attend
from megajax.config import ConfigError
from megajax.trainer import Trainer

STEPS = 5
# A Mixtral in miniature: 4 SwiGLU experts of width 32, top-2, a shared expert, GQA and RoPE.
MOE = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_shared_experts=1, dropout=0.1)


def moe_config(**model):
    return llama_config(**{**MOE, **model})


def _on(text: str):
    n = math.prod(mesh.parse(text).values())
    return mesh.make(text, devices=jax.devices()[:n])


# ----------------------------------------------------------------------------- the layer


def _silu(x):
    return x / (1 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(x, p, *, k, router, capacity_factor):
    """The MoE block in float64 NumPy, token by token: (output, statistics)."""
    b, s, h = x.shape
    e = p["router"].shape[1]
    tokens = x.reshape(-1, h).astype(np.float64)
    logits = tokens @ p["router"]
    probs = _softmax(logits)
    choice = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, choice, -1)
    weight = _softmax(top) if router == "topk_softmax" else np.take_along_axis(probs, choice, -1)
    keep = np.ones(choice.shape, bool)
    if capacity_factor:
        capacity = math.ceil(capacity_factor * s * k / e)
        for row in range(b):
            taken = np.zeros(e, int)
            for j in range(k):  # first choices first, then by position
                for t in range(row * s, (row + 1) * s):
                    keep[t, j] = taken[choice[t, j]] < capacity
                    taken[choice[t, j]] += 1
    out = np.zeros_like(tokens)
    for t in range(len(tokens)):
        for j in range(k):
            if keep[t, j]:
                gate_up = tokens[t] @ p["w1"][choice[t, j]]
                inner = _silu(gate_up[0::2]) * gate_up[1::2]
                out[t] += weight[t, j] * (inner @ p["w2"][choice[t, j]])
    if "shared" in p:
        gate_up = tokens @ p["shared"]["fc1"]["kernel"]
        out += (_silu(gate_up[:, 0::2]) * gate_up[:, 1::2]) @ p["shared"]["fc2"]["kernel"]
    stats = {
        "counts": np.eye(e)[choice].sum((0, 1)),
        "probs": probs.sum(0),
        "z": np.sum(np.log(np.exp(logits).sum(-1)) ** 2),
        "tokens": len(tokens),
        "dropped": (~keep).sum(),
    }
    return out.reshape(b, s, h), stats


LAYER_CASES = {
    "mixtral": dict(),
    "softmax-topk": dict(moe_router="softmax_topk", moe_shared_experts=0),
    "capacity": dict(moe_capacity_factor=1.0),
    "capacity-top1": dict(moe_capacity_factor=1.5, moe_top_k=1, moe_shared_experts=0),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_equals_numpy_reference(case):
    cfg = moe_config(**LAYER_CASES[case]).model
    one = _on("data=1")
    with jax.set_mesh(one), nnx.logical_axis_rules(parallel.RULES):
        block = moe.MoE(cfg, out_std=0.02, rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(block)
        x = jax.random.normal(jax.random.key(1), (2, 16, cfg.hidden))
        # Router weights large enough that the experts' loads differ (and a capacity drops).
        state["router"][...] = state["router"][...] * 50
        y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(state))
    want, want_stats = reference(
        np.asarray(x),
        params,
        k=cfg.moe_top_k,
        router=cfg.moe_router,
        capacity_factor=cfg.moe_capacity_factor,
    )
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
    for name, value in want_stats.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-4, atol=1e-4, err_msg=name)
    if cfg.moe_capacity_factor:
        assert want_stats["dropped"] > 0  # the capacity is a claim here, not a no-op


def test_router_losses_from_statistics():
    """aux = experts * sum_e (choices of e / tokens) (mean probability of e); z = mean lse^2."""
    stats = {
        "counts": jnp.array([3.0, 1.0, 2.0, 2.0]),
        "probs": jnp.array([1.5, 0.5, 1.0, 1.0]),
        "z": jnp.float32(8.0),
        "tokens": jnp.float32(4.0),
        "dropped": jnp.float32(1.0),
    }
    out = moe.router_losses(stats, 4)
    want = 4 * sum(c / 4 * p / 4 for c, p in ((3, 1.5), (1, 0.5), (2, 1.0), (2, 1.0)))
    np.testing.assert_allclose(out["moe_aux_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(out["moe_z_loss"], 2.0)
    assert float(out["moe_dropped"]) == 1.0


def test_router_losses_and_dropped_choices_are_logged():
    from megajax.metrics import progress_line

    scalars = dict(loss=7.1, lm_loss=7.0, moe_aux_loss=2.01, moe_z_loss=4.5, moe_dropped=12.0,
                   learning_rate=1e-3, grad_norm=1.0, tokens_per_sec=1e3, mfu=0.1)  # fmt: skip
    line = progress_line(5, 10, scalars, 3.0)
    assert "lm 7.000 | moe_aux 2.010 | moe_z 4.500 | dropped 12 |" in line
    assert "dropped" not in progress_line(5, 10, {**scalars, "moe_dropped": 0.0}, 3.0)


# ----------------------------------------------------------------------------- the meshes

MESHES = ["data=2,expert=2,model=2", "expert=4,model=2"]


def _run(cfg, text, batches):
    trainer = Trainer(cfg, _on(text))
    state = trainer.init_state()
    step, _ = trainer.compile_train_step()
    metrics, grads = [], None
    for batch in batches:
        state, m = step(state, trainer.put_batch(batch))
        metrics.append({k: float(v) for k, v in m.items() if k != "learning_rate"})
        if grads is None:
            mu = jax.device_get(optax.tree.get(state["opt_state"], "mu"))
            grads = jax.tree.map(lambda g: g / (1 - cfg.optim.beta1), mu)
    params = jax.device_get(state["params"])
    for tree in (grads, params):  # the vocabulary's padding rows differ by model degree
        for name in ("wte", "head"):
            if name not in tree:  # LoRA's gradients: the adapters' alone
                continue
            leaf = tree[name]
            if isinstance(leaf, dict):
                leaf["embedding"] = leaf["embedding"][: cfg.model.vocab_size]
            else:
                tree[name] = leaf[: cfg.model.vocab_size]
    return metrics, grads, params, step


# A MoE layer then a dense one (model.moe_every=2): the grouped scan, across meshes too.
INTERLEAVED = "interleaved expert=4,model=2"
# Master weights and moments split over `data` (configs/mixtral_8x7b.py's layout), sequence
# parallelism (each model shard routes the whole gathered sequence), selective recomputation:
# the same numbers.
DISTRIBUTED = "distributed, sequence-parallel data=2,expert=2,model=2"
# A capacity (per sequence, so the same choices are dropped on every mesh) and the smaller
# blocks it allows the exchange.
CAPACITY = "capacity expert=4,model=2"
# float16 matmuls (the experts' grouped ones too) under dynamic loss scaling.
FLOAT16 = "float16 expert=4,model=2"
# Pipeline stages (each a MoE layer, its experts one-hot: moe.for_stages), two micro-batches
# whose router statistics stay their own, as in the one-stage run that accumulates them.
PIPELINED = "pipelined pipeline=2,expert=2,model=2"


@pytest.fixture(scope="module")
def runs(shakespeare_tokens):
    cfg = moe_config(moe_z_loss=1e-3)
    m = cfg.model
    shape = dict(batch_size=cfg.train.batch_size, seq_len=m.seq_len, vocab_size=m.vocab_size)
    pairs = [real_batch(shakespeare_tokens, step=i, **shape) for i in range(STEPS)]
    batches = [{"inputs": x, "targets": y} for x, y in pairs]
    done = {text: _run(cfg, text, batches) for text in ["data=1", *MESHES]}
    interleaved = config.replace(cfg, model=dict(moe_every=2))
    for text in ("data=1", "expert=4,model=2"):
        done[f"interleaved {text}"] = _run(interleaved, text, batches)
    switches = dict(remat="selective", sequence_parallel=True)
    distributed = config.replace(cfg, model=switches, optim=dict(distributed=True))
    done[DISTRIBUTED] = _run(distributed, MESHES[0], batches)
    capacity = config.replace(cfg, model=dict(moe_capacity_factor=1.0))
    for text in ("data=1", "expert=4,model=2"):
        done[f"capacity {text}"] = _run(capacity, text, batches)
    fp16 = config.replace(
        cfg, model=dict(compute_dtype="float16"), optim=dict(initial_loss_scale=2.0**12)
    )
    done[FLOAT16] = _run(fp16, MESHES[1], batches)
    staged = config.replace(cfg, train=dict(micro_batches=2))
    for text in ("data=1", PIPELINED.split()[1]):
        done[f"pipelined {text}"] = _run(staged, text, batches)
    return cfg, done


@pytest.mark.parametrize("text", [*MESHES, INTERLEAVED, DISTRIBUTED, CAPACITY, PIPELINED])
def test_losses_and_gradients_identical_with_expert_parallelism(runs, text):
    _, done = runs
    reference = {INTERLEAVED: "interleaved data=1", CAPACITY: "capacity data=1",
                 PIPELINED: "pipelined data=1"}  # fmt: skip
    reference = reference.get(text, "data=1")
    (ref, ref_grads, ref_params, _), (ours, grads, params, _) = done[reference], done[text]
    for mine, theirs in zip(ours, ref, strict=True):
        assert mine.keys() == theirs.keys()
        for k in mine:
            np.testing.assert_allclose(mine[k], theirs[k], rtol=2e-4, atol=1e-6, err_msg=k)
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"]
    assert ref[0]["moe_aux_loss"] > 1.0 and ref[0]["loss"] > ref[0]["lm_loss"]
    assert (ref[0]["moe_dropped"] > 0) == (text == CAPACITY)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7), grads, ref_grads
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params
    )


def test_distributed_optimizer_splits_each_weights_state_over_its_data_parallel_group():
    """The experts' master weights over `data` (their replicas), every other weight's over
    `data` and `expert` together."""
    cfg = config.replace(moe_config(), optim=dict(distributed=True))
    specs = Trainer(cfg, _on("data=2,expert=2,model=2")).train_sharding
    assert ("data", "expert") in tuple(specs["h"]["attn"]["q"]["kernel"].spec)
    assert ("data", "expert") in tuple(specs["wte"]["embedding"].spec)
    w1 = tuple(specs["h"]["mlp"]["w1"].spec)
    assert "data" in w1 and "expert" in w1 and ("data", "expert") not in w1


def test_float16_experts_give_float32_losses_to_its_rounding(runs):
    _, done = runs
    losses = [s["loss"] for s in done[FLOAT16][0]]
    np.testing.assert_allclose(losses, [s["loss"] for s in done["data=1"][0]], rtol=2e-3)
    assert all(s["finite"] for s in done[FLOAT16][0])


def test_dispatch_and_combine_are_all_to_alls_over_expert_and_nothing_is_gathered(runs):
    """Per MoE layer and step: forward, one all-to-all of the rows to their experts' shards,
    one back, and one of the per-expert row counts; backward, the two of rows transposed.
    Each row block is X x (batch / (data X) x length x k) x hidden elements. No all-gather;
    the expert weights' gradients are summed over `data` alone, every other weight's over
    `data` and `expert`; over `model`, Megatron's two all-reduces each way per layer."""
    cfg, done = runs
    step = done[MESHES[0]][3]
    found = hlo.collectives(step.as_text(), {"data": 2, "expert": 2, "model": 2})
    m, layers, x_deg = cfg.model, cfg.model.num_layers, 2
    rows = cfg.train.batch_size // 4 * m.seq_len * m.moe_top_k
    to_all = [c for c in found if c.kind == "all-to-all"]
    assert {c.axes for c in to_all} == {("expert",)}
    blocks = [c for c in to_all if c.shapes[0][-1] == m.hidden]
    assert sum(c.runs for c in blocks) == 4 * layers
    for c in blocks:  # one operand per destination shard
        assert c.shapes == ((1, rows, m.hidden),) * x_deg
    counts = [c for c in to_all if c.shapes[0][-1] != m.hidden]
    assert sum(c.runs for c in counts) == layers
    assert [c.shapes for c in counts] == [((1, m.moe_experts // x_deg),) * x_deg]
    assert not [c for c in found if c.kind == "all-gather"]
    # Over `model`, a MoE layer communicates as a dense one: an all-reduce of (b, s, h) after
    # the attention output and after the experts' combine, and their two transposes (the
    # experts' input gradient summed over the tokens, not over the k x X times more rows);
    # then the embedding's and the untied head's.
    activations = (cfg.train.batch_size // 4, m.seq_len, m.hidden)
    model_sums = [c.runs for c in found if c.axes == ("model",) and activations in c.shapes]
    assert sum(model_sums) == 4 * layers + 2
    # With a capacity of ceil(1.0 x 32 x 2 / 4) = 16 choices per sequence and expert, each of
    # the 2 sequences on a device sends one expert's shard at most 32 rows, not all 128.
    capped = hlo.collectives(done[CAPACITY][3].as_text(), {"expert": 4, "model": 2})
    capped = [c for c in capped if c.kind == "all-to-all" and c.shapes[0][-1] == m.hidden]
    assert {c.shapes for c in capped} == {((1, 32, m.hidden),) * 4}
    from megajax.plan.estimates import moe_alltoall

    capacity = config.replace(cfg, model=dict(moe_capacity_factor=1.0))
    assert moe_alltoall(capacity, data_degree=1, expert_degree=4) == {
        "count": sum(c.runs for c in capped),
        "bytes": sum(c.runs * c.bytes for c in capped),
    }
    local_w1 = (m.moe_experts // x_deg, m.hidden, 2 * m.moe_ffn_hidden // 2)
    over_data = [s for c in found if c.axes == ("data",) for s in c.shapes]
    assert local_w1 in over_data
    assert all(len(s) == 3 for s in over_data)  # only the experts' (layer-sliced) weights


def test_bad_expert_layouts_are_refused():
    with pytest.raises(ConfigError, match="not divisible by the expert degree 4"):
        Trainer(moe_config(moe_experts=6), _on("expert=4,model=2"))
    with pytest.raises(ConfigError, match="moe_top_k=3 is more than model.moe_experts=2"):
        moe_config(moe_experts=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="this model is dense"):
        Trainer(llama_config(), _on("data=2,expert=2,model=2"))
    with pytest.raises(ConfigError, match=r"data degree 8 \(data x fsdp x expert"):
        Trainer(config.replace(moe_config(), train=dict(micro_batches=2)), _on("data=2,expert=4"))
    with pytest.raises(ConfigError, match="moe_every > 1: .* pipeline stages"):
        staged = config.replace(moe_config(moe_every=2), train=dict(micro_batches=2))
        Trainer(staged, _on("pipeline=2"))


# ----------------------------------------------------------------------------- moe_every


def test_interleaved_layers_run_in_megatron_order_in_training_and_decoding():
    """model.moe_every=2 on 4 layers: MoE, dense, MoE, dense (layers 0 and 2 are MoE, as
    Megatron-LM's --moe-layer-freq places them). The grouped scan equals the layers applied one
    by one, and decoding through the KV cache (one extend over the whole prompt) equals both."""
    cfg = moe_config(num_layers=4, moe_every=2, moe_shared_experts=0)
    trainer = Trainer(cfg, _on("data=1"))
    params = trainer.init_state()["params"]
    assert (
        params["h_moe"]["mlp"]["w1"].shape[0] == 2
        and params["h"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    )
    ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, cfg.model.seq_len))

    def layer(stack, i):
        graphdef, state = nnx.split(stack)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def all_three(params, ids):
        model = trainer.model(params)
        x = model.wte(ids, jnp.float32)
        for i in range(4):
            stack = model.h_moe if i % 2 == 0 else model.h
            x = layer(stack, i // 2)(x, attend=Attend(), key=None)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        mask = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))[None, None]
        cache = model.empty_cache(ids.shape[0], ids.shape[1])
        decoded, _ = model.extend(ids, cache, start=0, positions=positions, mask=mask)
        return model(ids), model.ln_f(x), decoded

    with trainer.context():
        scanned, one_by_one, decoded = jax.jit(all_three)(params, ids)
    np.testing.assert_allclose(scanned, one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decoded, scanned, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="not a multiple of model.moe_every=3"):
        moe_config(num_layers=4, moe_every=3)


# ----------------------------------------------------------------------------- sizes, dry run


def test_mixtral_and_olmoe_configs_have_the_published_sizes():
    """Mixtral 8x7B: 46.7B parameters, 12.9B active (arXiv 2401.04088); OLMoE-1B-7B: 6.9B and
    1.3B (arXiv 2409.02060). Mixtral's total is also transformers' own count of its model (on
    the meta device, nothing allocated), and the sharded model's."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from megajax.hf import families

    m = config.load("configs/mixtral_8x7b.py").model
    assert (m.num_params(), m.num_params(active=True)) == (46_702_792_704, 12_879_925_248)
    with torch.device("meta"):
        hf = MixtralForCausalLM(MixtralConfig(**families.hf_config(m)))
    assert sum(p.numel() for p in hf.parameters()) == m.num_params()
    assert Trainer(config.load("configs/mixtral_8x7b.py"), _on("data=2,expert=4")).num_params == (
        m.num_params()
    )
    olmoe = config.load("configs/olmoe_1b_7b.py").model
    assert round(olmoe.num_params() / 1e9, 1) == 6.9
    assert round(olmoe.num_params(active=True) / 1e9, 1) == 1.3


def test_moe_flops_are_those_of_the_active_parameters():
    """A MoE layer's FLOPs per token are a dense layer's whose MLP is k experts wide, plus the
    router's matmul."""
    m = moe_config(moe_shared_experts=0).model
    dense = config.replace(moe_config(), model=dict(moe_experts=0, ffn_hidden=64)).model
    router = 3 * 2 * m.hidden * m.moe_experts * m.num_layers
    assert m.flops_per_token() == dense.flops_per_token() + router


def test_dry_run_predicts_the_all_to_alls_and_the_memory_of_an_expert_parallel_step():
    from megajax.plan.compiled import make_plan

    cfg = moe_config()
    p = make_plan(cfg, _on("data=2,expert=2,model=2"))
    moe_plan = p["moe"]
    assert moe_plan["alltoall_compiled"] == moe_plan["alltoall_predicted"]
    assert moe_plan["alltoall_compiled"]["count"] == 4 * cfg.model.num_layers
    assert p["params"]["per_device"] == p["params"]["per_device_analytic"]
    assert moe_plan["active_params"] < moe_plan["total_params"] == p["params"]["total"]
    compiled = p["memory"]["compiled"]
    assert compiled["arguments"] == pytest.approx(p["memory"]["analytic"]["arguments"], rel=0.01)
    temporaries = p["memory"]["analytic_as_compiled"]["temporaries"]
    assert compiled["temporaries"] == pytest.approx(temporaries, rel=0.25)
    expert_weights = 2 * cfg.model.num_layers * 3 * cfg.model.hidden * 32 // 2  # 2 experts, T=2
    assert moe_plan["expert_state_bytes_per_device"] == 3 * 4 * expert_weights  # + 2 moments


@pytest.mark.slow  # a process of its own, on 64 faked devices
def test_mixtral_8x7b_fits_64_h100s_as_data_8_expert_8(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import TEST_XLA_FLAGS, subprocess_env

    env = subprocess_env(XLA_FLAGS=TEST_XLA_FLAGS)
    env.pop("JAX_PLATFORMS", None)
    run = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/mixtral_8x7b.py", "--mesh",
         "data=8,expert=8", "--cpu_devices", "64", "--dry_run", "--workdir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["memory"]["fits"] and p["memory"]["compiled"]["total"] < p["memory"]["target_bytes"]
    assert p["params"]["per_device"] == p["params"]["per_device_analytic"] == 7_242_780_672
    assert p["moe"]["alltoall_compiled"] == p["moe"]["alltoall_predicted"]
    assert "mixture of experts: 46,702,792,704 parameters, 12,879,925,248 active" in run.stdout


def test_lora_on_a_moe_models_attention_trains_the_adapters_alone_across_meshes(
    shakespeare_tokens,
):
    """Adapters on the attention (the experts frozen, the router losses still in the
    objective): the same losses on data=2,expert=2,model=2 as on one device, the experts and
    router bit for bit unchanged. Adapters on the experts' place are refused."""
    cfg = config.replace(moe_config(), lora=dict(rank=4, targets="qkv,proj"))
    m = cfg.model
    shape = dict(batch_size=cfg.train.batch_size, seq_len=m.seq_len, vocab_size=m.vocab_size)
    pairs = [real_batch(shakespeare_tokens, step=i, **shape) for i in range(3)]
    batches = [{"inputs": x, "targets": y} for x, y in pairs]
    ref, _, ref_params, _ = _run(cfg, "data=1", batches)
    ours, _, params, _ = _run(cfg, MESHES[0], batches)
    np.testing.assert_allclose([s["loss"] for s in ours], [s["loss"] for s in ref], rtol=2e-4)
    assert ref[-1]["loss"] < ref[0]["loss"]
    fresh = Trainer(cfg, _on("data=1")).init_state()["params"]
    for name in ("router", "w1", "w2"):
        for trained in (ref_params, params):
            np.testing.assert_array_equal(trained["h"]["mlp"][name], fresh["h"]["mlp"][name])
    with pytest.raises(ConfigError, match="lora.targets=qkv,proj"):
        Trainer(config.replace(moe_config(), lora=dict(rank=4)), _on("data=1"))
