"""Time KV-cached decoding beside Hugging Face's generate(use_cache=True) in eager PyTorch.

    python -m megajax.bench_decode [--config configs/gpt2_small.py] [--batch 1 8] \
        [--prompt_len 32] [--new_tokens 128] [--rounds 3]

Random weights of the config's shape (GPT-2 124M by default) in float32 on one CPU device, a
prompt of random ids, greedy decoding of exactly --new_tokens tokens on both sides. Each
round times one generation of each batch size on each side, alternately, so both see the same
machine load; tokens/s is batch * new_tokens over the whole call (the prompt's prefill
included), the median over rounds, and the ratio is megajax over PyTorch. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from megajax import cli, config
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_small.py", help="the model's shape")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--no_torch", dest="torch", action="store_false", help="megajax only")
    return parser.parse_args(argv)


def _megajax(cfg, batches, prompt_len, new_tokens):
    """{batch: fn() -> seconds} generating with megajax on one device."""
    import jax
    import numpy as np

    from megajax import mesh
    from megajax.generate import Generator
    from megajax.sharded_model import ShardedModel

    sharded = ShardedModel(cfg, mesh.make("data=1,model=1", devices=jax.devices()[:1]))
    generator = Generator(sharded, sharded.fresh_params())
    rng = np.random.default_rng(0)

    def run(batch):
        prompts = rng.integers(0, cfg.model.vocab_size, (batch, prompt_len)).tolist()
        return generator(prompts, new_tokens=new_tokens, temperature=0.0)["seconds"]

    return {b: (lambda b=b: run(b)) for b in batches}


def _torch(cfg, batches, prompt_len, new_tokens):
    """{batch: fn() -> seconds} generating with transformers' GPT2LMHeadModel, eager."""
    import torch
    from transformers import GPT2LMHeadModel

    from megajax.bench import hf_gpt2_config

    m = cfg.model
    model = GPT2LMHeadModel(hf_gpt2_config(cfg)).eval()

    def run(batch):
        ids = torch.randint(0, m.vocab_size, (batch, prompt_len))
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == prompt_len + new_tokens
        return time.perf_counter() - start

    return {b: (lambda b=b: run(b)) for b in batches}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.replace(
            config.load(args.config), model=dict(dropout=0.0, compute_dtype="float32")
        )
        if args.prompt_len + args.new_tokens > cfg.model.seq_len:
            raise ConfigError(
                f"--prompt_len + --new_tokens exceed model.seq_len {cfg.model.seq_len}"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sides = {"megajax": _megajax(cfg, args.batch, args.prompt_len, args.new_tokens)}
    if args.torch:
        import torch

        sides["pytorch"] = _torch(cfg, args.batch, args.prompt_len, args.new_tokens)
        print(f"PyTorch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    for side in sides.values():  # warm-up: compiling, first-call costs
        for run in side.values():
            run()
    times = {(s, b): [] for s in sides for b in args.batch}
    for r in range(args.rounds):
        for b in args.batch:
            for s, side in sides.items():
                seconds = side[b]()
                times[s, b].append(seconds)
                print(f"round {r} batch {b} {s}: {b * args.new_tokens / seconds:,.1f} tokens/s",
                      flush=True)  # fmt: skip
    result = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for b in args.batch:
        rates = {s: b * args.new_tokens / statistics.median(times[s, b]) for s in sides}
        line = f"batch {b}: megajax {rates['megajax']:,.1f} tokens/s"
        result[f"batch{b}"] = {s: round(v, 1) for s, v in rates.items()}
        if args.torch:
            ratio = rates["megajax"] / rates["pytorch"]
            line += f", PyTorch {rates['pytorch']:,.1f} tokens/s, ratio {ratio:.2f}x"
            result[f"batch{b}"]["ratio"] = round(ratio, 2)
        print(line, flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
