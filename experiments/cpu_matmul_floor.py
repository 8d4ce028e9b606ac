"""How fast can a CPU train step be? Every matmul of one GPT step, timed alone in XLA and in
PyTorch, beside the whole step of each.

    python experiments/cpu_matmul_floor.py [--config configs/bench_gpt_cpu.py]

A step cannot be faster than its matmuls run back to back with nothing else, so the XLA total
bounds megajax's step from below, and PyTorch's step divided by it bounds the ratio megajax can
reach against PyTorch. Each matmul is a fresh jit of one dot_general (XLA picks its layouts) or
one torch.matmul on 2 threads, median of 9 runs after 2; its count is the number of times a step
runs it (per layer, or once for the LM head). Needs torch and transformers
(requirements-test.txt). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import bench, cli, config, mesh  # noqa: E402


def matmuls(m: config.ModelConfig, tokens: int, batch: int):
    """(name, count per step, lhs shape, rhs shape, contraction) of one train step, where the
    contraction is an einsum over the two operands."""
    h, f, v, heads, s = m.hidden, m.mlp_hidden, m.vocab_size, m.num_heads, m.seq_len
    bh, d = batch * heads, m.head_dim
    out = []
    for din, dout in [(h, 3 * h), (h, h), (h, f), (f, h)]:
        out += [
            (f"dense {din}x{dout} forward", m.num_layers, (tokens, din), (din, dout), "ti,io->to"),
            (f"dense {din}x{dout} dX", m.num_layers, (tokens, dout), (din, dout), "to,io->ti"),
            (f"dense {din}x{dout} dW", m.num_layers, (tokens, din), (tokens, dout), "ti,to->io"),
        ]
    out += [
        ("attention q k^T", m.num_layers, (bh, s, d), (bh, s, d), "bqd,bkd->bqk"),
        ("attention p v", m.num_layers, (bh, s, s), (bh, s, d), "bqk,bkd->bqd"),
        ("attention dP", m.num_layers, (bh, s, d), (bh, s, d), "bqd,bkd->bqk"),
        ("attention dV", m.num_layers, (bh, s, s), (bh, s, d), "bqk,bqd->bkd"),
        ("attention dQ", m.num_layers, (bh, s, s), (bh, s, d), "bqk,bkd->bqd"),
        ("attention dK", m.num_layers, (bh, s, s), (bh, s, d), "bqk,bqd->bkd"),
        ("LM head logits", 1, (tokens, h), (v, h), "th,vh->tv"),
        ("LM head dH", 1, (tokens, v), (v, h), "tv,vh->th"),
        ("LM head dE", 1, (tokens, v), (tokens, h), "tv,th->vh"),
    ]
    return out


def _median_time(fn, runs: int = 9) -> float:
    fn()
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_both(spec: str, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Seconds for einsum(spec, a, b): as one jitted XLA dot, and in PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch

    dot = jax.jit(lambda x, y: jnp.einsum(spec, x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_xla = _median_time(lambda: dot(ja, jb).block_until_ready())
    return t_xla, _median_time(lambda: torch.einsum(spec, ta, tb))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bench_gpt_cpu.py")
    parser.add_argument("--steps", type=int, default=8, help="whole steps timed for each")
    args = parser.parse_args(argv)

    cfg = config.load(args.config)
    m, batch = cfg.model, cfg.train.batch_size
    tokens = batch * m.seq_len
    rng = np.random.default_rng(0)
    totals, flops = {"xla": 0.0, "torch": 0.0}, 0
    print(f"{'matmul':>28} {'count':>5} {'XLA ms':>8} {'torch ms':>9}")
    for name, count, a_shape, b_shape, spec in matmuls(m, tokens, batch):
        a = rng.standard_normal(a_shape, dtype=np.float32)
        b = rng.standard_normal(b_shape, dtype=np.float32)
        t_xla, t_torch = _time_both(spec, a, b)
        totals["xla"] += count * t_xla
        totals["torch"] += count * t_torch
        sizes = dict(zip(spec.split("->")[0].replace(",", ""), (*a_shape, *b_shape), strict=True))
        flops += count * 2 * int(np.prod(list(sizes.values())))
        print(f"{name:>28} {count:5d} {1e3 * t_xla:8.1f} {1e3 * t_torch:9.1f}")

    device_mesh = mesh.make("data=-1,model=1")
    batches = bench._text_batches(cfg, 4)
    steppers = {"megajax": bench.jax_stepper(cfg, device_mesh, batches)[0]}
    steppers["torch"] = bench.torch_stepper(cfg, batches)[0]
    times, _ = bench.time_steps(steppers, steps=args.steps, warmup=2, rounds=2)
    step = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "matmul_gflop": flops / 1e9,
        "model_gflop": tokens * m.flops_per_token() / 1e9,
        "xla_matmuls_s": totals["xla"],
        "torch_matmuls_s": totals["torch"],
        "megajax_step_s": step["megajax"],
        "torch_step_s": step["torch"],
        "ratio": step["torch"] / step["megajax"],
        "ratio_ceiling": step["torch"] / totals["xla"],
    }
    print(
        f"{flops / 1e9:.1f} GFLOP of matmuls (the model's count: {result['model_gflop']:.1f}); "
        f"alone they take {totals['xla']:.3f} s in XLA, {totals['torch']:.3f} s in PyTorch.\n"
        f"Whole steps: megajax {step['megajax']:.3f} s, PyTorch {step['torch']:.3f} s "
        f"({result['ratio']:.2f}x). With nothing but XLA's matmuls, megajax could reach at most "
        f"{result['ratio_ceiling']:.2f}x PyTorch's tokens/s."
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
