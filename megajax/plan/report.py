"""The dry run's plan as readable tables, and the command's entry point (train.py --dry_run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megajax import parallel
from megajax.config import Config
from megajax.plan.compiled import make_plan
from megajax.plan.estimates import GB


def gb(x: float) -> str:
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
        f"fsdp={plan['mesh']['fsdp']} expert={plan['mesh']['expert']} "
        f"context={plan['mesh']['context']} "
        f"model={plan['mesh']['model']}, "
        f"compiled in {plan['compile_seconds']:.1f}s on {plan['platform']}",
        f"parameters: {p['total']:,} total, {p['per_device']:,} per device "
        f"(analytic {p['per_device_analytic']:,})",
        f"trained: {p['trainable']:,}, {p['trainable_per_device']:,} per device (analytic "
        f"{p['trainable_per_device_analytic']:,}; lora.rank={plan['lora']['rank']})",
        "",
        f"memory per device (remat={remat}, sequence parallel {sp})",
        "                                      analytic      compiled",
        f"  weights + Adam moments + batch  {gb(an['arguments']):>12}  "
        f"{gb(co['arguments']):>12}  (arguments)",
        f"  gradients + update              {gb(an['gradients'] + an['update']):>12}",
        f"  activations, remat none         {gb(an['activations']):>12}",
        f"  activations, remat selective    {gb(an['activations_selective']):>12}",
        f"  activations, remat full         {gb(an['activations_remat']):>12}",
        f"  layers' activations, paper      {gb(an['activations_paper']):>12}  "
        "(arXiv 2205.05198 Table 2, 16-bit)",
        f"  gradients, update, activations  {gb(an['temporaries']):>12}  "
        f"{gb(co['temporaries']):>12}  (temporaries)",
        f"  total                           {gb(an['total']):>12}  {gb(co['total']):>12}",
    ]
    if plan["platform"] == "cpu":
        lines.append(
            f"  XLA:CPU (faked devices) computes bf16 as float32; the estimate at float32 is "
            f"{gb(plan['memory']['analytic_as_compiled']['temporaries'])} of temporaries"
        )
    lines.append(
        f"  fits one {mem['target']} ({gb(mem['target_bytes'])}): "
        f"{'yes' if mem['fits'] else 'NO'} (analytic, {plan['config']['compute_dtype']} "
        f"activations {gb(acts)})"
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
    moe = plan["moe"]
    if moe:
        done, want = moe["alltoall_compiled"], moe["alltoall_predicted"]
        lines += [
            "",
            f"mixture of experts: {moe['total_params']:,} parameters, "
            f"{moe['active_params']:,} active per token (the FLOPs below count these)",
            f"  experts' weights and Adam moments per device: "
            f"{gb(moe['expert_state_bytes_per_device'])}",
            f"  all-to-alls of rows over expert per step: {done['count']} of "
            f"{gb(done['bytes'])} compiled (predicted {want['count']}, {gb(want['bytes'])}); "
            f"{1e3 * moe['alltoall_seconds']:.1f} ms on the target's links in "
            f"{plan['config']['compute_dtype']}",
        ]
    cp = plan["context"]
    if cp:
        want = cp["predicted"]
        lines += [
            "",
            f"context: C={cp['degree']}, model.context_attention={cp['core']}; attention core "
            f"{cp['attention_flops']:.3e} FLOPs per step at the whole length",
            f"  K/V all-gathers over context: {cp['all_gathers_compiled']} compiled "
            f"(predicted {want['all_gather'][0]}), their reduce-scatters "
            f"{cp['reduce_scatters_compiled']} (predicted {want['reduce_scatter'][0]}); "
            f"K/V block collective-permutes {cp['permutes_compiled']} (a ring's: predicted "
            f"{want['collective_permute'][0]}); {gb(cp['bytes_compiled'])} of results compiled",
            f"  per device per step: all-gather {gb(cp['allgather_bytes'])} through its link, a "
            f"ring {gb(cp['ring_bytes'])}; {cp['core']}: "
            f"{1e3 * cp['seconds']:.1f} ms on the target's "
            f"{'intra' if cp['in_node'] else 'inter'}-node links",
        ]
    pp = plan["pipeline"]
    if pp:
        lines += [
            "",
            f"pipeline: {pp['schedule']}, P={pp['stages']} stages, v={pp['repeats']} repeats, "
            f"m={pp['micro_batches']} micro-batches: {pp['ticks']} ticks, bubble "
            f"{100 * pp['bubble']:.1f}% = (P-1)/(v m+P-1)",
            (
                f"  in flight per device: {pp['in_flight_micro_batches']:.1f} micro-batches of the "
                f"stage's layers (GPipe: all m, and the bubble ticks), "
                f"{gb(pp['in_flight_bytes'])} with the micro-batch buffers and heads"
                if pp["schedule"] == "gpipe"
                else f"  in flight per device: {pp['in_flight_micro_batches']} saved stage inputs "
                f"(1F1B: 2 v P - 1, whatever m) and one micro-batch's chunk, "
                f"{gb(pp['in_flight_bytes'])} with the buffers and the head"
            ),
            f"  collective-permutes per step: {pp['transfers']} of "
            f"{gb(pp['transfer_bytes'] / max(pp['transfers'], 1))}, "
            f"{gb(pp['transfer_bytes'])} per device (compiled: {pp['transfers_compiled']}, "
            f"{gb(pp['transfer_bytes_compiled'])})",
        ]
        if pp["other_permute_bytes_compiled"]:
            lines.append(
                f"  other collective-permutes over pipeline: "
                f"{gb(pp['other_permute_bytes_compiled'])} per step (circular repeats: the "
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
    if plan["mesh"]["fsdp"] > 1:
        lines.append(
            "  fsdp: each layer's weights all-gathered over `fsdp` inside the layer loop, "
            "forward and again backward (a shard's whole copy lives for one layer), its "
            "gradients reduce-scattered there (XLA:CPU prints an all-reduce of the whole, then "
            "a slice); the weights outside the layers gathered once"
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
            + (f", all-to-all {ms['alltoall_s']}" if r["alltoall_s"] else "")
            + (f", fsdp gathers and reduce-scatters {ms['fsdp_s']}" if r.get("fsdp_s") else "")
            + (f", K/V exchange {ms['context_s']}" if r.get("context_s") else "")
            + f") | MFU {100 * r['mfu']:.0f}% | {r['hardware_tflops_per_device']:.0f} "
            f"hardware TFLOP/s per device | weak scaling "
            f"{100 * r['weak_scaling_efficiency']:.0f}%"
        )
    if plan["paper_weak_scaling"]:
        paper = ", ".join(f"{k} {100 * v:.0f}%" for k, v in plan["paper_weak_scaling"].items())
        lines.append(f"  the 2019 paper, measured on V100s: {paper}")
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
