"""Evaluate a trained megajax model from its work directory's newest checkpoint.

    python eval.py --workdir runs/tiny --cpu_devices 8 --mesh data=2,model=4

Scores the held-out tail of the run's data.source (every token once, non-overlapping windows)
and writes the result to WORKDIR/eval.json. The mesh may differ from the training mesh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megajax import config, mesh
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's work directory")
    parser.add_argument("--config", help="config file (default: the run's config.json)")
    parser.add_argument("--mesh", default="data=-1,model=1", help="e.g. data=2,model=4")
    parser.add_argument("--cpu_devices", type=int, default=0, help="fake this many CPU devices")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def _load_config(args) -> config.Config:
    if args.config:
        cfg = config.load(args.config)
    else:
        saved = Path(args.workdir) / "config.json"
        if not saved.is_file():
            raise ConfigError(
                f"{saved} not found: pass --config, or a --workdir that train.py wrote"
            )
        cfg = config.from_dict(json.loads(saved.read_text()))
    return config.override(cfg, args.set)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    try:
        cfg = _load_config(args)
        from megajax.checkpoint import Checkpointer
        from megajax.data import text
        from megajax.evals import perplexity
        from megajax.trainer import Trainer

        trainer = Trainer(cfg, mesh.make(args.mesh))
        ckpt = Checkpointer(Path(args.workdir) / "checkpoints", every=0, keep=1)
        step = args.step if args.step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint in {ckpt.directory}: train first (train.py)")
        state, _ = ckpt.restore(step, trainer.abstract_state())
        ckpt.close()
        _, _, val_ids = text.load_tokens(cfg.data)
        result = {
            "step": step,
            "data": cfg.data.source,
            **perplexity.score(trainer, state["params"], val_ids),
        }
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"step {step}: validation loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} "
        f"over {result['tokens']:,} tokens of {cfg.data.source}"
    )
    (Path(args.workdir) / "eval.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
