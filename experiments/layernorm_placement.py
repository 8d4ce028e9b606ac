"""The paper's BERT finding at a scale a CPU can run: post-LN (the original BERT) against pre-LN
(the paper's Figure 7) at growing depth, the same learning rate for all.

    python experiments/layernorm_placement.py --depths 2 6 12 --steps 300 \
        --out experiments/layernorm_placement

Trains bert_tiny shapes (width 128, 8 heads, sequences of 64, batch 16) on tiny Shakespeare
with each placement at each depth, then writes OUT.json (every logged step of every run) and
OUT.png (masked-LM and sentence-order loss curves, with `pip install -r
experiments/requirements.txt`), and prints each run's final losses. A run already in OUT.json
is not repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megajax import config, mesh  # noqa: E402


def experiment_config(depth: int, placement: str, steps: int, lr: float) -> config.Config:
    return config.replace(
        config.load("configs/bert_tiny.py"),
        model=dict(num_layers=depth, layernorm_placement=placement, seq_len=64),
        optim=dict(lr=lr, min_lr=lr / 10, warmup_steps=steps // 10, decay_steps=steps),
        train=dict(steps=steps, batch_size=16, log_every=10, eval_every=steps, eval_batches=8),
        checkpoint=dict(every=0, async_save=False),
    )


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted({r["depth"] for r in runs.values()})
    colors = dict(
        zip(
            depths,
            plt.cm.viridis([0.1 + 0.8 * i / max(1, len(depths) - 1) for i in range(len(depths))]),
            strict=True,
        )
    )
    for run in runs.values():
        steps = [h["step"] for h in run["history"]]
        style = "-" if run["placement"] == "pre" else "--"
        label = f"{run['placement']}-LN, {run['depth']} layers"
        for ax, key in zip(axes, ("mlm_loss", "sop_loss"), strict=True):
            ax.plot(
                steps,
                [h[key] for h in run["history"]],
                style,
                color=colors[run["depth"]],
                label=label,
            )
    for ax, title in zip(axes, ("masked-LM loss", "sentence-order loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="experiments/layernorm_placement")
    args = parser.parse_args(argv)
    mesh.fake_cpu_devices(1)
    from megajax import run

    out = Path(args.out)
    runs = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").is_file()
        else {}
    )
    for depth in args.depths:
        for placement in ("post", "pre"):
            name = f"{placement}-{depth}"
            if name in runs:
                continue  # finished earlier: the file is the record
            cfg = experiment_config(depth, placement, args.steps, args.lr)
            with tempfile.TemporaryDirectory() as workdir:
                history = run.train(cfg, mesh.make("data=1,model=1"), workdir, log=lambda _: None)
            runs[name] = {"depth": depth, "placement": placement, "lr": args.lr, "history": history}
            out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
            last = {k: round(v, 3) for k, v in history[-1].items()}
            keys = ("mlm_loss", "sop_loss", "val_mlm_loss", "val_mlm_accuracy", "val_sop_accuracy")
            print(name, {k: last[k] for k in keys}, flush=True)
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
