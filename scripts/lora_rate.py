"""Time a LoRA train step against full fine-tuning of the same model on the same mesh, in rounds
that alternate the two so both see the same machine load (megajax.bench's batches and timer).

python scripts/lora_rate.py --config configs/bench_gpt_cpu.py --rank 16 [--mesh data=-1,model=1]
    [--cpu_devices N] [--steps 12] [--rounds 3] [--set KEY=VALUE ...]
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
    parser.add_argument("--config", required=True, help="a Python file in configs/")
    parser.add_argument("--rank", type=int, default=16, help="lora.rank of the LoRA step")
    parser.add_argument("--mesh", default="data=-1,model=1", help="e.g. data=2,model=4")
    bench.add_timing_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    import jax

    full = config.override(config.load(args.config), [*args.set, "lora.rank=0"])
    full = bench.for_platform(full, jax.devices()[0].platform)
    adapted = config.replace(full, lora=dict(rank=args.rank))
    device_mesh = mesh.make(args.mesh)
    batches = bench._text_batches(full, 8)
    steppers, compile_s = {}, {}
    for name, cfg in (("full", full), (f"lora r={args.rank}", adapted)):
        steppers[name], compile_s[name] = bench.jax_stepper(cfg, device_mesh, batches)
    times, faults = bench.time_steps(
        steppers, steps=args.steps, warmup=args.warmup, rounds=args.rounds
    )
    tokens = full.train.batch_size * full.model.tokens_per_sample
    print(
        f"{args.config} on {dict(device_mesh.shape)} ({jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {os.cpu_count()} CPUs), {tokens} tokens/step, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for name, t in times.items():
        r = bench.summarize(t, tokens=tokens, flops_per_token=full.model.flops_per_token(), peak=1)
        results[name] = r
        print(
            f"{name:>10}: {r['tokens_per_sec']:8,.0f} tokens/s | step {r['step_time_s']:.4f}s "
            f"(quartiles {r['step_time_q1_s']:.4f}-{r['step_time_q3_s']:.4f}, {r['steps']} "
            f"steps) | compiled in {compile_s[name]:.1f}s | {faults[name]:,.0f} page faults/step"
        )
    lora_name = f"lora r={args.rank}"
    ratio = results[lora_name]["tokens_per_sec"] / results["full"]["tokens_per_sec"]
    print(f"LoRA / full fine-tuning tokens/s: {ratio:.2f}x")
    print(json.dumps({"ratio": ratio, "load_average": os.getloadavg()[0], **{
        f"{k}_tokens_per_sec": v["tokens_per_sec"] for k, v in results.items()}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
