"""Evaluate a trained megajax model from its work directory's newest checkpoint.

    python eval.py --workdir runs/tiny --cpu_devices 8 --mesh data=2,model=4

Scores the held-out tail of the run's data.source (every token once, non-overlapping windows)
and writes the result to WORKDIR/eval.json. The mesh may differ from the training mesh.
`--hf_checkpoint DIR` evaluates a Hugging Face GPT-2 directory instead of a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megajax import cli, config, mesh
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_flags(parser, config_required=False)
    parser.add_argument("--workdir", required=True, help="the run's work directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--hf_checkpoint", help="evaluate a Hugging Face GPT-2 directory instead of a checkpoint"
    )
    return parser.parse_args(argv)


def _load_config(args) -> config.Config:
    if args.config:
        return cli.load_config(args)
    saved = Path(args.workdir) / "config.json"
    if not saved.is_file() and args.hf_checkpoint:
        return config.override(config.Config(), args.set)
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: pass --config, or a --workdir that train.py wrote")
    return config.override(config.from_dict(json.loads(saved.read_text())), args.set)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = _load_config(args)
        cli.start(args)
        import jax

        from megajax.checkpoint import Checkpointer
        from megajax.data import loader
        from megajax.evals import perplexity
        from megajax.trainer import Trainer

        if args.hf_checkpoint:
            from megajax import convert

            weights = convert.HFWeights(args.hf_checkpoint)
            # A config file, the work directory's config or --set model.arch chose the family.
            chosen = bool(args.config) or (Path(args.workdir) / "config.json").is_file()
            chosen |= any(s.startswith("model.arch=") for s in args.set)
            cfg = convert.with_hf_model(cfg, weights, arch_chosen=chosen)
            trainer = Trainer(cfg, mesh.make(args.mesh))
            params = convert.load_params(trainer, weights, log=cli.lead_print)
            step = args.hf_checkpoint
        else:
            trainer = Trainer(cfg, mesh.make(args.mesh))
            ckpt = Checkpointer(Path(args.workdir) / "checkpoints", every=0, keep=1)
            step = args.step if args.step is not None else ckpt.latest_step()
            if step is None:
                raise ConfigError(f"no checkpoint in {ckpt.directory}: train first (train.py)")
            params = ckpt.restore(step, trainer.abstract_state())[0]["params"]
            ckpt.close()
        cfg = trainer.cfg
        _, _, val_data = loader.loaders(cfg, workdir=args.workdir, log=cli.lead_print)
        windows = [d[i] for d in val_data.datasets for i in range(len(d))]
        result = {
            "step": step,
            "data": cfg.data.source,
            **perplexity.score(trainer, params, windows),
        }
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.lead_print(
        f"step {step}: validation loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} "
        f"over {result['tokens']:,} tokens of {cfg.data.source}"
    )
    if jax.process_index() == 0:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        (Path(args.workdir) / "eval.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
