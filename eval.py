"""Evaluate a megajax run's newest checkpoint, or a Hugging Face GPT-2, Llama or BERT, on a task.

    python eval.py --workdir runs/tiny --cpu_devices 8 --mesh data=2,model=4
    python eval.py --task wikitext103 --data data/wikitext103/wiki.valid.head429.tokens \
        --workdir runs/tiny
    python eval.py --task lambada --data data/lambada/lambada_sample.jsonl --hf_checkpoint HF_DIR
    python eval.py --task race --data data/race --workdir runs/race
    python eval.py --task chat --data data/chat/shakespeare_chat.jsonl --workdir runs/sft

Tasks: `val` scores the held-out tail of the run's data.source (a GPT: every token once,
non-overlapping windows; a BERT: its objective and metrics); `wikitext103` the perplexity of a
WikiText-103 `.tokens` file, and `lambada` the last-word accuracy on a LAMBADA JSON Lines file,
both as Megatron-LM measures them, for a GPT over the GPT-2 BPE or a tokenizer.json (its own,
read as training reads it); `race` the accuracy of a multiple-choice BERT on
RACE's folders (or files), overall and per level; `chat` the mean cross-entropy over the
trained (assistant) tokens of a JSON Lines file of conversations, rendered, masked and packed as
fine-tuning reads them (data.format=chat), or with `--held_out` of those a fine-tuning run
holds out. The mesh may differ from the training mesh.
The last line printed is the result as one JSON object, also written to WORKDIR/eval_TASK.json
when there is a work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megajax import cli, config
from megajax.config import ConfigError

TASKS = ("val", "wikitext103", "lambada", "race", "chat")
GPT_TASKS = ("wikitext103", "lambada", "chat")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_flags(parser, config_required=False)
    parser.add_argument("--task", choices=TASKS, default="val", help="what to measure")
    parser.add_argument(
        "--data",
        help="the task's data (wikitext103: .tokens; lambada, chat: .jsonl; race: a folder)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=32,
        help="wikitext103: tokens between window starts; each later window scores its last these",
    )
    parser.add_argument(
        "--no_strict",
        dest="strict",
        action="store_false",
        help="lambada: predict only the last token, not every token of the last word",
    )
    parser.add_argument(
        "--held_out",
        action="store_true",
        help="chat: only the conversations a fine-tuning run holds out (the last "
        "data.val_fraction of them)",
    )
    parser.add_argument("--workdir", help="the run's work directory (checkpoints, config.json)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--hf_checkpoint", help="evaluate a Hugging Face GPT-2, Llama or BERT directory instead"
    )
    args = parser.parse_args(argv)
    if not (args.workdir or args.hf_checkpoint):
        parser.error("pass --workdir (a run to restore) or --hf_checkpoint")
    if args.task == "val" and not args.workdir:
        parser.error("--task val prepares the run's data.source in --workdir: pass one")
    if args.task == "val" and args.data:
        parser.error("--data is for the benchmark tasks; val scores the run's data.source")
    if args.task != "val" and not args.data:
        parser.error(f"--task {args.task} needs --data")
    if args.held_out and args.task != "chat":
        parser.error("--held_out is for --task chat (--task val scores a run's held-out data)")
    return args


def _text_tokenizer(args, cfg: config.Config, task: str):
    """The tokenizer the GPT was trained with (data/loader.py tokenizer_for), for a task that
    reads text: the GPT-2 BPE or a tokenizer.json."""
    from megajax.data import loader

    if cfg.model.arch != "gpt":
        raise ConfigError(
            f"--task {task} scores a GPT language model, not model.arch={cfg.model.arch}"
        )
    if cfg.data.tokenizer not in ("gpt2", "hf"):
        raise ConfigError(
            f"--task {task} reads text through the GPT-2 BPE or a tokenizer.json "
            f"(data.tokenizer=gpt2 or hf); this model was trained on "
            f"data.tokenizer={cfg.data.tokenizer} ids"
        )
    tokenizer = loader.tokenizer_for(cfg, workdir=args.workdir, hf_checkpoint=args.hf_checkpoint)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
            f"{cfg.data.tokenizer} tokenizer's {tokenizer.vocab_size} tokens: it reads other "
            f"ids (a Hugging Face Llama directory needs its own tokenizer.json beside config.json)"
        )
    return tokenizer


def _lead() -> bool:
    """Whether this process prepares a text data.source; the others wait for its manifest."""
    import jax

    return jax.process_index() == 0


def _evaluate(args, sharded, params, tokenizer) -> tuple[dict, str]:
    """(metrics, a one-line summary) of args.task."""
    from megajax.data import corpora, loader
    from megajax.evals import lambada, perplexity, race, wikitext

    cfg, log = sharded.cfg, cli.lead_print
    if args.task == "val" and cfg.model.arch == "gpt":
        _, _, val_data = loader.loaders(cfg, workdir=args.workdir, log=log, lead=_lead())
        windows = perplexity.EveryTarget(val_data.datasets)
        scores = perplexity.score(sharded, params, windows, log=log)
        summary = f"validation loss {scores['loss']:.4f}, perplexity {scores['ppl']:.2f}"
        return {"data": cfg.data.source, **scores}, summary
    if args.task == "val":
        scores = _objective_metrics(sharded, params, args.workdir)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "samples")
        return {"data": cfg.data.source, **scores}, summary
    if args.task == "wikitext103":
        scores = wikitext.evaluate(
            sharded, params, args.data, tokenizer, overlap=args.overlap, log=log
        )
        return {"data": args.data, **scores}, (
            f"perplexity {scores['ppl']:.2f}, adjusted {scores['adjusted_ppl']:.2f}"
        )
    if args.task == "lambada":
        scores = lambada.evaluate(
            sharded, params, args.data, tokenizer, strict=args.strict, log=log
        )
        return {"data": args.data, **scores}, (
            f"{'strict' if args.strict else 'non-strict'} accuracy {scores['accuracy']:.4f} "
            f"({scores['correct']:,} of {scores['n']:,})"
        )
    if args.task == "chat":
        rows = _conversations(args, cfg)
        scores = perplexity.score(sharded, params, rows, log=log, label="chat rows")
        return {"data": args.data, "conversations": len(rows.conversations), **scores}, (
            f"chat loss {scores['loss']:.4f} over {scores['tokens']:,} trained tokens of "
            f"{len(rows.conversations):,} conversations"
        )
    if cfg.model.arch != "bert_multiple_choice":
        raise ConfigError(
            f"--task race needs a multiple-choice BERT (model.arch=bert_multiple_choice, e.g. "
            f"configs/race_bert_minilm.py fine-tuned with train.py), not model.arch="
            f"{cfg.model.arch}"
        )
    questions = loader.race_questions(cfg, corpora.read_race([args.data]), name=args.data)
    scores = race.score(sharded, params, questions, log=log)
    levels = ", ".join(
        f"{k[len('accuracy_') :]} {v:.4f}" for k, v in scores.items() if k.startswith("accuracy_")
    )
    return {"data": args.data, **scores}, (
        f"accuracy {scores['accuracy']:.4f} over {scores['n']:,} questions ({levels})"
    )


def _conversations(args, cfg):
    """The rows of conversations of --data as fine-tuning reads them (data.format=chat: its
    tokenizer, chat template, packing and truncation): every conversation in them, or with
    --held_out those a run with the same data.val_fraction holds out."""
    import tempfile

    from megajax.data import prepare, samples

    cache = Path(args.workdir) / "data" if args.workdir else Path(tempfile.mkdtemp())
    dataset = prepare.cached(
        args.data,
        tokenizer=cfg.data.tokenizer,
        vocab_dir=cfg.data.vocab_dir,
        val_fraction=cfg.data.val_fraction if args.held_out else 0.0,
        cache_dir=cache,
        log=cli.lead_print,
        fmt="chat",
        chat_template=cfg.data.chat_template,
        lead=_lead() or not args.workdir,
    )
    return samples.ChatRows(
        samples.Dataset(dataset),
        "validation" if args.held_out else "train",
        seq_len=cfg.model.seq_len,
        pack=cfg.data.pack,
        truncate=cfg.data.truncate,
        log=cli.lead_print,
    )


def _objective_metrics(sharded, params, workdir) -> dict:
    """A BERT's training objective and its metrics over every full batch of its validation
    samples, without dropout."""
    from megajax import run
    from megajax.data import loader

    _, _, val_data = loader.loaders(sharded.cfg, workdir=workdir, log=cli.lead_print, lead=_lead())
    batch = sharded.cfg.train.batch_size
    count = max(1, sum(len(d) for d in val_data.datasets) // batch)
    metrics = run.evaluate(sharded, sharded.compile_eval_step(), params, val_data, count)
    return {"samples": count * batch, **metrics}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cli.start(args)
        import jax

        weights = cli.hf_weights(args)
        cfg = cli.trained_config(args, weights)
        tokenizer = _text_tokenizer(args, cfg, args.task) if args.task in GPT_TASKS else None
        sharded, params, step = cli.load_trained(args, cfg, weights)
        result, summary = _evaluate(args, sharded, params, tokenizer)
        result = {"task": args.task, "step": step, **result}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.lead_print(f"{args.task} at step {step}: {summary}")
    cli.lead_print(json.dumps(result))
    if args.workdir and jax.process_index() == 0:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        (Path(args.workdir) / f"eval_{args.task}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
