"""Hugging Face GPT-2, BERT and Llama <-> megajax checkpoints: the command line.

    python -m megajax.convert --hf DIR --out WORKDIR [--mesh data=D,model=M] [--cpu_devices N]
    python -m megajax.convert --checkpoint WORKDIR --to_hf DIR [--step N] [--dtype bfloat16]
        [--lora_adapter]

Import writes a megajax checkpoint at step 0 (Hugging Face weights, fresh optimizer state) and
WORKDIR/config.json, which train.py and eval.py resume from; export writes model.safetensors,
config.json and the run's tokenizer files (process 0 alone writes); a LoRA run exports with its
adapters merged into the weights, or with --lora_adapter as a PEFT adapter directory of the
adapters alone. The conversion itself is megajax/hf/weights.py, its tables
megajax/hf/families.py, PEFT's adapters megajax/hf/adapters.py.
"""

from __future__ import annotations

import argparse
import sys

from megajax import cli, config, mesh
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Hugging Face GPT-2, BERT, Llama <-> megajax")
    cli.add_flags(parser, config_required=False)
    parser.add_argument("--hf", help="a Hugging Face save_pretrained directory to import")
    parser.add_argument("--out", help="the megajax work directory to write")
    parser.add_argument("--checkpoint", help="a megajax work directory to export")
    parser.add_argument("--to_hf", help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, help="export: checkpoint step (default: the newest)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="export: the safetensors' dtype (bfloat16 rounds to nearest, as Llama 3 ships)",
    )
    parser.add_argument(
        "--lora_adapter",
        action="store_true",
        help="export a LoRA run's adapters alone as a PEFT adapter directory "
        "(adapter_config.json, adapter_model.safetensors) instead of the merged model",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        importing, exporting = bool(args.hf and args.out), bool(args.checkpoint and args.to_hf)
        if importing == exporting:
            raise ConfigError(
                "use either --hf DIR --out WORKDIR or --checkpoint WORKDIR --to_hf DIR"
            )
        cfg = cli.load_config(args) if args.config else config.Config()
        cli.start(args)
        from megajax.hf import weights

        if importing:
            chosen = bool(args.config) or any(s.startswith("model.arch=") for s in args.set)
            cfg = weights.import_hf(
                args.hf,
                args.out,
                cfg,
                mesh.make(args.mesh),
                arch_chosen=chosen,
                overrides=args.set,
                log=cli.lead_print,
            )
            cli.lead_print(f"imported {args.hf} into {args.out} (step 0): {cfg.model}")
        else:
            weights.export_hf(
                args.checkpoint,
                args.to_hf,
                mesh.make(args.mesh),
                step=args.step,
                dtype=args.dtype,
                lora_adapter=args.lora_adapter,
                log=cli.lead_print,
            )
            what = "the LoRA adapters of " if args.lora_adapter else ""
            cli.lead_print(f"exported {what}{args.checkpoint} to {args.to_hf}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
