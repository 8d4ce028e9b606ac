"""Time a context-split train step (--mesh, e.g. context=4) against the unsplit one
(--reference, e.g. data=1) at the same global sequence, in rounds that alternate them
(megajax.bench's batches and timer); then the compiled memory per device of the context-split
step as the sequence grows at that context degree (--lengths).

python scripts/context_rate.py --config configs/llama_tiny.py --mesh context=4 --cpu_devices 4
    [--reference data=1] [--lengths 256,512,1024,2048] [--steps 6] [--rounds 3] [--set K=V]
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
    parser.add_argument("--config", required=True, help="a decoder config in configs/")
    parser.add_argument("--mesh", default="context=4", help="the context-split layout")
    parser.add_argument(
        "--reference", default="data=1", help="the unsplit layout it is timed against"
    )
    parser.add_argument(
        "--lengths", default="", help="comma-separated seq_len values for the memory sweep"
    )
    bench.add_timing_flags(parser, steps=6)
    return parser.parse_args(argv)


def _mesh(text):
    import jax

    n = 1
    for degree in mesh.parse(text).values():
        n *= degree
    return mesh.make(text, devices=jax.devices()[:n])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    import jax

    from megajax.trainer import Trainer

    cfg = config.override(config.load(args.config), args.set)
    cfg = bench.for_platform(cfg, jax.devices()[0].platform)
    m = cfg.model
    batches = bench._text_batches(cfg, 4)
    steppers, compile_s = {}, {}
    for text in (args.reference, args.mesh):
        steppers[text], compile_s[text] = bench.jax_stepper(cfg, _mesh(text), batches)
    times, _ = bench.time_steps(steppers, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    tokens = cfg.train.batch_size * m.tokens_per_sample
    print(
        f"{args.config}: seq_len {m.seq_len}, batch {cfg.train.batch_size}, {tokens} tokens/step "
        f"({jax.devices()[0].platform}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f})"
    )
    step = {}
    for key, t in times.items():
        r = bench.summarize(t, tokens=tokens, flops_per_token=m.flops_per_token(), peak=1)
        step[key] = r["step_time_s"]
        print(
            f"{key:>22}: step {r['step_time_s']:.4f}s (quartiles {r['step_time_q1_s']:.4f}-"
            f"{r['step_time_q3_s']:.4f}, {r['steps']} steps) | compiled in {compile_s[key]:.1f}s"
        )
    ratio = step[args.mesh] / step[args.reference]
    print(f"{args.mesh} / {args.reference} step time: {ratio:.2f}x")
    memory = {}
    for length in [int(x) for x in args.lengths.split(",") if x]:
        longer = config.replace(cfg, model=dict(seq_len=length))
        for text in (args.reference, args.mesh):
            stats = Trainer(longer, _mesh(text)).compile_train_step()[0].memory_analysis()
            memory[f"{text} seq_len={length}"] = stats.temp_size_in_bytes
            print(
                f"  seq_len {length:>6} on {text:>10}: temporaries "
                f"{stats.temp_size_in_bytes / 2**20:8.1f} MiB per device, arguments "
                f"{stats.argument_size_in_bytes / 2**20:7.1f} MiB"
            )
    print(json.dumps({"ratio": ratio, "load_average": os.getloadavg()[0], "step_s": step,
                      "temporaries": memory}))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
