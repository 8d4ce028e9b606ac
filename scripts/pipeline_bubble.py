"""Measure the pipeline bubble: train-step time with m = P and m = 4P micro-batches (of a fixed
size) on faked CPU devices, beside the schedule's formula (P - 1) / (v m + P - 1).

    python scripts/pipeline_bubble.py --pipeline 4 --model 2 --cpu_devices 8 --steps 3

Faked devices share the host's cores, so a bubble shows as work, not as idle time: every stage
computes on every tick (on zeros in the bubble). The step time is then proportional to the
ticks, v m + P - 1, and the useful share of it is 1 - bubble. The figure printed is the time per
micro-batch at m = P over the one at m = 4P, measured and as the formula predicts.
`--schedule 1f1b` times the 1F1B schedule instead (its bubble ticks skip their work under a
cond, so there the bubble is time spent waiting for the other stages).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import mesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_tiny.py")
    parser.add_argument("--pipeline", type=int, default=4)
    parser.add_argument("--model", type=int, default=2)
    parser.add_argument("--cpu_devices", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro_size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument(
        "--vocab", type=int, default=1024, help="a small head keeps the stages' share"
    )
    parser.add_argument("--repeats", default="1,2", help="pipeline_repeats values to time")
    parser.add_argument("--schedule", default="gpipe", choices=("gpipe", "1f1b"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; min is kept")
    args = parser.parse_args()
    mesh.fake_cpu_devices(args.cpu_devices)
    import jax
    import numpy as np

    from megajax import config, pipeline_arithmetic
    from megajax.trainer import Trainer

    p, t = args.pipeline, args.model
    data = args.cpu_devices // (p * t)
    device_mesh = mesh.make(f"pipeline={p},data={data},model={t}")
    base = config.replace(
        config.load(args.config), model=dict(num_layers=args.layers, vocab_size=args.vocab)
    )
    runs = {}
    for v in (int(x) for x in args.repeats.split(",")):
        for m in (p, 4 * p):
            batch = m * args.micro_size * data
            cfg = config.replace(
                base,
                train=dict(
                    batch_size=batch,
                    micro_batches=m,
                    pipeline_repeats=v,
                    pipeline_schedule=args.schedule,
                ),
            )
            trainer = Trainer(cfg, device_mesh)
            step, _ = trainer.compile_train_step()
            rng = np.random.default_rng(0)
            ids = rng.integers(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1))
            feed = trainer.put_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
            state = trainer.init_state()
            state, metrics = step(state, feed)  # warm up
            jax.block_until_ready(metrics)
            runs[v, m] = [trainer, step, state, feed, []]
    for _ in range(args.rounds):  # alternate the programs so a busy host slows them alike
        for run in runs.values():
            _, step, state, feed, times = run
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, feed)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / args.steps)
            run[2] = state
    print(f"{args.schedule}: mesh pipeline={p},data={data},model={t}; {args.layers} layers; "
          f"{args.micro_size} sequences per micro-batch and data shard; "
          f"{jax.devices()[0].platform}")  # fmt: skip
    print("  v   m  ticks  bubble(formula)  step s  s per micro-batch")
    for (v, m), (*_, times) in runs.items():
        ticks = pipeline_arithmetic.ticks(p, v, m, args.schedule)
        bubble = pipeline_arithmetic.bubble_fraction(p, v, m)
        print(f"  {v}  {m:2d}  {ticks:5d}  {bubble:15.3f}  {min(times):6.3f}  {min(times) / m:.4f}")
    for v in sorted({v for v, _ in runs}):
        small, large = (min(runs[v, m][4]) / m for m in (p, 4 * p))
        predicted = (1 - pipeline_arithmetic.bubble_fraction(p, v, 4 * p)) / (
            1 - pipeline_arithmetic.bubble_fraction(p, v, p)
        )
        print(
            f"  v={v}: time per micro-batch at m={p} over m={4 * p}: measured "
            f"{small / large:.2f}, formula (1 - bubble(4P)) / (1 - bubble(P)) = {predicted:.2f}"
        )


if __name__ == "__main__":
    main()
