"""Time train steps: tokens/s, step time and MFU, optionally beside Hugging Face GPT-2 (PyTorch).

    python -m megajax.bench --config configs/bench_gpt_cpu.py [--mesh data=-1,model=1]
        [--cpu_devices N] [--steps 30] [--torch] [--set KEY=VALUE ...]

Batches are real text (the config's data.source, ids folded into the model's vocabulary), put
on the devices before the clock starts. On a GPU the step runs in bfloat16 with cuDNN's fused
attention (when dropout is off). With --torch the same shape runs as Hugging Face's
GPT2LMHeadModel in eager PyTorch on the CPU, interleaved round by round with the JAX steps so
both see the same machine load. Each line gives the page faults per step as well: on CPU the
step's temporaries come from malloc afresh, which is why the benchmark (like train.py) restarts
itself with huge-page malloc (cli.restart_with_huge_page_malloc; MEGAJAX_SYSTEM_MALLOC=1 skips
it). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from megajax import cli, config, mesh
from megajax.config import Config, ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a Python file in configs/")
    parser.add_argument("--mesh", default="data=-1,model=1", help="e.g. data=2,model=4")
    add_timing_flags(
        parser, steps=30, warmup=3, rounds=5, rounds_help="interleaved rounds with --torch"
    )
    parser.add_argument("--torch", action="store_true", help="also time Hugging Face GPT-2")
    return parser.parse_args(argv)


def add_timing_flags(parser, *, steps=12, warmup=2, rounds=3, rounds_help="alternating rounds"):
    """--cpu_devices, --steps, --warmup, --rounds and --set: what every step-timing command
    (this one, scripts/lora_rate.py, scripts/moe_rate.py) takes."""
    parser.add_argument("--cpu_devices", type=int, default=0, help="fake this many CPU devices")
    parser.add_argument(
        "--steps", type=int, default=steps, help="timed steps of each (after warm-up)"
    )
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps after compiling")
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def for_platform(cfg: Config, platform: str) -> Config:
    """On a GPU: bf16 matmuls and, without dropout, cuDNN's fused attention."""
    if platform != "gpu":
        return cfg
    attention = "cudnn" if cfg.model.dropout == 0 else cfg.model.attention
    return config.replace(cfg, model=dict(compute_dtype="bfloat16", attention=attention))


def _text_batches(cfg: Config, count: int):
    """`count` (inputs, targets) pairs of real text, ids folded into the model's vocabulary."""
    import tempfile

    from megajax.data import loader

    vocab = cfg.model.vocab_size
    with tempfile.TemporaryDirectory() as workdir:  # the text is prepared into it, then read
        _, train, _ = loader.loaders(cfg, workdir=workdir, log=lambda _: None)
        batches = [train.batch(i) for i in range(count)]
    return [(b["inputs"] % vocab, b["targets"] % vocab) for b in batches]


def jax_stepper(cfg: Config, device_mesh, batches):
    """A function running one megajax train step to completion, and the compile time."""
    import jax

    from megajax.trainer import Trainer

    trainer = Trainer(cfg, device_mesh)
    on_device = [trainer.put_batch({"inputs": x, "targets": y}) for x, y in batches]
    compiled, compile_s = trainer.compile_train_step()
    holder = {"state": trainer.init_state(), "i": 0}

    def step():
        batch = on_device[holder["i"] % len(on_device)]
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        holder["i"] += 1
        return metrics["loss"]

    return step, compile_s


def hf_gpt2_config(cfg: Config):
    """Hugging Face's GPT2Config of the same shape, activation and dropout as cfg.model."""
    from transformers import GPT2Config

    m = cfg.model
    return GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.seq_len,
        n_embd=m.hidden,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        n_inner=m.mlp_hidden,
        activation_function="gelu_new",  # the tanh approximation megajax uses
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
        layer_norm_epsilon=m.layernorm_eps,
        bos_token_id=None,  # GPT-2's 50256 is outside a smaller vocabulary
        eos_token_id=None,
    )


def torch_stepper(cfg: Config, batches):
    """One eager PyTorch step of Hugging Face's GPT-2 with the same shape and AdamW."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ConfigError(
            f"--torch needs PyTorch and transformers ({e.name} is missing): "
            "pip install torch transformers"
        ) from None
    m, o = cfg.model, cfg.optim
    torch.manual_seed(cfg.train.seed)
    model = GPT2LMHeadModel(hf_gpt2_config(cfg)).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    tensors = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]
    holder = {"i": 0}

    def step():
        x, y = tensors[holder["i"] % len(tensors)]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        holder["i"] += 1
        return loss.item()

    about = f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
    about += f"attention {model.config._attn_implementation}"
    return step, about


def time_steps(steppers: dict, *, steps: int, warmup: int, rounds: int):
    """Seconds per step for each stepper, alternating rounds of steps // rounds between them,
    and the page faults per step each caused ({name: [seconds]}, {name: faults})."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steppers}
    faults = dict.fromkeys(steppers, 0)
    rounds = max(1, min(rounds, steps))
    for r in range(rounds):
        count = steps // rounds + (r < steps % rounds)
        for name, step in steppers.items():
            before = _page_faults()
            for _ in range(count):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
            faults[name] += _page_faults() - before
    return times, {name: faults[name] / len(times[name]) for name in steppers}


def _page_faults() -> int:
    """Page faults of this process so far that the kernel served without I/O."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(times: list[float], *, tokens: int, flops_per_token: float, peak: float) -> dict:
    median = statistics.median(times)
    quart = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    return {
        "tokens_per_sec": tokens / median,
        "step_time_s": median,
        "step_time_q1_s": quart[0],
        "step_time_q3_s": quart[2],
        "step_time_min_s": min(times),
        "mfu": tokens * flops_per_token / median / peak,
        "steps": len(times),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    try:
        import os

        import jax

        from megajax import metrics

        cfg = config.override(config.load(args.config), args.set)
        platform = jax.devices()[0].platform
        cfg = for_platform(cfg, platform)
        device_mesh = mesh.make(args.mesh)
        batches = _text_batches(cfg, 8)
        jax_step, compile_s = jax_stepper(cfg, device_mesh, batches)
        steppers = {"megajax": jax_step}
        print(
            f"megajax: jax {jax.__version__}, {jax.device_count()} {platform} device(s) "
            f"{dict(device_mesh.shape)}, {cfg.model.compute_dtype}, attention "
            f"{cfg.model.attention}; compiled in {compile_s:.1f}s; load average "
            f"{os.getloadavg()[0]:.2f}"
        )
        if args.torch:
            steppers["torch"], about = torch_stepper(cfg, batches)
            print(f"pytorch: {about}")
        times, faults = time_steps(
            steppers, steps=args.steps, warmup=args.warmup, rounds=args.rounds
        )
        peak_device = metrics.peak_flops_per_device(jax.devices()[0])
        peak = peak_device * jax.device_count()
        tokens = cfg.train.batch_size * cfg.model.seq_len
        flops = cfg.model.flops_per_token()
        results = {
            name: summarize(t, tokens=tokens, flops_per_token=flops, peak=peak)
            | {"page_faults_per_step": faults[name]}
            for name, t in times.items()
        }
        print(
            f"peak {peak_device / 1e9:,.0f} GFLOP/s per device ({platform}); {tokens} tokens/step"
        )
        for name, r in results.items():
            print(
                f"{name:>8}: {r['tokens_per_sec']:8,.0f} tokens/s | step {r['step_time_s']:.4f}s "
                f"(quartiles {r['step_time_q1_s']:.4f}-{r['step_time_q3_s']:.4f}, fastest "
                f"{r['step_time_min_s']:.4f}, {r['steps']} steps) | MFU {100 * r['mfu']:.1f}% | "
                f"{r['page_faults_per_step']:,.0f} page faults/step"
            )
        summary = {**results["megajax"], "config": args.config, "platform": platform}
        if "torch" in results:
            ratio = results["megajax"]["tokens_per_sec"] / results["torch"]["tokens_per_sec"]
            best = results["torch"]["step_time_min_s"] / results["megajax"]["step_time_min_s"]
            print(f"megajax / pytorch tokens/s: {ratio:.2f}x (fastest steps: {best:.2f}x)")
            summary |= {"torch_tokens_per_sec": results["torch"]["tokens_per_sec"]}
            summary |= {"torch_step_time_s": results["torch"]["step_time_s"], "ratio": ratio}
            summary |= {"ratio_fastest_steps": best}
            summary |= {"torch_page_faults_per_step": results["torch"]["page_faults_per_step"]}
        summary["load_average"] = os.getloadavg()[0]
        summary["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
        print(json.dumps(summary))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
