"""The dry run's plan: one train step compiled ahead of time from abstract parameters (nothing
of model size is allocated), its compiled memory and collectives read off the program and set
beside the estimates (plan/estimates.py) and a roofline."""

from __future__ import annotations

import dataclasses
import math

import jax

from megajax import hlo, parallel, pipeline_arithmetic
from megajax.config import Config
from megajax.plan import activations
from megajax.plan.estimates import (
    PAPER_WEAK_SCALING,
    allreduce_elements,
    context_kv,
    estimate_memory,
    expected_collectives,
    flops_per_step,
    moe_alltoall,
    params_per_device,
    pipeline_transfer_bytes,
    roofline,
    state_bytes_per_param,
    target,
    trainable_params_per_device,
)


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


def make_plan(cfg: Config, device_mesh, *, target_name: str = "h100") -> dict:
    """Compile one train step for `device_mesh` from abstract state and describe its cost."""
    from megajax.trainer import Trainer

    tgt = target(target_name)
    data, model = device_mesh.shape[parallel.DATA], device_mesh.shape[parallel.MODEL]
    expert = device_mesh.shape[parallel.EXPERT]
    fsdp = device_mesh.shape[parallel.FSDP]
    stages = device_mesh.shape[parallel.PIPELINE]
    context = device_mesh.shape[parallel.CONTEXT]
    trainer = Trainer(cfg, device_mesh)
    abstract = trainer.abstract_state()
    per_device = sum(  # as the forward pass holds them: split over `model` (and `fsdp`)
        math.prod(s.shard_shape(a.shape))
        for a, s in zip(
            jax.tree.leaves(abstract["params"]),
            jax.tree.leaves(trainer.rest_sharding),
            strict=True,
        )
    )
    trainable = trainer.split(abstract["params"])[0]
    master = sum(  # the trainable parameters' float32 masters (split over `data` if distributed)
        math.prod(s.shard_shape(a.shape))
        for a, s in zip(
            jax.tree.leaves(trainable), jax.tree.leaves(trainer.train_sharding), strict=True
        )
    )
    trainable_per_device = sum(
        math.prod(s.shard_shape(a.shape))
        for a, s in zip(
            jax.tree.leaves(trainable),
            jax.tree.leaves(trainer.split(trainer.rest_sharding)[0]),
            strict=True,
        )
    )
    compiled, compile_s = trainer.compile_train_step()
    stats = compiled.memory_analysis()
    found = hlo.collectives(compiled.as_text(), dict(device_mesh.shape))
    at = dict(
        data_degree=data, model_degree=model, stages=stages, expert_degree=expert, fsdp_degree=fsdp
    )
    est = estimate_memory(cfg, master_params=master, context_degree=context, **at)
    expected = expected_collectives(cfg, context_degree=context, **at)

    model_elements = sum(
        c.runs * allreduce_elements(c.kind, c.elements, model)
        for c in found
        if c.axes == (parallel.MODEL,)
    )
    plans = {
        "this mesh": roofline(
            cfg,
            tgt,
            expert_degree=expert,
            data_degree=data,
            model_degree=model,
            model_elements=model_elements,
            stages=stages,
            fsdp_degree=fsdp,
            context_degree=context,
        )
    }
    # The paper's largest run: 512 accelerators, this model degree, the same global batch.
    # Each device then holds data / scaled of the activations (and of their all-reduces); its
    # gradient bytes do not change, only the ring's factor and the fabric do.
    scaled = 512 // model
    if scaled != data and stages == 1 and expert == 1 and context == 1 and fsdp == 1:
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
    # XLA:CPU computes and stores bfloat16 as float32: the comparable estimate uses float32,
    # and keeps the layers' weights cast to the compute dtype for the backward pass (float32
    # there too): all layers' unless each is recomputed (remat full) or the distributed
    # optimizer cast them all once, before the layers.
    as_compiled, cast_weights = est, 0.0
    if platform == "cpu":
        f32 = dataclasses.replace(cfg.model, compute_dtype="float32")
        f32_cfg = dataclasses.replace(cfg, model=f32)
        as_compiled = estimate_memory(f32_cfg, master_params=master, context_degree=context, **at)
        if cfg.model.compute_dtype != "float32" and not cfg.optim.distributed and fsdp == 1:
            layers = 1 if remat == "full" else cfg.model.num_layers // stages
            cast_weights = 4 * layers * activations.layer_matmul_weights(cfg.model, model)
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
        "lora": dataclasses.asdict(cfg.lora),
        "mesh": {
            "pipeline": stages,
            "data": data,
            "fsdp": fsdp,
            "expert": expert,
            "context": context,
            "model": model,
        },  # fmt: skip
        "context": context_summary(
            cfg, found, data=data, model=model, context=context, stages=stages, tgt=tgt
        ),  # fmt: skip
        "pipeline": pipeline_summary(cfg, stages=stages, data=data, model=model, found=found),
        # Elements of the all-reduces over `model` that move as many bytes (the roofline's).
        "model_allreduce_elements": model_elements,
        "platform": platform,
        "compile_seconds": compile_s,
        "params": {
            "total": trainer.num_params,
            "per_device": per_device,
            "per_device_analytic": params_per_device(cfg.model, model, stages, expert) // fsdp
            + (trainable_params_per_device(cfg, model, stages) if cfg.lora.rank else 0),
            # all of them, or with lora.rank > 0 the adapters
            "trainable": sum(math.prod(a.shape) for a in jax.tree.leaves(trainable)),
            "trainable_per_device": trainable_per_device,
            "trainable_per_device_analytic": trainable_params_per_device(cfg, model, stages, expert)
            // fsdp,
        },
        "moe": moe_summary(cfg, trainer, abstract, found, data=data, expert=expert, tgt=tgt),
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
                "temporaries": as_compiled.temporaries(remat=remat) + cast_weights,
            },
            "target": tgt.name,
            "target_bytes": tgt.memory_bytes,
            "fits": analytic_total <= tgt.memory_bytes,
        },
        "state_bytes_per_param": {
            "distributed": cfg.optim.distributed,
            "compute_dtype": cfg.model.compute_dtype,
            **state_bytes_per_param(
                cfg, data_degree=data, trainable_fraction=trainable_per_device / per_device
            ),
            # float32 master weights and moments, from the compiled program's arguments
            "kept_compiled": (stats.argument_size_in_bytes - est.inputs) / per_device,
            "replicated_over_data": trainer.replicated_over_data,
        },
        "notes": notes,
        "flops_per_step": flops_per_step(cfg),
        "collectives": summarize_collectives(found),
        "collectives_expected": {k: list(v) for k, v in expected.items()},
        "roofline": {"target": tgt.name, **plans},
        # The 2019 paper's measured efficiencies are of its V100 runs, without pipelining.
        "paper_weak_scaling": PAPER_WEAK_SCALING if target_name == "v100" and stages == 1 else None,
    }


def context_summary(cfg: Config, found, *, data, model, context, stages, tgt) -> dict | None:
    """Context parallelism's figures: the K/V all-gathers and reduce-scatters over `context`
    found in the compiled program beside context_kv's prediction, the ring's computed bytes,
    the attention core's FLOPs at the whole length, and the exchange's time on the target."""
    if context == 1:
        return None
    m = cfg.model
    kv = [c for c in found if c.axes == (parallel.CONTEXT,) and len(c.shapes[0]) == 5]
    kv = [c for c in kv if c.shapes[0][-1] == m.head_dim]
    itemsize = 4 if jax.devices()[0].platform == "cpu" else None  # XLA:CPU moves bf16 as f32
    at = dict(data_degree=data, model_degree=model, context_degree=context, stages=stages)
    predicted = context_kv(cfg, itemsize=itemsize, **at)
    on_target = context_kv(cfg, **at)
    in_node = context * model <= tgt.node_size
    link = tgt.intra_node_bw if in_node else tgt.inter_node_bw
    return {
        "degree": context,
        "core": m.context_attention,
        "all_gathers_compiled": sum(c.runs for c in kv if c.kind == "all-gather"),
        "permutes_compiled": sum(c.runs for c in kv if c.kind == "collective-permute"),
        "reduce_scatters_compiled": sum(c.runs for c in kv if c.kind == "reduce-scatter"),
        "bytes_compiled": sum(c.runs * c.bytes for c in kv),
        "predicted": predicted,
        "allgather_bytes": on_target["allgather_bytes"],
        "ring_bytes": on_target["ring_bytes"],
        "seconds": on_target["bytes"] / link,
        "in_node": in_node,
        "attention_flops": flops_per_step(cfg)["attention"],
    }


def moe_summary(cfg: Config, trainer, abstract, found, *, data, expert, tgt) -> dict | None:
    """A MoE model's parameters in total and active per token, its experts' bytes per device
    (float32 weights and, split over `data` with the distributed optimizer, Adam's moments,
    as the compiled state holds them), and its all-to-alls: the compiled program's beside
    moe_alltoall's prediction, and their time on the target's links."""
    m = cfg.model
    if not m.moe:
        return None
    expert_bytes = 0
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for path, leaf in leaves:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-2:-1] == ["mlp"] and names[-1] in ("w1", "w2"):
            expert_bytes += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    compiled = [c for c in found if c.kind == "all-to-all" and c.axes == (parallel.EXPERT,)]
    itemsize = 4 if jax.devices()[0].platform == "cpu" else None  # XLA:CPU moves bf16 as f32
    predicted = moe_alltoall(cfg, data_degree=data, expert_degree=expert, itemsize=itemsize)
    in_node = expert * trainer.mesh.shape[parallel.MODEL] <= tgt.node_size
    link = tgt.intra_node_bw if in_node else tgt.inter_node_bw
    on_target = moe_alltoall(cfg, data_degree=data, expert_degree=expert)["bytes"]
    return {
        "total_params": m.num_params(trainer.mesh.shape[parallel.MODEL]),
        "active_params": m.num_params(trainer.mesh.shape[parallel.MODEL], active=True),
        "expert_state_bytes_per_device": expert_bytes,
        "alltoall_compiled": {
            "count": sum(c.runs for c in compiled if c.shapes[0][-1] == m.hidden),
            "bytes": sum(c.runs * c.bytes for c in compiled if c.shapes[0][-1] == m.hidden),
        },
        "alltoall_predicted": predicted,
        "alltoall_seconds": on_target * (expert - 1) / expert / link,
    }


def pipeline_summary(cfg: Config, *, stages: int, data: int, model: int, found) -> dict | None:
    """The schedule's figures: P, v, m, ticks, bubble, micro-batches in flight, and the
    collective-permutes per step, predicted and found in the compiled program."""
    if stages == 1:
        return None
    m, tr = cfg.model, cfg.train
    v, micro, kind = tr.pipeline_repeats, tr.micro_batches, tr.pipeline_schedule
    batch = tr.batch_size // micro // data
    r = model if m.sequence_parallel else 1
    # One stage's micro-batch share: GPipe's carries the vmapped stage axis, 1F1B's (inside
    # shard_map over `pipeline`) does not.
    share = (batch, m.seq_len // r, m.hidden)
    stage_input = (share,) if kind == "1f1b" else ((1, *share),)
    permutes = [c for c in found if c.kind == "collective-permute" and c.shapes == stage_input]
    # Anything else sent round the stages: with circular repeats the layers' weights, stored
    # in order, go to the stages that run them (and their gradients back) in every step.
    others = [c for c in found if c.kind == "collective-permute" and c.shapes != stage_input]
    in_flight = activations.pipelined_activation_bytes(
        cfg.model, batch=batch, model_degree=model, stages=stages, repeats=v, micro=micro,
        schedule=kind,
    )  # fmt: skip
    return {
        "schedule": kind,
        "stages": stages,
        "repeats": v,
        "micro_batches": micro,
        "ticks": pipeline_arithmetic.ticks(stages, v, micro, kind),
        "bubble": pipeline_arithmetic.bubble_fraction(stages, v, micro),
        "in_flight_micro_batches": in_flight["in_flight_micro_batches"],
        "in_flight_bytes": in_flight["total"],
        "transfers": pipeline_arithmetic.transfers(stages, v, micro, kind),
        "transfer_bytes": pipeline_transfer_bytes(cfg, data, model, stages),
        "transfers_compiled": sum(c.runs for c in permutes),
        "transfer_bytes_compiled": sum(c.runs * c.bytes for c in permutes),
        "other_permute_bytes_compiled": sum(c.runs * c.bytes for c in others),
    }
