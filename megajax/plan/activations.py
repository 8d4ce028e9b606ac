"""Activation memory per device: what this code keeps for the backward pass of one
micro-batch, and the paper's per-layer formulas (Korthikanti et al. 2022, Table 2) beside it.

With T = the model degree, tensor parallelism splits the attention and MLP tensors by T;
sequence parallelism also splits the residual stream's (layer norms, dropout masks, the
column-parallel matmuls' inputs); selective recomputation keeps no (batch, heads, length,
length) tensor; full recomputation keeps each layer's input only. Context parallelism (C =
the context degree) splits every activation's length by C; attention's scores are then
(length / C, length), and each layer keeps its gathered K/V, whole length at kv width; the
ring core's scores are one block's, (length / C, length / C), and it keeps no gathered K/V.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from megajax.config import LoRAConfig, ModelConfig


def _core_bytes(m: ModelConfig, *, batch: int, model_degree: int, context_degree: int = 1) -> float:
    """Attention's core, (b, heads / T, s / C, s) tensors: float32 probabilities, and the
    probabilities cast for the values matmul, or with dropout its mask and dropped ones. The
    ring core (model.context_attention="ring") holds one key block's, (b, heads / T, s / C,
    s / C), at a time."""
    e = jnp.dtype(m.compute_dtype).itemsize
    ring = context_degree > 1 and m.context_attention == "ring"
    keys = m.seq_len // context_degree if ring else m.seq_len
    scores = batch * (m.num_heads // model_degree) * m.seq_len // context_degree * keys
    return 4 * scores + (scores + e * scores if m.dropout > 0 else e * scores)


def layer_activation_bytes(
    m: ModelConfig,
    *,
    batch: int,
    model_degree: int,
    lora: LoRAConfig | None = None,
    expert_degree: int = 1,
    context_degree: int = 1,
) -> float:
    """Bytes one transformer layer keeps for its backward pass, per device, as this code saves
    them (read off jax's saved residuals): per layer norm three float32 (b, s, h) tensors; in
    the compute dtype the QKV and fc1 inputs, q, k, v, the attention output, and six
    (b, s, 4h / T) MLP tensors (fc1 output and GeLU's tanh intermediates); the attention
    core's tensors; with dropout 1-byte residual masks. model.remat="selective" recomputes
    the core, the layer norms' and GeLU's insides: it keeps the norms' inputs instead, and the
    activation's input and output (the paper's list: two MLP tensors; SwiGLU's input, fc1's
    output, is twice as wide). LoRA adapters add adapter_activation_bytes. Bias-free of any
    framework rounding: the compiled figure is the check. A MoE model's layers are averaged
    over its dense and MoE ones (moe_layer_bytes)."""
    if m.moe:
        return _mean_moe_layer(m, batch, model_degree, lora, expert_degree)
    e = jnp.dtype(m.compute_dtype).itemsize
    t, c = model_degree, context_degree
    r = t if m.sequence_parallel else 1  # the residual stream's split
    n = batch * m.seq_len // c * m.hidden  # one (b, s / C, h) tensor
    mlp = m.mlp_hidden / m.hidden  # (b, s, 4h) / (b, s, h)
    if m.remat == "selective":  # the paper's list: no core, and layer norms and GeLU redone
        act = (3 if m.mlp == "swiglu" else 2) * mlp  # the activation's input and output
        total = e * n * (2 / r + 2 / r + 4 / t + act / t)  # norms' inputs, the list above
    else:
        total = 2 * 3 * 4 * n / r  # two layer norms
        total += e * n * (2 / r + 4 / t + 6 * mlp / t)
        if c > 1 and m.context_attention == "ring":  # its custom VJP keeps the stacked K/V
            # (at kv-slot width) and two float32 numbers per query row and head
            rows = batch * m.num_heads // t * m.seq_len // c
            kv_rows = batch * m.kv_slots(t) // t * m.seq_len // c
            total += e * 2 * kv_rows * m.head_dim + 8 * rows
        else:
            total += _core_bytes(m, batch=batch, model_degree=t, context_degree=c)
    if c > 1 and m.context_attention == "allgather":  # the gathered K/V, kept (selective
        # recomputation too) for the backward pass; the ring keeps its own block alone
        total += e * batch * m.seq_len * 2 * m.kv_slots(t) // t * m.head_dim
    if m.dropout > 0:
        total += 2 * n / r  # residual dropout masks
    if e != 4:  # the layer's matmul weights in the compute dtype
        total += e * layer_matmul_weights(m, t)
    return total + adapter_activation_bytes(m, lora, batch=batch, model_degree=t)


def _mean_moe_layer(m, batch, model_degree, lora, expert_degree) -> float:
    """The mean of a MoE model's layers' saved bytes: a MoE layer is a dense one whose MLP is
    the shared experts' (none: the MLP's bytes taken off), plus moe_layer_bytes."""
    dense = dataclasses.replace(m, moe_experts=0)
    at = dict(batch=batch, model_degree=model_degree, lora=lora)
    dense_layer = layer_activation_bytes(dense, **at)
    shared = m.moe_shared_experts * m.expert_hidden

    def of_width(width):
        return layer_activation_bytes(dataclasses.replace(dense, ffn_hidden=width), **at)

    # A layer's bytes are linear in its MLP's width: without shared experts, width 0's.
    base = of_width(shared) if shared else 2 * of_width(1) - of_width(2)
    sparse = base + moe_layer_bytes(
        m, batch=batch, model_degree=model_degree, expert_degree=expert_degree
    )
    return (m.moe_layers * sparse + (m.num_layers - m.moe_layers) * dense_layer) / m.num_layers


def moe_layer_bytes(m: ModelConfig, *, batch: int, model_degree: int, expert_degree: int) -> float:
    """What a MoE block (megajax/moe.py) keeps for its backward pass, per device: the router's
    float32 logits and probabilities (tokens, experts); in the compute dtype the A = tokens x
    k rows gathered by expert and, across X expert shards, the blocks sent, arrived and sent
    back (X blocks of A rows of hidden each; fewer rows with a capacity), the rows sorted for
    the experts, the first grouped matmul's output (2 ffn / T wide), the SwiGLU product
    (ffn / T) and the second's output; and the experts' weights in the compute dtype when it
    is not float32."""
    e, t, x = jnp.dtype(m.compute_dtype).itemsize, model_degree, expert_degree
    tokens = batch * m.seq_len
    rows, h, f = tokens * m.moe_top_k, m.hidden, m.expert_hidden
    block = rows
    if m.moe_capacity_factor and x > 1:  # megajax.moe's blocks under a capacity
        capacity = math.ceil(m.moe_capacity_factor * m.seq_len * m.moe_top_k / m.moe_experts)
        block = min(rows, m.moe_experts // x * batch * capacity)
    exchanged = 3 * x * block * h if x > 1 else 0
    total = 8 * tokens * m.moe_experts + e * (rows * h + exchanged)
    total += e * x * block * (2 * h + 3 * f / t)
    if e != 4:
        total += e * m.moe_experts // x * m.expert_params() / t
    return total


def layer_matmul_weights(m: ModelConfig, model_degree: int) -> float:
    """One layer's matmul weights per device: what the backward pass keeps of a layer in the
    compute dtype when that is not the weights' float32."""
    h, f = m.hidden, m.mlp_hidden
    kv = h * 2 * m.head_dim * m.kv_slots(model_degree)  # a key/value head per shard at least
    return (h * h + kv + h * h + h * f * (2 if m.mlp == "swiglu" else 1) + f * h) / model_degree


def adapter_activation_bytes(
    m: ModelConfig, lora: LoRAConfig | None, *, batch: int, model_degree: int
) -> float:
    """What one layer's LoRA adapters add to its saved activations: each adapter's x A
    (batch, length, rank) in the compute dtype (the q and kv adapters' side by side), and with
    lora.dropout their 1-byte keep masks, of the whole length on the column-parallel layers
    (drawn by position, outside the shard's computation) and split by columns on the
    row-parallel ones."""
    if lora is None or lora.rank == 0:
        return 0.0
    e, tokens, t = jnp.dtype(m.compute_dtype).itemsize, batch * m.seq_len, model_degree
    widths = {"qkv": 2 * lora.rank if m.grouped_query else lora.rank}
    total = sum(e * tokens * widths.get(name, lora.rank) for name in lora.target_names)
    if lora.dropout > 0:
        masks = {"qkv": m.hidden, "fc1": m.hidden, "proj": m.hidden / t, "fc2": m.mlp_hidden / t}
        total += sum(tokens * masks[name] for name in lora.target_names)
    return total


def stack_activation_bytes(
    m: ModelConfig,
    *,
    batch: int,
    model_degree: int,
    lora: LoRAConfig | None = None,
    expert_degree: int = 1,
    context_degree: int = 1,
) -> float:
    """All layers' saved activations, with one layer's working set when it is recomputed."""
    e, c = jnp.dtype(m.compute_dtype).itemsize, context_degree
    layer = layer_activation_bytes(
        m, batch=batch, model_degree=model_degree, lora=lora, expert_degree=expert_degree,
        context_degree=c,
    )  # fmt: skip
    if m.remat == "full":  # the layers' inputs, then one layer at a time
        r = model_degree if m.sequence_parallel else 1
        return m.num_layers * batch * m.seq_len // c * m.hidden * e / r + layer
    if m.remat == "selective":  # plus one layer's attention core, recomputed
        core = _core_bytes(m, batch=batch, model_degree=model_degree, context_degree=c)
        return m.num_layers * layer + core
    return m.num_layers * layer


def head_activation_bytes(
    m: ModelConfig, *, batch: int, model_degree: int, context_degree: int = 1
) -> float:
    """The vocabulary-sharded logits (float32 shifted logits, exponentials, padding mask) and
    the embedding output and final layer norm around the stack; for BERT also the masked-LM
    transform (dense output, GeLU, layer norm) before the logits."""
    e = jnp.dtype(m.compute_dtype).itemsize
    if m.arch == "bert_multiple_choice":
        batch *= m.num_choices
    s = m.seq_len // context_degree
    n = batch * s * m.hidden
    total = n * (e + 3 * 4)
    if m.arch != "bert_multiple_choice":
        total += 9 * batch * s * m.padded_vocab_size(model_degree) // model_degree
    if m.arch == "bert":
        total += n * (3 * e + 3 * 4)
    return total


def paper_layer_activation_bytes(
    m: ModelConfig, *, batch: int, model_degree: int, context_degree: int = 1
) -> float:
    """The paper's bytes per layer at 16-bit activations (its Table 2), for model.remat and
    model.sequence_parallel: sbh(10 + 24/t + 5as/(ht)) with tensor parallelism (t = 1: none),
    (sbh/t)(34 + 5as/h) adding sequence parallelism, the 5as/h term gone with selective
    recomputation, 2sbh (2sbh/t with sequence parallelism) with full recomputation."""
    s, h, a, t = m.seq_len, m.hidden, m.num_heads, model_degree
    sbh = s * batch * h / context_degree  # context parallelism: each term's s by C
    if m.remat == "full":
        return 2 * sbh / (t if m.sequence_parallel else 1)
    core = 0 if m.remat == "selective" else 5 * a * s / h
    if m.sequence_parallel:
        return sbh / t * (34 + core)
    return sbh * (10 + 24 / t + core / t)


def pipelined_activation_bytes(
    m: ModelConfig,
    *,
    batch: int,
    model_degree: int,
    stages: int,
    repeats: int,
    micro: int,
    lora: LoRAConfig | None = None,
    context_degree: int = 1,
    schedule: str = "gpipe",
) -> dict:
    """Bytes a device keeps for the backward pass of a pipelined step, for `micro`
    micro-batches of `batch` sequences per device. GPipe (models/pipeline_schedule.py):
    - the stack: each of the v m + P - 1 ticks runs one chunk of L / (v P) layers and keeps
      what that chunk saves, bubble ticks included, so ticks / v micro-batches' worth of the
      stage's layers are in flight;
    - the micro-batches' embedding output, the stages' copy of it and the finished outputs,
      (m, b, s, h) each, and as many cotangents in the backward pass;
    - the heads, run on all micro-batches at once (vmapped).
    1F1B (models/pipeline_1f1b.py): the ring of 2 v P - 1 saved stage inputs (b, s, h) and
    what one chunk keeps for one micro-batch inside its backward tick; four (b, s, h) buffers
    (the input and cotangent that arrive, the output and cotangent sent); one micro-batch's
    head. Nothing depends on m."""
    e, c = jnp.dtype(m.compute_dtype).itemsize, context_degree
    r = model_degree if m.sequence_parallel else 1  # the stages' inputs split over `model`
    if schedule == "1f1b":
        chunk = dataclasses.replace(m, num_layers=m.num_layers // (stages * repeats))
        one = batch * m.seq_len * m.hidden * e / r
        slots = 2 * repeats * stages - 1
        stack = slots * one + stack_activation_bytes(
            chunk, batch=batch, model_degree=model_degree, lora=lora
        )
        buffers = 4 * one
        head = head_activation_bytes(m, batch=batch, model_degree=model_degree)
        return {
            "stack": stack,
            "buffers": buffers,
            "head": head,
            "in_flight_micro_batches": slots,
            "total": stack + buffers + head,
        }
    ticks = repeats * micro + stages - 1
    chunk = dataclasses.replace(m, num_layers=m.num_layers // (stages * repeats))
    at = dict(batch=batch, model_degree=model_degree, context_degree=c)
    stack = ticks * stack_activation_bytes(chunk, lora=lora, **at)
    if m.remat != "none":  # one layer's working set at a time, not one per tick
        working = (
            layer_activation_bytes(m, lora=lora, **at)
            if m.remat == "full"
            else _core_bytes(m, **at)
        )
        stack -= (ticks - 1) * working
    buffers = 2 * 3 * micro * batch * m.seq_len // c * m.hidden * e / r
    head = head_activation_bytes(
        m, batch=micro * batch, model_degree=model_degree, context_degree=c
    )
    return {
        "stack": stack,
        "buffers": buffers,
        "head": head,
        "in_flight_micro_batches": ticks / repeats,
        "total": stack + buffers + head,
    }
