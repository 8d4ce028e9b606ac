"""On a GPU: packed documents through cuDNN's fused attention give the XLA path's losses and
gradients (bfloat16), and packing changes the second document's losses (the mask is applied).

    python scripts/cudnn_packed_check.py [--configs configs/gpt2_tiny.py configs/llama_tiny.py]

Each row of 256 tokens holds two documents (the first 37 to 200 tokens long) and 16 tokens of
padding; positions restart at each document. Prints one JSON line per config and exits 1 when
the two paths disagree beyond bfloat16's tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megajax import config, mesh  # noqa: E402

LENGTH, ROWS, PADDING = 256, 4, 16


def packed_rows():
    """(segments, positions) of ROWS rows: two documents each, then padding (segment 0)."""
    cut = np.array([100, 37, 200, 128])[:, None]
    at = np.arange(LENGTH)[None]
    segments = np.where(at < cut, 1, 2).astype(np.int32)
    segments[:, LENGTH - PADDING :] = 0
    positions = np.where(segments == 1, at, at - cut).astype(np.int32)
    return segments, np.where(segments == 0, 0, positions)


def losses_and_grads(path: str, implementation: str, ids, segments, positions):
    import jax

    from megajax.sharded_model import ShardedModel

    cfg = config.override(
        config.load(path),
        [f"model.attention={implementation}", "model.dropout=0.0", f"model.seq_len={LENGTH}",
         "model.compute_dtype=bfloat16", f"train.batch_size={ROWS}"],
    )  # fmt: skip
    model = ShardedModel(cfg, mesh.make("data=1,model=1", devices=jax.devices()[:1]))
    with model.context():
        params = jax.jit(model._initial_params)()
        losses = jax.jit(model.token_losses)
        inputs, targets = ids[:, :-1] % cfg.model.vocab_size, ids[:, 1:] % cfg.model.vocab_size

        def scored(p):
            per_token = model.token_losses(
                p, inputs, targets, segments=segments, positions=positions
            )
            return (per_token * (segments > 0)).sum()

        packed = losses(params, inputs, targets, None, segments, positions)
        unpacked = losses(params, inputs, targets)
        grads = jax.jit(jax.grad(scored))(params)
    return np.asarray(packed, np.float32), np.asarray(unpacked, np.float32), grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["configs/gpt2_tiny.py", "configs/llama_tiny.py"]
    )
    args = parser.parse_args(argv)
    import jax

    ids = np.random.default_rng(0).integers(0, 2**31 - 1, (ROWS, LENGTH + 1), dtype=np.int64)
    segments, positions = packed_rows()
    real, ok = segments > 0, True
    for path in args.configs:
        xla, xla_unpacked, xla_grads = losses_and_grads(path, "xla", ids, segments, positions)
        cudnn, _, cudnn_grads = losses_and_grads(path, "cudnn", ids, segments, positions)
        grad_gap = max(
            float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
            for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(cudnn_grads), strict=True)
        )
        result = {
            "config": path,
            "max_loss_gap": float(np.abs(xla - cudnn)[real].max()),
            "max_relative_grad_gap": grad_gap,
            "packing_changes_second_document": float(
                np.abs(xla - xla_unpacked)[segments == 2].max()
            ),
        }
        ok &= result["max_loss_gap"] < 0.05 and grad_gap < 0.05
        ok &= result["packing_changes_second_document"] > 0.05
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
