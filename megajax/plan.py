"""Dry run: what one train step costs on a mesh, before any accelerator is touched.

The step is compiled ahead of time from abstract parameters (nothing of model size is
allocated). The plan sets beside each other:
- parameters in total and per device (from the shards' shapes);
- per-device memory: the compiled program's own figures and an analytic estimate (weights,
  gradients, Adam moments, activations with and without recomputation), and whether that
  fits a target accelerator;
- model FLOPs (Megatron-LM's count) and hardware FLOPs (plus the recomputed forward);
- the collectives of the optimized HLO (megajax.hlo) beside the counts the paper predicts;
- a roofline step time, MFU and weak-scaling efficiency on the target.

The formulas use only transformer sizes (hidden, MLP width, heads, layers, length, vocabulary),
so an encoder (BERT) plugs in by its own parameter count and FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from megajax import activations, hlo, models, parallel, pipeline
from megajax.config import Config, ConfigError, ModelConfig

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator of a training cluster: what the roofline needs to know."""

    name: str
    memory_bytes: float
    peak_flops: float  # dense bf16 (V100: fp16) tensor-core FLOP/s
    intra_node_bw: float  # bytes/s per accelerator, one direction (NVLink / NVSwitch)
    inter_node_bw: float  # bytes/s per accelerator, one direction (InfiniBand share)
    node_size: int  # accelerators sharing the intra-node fabric


# Vendor data sheets. Inter-node: one 400 Gb/s NDR port per H100 (DGX H100), one 200 Gb/s HDR
# port per A100 (DGX A100); the paper's DGX-2H has 8 x 100 Gb/s for 16 V100s.
TARGETS = {
    "h100": Target("H100 SXM 80GB", 80 * GB, 989e12, 450 * GB, 50 * GB, 8),
    "a100": Target("A100 SXM 80GB", 80 * GB, 312e12, 300 * GB, 25 * GB, 8),
    "v100": Target("V100 SXM3 32GB (DGX-2H)", 32 * GB, 125e12, 150 * GB, 6.25 * GB, 16),
}

# Measured by the paper (section 5.1) for comparison with the roofline.
PAPER_WEAK_SCALING = {"8-way model parallel": 0.77, "512 GPUs (8-way model x 64-way data)": 0.74}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r}: choose one of {sorted(TARGETS)}")
    return TARGETS[name]


# ---------------------------------------------------------------------------------------------
# Parameters


def params_per_device(m: ModelConfig, model_degree: int, stages: int = 1) -> int:
    """Parameters one device holds under the Megatron plan: QKV, fc1 (and their biases), the
    attention output and fc2 weights and the word embedding (with BERT's masked-LM output bias)
    are split T ways; layer norms, row-parallel biases, position and token-type embeddings and
    BERT's small heads are replicated. Pipeline stages split the layers P ways; everything
    outside them is on every stage."""
    return stage_layer_params(m, model_degree, stages) + outside_params(m, model_degree)


def stage_layer_params(m: ModelConfig, model_degree: int, stages: int = 1) -> int:
    """The transformer layers' parameters one device holds: its stage's L / P layers."""
    split, replicated = m.layer_params(model_degree)
    return m.num_layers // stages * (split // model_degree + replicated)


def outside_params(m: ModelConfig, model_degree: int) -> int:
    """The parameters outside the layers one device holds (on every pipeline stage)."""
    t = model_degree
    split, replicated = m.layer_params(t)
    # The word embedding, and an untied LM head: both split by vocabulary rows.
    tables = m.padded_vocab_size(t) * m.hidden * (1 if m.tie_embeddings else 2)
    # Everything outside the layers, as num_params counts it, with the vocabulary rows split.
    outside = m.num_params(t) - m.num_layers * (split + replicated) - tables
    if m.arch == "bert":
        vocab = m.padded_vocab_size(t)
        outside -= vocab - vocab // t  # the masked-LM head's output bias is split too
    return tables // t + outside


# ---------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # float32 master weights
    optimizer: float  # Adam's two float32 moments (and its int32 step counts)
    inputs: float  # the step's int32 input and target tokens (and its step, skip counters)
    gradients: float  # float32; a second buffer accumulates micro-batches
    update: float  # the float32 update tree optax builds before adding it to the weights
    # Saved for the backward pass of one micro-batch under each model.remat (and the
    # configured sequence parallelism): "none", "selective" and "full".
    activations: float
    activations_selective: float
    activations_remat: float
    activations_paper: float  # the paper's Table 2 for the configured switches, 16-bit
    compute_weights: float = 0.0  # distributed optimizer: the gathered compute_dtype copy

    @property
    def arguments(self) -> float:
        """What the compiled step takes as arguments: the train state and the batch."""
        return self.weights + self.optimizer + self.inputs

    def activations_for(self, remat: str) -> float:
        return {
            "none": self.activations,
            "selective": self.activations_selective,
            "full": self.activations_remat,
        }[remat]

    def temporaries(self, *, remat: str) -> float:
        """What the step allocates while it runs."""
        acts = self.activations_for(remat)
        return self.compute_weights + self.gradients + self.update + acts

    def total(self, *, remat: str) -> float:
        return self.arguments + self.temporaries(remat=remat)


def estimate_memory(
    cfg: Config,
    *,
    data_degree: int,
    model_degree: int,
    master_params: int | None = None,
    stages: int = 1,
) -> MemoryEstimate:
    """Per-device bytes. With optim.distributed, `master_params` is the per-device count of the
    float32 master weights (those split over `data` and those left whole); by default the
    parameters per device over the data degree. With pipeline stages, the micro-batches are in
    flight together (activations.pipelined_activation_bytes)."""
    m, tr = cfg.model, cfg.train
    p = params_per_device(m, model_degree, stages)
    batch = tr.batch_size // tr.micro_batches // data_degree  # one micro-batch on one device
    sequences = batch * (m.num_choices if m.arch == "bert_multiple_choice" else 1)
    head = activations.head_activation_bytes(m, batch=batch, model_degree=model_degree)

    def stack(remat):
        m_remat = dataclasses.replace(m, remat=remat)
        if stages > 1:  # the head's and the buffers' too
            return activations.pipelined_activation_bytes(
                m_remat, batch=sequences, model_degree=model_degree, stages=stages,
                repeats=tr.pipeline_repeats, micro=tr.micro_batches,
            )["total"] - head  # fmt: skip
        return activations.stack_activation_bytes(
            m_remat, batch=sequences, model_degree=model_degree
        )

    paper = activations.paper_layer_activation_bytes(m, batch=sequences, model_degree=model_degree)
    sample = sum(math.prod(shape) for shape in models.batch_fields(m).values())
    counters = 2 * 4 + (3 * 4 if m.compute_dtype == "float16" else 0)  # + the loss scaler
    accumulate = 2 if tr.micro_batches > 1 and stages == 1 else 1
    if cfg.optim.distributed:
        e = jnp.dtype(m.compute_dtype).itemsize
        master = master_params if master_params is not None else p / data_degree
        # Gradients of the compute copy (compute_dtype), then float32 on the master shards.
        gradients, copy = e * p + 4 * master * accumulate, e * p
    else:
        master, gradients, copy = p, 4 * p * accumulate, 0
    if stages > 1:  # the layers' weights rearranged by stage, and their gradient so laid out
        copy += 2 * 4 * stage_layer_params(m, model_degree, stages)
    return MemoryEstimate(
        weights=4 * master,
        optimizer=8 * master + 2 * 4,  # + the counts of scale_by_adam and scale_by_schedule
        inputs=4 * tr.batch_size // data_degree * sample + counters,  # int32 fields; counters
        gradients=gradients,
        update=4 * master,
        activations=stack("none") + head,
        activations_selective=stack("selective") + head,
        activations_remat=stack("full") + head,
        activations_paper=m.num_layers // stages * paper,
        compute_weights=copy,
    )


# Megatron-LM's per-device bytes per parameter (its distributed optimizer's documentation):
# (without the distributed optimizer, with it: the part every device holds, the part split D
# ways). fp16: fp16 weights and gradients + fp32 master weights, moments and gradients; bf16:
# bf16 weights, fp32 gradients + fp32 master weights and moments; fp32: the weights are the
# master weights.
MEGATRON_STATE_BYTES = {"float16": (20, 4, 16), "bfloat16": (18, 6, 12), "float32": (16, 8, 8)}


def state_bytes_per_param(cfg: Config, *, data_degree: int) -> dict:
    """Weights, gradients and Adam state per parameter and device: Megatron-LM's table beside
    this code's layout (the float32 master weights and moments split over `data`; a gathered
    compute_dtype copy and its gradients during the step; without the switch float32 weights
    and gradients, cast to the compute dtype inside the layers)."""
    whole, fixed, split = MEGATRON_STATE_BYTES[cfg.model.compute_dtype]
    e, d = jnp.dtype(cfg.model.compute_dtype).itemsize, data_degree
    if cfg.optim.distributed:
        return {
            "megatron": fixed + split / d,
            "megatron_formula": f"{fixed} + {split}/D",
            "here": 2 * e + 16 / d,
            "here_formula": f"{2 * e} + 16/D",
            "kept": 12 / d,  # float32 master weights and moments, between steps
        }
    return {
        "megatron": whole,
        "megatron_formula": str(whole),
        "here": 16,
        "here_formula": "16",
        "kept": 12,
    }


# ---------------------------------------------------------------------------------------------
# FLOPs and communication


def flops_per_step(cfg: Config) -> dict[str, float]:
    """Model FLOPs (forward + backward, Megatron-LM's count) and hardware FLOPs (adding the
    forward pass of every layer again with full recomputation, of the attention core with
    selective), for the global batch."""
    m = cfg.model
    tokens = cfg.train.batch_size * m.tokens_per_sample
    model = m.flops_per_token() * tokens
    core = 4 * m.seq_len * m.hidden  # q k^T and the values, per token and layer
    recomputed = {"none": 0, "selective": core, "full": 24 * m.hidden**2 + core}[m.remat]
    return {"model": model, "hardware": model + m.num_layers * recomputed * tokens}


def expected_collectives(
    cfg: Config, *, data_degree: int, model_degree: int, stages: int = 1
) -> dict:
    """Collectives the paper's plan implies per step: (count, elements) by mesh axis. With
    pipeline stages a device runs L / (v P) layers per tick, on one micro-batch, for every
    tick; the embedding and heads run on all micro-batches at once."""
    m, tr = cfg.model, cfg.train
    micro, b = tr.micro_batches, tr.batch_size // tr.micro_batches // data_degree
    runs = micro * m.num_layers  # layers a device runs per step
    lm = m.arch != "bert_multiple_choice"
    # The embedding's and the head's, one per micro-batch; pipelined, one for all of them.
    outside, batched = micro * (2 if lm else 1), 1
    if stages > 1:
        ticks = pipeline.ticks(stages, tr.pipeline_repeats, micro)
        runs = ticks * (m.num_layers // (stages * tr.pipeline_repeats))
        outside, batched = 2 if lm else 1, micro
    b *= 1 if lm else m.num_choices  # sequences per device
    found = {}
    n = b * m.seq_len * m.hidden
    if model_degree > 1 and m.sequence_parallel:
        # Per layer 2 all-gathers and 2 reduce-scatters forward; backward the reduce-scatters'
        # transposes (2 all-gathers), the gathers' (2 reduce-scatters) and 2 gathers again of
        # the column-parallel inputs; the embedding's reduce-scatter and the head's gather,
        # and their transposes. Full recomputation adds the attention output's reduce-scatter
        # (its gathers are the backward's own).
        again = 1 if m.remat == "full" else 0
        gathers = 6 * runs + outside
        scatters = (4 + again) * runs + outside
        elements = (6 * runs + batched * outside) * n
        found["model: all-gathers (b, s, h)"] = (gathers, elements)
        elements = ((4 + again) * runs + batched * outside) * n // model_degree
        found["model: reduce-scatters (b, s / T, h)"] = (scatters, elements)
    elif model_degree > 1:
        # 2 forward + 2 backward per layer (+1: the attention all-reduce is recomputed), the
        # embedding and the tied head's gradient, then max, sum of exp and target logit.
        per_layer = 4 + (1 if m.remat == "full" else 0)
        acts = per_layer * runs + outside
        found["model: activations (b, s, h)"] = (acts, (per_layer * runs + batched * outside) * n)
    if model_degree > 1:
        if lm:
            found["model: cross-entropy (b, s)"] = (3 * micro, 3 * micro * b * m.seq_len)
        if m.kv_by_rows(model_degree):  # the kv weight gathered per layer, its gradient
            kv, again = m.hidden * 2 * m.kv_heads * m.head_dim, 2 if m.remat == "full" else 1
            found["model: kv weight all-gathers"] = (again * runs, again * runs * kv)
            found["model: kv gradient reduce-scatters"] = (runs, runs * kv // model_degree)
            if m.bias:
                found["model: kv bias gradients"] = (runs, runs * 2 * m.kv_heads * m.head_dim)
    if data_degree > 1:
        p = params_per_device(m, model_degree, stages)
        found["data: gradients"] = (None, p)
    return found


def summarize_collectives(found: list[hlo.Collective]) -> list[dict]:
    """One row per (kind, mesh axes, shape): executions per step and bytes per step."""
    rows: dict[tuple, dict] = {}
    for c in found:
        key = (c.kind, c.axes, c.shapes)
        row = rows.setdefault(
            key,
            {
                "kind": c.kind,
                "axes": list(c.axes),
                "shapes": [list(s) for s in c.shapes],
                "count": 0,
                "bytes": 0,
            },
        )
        row["count"] += c.runs
        row["bytes"] += c.runs * c.bytes
    return sorted(rows.values(), key=lambda r: -r["bytes"])


def pipeline_transfer_bytes(cfg: Config, data_degree: int, model_degree: int, stages: int):
    """Bytes one device sends to the next stage per step: pipeline.transfers() collective-
    permutes of its (micro-batch, length, hidden) share, split over `model` too with sequence
    parallelism."""
    m, tr = cfg.model, cfg.train
    if stages == 1:
        return 0
    r = model_degree if m.sequence_parallel else 1
    batch = tr.batch_size // tr.micro_batches // data_degree
    one = pipeline.transfer_bytes(
        batch, m.seq_len // r, m.hidden, jnp.dtype(m.compute_dtype).itemsize
    )
    return pipeline.transfers(stages, tr.pipeline_repeats, tr.micro_batches) * one


def allreduce_elements(kind: str, elements: float, group: int) -> float:
    """The all-reduce that moves as many bytes as a collective with `elements` in its result:
    a ring all-gather or reduce-scatter of a whole tensor moves half an all-reduce's."""
    return {"all-gather": elements / 2, "reduce-scatter": elements * group / 2}.get(kind, elements)


def allreduce_seconds(nbytes: float, group: int, bandwidth: float) -> float:
    """A ring all-reduce moves 2 (n - 1) / n of the buffer through each member's link."""
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / bandwidth


def roofline(
    cfg: Config,
    tgt: Target,
    *,
    data_degree: int,
    model_degree: int,
    model_elements: float,
    stages: int = 1,
) -> dict:
    """Step time = compute at peak + model all-reduces (intra-node) + gradient all-reduce
    (inter-node once the mesh leaves a node), nothing overlapped: an optimistic compute term
    and a pessimistic communication term. Weak-scaling efficiency = compute / step time.

    With P pipeline stages (across nodes once D T fills one), the step adds the bubble (each
    stage idles, or computes on zeros, P - 1 of its v m + P - 1 ticks), the embedding and
    heads that every stage computes again, the stage-to-stage collective-permutes (one per
    tick each way, on the critical path), the two all-reduces over `pipeline` of the
    micro-batches' (m b s h) buffers, and with circular repeats the layers' weights sent to the
    stages that run them (and their gradients back)."""
    m, tr = cfg.model, cfg.train
    devices = stages * data_degree * model_degree
    fl = flops_per_step(cfg)
    compute = fl["hardware"] / devices / tgt.peak_flops
    e = jnp.dtype(m.compute_dtype).itemsize
    model_bytes = e * model_elements  # activations, in the compute dtype
    model_s = allreduce_seconds(model_bytes, model_degree, tgt.intra_node_bw)
    grad_bytes = 4 * params_per_device(m, model_degree, stages)  # float32 gradients
    data_bw = tgt.inter_node_bw if devices > tgt.node_size else tgt.intra_node_bw
    data_s = allreduce_seconds(grad_bytes, data_degree, data_bw)
    bubble_s = p2p_s = 0.0
    if stages > 1:
        v, micro = tr.pipeline_repeats, tr.micro_batches
        tokens = tr.batch_size * m.tokens_per_sample
        outside = dataclasses.replace(m, num_layers=0).flops_per_token()  # the LM head
        layers = fl["hardware"] - outside * tokens
        bubble_s = layers / devices / tgt.peak_flops * (stages - 1) / (v * micro)
        compute += outside * tokens * (stages - 1) / devices / tgt.peak_flops
        node = data_degree * model_degree >= tgt.node_size  # a stage fills a node
        p2p_bw = tgt.inter_node_bw if node else tgt.intra_node_bw
        p2p_s = pipeline_transfer_bytes(cfg, data_degree, model_degree, stages) / p2p_bw
        # Over `pipeline` also: the last stage's outputs to every stage's heads, and the
        # gradient of the micro-batches entering stage 0 back to every stage's embedding.
        buffers = tr.batch_size // data_degree * m.seq_len * m.hidden * e
        p2p_s += 2 * allreduce_seconds(buffers, stages, p2p_bw)
        if v > 1:  # float32 layer weights to the stages that run them, gradients back
            layer_params = stage_layer_params(m, model_degree, stages)
            p2p_s += 2 * 4 * layer_params * (v - 1) / v / p2p_bw
    step = compute + model_s + data_s + bubble_s + p2p_s
    return {
        "compute_s": compute,
        "model_allreduce_s": model_s,
        "data_allreduce_s": data_s,
        "bubble_s": bubble_s,
        "pipeline_s": p2p_s,
        "step_s": step,
        "mfu": fl["model"] / devices / step / tgt.peak_flops,
        "weak_scaling_efficiency": compute / step,
        "tokens_per_sec": cfg.train.batch_size * cfg.model.tokens_per_sample / step,
        "hardware_tflops_per_device": fl["hardware"] / devices / step / 1e12,
    }


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(cfg: Config, device_mesh, *, target_name: str = "h100") -> dict:
    """Compile one train step for `device_mesh` from abstract state and describe its cost."""
    from megajax.trainer import Trainer

    tgt = target(target_name)
    data, model = device_mesh.shape[parallel.DATA], device_mesh.shape[parallel.MODEL]
    stages = device_mesh.shape[parallel.PIPELINE]
    trainer = Trainer(cfg, device_mesh)
    abstract = trainer.abstract_state()
    per_device = sum(  # as the forward pass holds them: split over `model` only
        math.prod(s.shard_shape(a.shape))
        for a, s in zip(
            jax.tree.leaves(abstract["params"]),
            jax.tree.leaves(trainer.compute_sharding),
            strict=True,
        )
    )
    master = sum(
        math.prod(s.shard_shape(a.shape))
        for a, s in zip(
            jax.tree.leaves(abstract["params"]),
            jax.tree.leaves(trainer.state_sharding["params"]),
            strict=True,
        )
    )
    compiled, compile_s = trainer.compile_train_step()
    stats = compiled.memory_analysis()
    found = hlo.collectives(compiled.as_text(), dict(device_mesh.shape))
    est = estimate_memory(
        cfg, data_degree=data, model_degree=model, master_params=master, stages=stages
    )
    expected = expected_collectives(cfg, data_degree=data, model_degree=model, stages=stages)

    model_elements = sum(
        c.runs * allreduce_elements(c.kind, c.elements, model)
        for c in found
        if c.axes == (parallel.MODEL,)
    )
    plans = {
        "this mesh": roofline(
            cfg,
            tgt,
            data_degree=data,
            model_degree=model,
            model_elements=model_elements,
            stages=stages,
        )
    }
    # The paper's largest run: 512 accelerators, this model degree, the same global batch.
    # Each device then holds data / scaled of the activations (and of their all-reduces); its
    # gradient bytes do not change, only the ring's factor and the fabric do.
    scaled = 512 // model
    if scaled != data and stages == 1:
        plans[f"data={scaled} (512 devices)"] = roofline(
            cfg,
            tgt,
            data_degree=scaled,
            model_degree=model,
            model_elements=model_elements * data / scaled,
        )
    compiled_bytes = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }
    compiled_bytes["total"] = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    remat = cfg.model.remat
    analytic_total = est.total(remat=remat)
    platform = jax.devices()[0].platform
    # XLA:CPU computes and stores bfloat16 as float32: the comparable estimate uses float32.
    as_compiled = est
    if platform == "cpu":
        f32 = dataclasses.replace(cfg.model, compute_dtype="float32")
        f32_cfg = dataclasses.replace(cfg, model=f32)
        as_compiled = estimate_memory(
            f32_cfg, data_degree=data, model_degree=model, master_params=master, stages=stages
        )
    notes = []
    if tgt.name.startswith("V100") and cfg.model.compute_dtype == "bfloat16":
        notes.append(
            "a V100 cannot run bfloat16 (its tensor cores do float16): use "
            "--set model.compute_dtype=float16, with dynamic loss scaling"
        )
    if stages > 1 and data == 1 and cfg.train.micro_batches < cfg.train.batch_size:
        notes.append(
            f"data=1 holds the whole global batch of {cfg.train.batch_size}: for one "
            "data-parallel replica of a larger layout, --set train.batch_size=B/D "
            "--set train.micro_batches=m/D"
        )
    return {
        "config": dataclasses.asdict(cfg.model),
        "mesh": {"pipeline": stages, "data": data, "model": model},
        "pipeline": pipeline_summary(cfg, stages=stages, data=data, model=model, found=found),
        # Elements of the all-reduces over `model` that move as many bytes (the roofline's).
        "model_allreduce_elements": model_elements,
        "platform": platform,
        "compile_seconds": compile_s,
        "params": {
            "total": trainer.num_params,
            "per_device": per_device,
            "per_device_analytic": params_per_device(cfg.model, model, stages),
        },
        "memory": {
            "compiled": compiled_bytes,
            "analytic": {
                **dataclasses.asdict(est),
                "arguments": est.arguments,
                "temporaries": est.temporaries(remat=remat),
                "activations_used": est.activations_for(remat),
                "total": analytic_total,
            },
            "analytic_as_compiled": {
                "arguments": as_compiled.arguments,
                "temporaries": as_compiled.temporaries(remat=remat),
            },
            "target": tgt.name,
            "target_bytes": tgt.memory_bytes,
            "fits": analytic_total <= tgt.memory_bytes,
        },
        "state_bytes_per_param": {
            "distributed": cfg.optim.distributed,
            "compute_dtype": cfg.model.compute_dtype,
            **state_bytes_per_param(cfg, data_degree=data),
            # float32 master weights and moments, from the compiled program's arguments
            "kept_compiled": (stats.argument_size_in_bytes - est.inputs) / per_device,
            "replicated_over_data": trainer.replicated_over_data,
        },
        "notes": notes,
        "flops_per_step": flops_per_step(cfg),
        "collectives": summarize_collectives(found),
        "collectives_expected": {k: list(v) for k, v in expected.items()},
        "roofline": {"target": tgt.name, **plans},
        "paper_weak_scaling": PAPER_WEAK_SCALING,
    }


def pipeline_summary(cfg: Config, *, stages: int, data: int, model: int, found) -> dict | None:
    """The schedule's figures: P, v, m, ticks, bubble, micro-batches in flight, and the
    collective-permutes per step, predicted and found in the compiled program."""
    if stages == 1:
        return None
    m, tr = cfg.model, cfg.train
    v, micro = tr.pipeline_repeats, tr.micro_batches
    batch = tr.batch_size // micro // data
    r = model if m.sequence_parallel else 1
    stage_input = ((1, batch, m.seq_len // r, m.hidden),)  # one stage's micro-batch share
    permutes = [c for c in found if c.kind == "collective-permute" and c.shapes == stage_input]
    # Anything else sent round the stages: with circular repeats the layers' weights, stored
    # in order, go to the stages that run them (and their gradients back) in every step.
    others = [c for c in found if c.kind == "collective-permute" and c.shapes != stage_input]
    return {
        "stages": stages,
        "repeats": v,
        "micro_batches": micro,
        "ticks": pipeline.ticks(stages, v, micro),
        "bubble": pipeline.bubble_fraction(stages, v, micro),
        "in_flight_micro_batches": pipeline.ticks(stages, v, micro) / v,
        "in_flight_bytes": activations.pipelined_activation_bytes(
            cfg.model, batch=batch, model_degree=model, stages=stages, repeats=v, micro=micro
        )["total"],
        "transfers": pipeline.transfers(stages, v, micro),
        "transfer_bytes": pipeline_transfer_bytes(cfg, data, model, stages),
        "transfers_compiled": sum(c.runs for c in permutes),
        "transfer_bytes_compiled": sum(c.runs * c.bytes for c in permutes),
        "other_permute_bytes_compiled": sum(c.runs * c.bytes for c in others),
    }


def _gb(x: float) -> str:
    return f"{x / GB:,.2f} GB"


def report(plan: dict) -> str:
    """The plan as a few readable tables."""
    mem, p = plan["memory"], plan["params"]
    an, co = mem["analytic"], mem["compiled"]
    remat = plan["config"]["remat"]
    acts = an["activations_used"]
    sp = "on" if plan["config"]["sequence_parallel"] else "off"
    lines = [
        f"dry run: mesh pipeline={plan['mesh']['pipeline']} data={plan['mesh']['data']} "
        f"model={plan['mesh']['model']}, "
        f"compiled in {plan['compile_seconds']:.1f}s on {plan['platform']}",
        f"parameters: {p['total']:,} total, {p['per_device']:,} per device "
        f"(analytic {p['per_device_analytic']:,})",
        "",
        f"memory per device (remat={remat}, sequence parallel {sp})",
        "                                      analytic      compiled",
        f"  weights + Adam moments + batch  {_gb(an['arguments']):>12}  "
        f"{_gb(co['arguments']):>12}  (arguments)",
        f"  gradients + update              {_gb(an['gradients'] + an['update']):>12}",
        f"  activations, remat none         {_gb(an['activations']):>12}",
        f"  activations, remat selective    {_gb(an['activations_selective']):>12}",
        f"  activations, remat full         {_gb(an['activations_remat']):>12}",
        f"  layers' activations, paper      {_gb(an['activations_paper']):>12}  "
        "(arXiv 2205.05198 Table 2, 16-bit)",
        f"  gradients, update, activations  {_gb(an['temporaries']):>12}  "
        f"{_gb(co['temporaries']):>12}  (temporaries)",
        f"  total                           {_gb(an['total']):>12}  {_gb(co['total']):>12}",
    ]
    if plan["platform"] == "cpu":
        lines.append(
            f"  XLA:CPU (faked devices) computes bf16 as float32; the estimate at float32 is "
            f"{_gb(plan['memory']['analytic_as_compiled']['temporaries'])} of temporaries"
        )
    lines.append(
        f"  fits a {mem['target']} ({_gb(mem['target_bytes'])}): "
        f"{'yes' if mem['fits'] else 'NO'} (analytic, {plan['config']['compute_dtype']} "
        f"activations {_gb(acts)})"
    )
    st = plan["state_bytes_per_param"]
    lines.append(
        f"  weights, gradients, Adam state per parameter (optim.distributed="
        f"{str(st['distributed']).lower()}, D={plan['mesh']['data']}, {st['compute_dtype']}): "
        f"Megatron-LM {st['megatron_formula']} = {st['megatron']:.2f} B; here "
        f"{st['here_formula']} = {st['here']:.2f} B, of which master weights + moments "
        f"{st['kept']:.2f} B (compiled {st['kept_compiled']:.2f} B)"
    )
    if st["replicated_over_data"]:
        lines.append(
            "  replicated over data (no dimension the data degree divides): "
            + ", ".join(st["replicated_over_data"])
        )
    lines += [f"  note: {note}" for note in plan["notes"]]
    pp = plan["pipeline"]
    if pp:
        lines += [
            "",
            f"pipeline: P={pp['stages']} stages, v={pp['repeats']} repeats, "
            f"m={pp['micro_batches']} micro-batches: {pp['ticks']} ticks, bubble "
            f"{100 * pp['bubble']:.1f}% = (P-1)/(v m+P-1)",
            f"  in flight per device: {pp['in_flight_micro_batches']:.1f} micro-batches of the "
            f"stage's layers (GPipe: all m, and the bubble ticks), "
            f"{_gb(pp['in_flight_bytes'])} with the micro-batch buffers and heads",
            f"  collective-permutes per step: {pp['transfers']} of "
            f"{_gb(pp['transfer_bytes'] / max(pp['transfers'], 1))}, "
            f"{_gb(pp['transfer_bytes'])} per device (compiled: {pp['transfers_compiled']}, "
            f"{_gb(pp['transfer_bytes_compiled'])})",
        ]
        if pp["other_permute_bytes_compiled"]:
            lines.append(
                f"  other collective-permutes over pipeline: "
                f"{_gb(pp['other_permute_bytes_compiled'])} per step (circular repeats: the "
                "layers' weights to the stages that run them, their gradients back)"
            )
    fl = plan["flops_per_step"]
    lines += [
        "",
        f"FLOPs per step: model {fl['model']:.3e}, hardware {fl['hardware']:.3e} (remat={remat})",
        "",
        "collectives per step (optimized HLO)",
        f"  {'kind':<12} {'axes':<8} {'shape':<28} {'count':>7} {'bytes':>14}",
    ]
    for row in plan["collectives"]:
        shape = ",".join("x".join(map(str, s)) or "()" for s in row["shapes"])
        shape = shape if len(shape) <= 28 else shape[:25] + "..."
        axes = ",".join(row["axes"]) or "-"
        lines.append(
            f"  {row['kind']:<12} {axes:<8} {shape:<28} {row['count']:>7} {row['bytes']:>14,}"
        )
    for what, (count, elements) in plan["collectives_expected"].items():
        lines.append(
            f"  expected by the plan: {what}: {count if count is not None else 'per parameter'}"
            f" collectives, {elements:,} elements"
        )
    data_bytes = sum(r["bytes"] for r in plan["collectives"] if r["axes"] == [parallel.DATA])
    if "data: gradients" in plan["collectives_expected"]:
        once = 4 * plan["collectives_expected"]["data: gradients"][1]
        if data_bytes > 1.5 * once:
            lines.append(
                f"  note: the gradients cross `data` {data_bytes / once:.1f}x per step in this "
                "XLA:CPU program (reduced inside the micro-batch loop, the tied embedding's two "
                "terms apart); XLA:GPU's collective passes sink and reassociate such "
                "all-reduces; the roofline counts once"
            )
    roof = plan["roofline"]
    lines += ["", f"roofline on {roof['target']} (compute at peak, communication not overlapped)"]
    for name, r in roof.items():
        if name == "target":
            continue
        ms = {k: f"{1e3 * v:.1f}" for k, v in r.items()}
        lines.append(
            f"  {name:<28} step {ms['step_s']} ms (compute {ms['compute_s']}, model "
            f"all-reduce {ms['model_allreduce_s']}, data all-reduce {ms['data_allreduce_s']}"
            + (
                f", bubble {ms['bubble_s']}, pipeline transfers {ms['pipeline_s']}"
                if r["bubble_s"] or r["pipeline_s"]
                else ""
            )
            + f") | MFU {100 * r['mfu']:.0f}% | {r['hardware_tflops_per_device']:.0f} "
            f"hardware TFLOP/s per device | weak scaling "
            f"{100 * r['weak_scaling_efficiency']:.0f}%"
        )
    paper = ", ".join(f"{k} {100 * v:.0f}%" for k, v in plan["paper_weak_scaling"].items())
    lines.append(f"  paper, measured on V100s: {paper}")
    return "\n".join(lines)


def dry_run(cfg: Config, device_mesh, workdir: str | Path, *, target_name: str, log=print):
    """Make the plan, print it and write it to workdir/plan.json."""
    plan = make_plan(cfg, device_mesh, target_name=target_name)
    log(report(plan))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "plan.json"
    path.write_text(json.dumps(plan, indent=2, default=_jsonable))
    log(f"wrote {path}")
    return plan


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
