"""What one train step needs, from the model's sizes alone: parameters and memory per device,
FLOPs, the collectives the Megatron plan implies, and a roofline step time on a target
accelerator.

The formulas use only transformer sizes (hidden, MLP width, heads, layers, length, vocabulary),
so an encoder (BERT) plugs in by its own parameter count and FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from megajax import models, pipeline_arithmetic
from megajax.config import Config, ConfigError, LoRAConfig, ModelConfig
from megajax.plan import activations

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


def params_per_device(
    m: ModelConfig, model_degree: int, stages: int = 1, expert_degree: int = 1
) -> int:
    """Parameters one device holds under the Megatron plan: QKV, fc1 (and their biases), the
    attention output and fc2 weights and the word embedding (with BERT's masked-LM output bias)
    are split T ways; layer norms, row-parallel biases, position and token-type embeddings and
    BERT's small heads are replicated. Pipeline stages split the layers P ways; everything
    outside them is on every stage. A MoE layer's experts are split over `expert` too."""
    layers = stage_layer_params(m, model_degree, stages, expert_degree)
    return layers + outside_params(m, model_degree)


def stage_layer_params(
    m: ModelConfig, model_degree: int, stages: int = 1, expert_degree: int = 1
) -> int:
    """The transformer layers' parameters one device holds: its stage's L / P layers."""
    if m.moe:  # dense and MoE layers
        split, replicated = m.stack_params(model_degree, expert_degree)
        return (split // model_degree + replicated) // stages
    split, replicated = m.layer_params(model_degree)
    return m.num_layers // stages * (split // model_degree + replicated)


def adapter_layer_params(m: ModelConfig, lora: LoRAConfig, model_degree: int) -> tuple[int, int]:
    """One transformer layer's LoRA adapter parameters: (split over `model`, whole on every
    shard). A follows its kernel's rows and B its columns (megajax.lora): on QKV and fc1 B is
    split, on the attention output and fc2 A is; the kv adapter of a kv weight split by rows
    (more model shards than key/value heads) is whole."""
    if lora.rank == 0:
        return 0, 0
    r, h, f = lora.rank, m.hidden, m.mlp_hidden
    q, kv = m.num_heads * m.head_dim, 2 * m.kv_heads * m.head_dim
    fc1 = 2 * f if m.mlp == "swiglu" else f
    split = whole = 0
    for target in lora.target_names:
        if target == "qkv" and m.grouped_query:
            whole += 2 * h * r
            split += r * q
            if m.kv_by_rows(model_degree):
                whole += r * kv
            else:
                split += r * kv
        elif target == "qkv":
            whole, split = whole + h * r, split + r * (q + kv)
        elif target == "proj":
            split, whole = split + q * r, whole + r * h
        elif target == "fc1":
            whole, split = whole + h * r, split + r * fc1
        else:  # fc2
            split, whole = split + f * r, whole + r * h
    return split, whole


def trainable_params_per_device(
    cfg: Config, model_degree: int, stages: int = 1, expert_degree: int = 1
) -> int:
    """The parameters one device trains, as the forward pass holds them: all of them, or with
    lora.rank > 0 its stage's layers' adapters."""
    if cfg.lora.rank == 0:
        return params_per_device(cfg.model, model_degree, stages, expert_degree)
    split, whole = adapter_layer_params(cfg.model, cfg.lora, model_degree)
    return cfg.model.num_layers // stages * (split // model_degree + whole)


def outside_params(m: ModelConfig, model_degree: int) -> int:
    """The parameters outside the layers one device holds (on every pipeline stage)."""
    t = model_degree
    # The word embedding, and an untied LM head: both split by vocabulary rows.
    tables = m.padded_vocab_size(t) * m.hidden * (1 if m.tie_embeddings else 2)
    # Everything outside the layers, as num_params counts it, with the vocabulary rows split.
    outside = m.num_params(t) - sum(m.stack_params(t)) - tables
    if m.arch == "bert":
        vocab = m.padded_vocab_size(t)
        outside -= vocab - vocab // t  # the masked-LM head's output bias is split too
    return tables // t + outside


# ---------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # float32 weights: the trainable ones' masters and the frozen ones
    optimizer: float  # Adam's two float32 moments of the trainable (and its int32 step counts)
    inputs: float  # the step's int32 input and target tokens (and its step, skip counters)
    gradients: float  # float32, of the trainable; a second buffer accumulates micro-batches
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
    expert_degree: int = 1,
    fsdp_degree: int = 1,
    context_degree: int = 1,
) -> MemoryEstimate:
    """Per-device bytes. With optim.distributed, `master_params` is the per-device count of the
    float32 master weights of the trainable parameters (those split over `data` and those left
    whole); by default the trainable parameters per device over the data degree. With
    `fsdp_degree` > 1 the weights, moments and float32 gradient sums are held split over fsdp
    (`master_params` counts them, by default the trainable parameters over the fsdp degree);
    the step adds a compute_dtype copy of those shards, the weights outside the layers
    gathered whole for the step, and one layer's gathered weights and their whole gradient
    before its reduce-scatter (ShardedModel.loss, models/pipeline_schedule.scan_layers). With
    lora.rank > 0 only the adapters train: the other weights are held as they are (float32),
    with neither gradients nor moments. With pipeline stages, the micro-batches are in flight
    together (activations.pipelined_activation_bytes). `expert_degree` splits a MoE model's
    experts, and the batch with `data`. `context_degree` splits every activation's length
    (activations.py); the batch arrives whole on every context rank."""
    m, tr = cfg.model, cfg.train
    c = context_degree
    p = trainable_params_per_device(cfg, model_degree, stages, expert_degree)
    frozen = params_per_device(m, model_degree, stages) if cfg.lora.rank else 0
    shards = data_degree * fsdp_degree * expert_degree  # the batch's
    batch = tr.batch_size // tr.micro_batches // shards  # one micro-batch on one device
    sequences = batch * (m.num_choices if m.arch == "bert_multiple_choice" else 1)
    head = activations.head_activation_bytes(
        m, batch=batch, model_degree=model_degree, context_degree=c
    )

    def stack(remat):
        m_remat = dataclasses.replace(m, remat=remat)
        if stages > 1:  # the head's and the buffers' too
            return activations.pipelined_activation_bytes(
                m_remat, batch=sequences, model_degree=model_degree, stages=stages,
                repeats=tr.pipeline_repeats, micro=tr.micro_batches, lora=cfg.lora,
                context_degree=c,
                schedule=tr.pipeline_schedule,
            )["total"] - head  # fmt: skip
        return activations.stack_activation_bytes(
            m_remat,
            batch=sequences,
            model_degree=model_degree,
            lora=cfg.lora,
            expert_degree=expert_degree,
            context_degree=c,
        )

    paper = activations.paper_layer_activation_bytes(
        m, batch=sequences, model_degree=model_degree, context_degree=c
    )
    fields = models.batch_fields(m, documents=cfg.data.documents)
    sample = sum(math.prod(shape) for shape in fields.values())
    counters = 2 * 4 + (3 * 4 if m.compute_dtype == "float16" else 0)  # + the loss scaler
    accumulate = 2 if tr.micro_batches > 1 and stages == 1 else 1
    if cfg.optim.distributed:
        e = jnp.dtype(m.compute_dtype).itemsize
        master = master_params if master_params is not None else p / data_degree
        # Gradients of the compute copy (compute_dtype), then float32 on the master shards.
        gradients, copy = e * p + 4 * master * accumulate, e * p
    elif fsdp_degree > 1:
        e = jnp.dtype(m.compute_dtype).itemsize
        master = master_params if master_params is not None else p / fsdp_degree
        layer = stage_layer_params(m, model_degree, stages, expert_degree) * stages
        whole = outside_params(m, model_degree) + layer / m.num_layers
        gradients, copy = 4 * master * accumulate + e * whole, e * (master + whole)
    else:
        master, gradients, copy = p, 4 * p * accumulate, 0
    if stages > 1:  # the layers' weights rearranged by stage, and their gradient so laid out
        copy += 2 * 4 * stage_layer_params(m, model_degree, stages)
    return MemoryEstimate(
        weights=4 * (master + frozen),
        optimizer=8 * master + 2 * 4,  # + the counts of scale_by_adam and scale_by_schedule
        inputs=4 * tr.batch_size // shards * sample + counters,  # int32 fields; counters
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


def state_bytes_per_param(cfg: Config, *, data_degree: int, trainable_fraction: float = 1.0):
    """Weights, gradients and Adam state per parameter and device: Megatron-LM's table beside
    this code's layout (the float32 master weights and moments split over `data`; a gathered
    compute_dtype copy and its gradients during the step; without the switch float32 weights
    and gradients, cast to the compute dtype inside the layers). With LoRA, a fraction f of the
    parameters (the adapters) trains: the frozen rest is 4 bytes of float32 weights alone."""
    whole, fixed, split = MEGATRON_STATE_BYTES[cfg.model.compute_dtype]
    e, d = jnp.dtype(cfg.model.compute_dtype).itemsize, data_degree
    if cfg.optim.distributed:
        out = {
            "megatron": fixed + split / d,
            "megatron_formula": f"{fixed} + {split}/D",
            "here": 2 * e + 16 / d,
            "here_formula": f"{2 * e} + 16/D",
            "kept": 12 / d,  # float32 master weights and moments, between steps
        }
    else:
        out = {
            "megatron": whole,
            "megatron_formula": str(whole),
            "here": 16,
            "here_formula": "16",
            "kept": 12,
        }
    if cfg.lora.rank == 0:
        return out
    f = trainable_fraction
    return {
        **out,
        "here": 4 * (1 - f) + f * out["here"],
        "here_formula": f"4 (1 - f) + ({out['here_formula']}) f, f = {f:.4f} trainable",
        "kept": 4 * (1 - f) + f * out["kept"],
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
    layer = 24 * m.hidden**2 + core  # one layer's forward per token: GPT-2's
    if m.moe:  # a token's share of the layers' FLOPs, forward only
        layer = (m.flops_per_token() - m.head_flops_per_token()) / 3 / m.num_layers
    recomputed = {"none": 0, "selective": core, "full": layer}[m.remat]
    # The attention core's share of `model` (q k^T and the values at the whole length, forward
    # and backward; causal masking skips none of it here).
    attention = 3 * core * m.num_layers * tokens
    return {
        "model": model,
        "hardware": model + m.num_layers * recomputed * tokens,
        "attention": attention,
    }


def expected_collectives(
    cfg: Config,
    *,
    data_degree: int,
    model_degree: int,
    stages: int = 1,
    expert_degree: int = 1,
    fsdp_degree: int = 1,
    context_degree: int = 1,
) -> dict:
    """Collectives the paper's plan implies per step: (count, elements) by mesh axis. With
    pipeline stages a device runs L / (v P) layers per tick, on one micro-batch, for every
    tick; the embedding and heads run on all micro-batches at once. A MoE model's all-to-alls
    over `expert` are moe_alltoall's (the tensor-parallel rows above assume dense layers)."""
    m, tr = cfg.model, cfg.train
    shards = data_degree * fsdp_degree * expert_degree
    micro, b = tr.micro_batches, tr.batch_size // tr.micro_batches // shards
    runs = micro * m.num_layers  # layers a device runs per step
    lm = m.arch != "bert_multiple_choice"
    # The embedding's and the head's, one per micro-batch; pipelined, one for all of them.
    outside, batched = micro * (2 if lm else 1), 1
    if stages > 1:
        ticks = pipeline_arithmetic.ticks(stages, tr.pipeline_repeats, micro)
        runs = ticks * (m.num_layers // (stages * tr.pipeline_repeats))
        outside, batched = 2 if lm else 1, micro
    b *= 1 if lm else m.num_choices  # sequences per device
    found = {}
    s = m.seq_len // context_degree  # the local length
    n = b * s * m.hidden
    if model_degree > 1 and m.sequence_parallel:
        # Per layer 2 all-gathers and 2 reduce-scatters forward; backward the reduce-scatters'
        # transposes (2 all-gathers), the gathers' (2 reduce-scatters) and 2 gathers again of
        # the column-parallel inputs; the embedding's reduce-scatter and the head's gather,
        # and their transposes. Full recomputation adds the attention output's reduce-scatter
        # (its gathers are the backward's own). A frozen embedding (LoRA) has no gradient: its
        # reduce-scatter's transpose is not computed.
        again = 1 if m.remat == "full" else 0
        embedding = outside // (2 if lm else 1) if cfg.lora.rank else 0
        gathers = 6 * runs + outside - embedding
        scatters = (4 + again) * runs + outside
        elements = (6 * runs + batched * (outside - embedding)) * n
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
            found["model: cross-entropy (b, s)"] = (3 * micro, 3 * micro * b * s)
        if m.kv_by_rows(model_degree):  # the kv weight gathered per layer, its gradient
            kv, again = m.hidden * 2 * m.kv_heads * m.head_dim, 2 if m.remat == "full" else 1
            found["model: kv weight all-gathers"] = (again * runs, again * runs * kv)
            found["model: kv gradient reduce-scatters"] = (runs, runs * kv // model_degree)
            if m.bias:
                found["model: kv bias gradients"] = (runs, runs * 2 * m.kv_heads * m.head_dim)
    if data_degree * expert_degree > 1:  # the trainable parameters' (with LoRA, the adapters')
        grads = trainable_params_per_device(cfg, model_degree, stages, expert_degree)
        found["data: gradients"] = (None, grads)
    if fsdp_degree > 1:
        # Per layer run, each weight gathered forward and again backward (every one of them
        # under remat="full"; otherwise those the backward pass reads), its gradient
        # reduce-scattered (elements of the whole, gathered tensors); outside the layers, each
        # weight gathered once per step (the same on every micro-batch: XLA hoists it out of
        # the loop) and its gradient reduced once per micro-batch.
        layer = stage_layer_params(m, model_degree, stages, expert_degree) * stages
        layer //= m.num_layers
        outside = outside_params(m, model_degree)
        found["fsdp: weight all-gathers"] = (None, 2 * runs * layer + outside)
        found["fsdp: gradient reduce-scatters"] = (None, runs * layer + micro * outside)
    if context_degree > 1:
        kv = context_kv(cfg, data_degree=data_degree, model_degree=model_degree,
                        context_degree=context_degree, stages=stages)  # fmt: skip
        if cfg.model.context_attention == "ring":
            found["context: K/V block collective-permutes (2, b, s / C, heads, d)"] = kv[
                "collective_permute"
            ]
        else:
            found["context: K/V all-gathers (b, s, 2, kv, d)"] = kv["all_gather"]
            found["context: K/V gradient reduce-scatters (b, s / C, 2, kv, d)"] = kv[
                "reduce_scatter"
            ]
    if expert_degree > 1:
        rows = moe_alltoall(cfg, data_degree=data_degree, expert_degree=expert_degree, itemsize=1)
        found["expert: all-to-alls of rows"] = (rows["count"], rows["bytes"])
    return found


def context_kv(
    cfg: Config, *, data_degree: int, model_degree: int, context_degree: int, stages: int = 1,
    itemsize=None,
) -> dict:  # fmt: skip
    """K and V's exchange over `context` in one step on one device (context_attention.py).
    "allgather": per layer run, one all-gather of the (b, s, 2, kv slots / T, head_dim) K/V
    forward (again when model.remat="full" recomputes the layer) and one reduce-scatter of
    its gradient backward; each moves (C - 1) / C of the gathered tensor through a device's
    link. "ring": C - 1 collective-permutes of (2, b, s / C, kv slots / T, head_dim) K/V blocks
    forward, and backward the blocks again and their float32 dK/dV sums, 2 (C - 1). "bytes":
    the configured core's. Bytes in the compute dtype (`itemsize`: another)."""
    m, tr = cfg.model, cfg.train
    c, t = context_degree, model_degree
    e = itemsize or jnp.dtype(m.compute_dtype).itemsize
    b = tr.batch_size // tr.micro_batches // data_degree
    runs = tr.micro_batches * m.num_layers // stages
    if stages > 1:
        ticks = pipeline_arithmetic.ticks(stages, tr.pipeline_repeats, tr.micro_batches)
        runs = ticks * (m.num_layers // (stages * tr.pipeline_repeats))
    slots = m.kv_slots(t) // t
    whole = b * m.seq_len * 2 * slots * m.head_dim  # one gathered K/V, elements
    gathers = runs * (2 if m.remat == "full" else 1)
    sent = (gathers + runs) * whole * (c - 1) / c * e
    block = whole // c
    # The ring's permutes: (C - 1) per layer run forward (again when recomputed), 2 (C - 1)
    # backward (the blocks again, then their float32 dK/dV sums), (2, b, s / C, kv, head_dim).
    permutes = (gathers + 2 * runs) * (c - 1)
    ring = (gathers + runs) * (c - 1) * block * e + runs * (c - 1) * block * 4
    return {
        "all_gather": (gathers, gathers * whole),
        "reduce_scatter": (runs, runs * block),
        "collective_permute": (permutes, permutes * block),
        "allgather_bytes": sent,
        "ring_bytes": ring,
        "bytes": sent if m.context_attention == "allgather" else ring,
    }


def pipeline_transfer_bytes(cfg: Config, data_degree: int, model_degree: int, stages: int):
    """Bytes one device sends to the next stage per step: pipeline_arithmetic.transfers()
    collective-permutes of its (micro-batch, length, hidden) share, split over `model` too with
    sequence parallelism."""
    m, tr = cfg.model, cfg.train
    if stages == 1:
        return 0
    r = model_degree if m.sequence_parallel else 1
    batch = tr.batch_size // tr.micro_batches // data_degree
    one = pipeline_arithmetic.transfer_bytes(
        batch, m.seq_len // r, m.hidden, jnp.dtype(m.compute_dtype).itemsize
    )
    count = pipeline_arithmetic.transfers(
        stages, tr.pipeline_repeats, tr.micro_batches, tr.pipeline_schedule
    )
    return count * one


def allreduce_elements(kind: str, elements: float, group: int) -> float:
    """The all-reduce that moves as many bytes as a collective with `elements` in its result:
    a ring all-gather or reduce-scatter of a whole tensor moves half an all-reduce's."""
    return {"all-gather": elements / 2, "reduce-scatter": elements * group / 2}.get(kind, elements)


def allreduce_seconds(nbytes: float, group: int, bandwidth: float) -> float:
    """A ring all-reduce moves 2 (n - 1) / n of the buffer through each member's link."""
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / bandwidth


def moe_alltoall(cfg: Config, *, data_degree: int, expert_degree: int, itemsize=None) -> dict:
    """The experts' all-to-alls of one step on one device (megajax/moe.py): per MoE layer and
    micro-batch, the rows dispatched and combined forward and both transposed backward (with
    model.remat="full" the forward's pair again), each X blocks of A rows of hidden, A the
    micro-batch's tokens on the device times k (with a capacity, at most the rows its
    sequences may send one shard's experts), in the compute dtype (`itemsize`: another).
    `seconds`: each sends (X - 1) / X of its block, over the intra-node links while X times
    the model degree fits a node (`link_bw`, set by roofline), else the inter-node ones."""
    m, tr = cfg.model, cfg.train
    if not m.moe or expert_degree == 1:
        return {"count": 0, "bytes": 0}
    e = itemsize or jnp.dtype(m.compute_dtype).itemsize
    sequences = tr.batch_size // tr.micro_batches // (data_degree * expert_degree)
    block = sequences * m.seq_len * m.moe_top_k
    if m.moe_capacity_factor:
        capacity = math.ceil(m.moe_capacity_factor * m.seq_len * m.moe_top_k / m.moe_experts)
        block = min(block, m.moe_experts // expert_degree * sequences * capacity)
    count = (4 + (2 if m.remat == "full" else 0)) * m.moe_layers * tr.micro_batches
    return {"count": count, "bytes": count * expert_degree * block * m.hidden * e}


def roofline(
    cfg: Config,
    tgt: Target,
    *,
    data_degree: int,
    model_degree: int,
    model_elements: float,
    stages: int = 1,
    expert_degree: int = 1,
    fsdp_degree: int = 1,
    context_degree: int = 1,
) -> dict:
    """Step time = compute at peak + model all-reduces (intra-node) + gradient all-reduce
    (inter-node once the mesh leaves a node), nothing overlapped: an optimistic compute term
    and a pessimistic communication term. Weak-scaling efficiency = compute / step time.

    With `fsdp_degree` F > 1 the batch is split F ways more, and the step adds fsdp's
    collectives (`fsdp_s`, on the intra-node links while the mesh fits a node): per
    micro-batch each layer's compute_dtype weights gathered twice (forward, backward) and its
    gradient reduce-scattered, the weights outside the layers gathered and reduced once; each
    ring step moves (F - 1) / F of the whole tensor.

    With P pipeline stages (across nodes once D T fills one), the step adds the bubble (each
    stage idles, or computes on zeros, P - 1 of its v m + P - 1 ticks), the embedding and
    heads that every stage computes again, the stage-to-stage collective-permutes (one per
    tick each way, on the critical path), the two all-reduces over `pipeline` of the
    micro-batches' (m b s h) buffers, and with circular repeats the layers' weights sent to the
    stages that run them (and their gradients back). A MoE model on `expert_degree` > 1 adds
    its all-to-alls (moe_alltoall); its batch is split over data and expert, and the gradients
    are reduced over both (the experts' over data alone: counted as the others). A context
    degree C > 1 adds the K/V all-gathers and their reduce-scatters (context_kv), over the
    intra-node links while C T fits a node, and sums the gradients over context too."""
    m, tr = cfg.model, cfg.train
    c = context_degree
    devices = stages * data_degree * fsdp_degree * expert_degree * c * model_degree
    fl = flops_per_step(cfg)
    compute = fl["hardware"] / devices / tgt.peak_flops
    e = jnp.dtype(m.compute_dtype).itemsize
    model_bytes = e * model_elements  # activations, in the compute dtype
    model_s = allreduce_seconds(model_bytes, model_degree, tgt.intra_node_bw)
    # float32 gradients
    grad_bytes = 4 * trainable_params_per_device(cfg, model_degree, stages, expert_degree)
    data_bw = tgt.inter_node_bw if devices > tgt.node_size else tgt.intra_node_bw
    data_s = allreduce_seconds(grad_bytes, data_degree * expert_degree * c, data_bw)
    fsdp_s = 0.0
    if fsdp_degree > 1:
        f = fsdp_degree
        layer = stage_layer_params(m, model_degree, stages, expert_degree)  # a stage's layers
        moved = tr.micro_batches * (3 * layer + 2 * outside_params(m, model_degree))
        fsdp_bw = tgt.intra_node_bw if devices <= tgt.node_size else tgt.inter_node_bw
        fsdp_s = e * moved * (f - 1) / f / fsdp_bw
    context_s = 0.0
    if c > 1:
        kv = context_kv(cfg, data_degree=data_degree * expert_degree, model_degree=model_degree,
                        context_degree=c, stages=stages)  # fmt: skip
        in_node = c * model_degree <= tgt.node_size
        context_s = kv["bytes"] / (tgt.intra_node_bw if in_node else tgt.inter_node_bw)
    alltoall = moe_alltoall(cfg, data_degree=data_degree, expert_degree=expert_degree)
    x = expert_degree
    link = tgt.intra_node_bw if x * model_degree <= tgt.node_size else tgt.inter_node_bw
    alltoall_s = alltoall["bytes"] * (x - 1) / x / link
    bubble_s = p2p_s = 0.0
    if stages > 1:
        v, micro = tr.pipeline_repeats, tr.micro_batches
        tokens = tr.batch_size * m.tokens_per_sample
        outside = m.head_flops_per_token()
        layers = fl["hardware"] - outside * tokens
        bubble_s = layers / devices / tgt.peak_flops * (stages - 1) / (v * micro)
        node = data_degree * model_degree >= tgt.node_size  # a stage fills a node
        p2p_bw = tgt.inter_node_bw if node else tgt.intra_node_bw
        p2p_s = pipeline_transfer_bytes(cfg, data_degree, model_degree, stages) / p2p_bw
        if tr.pipeline_schedule == "1f1b":
            # The head on the last stage only; every layer's forward run once more, in its
            # backward tick, on top of what model.remat recomputes; one all-reduce of the
            # float32 gradients outside the layers over `pipeline`.
            forward = (m.flops_per_token() - outside) / 3
            compute += forward * tokens / devices / tgt.peak_flops
            p2p_s += allreduce_seconds(4 * outside_params(m, model_degree), stages, p2p_bw)
        else:
            compute += outside * tokens * (stages - 1) / devices / tgt.peak_flops
            # Over `pipeline` also: the last stage's outputs to every stage's heads, and the
            # gradient of the micro-batches entering stage 0 back to every stage's embedding.
            buffers = tr.batch_size // data_degree * m.seq_len * m.hidden * e
            p2p_s += 2 * allreduce_seconds(buffers, stages, p2p_bw)
        if v > 1:  # float32 layer weights to the stages that run them, gradients back
            layer_params = stage_layer_params(m, model_degree, stages)
            p2p_s += 2 * 4 * layer_params * (v - 1) / v / p2p_bw
    step = compute + model_s + data_s + bubble_s + p2p_s + alltoall_s + fsdp_s + context_s
    return {
        "compute_s": compute,
        "model_allreduce_s": model_s,
        "data_allreduce_s": data_s,
        "fsdp_s": fsdp_s,
        "bubble_s": bubble_s,
        "pipeline_s": p2p_s,
        "alltoall_s": alltoall_s,
        "context_s": context_s,
        "step_s": step,
        "mfu": fl["model"] / devices / step / tgt.peak_flops,
        "weak_scaling_efficiency": compute / step,
        "tokens_per_sec": cfg.train.batch_size * cfg.model.tokens_per_sample / step,
        "hardware_tflops_per_device": fl["hardware"] / devices / step / 1e12,
    }
