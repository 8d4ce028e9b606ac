"""Time a Mixture-of-Experts train step against the dense model with the same active
parameters (one SwiGLU MLP as wide as top_k experts together), and the grouped-matmul experts
against a dense one-hot dispatch (every row through every expert, the others' outputs
discarded), in rounds that alternate them (megajax.bench's batches and timer).

python scripts/moe_rate.py --config configs/mixtral_tiny.py [--mesh data=-1] [--cpu_devices N]
    [--steps 12] [--rounds 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import bench, cli, config, mesh  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a MoE config in configs/")
    parser.add_argument("--mesh", default="data=-1", help="e.g. data=2,expert=2,model=2")
    bench.add_timing_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    import jax

    from megajax import moe

    sparse = config.override(config.load(args.config), args.set)
    sparse = bench.for_platform(sparse, jax.devices()[0].platform)
    m = sparse.model
    if not m.moe:
        raise SystemExit(f"{args.config} has no experts (model.moe_experts=0)")
    width = m.moe_top_k * m.expert_hidden + m.moe_shared_experts * m.expert_hidden
    dense = config.replace(sparse, model=dict(moe_experts=0, mlp="swiglu", ffn_hidden=width))
    device_mesh = mesh.make(args.mesh)
    dense_mesh = mesh.make(args.mesh.replace("expert", "data"))
    batches = bench._text_batches(sparse, 8)
    steppers, compile_s = {}, {}
    name = f"MoE {m.moe_experts} top-{m.moe_top_k}"
    steppers[name], compile_s[name] = bench.jax_stepper(sparse, device_mesh, batches)
    grouped = moe.grouped_swiglu
    moe.grouped_swiglu = moe.one_hot_swiglu  # read when the step is traced, inside jax_stepper
    try:
        steppers["one-hot MoE"], compile_s["one-hot MoE"] = bench.jax_stepper(
            sparse, device_mesh, batches
        )
    finally:
        moe.grouped_swiglu = grouped
    steppers[f"dense {width}"], compile_s[f"dense {width}"] = bench.jax_stepper(
        dense, dense_mesh, batches
    )
    times, _ = bench.time_steps(steppers, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    tokens = sparse.train.batch_size * m.tokens_per_sample
    print(
        f"{args.config} on {dict(device_mesh.shape)} ({jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {os.cpu_count()} CPUs), {tokens} tokens/step, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for key, t in times.items():
        r = bench.summarize(t, tokens=tokens, flops_per_token=m.flops_per_token(), peak=1)
        results[key] = r
        print(
            f"{key:>14}: step {r['step_time_s']:.4f}s (quartiles {r['step_time_q1_s']:.4f}-"
            f"{r['step_time_q3_s']:.4f}, {r['steps']} steps) | {r['tokens_per_sec']:8,.0f} "
            f"tokens/s | compiled in {compile_s[key]:.1f}s"
        )
    step = {k: v["step_time_s"] for k, v in results.items()}
    vs_dense = step[name] / step[f"dense {width}"]
    vs_one_hot = step["one-hot MoE"] / step[name]
    print(f"MoE / dense step time: {vs_dense:.2f}x; one-hot / grouped: {vs_one_hot:.2f}x")
    print(json.dumps({"moe_over_dense": vs_dense, "one_hot_over_grouped": vs_one_hot,
                      "load_average": os.getloadavg()[0], **{
                          f"{k}_step_s": v for k, v in step.items()}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
