"""Time the server with concurrent clients against the same requests sent one at a time.

    python -m megajax.bench_serve [--config configs/gpt2_small.py] [--clients 8] \
        [--prompt_len 32] [--new_tokens 128] [--rounds 2] [--set model.num_layers=6]

Random weights of the config's shape (GPT-2 124M by default) in float32 on one CPU device,
served by megajax.serve (uvicorn and the engine, warmed up, its context --prompt_len +
--new_tokens as `--context` sets it) on a loopback port. Each client
streams one completion of exactly --new_tokens greedy tokens (`ignore_eos`) after its own
prompt of random ids. Each round sends the clients' requests one after another, then all at
once; tokens/s is clients * new_tokens over the wall time of each, the median over rounds,
and the ratio is concurrent over one at a time. Time to first token is from sending a request
to its first streamed text, the median over requests (1 client: the sequential ones). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

from megajax import cli, config
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_small.py", help="the model's shape")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (and rows)")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after a warm-up")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def _server(cfg, clients: int, prompt_len: int, new_tokens: int) -> str:
    """The base URL of a server over random weights on one CPU device, its context
    prompt_len + new_tokens (--context), warmed up for these prompts."""
    import jax

    from megajax import generate, mesh, serve
    from megajax.data import chat
    from megajax.data.tokenizer import GPT2Tokenizer
    from megajax.sharded_model import ShardedModel

    sharded = ShardedModel(cfg, mesh.make("data=1,model=1", devices=jax.devices()[:1]))
    generator = generate.Generator(sharded, sharded.fresh_params())
    tokenizer = GPT2Tokenizer("data/gpt2")
    limits = dict(max_rows=clients, max_queue=clients, slots=prompt_len + new_tokens)
    engine = serve.start_engine(generator, tokenizer, warm_up=[prompt_len], **limits)
    server = serve.Server(engine, tokenizer, chat.template_for(tokenizer), model_name="bench")
    _, port = serve.serve_in_thread(serve.make_app(server))
    return f"http://127.0.0.1:{port}/v1/completions"


def _complete(url: str, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, tokens) of one streamed completion."""
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=3600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: ") :])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


def _one_at_a_time(url, prompts, new_tokens):
    start = time.perf_counter()
    results = [_complete(url, p, new_tokens) for p in prompts]
    return time.perf_counter() - start, results


def _all_at_once(url, prompts, new_tokens):
    results = [None] * len(prompts)

    def client(i):
        results[i] = _complete(url, prompts[i], new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def main(argv=None) -> int:
    import numpy as np

    args = parse_args(argv)
    try:
        cfg = config.replace(
            config.override(config.load(args.config), args.set),
            model=dict(dropout=0.0, compute_dtype="float32"),
        )
        if args.prompt_len + args.new_tokens > cfg.model.seq_len:
            raise ConfigError(
                f"--prompt_len + --new_tokens exceed model.seq_len {cfg.model.seq_len}"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = _server(cfg, args.clients, args.prompt_len, args.new_tokens)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.model.vocab_size, (args.clients, args.prompt_len)).tolist()
    _all_at_once(url, prompts, args.new_tokens)  # warm-up: first-call costs
    total = args.clients * args.new_tokens
    rates = {"one_at_a_time": [], "concurrent": []}
    first = {"one_at_a_time": [], "concurrent": []}
    for r in range(args.rounds):
        for name, run in (("one_at_a_time", _one_at_a_time), ("concurrent", _all_at_once)):
            seconds, results = run(url, prompts, args.new_tokens)
            assert all(tokens == args.new_tokens for _, _, tokens in results)
            rates[name].append(total / seconds)
            first[name] += [f for f, _, _ in results]
            print(
                f"round {r} {name}: {total / seconds:,.1f} tokens/s, first token after "
                f"{statistics.median(f for f, _, _ in results):.3f} s",
                flush=True,
            )
    rate = {k: statistics.median(v) for k, v in rates.items()}
    ttft = {k: statistics.median(v) for k, v in first.items()}
    ratio = rate["concurrent"] / rate["one_at_a_time"]
    print(
        f"{args.clients} clients: {rate['concurrent']:,.1f} tokens/s concurrent, "
        f"{rate['one_at_a_time']:,.1f} one at a time, ratio {ratio:.2f}x; first token "
        f"{ttft['one_at_a_time']:.3f} s (1 client), {ttft['concurrent']:.3f} s "
        f"({args.clients} clients)",
        flush=True,
    )
    result = {
        "config": args.config,
        "clients": args.clients,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "tokens_per_sec": {k: round(v, 1) for k, v in rate.items()},
        "ratio": round(ratio, 2),
        "first_token_s": {
            "1": round(ttft["one_at_a_time"], 3),
            str(args.clients): round(ttft["concurrent"], 3),
        },
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
