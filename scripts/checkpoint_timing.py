"""Time a checkpoint save and restore of a model's full train state, and its size on disk.

python scripts/checkpoint_timing.py --config configs/gpt2_small.py --cpu_devices 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import cli, mesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_flags(parser, config_required=True)
    parser.add_argument("--restore_mesh", help="also restore onto this mesh, e.g. data=1,model=1")
    args = parser.parse_args()
    cfg = cli.load_config(args)
    cli.start(args)
    import jax

    from megajax.checkpoint import Checkpointer
    from megajax.trainer import Trainer

    trainer = Trainer(cfg, mesh.make(args.mesh))
    state = jax.block_until_ready(trainer.init_state())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "checkpoints", every=1, keep=1, async_save=True)
        for step in (1, 2):  # the first save also sets up Orbax's writers
            start = time.perf_counter()
            ckpt.save(step, state, {"step": step})
            blocking = time.perf_counter() - start
            ckpt.wait()
            total = time.perf_counter() - start
            print(f"save {step}: training blocked {blocking:.2f}s, written in {total:.2f}s")
        size = sum(f.stat().st_size for f in (Path(tmp) / "checkpoints" / "2").rglob("*")
                   if f.is_file())  # fmt: skip
        print(f"{trainer.num_params / 1e6:.1f}M parameters, train state {size / 2**20:,.0f} MiB "
              f"on disk")  # fmt: skip
        for text in filter(None, [args.mesh, args.restore_mesh]):
            degrees = mesh.parse(text)  # a subset of the devices when the mesh is smaller
            count = degrees["data"] * degrees["model"] if -1 not in degrees.values() else None
            target = Trainer(cfg, mesh.make(text, devices=jax.devices()[:count]))
            start = time.perf_counter()
            restored, _ = ckpt.restore(2, target.abstract_state())
            jax.block_until_ready(restored)
            print(f"restore onto mesh {text}: {time.perf_counter() - start:.2f}s")
        ckpt.close()


if __name__ == "__main__":
    main()
