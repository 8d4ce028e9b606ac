"""EleutherAI's lm-evaluation-harness on a megajax model in this process, sharded over the mesh.

    python -m megajax.lm_eval --hf_checkpoint HF_DIR --tasks lambada_local,lambada_local_until \
        --include_path data/lm_eval --limit 100 [--mesh data=1,model=8 --cpu_devices 8]

Runs lm-eval's `simple_evaluate` with MegajaxLM, then prints lm-eval's results table and one
JSON line (`results`: each task's metrics). `--include_path` adds task YAMLs (data/lm_eval
holds offline ones over the shipped LAMBADA sample; run from the repository's root, where
their data paths point); lm-eval's own tasks download their data.

- loglikelihood: context + continuation (the last model.seq_len + 1 tokens) run whole through
  the model, in batches of --batch_size rows padded on the right to a width of 16 times a
  power of two; each target's log-probability from vocabulary-sharded logits (never gathered),
  and whether it is the greedy token. An empty context starts from the beginning-of-text token
  (else the end-of-text one), as lm-eval's `hf` model does.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of model.seq_len, summed.
- generate_until: the server's engine (megajax/engine.py) in this thread: up to --max_rows
  continuations decoded together, each stopping at the end-of-text token, an `until` string
  or max_gen_toks; greedy unless do_sample.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from megajax.config import ConfigError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the command says so in one line; the module still imports
    TemplateLM = object

WIDTH = 16  # the narrowest batch width


class MegajaxLM(TemplateLM):
    """lm-eval's model interface over a Generator's model and parameters (megajax.generate)."""

    def __init__(self, generator, tokenizer, *, batch_size: int = 16, max_rows: int = 8):
        super().__init__()
        self.generator, self.tokenizer = generator, tokenizer
        self.sharded, self.params = generator.sharded, generator.params
        self.max_length = generator.seq_len
        degree = generator.data_degree
        self.rows = -(-batch_size // degree) * degree
        self.max_rows = max_rows
        self._programs = {}
        self._engine = None

    @property
    def eot_token_id(self):
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self):
        bos = getattr(self.tokenizer, "bos_id", None)
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # scoring -------------------------------------------------------------------------------

    def score(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log p, greedy) of every token after the first of each sequence (at most seq_len + 1
        tokens), in batches of sequences of similar length."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = [None] * len(sequences)
        for start in range(0, len(order), self.rows):
            chunk = order[start : start + self.rows]
            width = WIDTH
            while width < max(len(sequences[i]) - 1 for i in chunk):
                width *= 2
            width = min(width, self.max_length)
            inputs = np.zeros((self.rows, width), np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            for row, i in enumerate(chunk):
                seq = sequences[i]
                inputs[row, : len(seq) - 1], targets[row, : len(seq) - 1] = seq[:-1], seq[1:]
            logprobs, greedy = self._program(width)(self.params, inputs, targets)
            logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
            for row, i in enumerate(chunk):
                n = len(sequences[i]) - 1
                out[i] = (logprobs[row, :n], greedy[row, :n])
        return out

    def _program(self, width: int):
        """The scoring program for (rows, width) batches, compiled once."""
        import jax

        if width not in self._programs:
            from megajax import loss, parallel

            vocab = self.sharded.cfg.model.vocab_size

            def scores(params, inputs, targets):  # right padding: causal, so harmless
                model = self.sharded.model(params)
                nll, correct = loss.cross_entropy_and_correct(
                    model(inputs), model.lm_head, targets, vocab_size=vocab
                )
                return -nll, correct

            with self.sharded.context():
                rows = jax.sharding.NamedSharding(self.sharded.mesh, parallel.spec("batch", None))
                batch = jax.ShapeDtypeStruct((self.rows, width), np.int32, sharding=rows)
                self._programs[width] = jax.jit(scores).lower(self.params, batch, batch).compile()
        return self._programs[width]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's log-probabilities, whether all are greedy) of each
        ((context, continuation), context ids, continuation ids)."""
        sequences = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in requests]
        out = []
        for (_, _, cont), (logprobs, greedy) in zip(requests, self.score(sequences), strict=True):
            n = len(cont)
            out.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        return totals

    # generation ----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megajax.engine import Engine, Work

        if self._engine is None:
            self._engine = Engine(
                self.generator, self.tokenizer, max_rows=self.max_rows, max_queue=1 << 30
            )
        works = []
        stop_ids = frozenset() if self.eot_token_id is None else frozenset({self.eot_token_id})
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - new) :] or [self.prefix_token_id]
            work = Work(
                ids=ids,
                max_tokens=new,
                notify=lambda *_: None,
                stop=tuple(until),
                stop_ids=stop_ids,
                temperature=temperature,
                seed=1234,
            )
            works.append(work)
            self._engine.submit([work])
        self._engine.run(until_idle=True)
        return [w.choices[0].text for w in works]


def parse_args(argv=None) -> argparse.Namespace:
    from megajax import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    generate.add_model_flags(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", help="a directory of task YAMLs (e.g. data/lm_eval)")
    parser.add_argument("--num_fewshot", type=int, help="examples before each (task default)")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences scored together")
    parser.add_argument("--max_rows", type=int, default=8, help="continuations decoded together")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's random seeds")
    parser.add_argument(
        "--bootstrap_iters",
        type=int,
        default=0,
        help="resamples for some "
        "metrics' stderr; lm-eval forks processes for them (beside JAX's "
        "threads), so 0 (none) unless asked",
    )
    args = parser.parse_args(argv)
    if not (args.workdir or args.hf_checkpoint):
        parser.error("pass --workdir (a trained run) or --hf_checkpoint")
    if args.batch_size < 1 or args.max_rows < 1:
        parser.error("--batch_size and --max_rows must be positive")
    return args


def evaluate(lm: MegajaxLM, tasks: list[str], *, include_path=None, **kwargs) -> dict:
    """lm-eval's simple_evaluate of `lm` on the tasks (per-sample records in "samples")."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-evaluation-harness is not installed: pip install lm-eval", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    from megajax import cli, generate

    try:
        generator, tokenizer, _ = generate.load(args)
        lm = MegajaxLM(generator, tokenizer, batch_size=args.batch_size, max_rows=args.max_rows)
        seeds = dict(
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
        results = evaluate(
            lm,
            args.tasks.split(","),
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            bootstrap_iters=args.bootstrap_iters,
            **seeds,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.lead_print(make_table(results))
    cli.lead_print(json.dumps({"results": results["results"]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
