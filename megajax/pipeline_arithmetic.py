"""Pipeline parallelism's schedule: its arithmetic, its checks, and the schedule in force while
a train step is traced (models/pipeline_schedule.py runs it).

GPipe in one jitted step (as MaxText's layers/pipeline.py): the stacked layers split into P
stages (the `pipeline` mesh axis); each tick applies every stage at once to its own micro-batch
and shifts the stages' outputs one stage on with a collective-permute. With circular repeats v
each stage holds v chunks of L / (v P) layers, chunk c = r P + s on stage s, and a micro-batch
goes round the P stages v times. m micro-batches then take v m + P - 1 ticks, of which P - 1
per stage are bubble: the fraction (P - 1) / (v m + P - 1) of the step (arXiv 2104.04473).
Every tick's activations are kept for autodiff's backward pass: memory grows with m.

1F1B (models/pipeline_1f1b.py; interleaved with v > 1): each tick runs one forward and one
backward pass per stage, the backward recomputing the stage from its saved input, so a stage
keeps at most 2 v P - 1 stage inputs whatever m; same bubble, m + 2P - 2 ticks at v = 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np

from megajax.config import ConfigError

MICRO = "micro_batch"  # the vmap axis of the train step's micro-batches (not a mesh axis)


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: int  # P, the `pipeline` degree
    repeats: int = 1  # v, chunks per stage (train.pipeline_repeats)
    kind: str = "gpipe"  # train.pipeline_schedule: "gpipe" or "1f1b"


def ticks(stages: int, repeats: int, micro_batches: int, schedule: str = "gpipe") -> int:
    """Scan steps of one step's schedule: GPipe's forward pass v m + P - 1 (its backward pass
    as many); 1F1B's, each a forward and a backward, v m + v P + P - 2 (m + 2P - 2 at v = 1)."""
    if schedule == "1f1b":
        return repeats * micro_batches + repeats * stages + stages - 2
    return repeats * micro_batches + stages - 1


def bubble_fraction(stages: int, repeats: int, micro_batches: int) -> float:
    """The share of each stage's time spent idle: (P - 1) / (v m + P - 1), for both schedules
    (1F1B's warm-up ticks run forward passes only, its cool-down ticks backward passes only)."""
    return (stages - 1) / ticks(stages, repeats, micro_batches)


def transfers(stages: int, repeats: int, micro_batches: int, schedule: str = "gpipe") -> int:
    """Collective-permutes of the stage activations per train step; none without a pipeline.
    GPipe: one per tick and one more to collect the last outputs in the forward pass, as many
    in the backward pass. 1F1B: two per tick (outputs on, cotangents back)."""
    if stages == 1:
        return 0
    if schedule == "1f1b":
        return 2 * ticks(stages, repeats, micro_batches, schedule)
    return 2 * (ticks(stages, repeats, micro_batches) + 1)


def saved_inputs(stages: int, repeats: int, micro_batches: int, schedule: str = "gpipe") -> int:
    """Stage inputs (micro-batch activations, b / D x s x h each) a stage keeps for its backward
    passes at once. GPipe: one per tick, v m + P - 1, each with the residuals of the stage's
    layers that model.remat keeps. 1F1B: at most 2 v P - 1 whatever m (stage 0 keeps micro-batch
    i's input from tick i to tick i + 2 v P - 2), and the stage is recomputed from them."""
    if schedule == "1f1b":
        return 2 * repeats * stages - 1
    return ticks(stages, repeats, micro_batches)


def transfer_bytes(micro_batch_per_device: int, seq_len: int, hidden: int, itemsize: int) -> int:
    """Bytes one device sends in one transfer: its (micro-batch / data, length, hidden) share."""
    return micro_batch_per_device * seq_len * hidden * itemsize


def stage_chunks(stages: int, repeats: int) -> np.ndarray:
    """(P, v) chunk numbers: stage s runs chunks s, P + s, 2P + s, ... in turn (circular)."""
    return np.arange(repeats)[None, :] * stages + np.arange(stages)[:, None]


def check(*, num_layers: int, stages: int, repeats: int, micro_batches: int) -> None:
    """Refuse a schedule the layers or the micro-batches cannot fill; warn about a deep bubble."""
    if repeats < 1:
        raise ConfigError(f"train.pipeline_repeats={repeats}: use 1 (GPipe) or more (circular)")
    if num_layers % (stages * repeats):
        raise ConfigError(
            f"model.num_layers={num_layers} does not split into pipeline={stages} stages x "
            f"train.pipeline_repeats={repeats} chunks of equal depth: choose a pipeline degree "
            f"and repeats whose product divides the layer count"
        )
    if stages > 1 and repeats > 1 and micro_batches < stages:
        raise ConfigError(
            f"train.micro_batches={micro_batches} is fewer than the {stages} pipeline stages: "
            f"circular repeats need at least one micro-batch per stage (set "
            f"train.micro_batches >= {stages}, or train.pipeline_repeats=1)"
        )
    if stages > 1 and micro_batches < stages:
        warnings.warn(
            f"train.micro_batches={micro_batches} < pipeline={stages}: the bubble is "
            f"{bubble_fraction(stages, repeats, micro_batches):.0%} of the step; use "
            f"train.micro_batches >= {4 * stages} to bring it under 20%",
            stacklevel=2,
        )


def check_1f1b(*, stages: int, repeats: int, micro_batches: int) -> None:
    """Refuse what the interleaved 1F1B schedule cannot order: its micro-batches go through the
    chunk rounds in groups of P (as Megatron-LM's)."""
    if repeats > 1 and micro_batches % stages:
        raise ConfigError(
            f"train.micro_batches={micro_batches} is not a multiple of the {stages} pipeline "
            f"stages: the interleaved 1F1B schedule (train.pipeline_repeats={repeats}) runs them "
            f"in groups of {stages}; set train.micro_batches to a multiple of {stages}"
        )


_active: list[Schedule] = []


@contextlib.contextmanager
def scheduled(schedule: Schedule):
    """Trace model code inside this block with the stacked layers run as `schedule` says; the
    model must be called under `jax.vmap(..., axis_name=MICRO)` over the micro-batches."""
    _active.append(schedule)
    try:
        yield
    finally:
        _active.pop()


def current() -> Schedule | None:
    """The schedule in force while tracing, or None (the plain layer scan)."""
    return _active[-1] if _active else None
