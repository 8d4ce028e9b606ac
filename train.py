"""Train a megajax model on a (data, model) device mesh.

    python train.py --config configs/gpt2_tiny.py --mesh data=2,model=4 --cpu_devices 8 \
        --workdir runs/tiny --set train.steps=50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megajax import config, mesh
from megajax.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a Python file in configs/")
    parser.add_argument(
        "--mesh",
        default="data=-1,model=1",
        help="degrees of the (data, model) mesh, e.g. data=2,model=4; -1 = all remaining devices",
    )
    parser.add_argument(
        "--cpu_devices", type=int, default=0, help="run on this many faked CPU devices"
    )
    parser.add_argument("--workdir", help="metrics and TensorBoard files (default runs/CONFIG)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=50 (repeatable)",
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
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    try:
        cfg = config.override(config.load(args.config), args.set)
        from megajax import run  # imports JAX's backend: after the device flags are set

        device_mesh = mesh.make(args.mesh)
        workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
        if args.dry_run:
            from megajax import plan

            plan.dry_run(cfg, device_mesh, workdir, target_name=args.target)
        else:
            run.train(cfg, device_mesh, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
