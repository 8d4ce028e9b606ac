"""Where training scalars go: metrics.jsonl, TensorBoard event files and a terminal line."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

# Dense bf16 tensor-core peak FLOP/s per device (vendor data sheets, SXM parts).
GPU_PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "v100": 125e12}


@functools.cache
def _cpu_matmul_flops_per_device() -> float:
    """Measured float32 matmul FLOP/s per local CPU device, all devices busy at once.

    A CPU has no data-sheet peak, and faked devices share the host's cores: one large matmul
    on every device together measures what the host can give each of them.
    """
    devices, n = jax.local_devices(), 1024
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    a = jax.device_put(
        np.ones((len(devices), n, n), np.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")),
    )
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start, reps = time.perf_counter(), 4
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops_per_device(device) -> float:
    """Peak FLOP/s for MFU: a GPU's data sheet; a CPU device's measured matmul throughput."""
    kind = device.device_kind.lower()
    for name, flops in GPU_PEAK_FLOPS.items():
        if name in kind:
            return flops
    return _cpu_matmul_flops_per_device()


class Writer:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.workdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def progress_line(step: int, total: int, scalars: dict[str, float], elapsed: float) -> str:
    parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {scalars['loss']:.4f}"]
    # The objective's own metrics (BERT's mlm_loss, sop_accuracy, ...), shortened.
    own = [
        k
        for k in scalars
        if (k.endswith(("_loss", "_accuracy")) or k == "accuracy") and not k.startswith("val_")
    ]
    for key in sorted(own, key=lambda k: (k.rsplit("_", 1)[0], k.endswith("_accuracy"))):
        name = key.replace("_loss", "").replace("_accuracy", " acc").replace("accuracy", "acc")
        parts.append(f"{name} {scalars[key]:.3f}")
    if scalars.get("moe_dropped"):  # choices over an expert's capacity, per micro-batch
        parts.append(f"dropped {scalars['moe_dropped']:,.0f}")
    if "val_loss" in scalars:
        parts.append(f"val {scalars['val_loss']:.4f}")
    parts += [
        f"lr {scalars['learning_rate']:.2e}",
        f"gnorm {scalars['grad_norm']:.2f}",
        f"{scalars['tokens_per_sec']:,.0f} tok/s",
        f"mfu {100 * scalars['mfu']:.1f}%",
        time.strftime("%H:%M:%S", time.gmtime(elapsed)),
    ]
    return " | ".join(parts)
