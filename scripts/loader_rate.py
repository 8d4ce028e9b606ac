"""Samples per second the training loader builds for a GPT config, beside what one data-parallel
replica of that config consumes at the dry run's predicted MFU.

python scripts/loader_rate.py --config configs/megatron_gpt2_8p3b.py --data prepared/wiki \
    --data_degree 64 --devices 512 --mfu 0.38
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import config  # noqa: E402
from megajax.data.loader import Loader  # noqa: E402
from megajax.data.samples import Dataset, GPTWindows  # noqa: E402

H100_BF16 = 989e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="a dataset prepared with the GPT-2 BPE")
    parser.add_argument("--data_degree", type=int, default=64, help="data-parallel replicas")
    parser.add_argument("--devices", type=int, default=512)
    parser.add_argument("--mfu", type=float, default=0.38, help="the dry run's prediction")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    cfg = config.load(args.config)
    rows = cfg.train.batch_size // args.data_degree  # one replica's rows of a global batch
    windows = GPTWindows(Dataset(args.data), "train", seq_len=cfg.model.seq_len)
    loader = Loader([windows], batch_size=cfg.train.batch_size, seed=0, rows=range(rows))
    loader.batch(0)
    start = time.perf_counter()
    for step in range(1, args.batches + 1):
        loader.batch(step)
    built = args.batches * rows / (time.perf_counter() - start)
    tokens_per_s = args.devices * H100_BF16 * args.mfu / cfg.model.flops_per_token()
    needed = tokens_per_s / cfg.model.seq_len / args.data_degree
    print(
        f"loader: {built:,.0f} samples/s of {cfg.model.seq_len + 1} tokens on one thread; "
        f"one of {args.data_degree} replicas of {Path(args.config).stem} at {args.mfu:.0%} MFU "
        f"on {args.devices} H100s consumes {needed:,.0f} samples/s ({rows} per step)"
    )


if __name__ == "__main__":
    main()
