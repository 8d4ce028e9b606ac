"""Sample text from a trained GPT, or a Hugging Face GPT-2 or Llama, with a KV cache.

    python -m megajax.generate --workdir runs/sc --prompt "ROMEO:" --max_new_tokens 200
    python -m megajax.generate --hf_checkpoint HF_DIR --prompt FILE:prompt.txt --temperature 0 \
        --mesh data=1,model=8 --cpu_devices 8
    python -m megajax.generate --workdir runs/sft --chat --prompt "Who is Juliet?"

The prompt runs through the model once (prefill), filling a KV cache of (layers, batch, slots,
kv heads, head_dim) split over `model` by heads; then one jitted loop decodes one token per step,
each model shard attending with its own heads and sampling on its own vocabulary rows
(megajax/sampling.py). Prompts of unequal length are padded on the left, with their positions
counted from their first real token and the padding masked out of attention, so every row
decodes as it would alone. A prompt must fit model.seq_len; once prompt and new tokens pass it,
each further token is predicted from the last seq_len tokens (nanoGPT's crop), the window run
whole through the model each step since learned positions shift with it. Each sample is
printed as text; the last line is one JSON object. With --chat the prompt is a user's message,
rendered through the run's chat template (megajax/data/chat.py) with the assistant's generation
prompt, and each reply ends before the token that closes an assistant's turn.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from megajax import cli, config, parallel
from megajax.config import ConfigError
from megajax.data import loader
from megajax.data.tokenizer import text_ids

PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this: fewer compiles


class Generator:
    """Batched generation with a trained GPT's parameters on its mesh: `sharded` is the
    model's ShardedModel (a Trainer serves too), `params` laid out as its param_sharding."""

    def __init__(self, sharded, params):
        import jax

        if sharded.cfg.model.arch != "gpt":
            raise ConfigError(
                f"text generation needs a GPT (model.arch=gpt), not model.arch="
                f"{sharded.cfg.model.arch}: a BERT does not predict the next token"
            )
        context = sharded.mesh.shape[parallel.CONTEXT]
        if context > 1:
            raise ConfigError(
                f"--mesh context={context} splits a training step's sequence; decoding reads "
                "one token at a time from a KV cache: decode on a mesh without context "
                "(context=1), e.g. --mesh data=D,model=M"
            )
        self.sharded, self.params = sharded, params
        self.seq_len, self.vocab_size = sharded.cfg.model.seq_len, sharded.cfg.model.vocab_size
        self.data_degree = math.prod(sharded.mesh.shape[a] for a in parallel.BATCH)
        self._programs = {}  # (rows, width, new_tokens, prompt_logprobs) -> compiled
        self._replicated = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec())

    def check_length(self, prompt_len: int) -> None:
        if prompt_len < 1:
            raise ConfigError("a prompt needs at least one token")
        if prompt_len > self.seq_len:
            raise ConfigError(
                f"a prompt of {prompt_len} tokens exceeds the model's {self.seq_len} positions "
                f"(model.seq_len): shorten it"
            )

    def __call__(
        self,
        prompts,
        *,
        new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        prompt_logprobs: bool = False,
    ) -> dict:
        """Generate `new_tokens` after each prompt (a list of token-id lists). Returns numpy
        arrays "tokens" and "logprobs" (prompts, new_tokens), "seconds" (the run, without
        compiling) and, with prompt_logprobs, "prompt_logprobs": a (len(prompt) - 1,) array per
        prompt, log p of each prompt token after the first. Row i's samples depend on its prompt
        and (seed, i), not on the mesh."""
        import jax

        longest = max(len(p) for p in prompts)
        for p in prompts:
            self.check_length(len(p))
            if max(p) >= self.vocab_size or min(p) < 0:
                raise ConfigError(
                    f"a prompt has token ids outside the model's {self.vocab_size} "
                    f"(model.vocab_size): was it encoded with the model's tokenizer?"
                )
        width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.seq_len)
        rows = -(-len(prompts) // self.data_degree) * self.data_degree
        ids = np.zeros((rows, width), np.int32)
        pads = np.full((rows,), width - 1, np.int32)  # filler rows: one token of id 0
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            pads[i] = width - len(p)
        fn = self._compiled(rows, width, new_tokens, prompt_logprobs)
        args = (ids, pads, np.uint32(seed), np.float32(temperature), np.int32(top_k),
                np.float32(top_p))  # fmt: skip
        start = time.perf_counter()
        out = fn(self.params, *jax.device_put(args, self._replicated))
        out = jax.block_until_ready(out)
        seconds = time.perf_counter() - start
        out = jax.tree.map(np.asarray, out)
        n = len(prompts)
        result = {"tokens": out["tokens"][:n], "logprobs": out["logprobs"][:n], "seconds": seconds}
        if prompt_logprobs:
            result["prompt_logprobs"] = [
                out["prompt_logprobs"][i, width - len(p) :] for i, p in enumerate(prompts)
            ]
        return result

    def _compiled(self, rows: int, width: int, new_tokens: int, prompt_logprobs: bool):
        """The generation program for this batch shape, compiled once."""
        import jax

        key = (rows, width, new_tokens, prompt_logprobs)
        if key in self._programs:
            return self._programs[key]

        shapes = [((rows, width), np.int32), ((rows,), np.int32), ((), np.uint32),
                  ((), np.float32), ((), np.int32), ((), np.float32)]  # fmt: skip
        args = [jax.ShapeDtypeStruct(s, t, sharding=self._replicated) for s, t in shapes]
        fn = functools.partial(
            self._generate, new_tokens=new_tokens, prompt_logprobs=prompt_logprobs
        )
        with self.sharded.context():
            self._programs[key] = jax.jit(fn).lower(self.params, *args).compile()
        return self._programs[key]

    def _generate(self, params, ids, pads, seed, temperature, top_k, top_p, *, new_tokens,
                  prompt_logprobs):  # fmt: skip
        """Prefill the left-padded prompts `ids` (batch, width), decode with the KV cache while
        the sequence fits model.seq_len, then with a sliding window of its last seq_len."""
        import jax
        import jax.numpy as jnp

        from megajax import loss, sampling
        from megajax.parallel import constrain

        model = self.sharded.model(params)
        vocab, head = self.vocab_size, model.lm_head
        (batch, width), slots = ids.shape, min(ids.shape[1] + new_tokens, self.seq_len)
        slot = jnp.arange(slots)
        real = slot[None, :] >= pads[:, None]  # (batch, slots): False on the left padding
        row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(
            jnp.arange(batch)
        )

        def step_keys(t):  # (batch, 2) key data for the token chosen at step t
            keys = jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(k, t)))(row_keys)
            return constrain(keys, "batch", None)

        def choose(hidden, t):  # hidden (batch, hidden) -> (token, its log-probability)
            return sampling.sample(
                hidden,
                head,
                step_keys(t),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                vocab_size=vocab,
            )

        # Prefill: every prompt slot at once, causal and blind to the padding.
        causal = slot[:, None] >= slot[None, :]  # (query, key) slots
        mask = (causal[None, :width] & real[:, None, :])[:, None]  # (batch, 1, width, slots)
        positions = jnp.maximum(jnp.arange(width)[None, :] - pads[:, None], 0)
        hidden, cache = model.extend(
            ids, model.empty_cache(batch, slots), start=0, positions=positions, mask=mask
        )
        out = {}
        if prompt_logprobs:  # log p of prompt token j + 1 given those up to j; padding gets 0
            nll = loss.cross_entropy(hidden[:, :-1], head, ids[:, 1:], vocab_size=vocab)
            out["prompt_logprobs"] = jnp.where(real[:, 1:width], -nll, 0.0)
        if new_tokens == 0:
            empty = jnp.zeros((batch, 0))
            return {**out, "tokens": empty.astype(jnp.int32), "logprobs": empty}
        first = choose(hidden[:, -1], 0)

        def decode(carry, t):  # feed token t - 1 at slot width + t - 1, choose token t
            cache, (token, _) = carry
            at = width + t - 1
            step_mask = (real & (slot[None, :] <= at))[:, None, None, :]
            position = (at - pads)[:, None]
            hidden, cache = model.extend(
                token[:, None], cache, start=at, positions=position, mask=step_mask
            )
            chosen = choose(hidden[:, 0], t)
            return (cache, chosen), chosen

        cached = min(new_tokens, slots - width + 1)  # tokens chosen while the cache has room
        (_, last), (tokens, logprobs) = jax.lax.scan(decode, (cache, first), jnp.arange(1, cached))
        tokens = jnp.concatenate([first[0][:, None], tokens.T], axis=1)
        logprobs = jnp.concatenate([first[1][:, None], logprobs.T], axis=1)
        if cached < new_tokens:
            later = self._slide(model, choose, ids, pads, tokens, last, new_tokens)
            tokens = jnp.concatenate([tokens, later[0]], axis=1)
            logprobs = jnp.concatenate([logprobs, later[1]], axis=1)
        return {**out, "tokens": tokens, "logprobs": logprobs}

    def _slide(self, model, choose, ids, pads, tokens, last, new_tokens):
        """The tokens after the sequence fills model.seq_len, each from the last seq_len tokens
        alone (nanoGPT's crop): learned positions shift with the window, so every step runs the
        whole window through the model rather than reusing cached keys. (tokens, logprobs),
        (batch, new_tokens - tokens.shape[1]) each."""
        import jax
        import jax.numpy as jnp

        (batch, width), done, seq_len = ids.shape, tokens.shape[1], self.seq_len
        buffer = jnp.concatenate(
            [ids, tokens, jnp.zeros((batch, new_tokens - done), jnp.int32)], axis=1
        )
        causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))

        def slide(carry, t):  # feed token t - 1 at slot width + t - 1, choose token t
            buffer, (token, _) = carry
            at = width + t - 1
            buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], at, 1)
            begin = at + 1 - seq_len
            window = jax.lax.dynamic_slice_in_dim(buffer, begin, seq_len, 1)
            first_real = jnp.maximum(pads, begin)  # each row's first slot in view
            view = begin + jnp.arange(seq_len)
            seen = view[None, :] >= first_real[:, None]  # (batch, seq_len)
            mask = (causal[None] & seen[:, None, :])[:, None]
            positions = jnp.maximum(view[None, :] - first_real[:, None], 0)
            hidden, _ = model.extend(
                window,
                model.empty_cache(batch, seq_len),
                start=0,
                positions=positions,
                mask=mask,
            )
            chosen = choose(hidden[:, -1], t)
            return (buffer, chosen), chosen

        steps = jnp.arange(done, new_tokens)
        _, (tokens, logprobs) = jax.lax.scan(slide, (buffer, last), steps)
        return tokens.T, logprobs.T


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--workdir/--step/--hf_checkpoint plus the shared mesh and config flags."""
    cli.add_flags(parser, config_required=False)
    parser.add_argument("--workdir", help="a run's work directory (checkpoints, config.json)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--hf_checkpoint", help="a Hugging Face GPT-2 or Llama directory instead of --workdir"
    )


def load(args) -> tuple[Generator, object, object]:
    """(Generator, tokenizer, step) of the model the flags name, on the --mesh."""
    cli.start(args)
    weights = cli.hf_weights(args)
    cfg = cli.trained_config(args, weights)
    # Training's memory switches do not apply to decoding, which feeds one token at a time and
    # runs no backward pass; the parameters restore without them (their layout does not change).
    cfg = config.replace(cfg, model=dict(sequence_parallel=False, remat="none"))
    tokenizer = loader.tokenizer_for(cfg, workdir=args.workdir, hf_checkpoint=args.hf_checkpoint)
    sharded, params, step = cli.load_trained(args, cfg, weights)
    return Generator(sharded, params), tokenizer, step


def chat_template(cfg, tokenizer, hf_checkpoint=None):
    """The run's chat template (data.chat_template, else its tokenizer directory's, else
    megajax's default), over its tokenizer."""
    from megajax.data import chat

    return chat.template_for(tokenizer, hf_checkpoint or cfg.data.vocab_dir, cfg.data.chat_template)


def until_stop(tokens: list[int], stops) -> list[int]:
    """The tokens before the first stop token (all of them if none is there)."""
    ends = [i for i, t in enumerate(tokens) if t in stops]
    return tokens[: ends[0]] if ends else tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--prompt", default="\n", help="the prompt text, or FILE:path to read it")
    parser.add_argument("--num_samples", type=int, default=1, help="samples of the prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely; 0: all")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's message: rendered through the chat template, the reply "
        "stops at the end of the assistant's turn",
    )
    args = parser.parse_args(argv)
    if not (args.workdir or args.hf_checkpoint):
        parser.error("pass --workdir (a trained run) or --hf_checkpoint")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        parser.error("--num_samples and --max_new_tokens must be positive")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed {args.seed}: use a seed in [0, 2**32)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prompt = args.prompt
        if prompt.startswith("FILE:"):
            path = Path(prompt[len("FILE:") :])
            if not path.is_file():
                raise ConfigError(f"--prompt {prompt}: {path} not found")
            prompt = path.read_text(encoding="utf-8")
        generator, tokenizer, _ = load(args)
        stops = ()
        if args.chat:
            template = chat_template(generator.sharded.cfg, tokenizer, args.hf_checkpoint)
            ids = template.prompt_ids([{"role": "user", "content": prompt}])
            prompt, stops = tokenizer.decode(ids), template.stop_ids()
        else:
            try:
                ids = text_ids(tokenizer, prompt)
            except KeyError as e:
                raise ConfigError(f"the prompt has a character the model never saw: {e}") from None
        prompts = [ids] * args.num_samples
        options = dict(
            new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        out = generator(prompts, **options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = []
    for tokens in out["tokens"]:
        tokens = until_stop(tokens.tolist(), stops)
        text = tokenizer.decode(tokens)
        samples.append({"text": text, "tokens": tokens})
        cli.lead_print(prompt + text)
        cli.lead_print("-" * 40)
    rate = out["tokens"].size / out["seconds"]
    cli.lead_print(json.dumps({"samples": samples, "tokens_per_sec": round(rate, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
