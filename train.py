"""Train a megajax model on a (data, model) device mesh.

    python train.py --config configs/gpt2_tiny.py --mesh data=2,model=4 --cpu_devices 8 \
        --workdir runs/tiny --set train.steps=50

Resumes from the newest checkpoint in --workdir; a new run may start from a Hugging Face
checkpoint (--hf_checkpoint) or from another megajax run's newest parameters (--init_from), for
full or LoRA fine-tuning (lora.rank; docs/finetuning.md). See README.md for multi-process
launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megajax import cli, mesh
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_flags(parser, config_required=True)
    parser.add_argument("--workdir", help="checkpoints and metrics (default runs/CONFIG)")
    parser.add_argument(
        "--hf_checkpoint",
        help="start from a Hugging Face GPT-2 or BERT directory (its model shape wins; a BERT "
        "keeps the config's heads)",
    )
    parser.add_argument(
        "--init_from",
        metavar="RUN",
        help="start from the newest checkpoint's parameters of the megajax work directory RUN "
        "(its model shape wins; a LoRA run's adapters are merged) with a fresh optimizer",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="compile one step from abstract parameters, report its cost, write plan.json",
    )
    parser.add_argument(
        "--target", default="h100", help="accelerator of the dry run: h100, a100 or v100"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.hf_checkpoint and args.init_from:
            raise ConfigError("--hf_checkpoint and --init_from both name a starting point: "
                              "pass one")  # fmt: skip
        cfg = cli.load_config(args)
        cli.start(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megajax import run  # imports JAX's backend: after the device flags are set

    try:
        workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
        init = None
        if args.init_from:
            from megajax import finetune

            cfg = finetune.with_run_model(cfg, args.init_from, overrides=args.set)
            init = lambda trainer: trainer.state_from_params(  # noqa: E731
                finetune.params_from_run(trainer, args.init_from, log=cli.lead_print)
            )
        if args.hf_checkpoint:
            from megajax.hf.weights import HFWeights, load_params, with_hf_model

            weights = HFWeights(args.hf_checkpoint)
            cfg = with_hf_model(cfg, weights, arch_chosen=True, overrides=args.set)
            init = lambda trainer: trainer.state_from_params(  # noqa: E731
                load_params(trainer, weights, log=cli.lead_print)
            )
        if args.dry_run:
            from megajax.plan import report

            report.dry_run(cfg, mesh.make(args.mesh), workdir, target_name=args.target)
        else:
            run.train(cfg, mesh.make(args.mesh), workdir, log=cli.lead_print, init=init)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except run.Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_page_malloc()
    sys.exit(main())
