"""Time train steps with and without the per-step agreement on signals (run.py's _AgreedSignal),
in rounds that alternate the two, on every process of a job.

python scripts/agreed_stop_cost.py --config configs/gpt2_tiny.py --mesh data=2,model=4 \
    --cpu_devices 4 --coordinator 127.0.0.1:PORT --num_processes 2 --process_id I
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import cli, mesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_flags(parser, config_required=True)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each kind")
    args = parser.parse_args()
    cfg = cli.load_config(args)
    cli.start(args)
    import jax
    import numpy as np

    from megajax.run import _AgreedSignal
    from megajax.trainer import Trainer

    trainer = Trainer(cfg, mesh.make(args.mesh))
    state = trainer.init_state()
    step_fn, _ = trainer.compile_train_step()
    shape = (len(trainer.train_rows), cfg.model.seq_len)  # this process's rows
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
    batch = trainer.put_batch({"inputs": tokens, "targets": tokens})
    agreed = _AgreedSignal(trainer.mesh, [])

    def run_round(with_poll: bool) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step_fn(state, batch)
            if with_poll:
                agreed.poll()
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - start) / args.steps * 1e3

    run_round(True)  # warm up both paths
    run_round(False)
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for with_poll in (False, True):
            times[with_poll].append(run_round(with_poll))
    plain, polled = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"process {jax.process_index()}: {plain:.2f} ms/step without the agreement, "
        f"{polled:.2f} ms/step with it ({polled - plain:+.2f} ms, "
        f"{100 * (polled - plain) / plain:+.1f}%), medians of {args.rounds} rounds of "
        f"{args.steps} steps",
        flush=True,
    )


if __name__ == "__main__":
    main()
