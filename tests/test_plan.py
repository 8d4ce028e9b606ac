"""The dry run's figures: formulas equal hand counts, and the compiled program agrees with them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import TEST_XLA_FLAGS, device_mesh, subprocess_env, tiny_config

from megajax import config, mesh
from megajax.config import ModelConfig
from megajax.plan import activations, estimates
from megajax.plan.compiled import make_plan
from megajax.plan.report import report

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(
    vocab_size=100, make_vocab_size_divisible_by=8, seq_len=4, num_layers=2, hidden=8, num_heads=2
)


def test_params_per_device_hand_count():
    # T=2: vocabulary padded to 112 -> 448 + 32 positions; per layer (3*64 + 24 + 64 + 256 + 32
    # + 256) / 2 split + 48 replicated = 460; final layer norm 16.
    assert estimates.params_per_device(SMALL, 2) == 480 + 2 * 460 + 16
    assert estimates.params_per_device(SMALL, 1) == SMALL.num_params(1) == 2624


def test_flops_hand_count():
    cfg = config.Config(model=SMALL, train=config.TrainConfig(batch_size=2))
    # per token 3 * (2 layers * (24 * 64 + 4 * 4 * 8) + 2 * 100 * 8) = 14784; 8 tokens.
    # the attention core's share: 3 * 2 layers * 4 * 4 * 8 per token
    attention = 3 * 2 * 128 * 8
    assert estimates.flops_per_step(cfg) == {
        "model": 118272, "hardware": 118272, "attention": attention
    }  # fmt: skip
    remat = config.replace(cfg, model=dict(remat="full"))
    assert estimates.flops_per_step(remat)["hardware"] == 118272 + 2 * (1536 + 128) * 8
    selective = config.replace(cfg, model=dict(remat="selective"))
    assert estimates.flops_per_step(selective)["hardware"] == 118272 + 2 * 128 * 8


def test_activation_and_state_bytes_hand_count():
    m = config.replace(config.Config(model=SMALL), model=dict(dropout=0.0)).model
    # b=1, s=4, h=8: n=32 elements per (b, s, h), 2 heads x 4 x 4 = 32 scores; float32:
    # 2 LNs x 3 x 4n + 4n (2 + 4 + 6 * 4) + 4 * scores (float32 probs) + 4 * scores (cast).
    assert activations.layer_activation_bytes(m, batch=1, model_degree=1) == 768 + 3840 + 128 + 128
    cfg = config.Config(model=m, train=config.TrainConfig(batch_size=4, micro_batches=2))
    est = estimates.estimate_memory(cfg, data_degree=2, model_degree=1)
    p = 2624
    assert (est.weights, est.optimizer, est.update) == (4 * p, 8 * p + 8, 4 * p)
    assert est.gradients == 2 * 4 * p  # micro-batches accumulate into a second buffer
    assert est.inputs == 2 * 4 * 2 * 4 + 2 * 4  # inputs, targets of 2 sequences; 2 counters
    assert est.total(remat="none") == est.arguments + est.gradients + est.update + est.activations


def test_paper_activation_formulas():
    """arXiv 2205.05198 Table 2, per layer at 16-bit: s=1024, b=8, h=3072, a=32, t=8."""
    m = config.load("configs/megatron_gpt2_8p3b.py").model
    sbh, core = 1024 * 8 * 3072, 5 * 32 * 1024 / 3072

    def paper(**switches):
        m2 = config.replace(config.Config(model=m), model=switches).model
        return activations.paper_layer_activation_bytes(m2, batch=8, model_degree=8)

    assert paper(remat="none") == pytest.approx(sbh * (10 + 24 / 8 + core / 8))
    assert paper(remat="none", sequence_parallel=True) == pytest.approx(sbh / 8 * (34 + core))
    assert paper(remat="selective", sequence_parallel=True) == pytest.approx(34 * sbh / 8)
    assert paper(remat="full") == 2 * sbh
    assert paper(remat="full", sequence_parallel=True) == 2 * sbh / 8


def test_ring_allreduce_time():
    assert estimates.allreduce_seconds(8e9, 8, 100e9) == pytest.approx(2 * 7 / 8 * 0.08)
    assert estimates.allreduce_seconds(8e9, 1, 100e9) == 0.0


def _check_against_compiled(p: dict, tolerance: float = 0.15):
    assert p["params"]["per_device"] == p["params"]["per_device_analytic"]
    compiled, analytic = p["memory"]["compiled"], p["memory"]["analytic_as_compiled"]
    assert compiled["arguments"] == analytic["arguments"]  # state and batch, byte for byte
    ratio = compiled["temporaries"] / analytic["temporaries"]
    assert 1 - tolerance < ratio < 1 + tolerance, ratio
    # The optimized HLO holds exactly the model-axis all-reduces the plan predicts.
    s, h = p["config"]["seq_len"], p["config"]["hidden"]
    expected = p["collectives_expected"]
    # Per tensor: XLA may combine several tensors into one all-reduce.
    model_tensors = [
        (shape, r["count"])
        for r in p["collectives"]
        if r["axes"] == ["model"]
        for shape in r["shapes"]
    ]
    acts = [(x, n) for x, n in model_tensors if x[-2:] == [s, h]]  # (stage,) micro, b, s, h
    count, elements = expected["model: activations (b, s, h)"]
    assert sum(n for _, n in acts) == count
    assert sum(n * math.prod(x) for x, n in acts) == elements
    ce = [(x, n) for x, n in model_tensors if len(x) > 1 and x[-1] == s and x[-2:] != [s, h]]
    _, ce_elements = expected.get("model: cross-entropy (b, s)", (0, 0))  # none: no LM head
    assert sum(n * math.prod(x) for x, n in ce) == ce_elements


@pytest.mark.slow  # a process of its own
def test_dry_run_of_gpt2_tiny_from_the_command_line(tmp_path):
    # The run's compiler settings and cache, not its faked devices: --cpu_devices fakes them.
    env = subprocess_env(XLA_FLAGS=TEST_XLA_FLAGS)
    env.pop("JAX_PLATFORMS", None)
    run = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/gpt2_tiny.py", "--mesh",
         "data=2,model=4", "--cpu_devices", "8", "--dry_run", "--workdir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "collectives per step" in run.stdout and "roofline on H100" in run.stdout
    assert "fits one H100" in run.stdout and "V100s" not in run.stdout  # the paper's own figures
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["params"]["total"] == config.load("configs/gpt2_tiny.py").model.num_params(4)
    count, _ = p["collectives_expected"]["model: activations (b, s, h)"]
    assert count == 4 * 4 + 2  # 2 forward + 2 backward per layer, embedding, tied head
    _check_against_compiled(p)
    assert p["memory"]["fits"]


def test_dry_run_of_the_8p3b_model_on_8_way_model_parallelism():
    cfg = config.load("configs/megatron_gpt2_8p3b.py")
    p = make_plan(cfg, device_mesh(1, 8), target_name="v100")
    assert p["params"]["total"] == cfg.model.num_params(8)
    assert p["params"]["total"] > 8.3e9
    count, _ = p["collectives_expected"]["model: activations (b, s, h)"]
    assert count == cfg.train.micro_batches * (5 * 72 + 2)  # remat recomputes one per layer
    _check_against_compiled(p)
    assert not p["memory"]["fits"]  # a 32 GB V100 holds only a 1.04B-parameter shard's states
    roof = p["roofline"]["this mesh"]
    assert 0 < roof["weak_scaling_efficiency"] < 1 and 0 < roof["mfu"] < 1
    assert "the 2019 paper, measured on V100s: 8-way model parallel 77%" in report(p)


def _fsdp_elements(p: dict, kind: str) -> int:
    """Elements per step of the compiled collectives of `kind` over `fsdp`, scalars left out."""
    return sum(
        r["count"] * math.prod(shape)
        for r in p["collectives"]
        if r["kind"] == kind and r["axes"] == ["fsdp"]
        for shape in r["shapes"]
        if shape
    )


def test_dry_run_of_llama3_8b_on_fsdp_8_fits_an_h100():
    """docs/fsdp.md's figure: Llama 3 8B on fsdp=8 (no tensor parallelism) at 8,192 tokens,
    one sequence per device and micro-batch, full recomputation. Weights and Adam state are
    an eighth per device, byte for byte as compiled; the fsdp all-gathers and reduce-scatters
    of the compiled step are exactly the elements the plan predicts."""
    cfg = config.replace(
        config.load("configs/llama3_8b.py"),
        model=dict(seq_len=8192, remat="full", sequence_parallel=False),
        train=dict(micro_batches=64),
    )
    p = make_plan(cfg, mesh.make("fsdp=8"), target_name="h100")
    assert p["params"]["per_device"] == p["params"]["per_device_analytic"]
    assert p["params"]["per_device"] * 8 == p["params"]["total"]
    compiled, analytic = p["memory"]["compiled"], p["memory"]["analytic_as_compiled"]
    assert compiled["arguments"] == analytic["arguments"]
    assert 0.85 < compiled["temporaries"] / analytic["temporaries"] < 1.15
    assert p["memory"]["fits"] and p["memory"]["analytic"]["total"] < 0.8 * 80e9
    expected = p["collectives_expected"]
    assert "data: gradients" not in expected
    gathers = _fsdp_elements(p, "all-gather")
    assert gathers == expected["fsdp: weight all-gathers"][1]
    assert _fsdp_elements(p, "all-reduce") == expected["fsdp: gradient reduce-scatters"][1]
    assert "fsdp: each layer's weights all-gathered" in report(p)


@pytest.mark.parametrize(
    "model",
    [
        dict(layernorm_placement="pre"),
        dict(layernorm_placement="post", binary_head="nsp"),
        dict(arch="bert_multiple_choice"),
    ],
    ids=["pre-sop", "post-nsp", "multiple-choice"],
)
def test_dry_run_of_bert_agrees_with_its_compiled_step(model):
    cfg = config.replace(
        config.load("configs/bert_tiny.py"),
        model=dict(seq_len=64, **model),
        train=dict(batch_size=8, micro_batches=2),
    )
    p = make_plan(cfg, device_mesh(2, 4))
    assert p["params"]["total"] == cfg.model.num_params(4)
    _check_against_compiled(p)


def test_bert_paper_config_plans_on_its_model_degree():
    cfg = config.load("configs/megatron_bert_3p9b.py")
    p = make_plan(cfg, device_mesh(1, 4), target_name="h100")
    assert p["params"]["total"] == cfg.model.num_params(4) and p["params"]["total"] > 3.8e9
    _check_against_compiled(p)


@pytest.mark.parametrize("remat", ["selective", "full"])
def test_dry_run_with_sequence_parallelism_agrees_with_its_compiled_step(remat):
    cfg = config.replace(
        config.load("configs/gpt2_tiny.py"),
        model=dict(sequence_parallel=True, remat=remat, seq_len=64),
        train=dict(batch_size=8, micro_batches=2),
    )
    p = make_plan(cfg, device_mesh(2, 4))
    compiled, analytic = p["memory"]["compiled"], p["memory"]["analytic_as_compiled"]
    assert compiled["arguments"] == analytic["arguments"]
    assert 0.85 < compiled["temporaries"] / analytic["temporaries"] < 1.15
    b, s, h = 8 // 2 // 2, 64, cfg.model.hidden
    for kind, what, shape in (
        ("all-gather", "all-gathers (b, s, h)", [b, s, h]),
        ("reduce-scatter", "reduce-scatters (b, s / T, h)", [b, s // 4, h]),
    ):
        count, _ = p["collectives_expected"][f"model: {what}"]
        found = [r for r in p["collectives"] if r["kind"] == kind and r["axes"] == ["model"]]
        assert sum(r["count"] for r in found if r["shapes"] == [shape]) == count, kind


def test_state_bytes_per_parameter_follow_megatron_lms_table():
    base = config.Config(model=SMALL)
    for dtype, before, after in (("float16", 20, 4 + 16 / 64), ("bfloat16", 18, 6 + 12 / 64)):
        cfg = config.replace(base, model=dict(compute_dtype=dtype))
        assert estimates.state_bytes_per_param(cfg, data_degree=64)["megatron"] == before
        on = config.replace(cfg, optim=dict(distributed=True))
        assert estimates.state_bytes_per_param(on, data_degree=64)["megatron"] == after
        assert estimates.state_bytes_per_param(on, data_degree=64)["kept"] == 12 / 64


def test_dry_run_with_the_distributed_optimizer_agrees_with_its_compiled_step():
    cfg = config.replace(
        tiny_config(compute_dtype="bfloat16"),
        optim=dict(distributed=True),
        train=dict(micro_batches=2),
    )
    p = make_plan(cfg, device_mesh(2, 4), target_name="v100")
    _check_against_compiled(p)
    st = p["state_bytes_per_param"]
    assert st["replicated_over_data"] == ["h/attn/qkv/bias", "h/mlp/fc1/bias"]
    # Master weights and moments: 12 / D bytes per parameter, but for the two biases left whole.
    assert st["kept"] == 6 < st["kept_compiled"] < 6.1
    text = report(p)
    assert "h/attn/qkv/bias, h/mlp/fc1/bias" in text
    assert "a V100 cannot run bfloat16" in text


@pytest.mark.slow  # the file's largest programs: twice the others' compile time
@pytest.mark.parametrize("repeats", [1, 2])
def test_dry_run_of_a_pipelined_step_agrees_with_its_compiled_step(repeats):
    """P=2, D=2, T=2, m=4: the schedule's transfers are the compiled collective-permutes, the
    stage's layers run once per tick with the plan's all-reduces, the memory estimate of the
    micro-batches in flight matches the compiled program's."""
    from megajax import mesh, pipeline_arithmetic

    cfg = config.replace(
        config.load("configs/gpt2_tiny.py"),
        model=dict(seq_len=64, remat="full"),
        train=dict(batch_size=16, micro_batches=4, pipeline_repeats=repeats),
    )
    p = make_plan(cfg, mesh.make("pipeline=2,data=2,model=2", devices=jax.devices()[:8]))
    pp = p["pipeline"]
    assert pp["ticks"] == repeats * 4 + 1 and pp["bubble"] == 1 / (repeats * 4 + 1)
    assert (
        pp["transfers_compiled"] == pp["transfers"] == pipeline_arithmetic.transfers(2, repeats, 4)
    )
    # XLA:CPU moves float32: the bytes of the plan's compute dtype times 4 / itemsize.
    assert pp["transfer_bytes_compiled"] == pp["transfer_bytes"]
    # GPipe keeps every micro-batch's buffers and heads: counted within 30% on this small
    # model, whose 50k-token head outweighs its layers (the 145.6B model's within 3%).
    _check_against_compiled(p, tolerance=0.3)
    roof = p["roofline"]["this mesh"]
    assert roof["bubble_s"] > 0 and roof["pipeline_s"] > 0
    assert "pipeline: gpipe, P=2 stages" in report(p)
