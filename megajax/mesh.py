"""The one place that builds the (pipeline, data, fsdp, expert, context, model) device mesh and
checks it against the model. The mesh always has all six axes; a degree left out is 1, so every
two-axis string (`data=2,model=4`) builds the same programs as before the pipeline, fsdp, expert
and context axes existed. `fsdp` splits the batch like `data` and, unlike it, every parameter
at rest (fully sharded data parallelism); `expert` splits the batch like `data` outside
Mixture-of-Experts layers and the experts inside them; `context` splits every activation's
sequence (parallel.py, context_attention.py)."""

from __future__ import annotations

import math
import os

from megajax.config import ConfigError, ModelConfig

# The mesh axes, outermost (across nodes) first. This module imports JAX only to build a mesh,
# so that a command line checks its flags, and says what is wrong, before JAX loads.
PIPELINE, DATA, FSDP, EXPERT, CONTEXT, MODEL = (
    "pipeline",
    "data",
    "fsdp",
    "expert",
    "context",
    "model",
)
AXES = (PIPELINE, DATA, FSDP, EXPERT, CONTEXT, MODEL)


def fake_cpu_devices(count: int) -> None:
    """Run on `count` faked CPU devices. Must run before JAX initialises its backend; adds to,
    rather than replaces, any XLA_FLAGS already set."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"


def parse(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'pipeline': 1, 'data': 2, 'fsdp': 1, 'expert': 1, 'context': 1,
    'model': 4}; a missing axis is 1, -1 means 'the rest'."""
    degrees = {axis: 1 for axis in AXES}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, sep, value = part.partition("=")
        if not sep or name not in AXES:
            raise ConfigError(
                f"--mesh {text!r}: expected pipeline=P,data=D,fsdp=F,expert=E,context=C,model=M "
                f"(got {part!r})"
            )
        try:
            degrees[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: {name} must be an integer or -1") from None
        if degrees[name] == 0 or degrees[name] < -1:
            raise ConfigError(f"--mesh {text!r}: {name} must be positive or -1")
    return degrees


def resolve(degrees: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """(pipeline, data, fsdp, expert, context, model): fill in a -1 degree and check that the
    product of the degrees equals the device count."""
    free = [axis for axis, d in degrees.items() if d == -1]
    if len(free) > 1:
        raise ConfigError("--mesh: at most one axis may be -1")
    fixed = math.prod(d for d in degrees.values() if d != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"--mesh: {num_devices} devices do not divide by the fixed degrees ({fixed})"
            )
        degrees = {**degrees, free[0]: num_devices // fixed}
    total = math.prod(degrees[axis] for axis in AXES)
    if total != num_devices:
        named = [a for a in AXES if a in (DATA, MODEL) or degrees[a] > 1]
        shown = ",".join(f"{a}={degrees[a]}" for a in named)
        raise ConfigError(
            f"--mesh {shown} needs {total} devices but "
            f"{num_devices} {'is' if num_devices == 1 else 'are'} present: change the degrees "
            "(or use -1 for one of them), "
            f"or pass --cpu_devices {total} to fake them"
        )
    return tuple(degrees[axis] for axis in AXES)


def check_model(
    cfg: ModelConfig, model_degree: int, expert_degree: int = 1, context_degree: int = 1
) -> None:
    """Refuse a model that the `model`, `expert` and `context` degrees cannot split the way
    the plan says."""
    if context_degree > 1:
        check_context(cfg, context_degree, model_degree)
    if expert_degree > 1 and not cfg.moe:
        raise ConfigError(
            f"--mesh expert={expert_degree} splits the experts of a Mixture-of-Experts model, "
            "and this model is dense (model.moe_experts=0): use data instead of expert"
        )
    if cfg.moe and cfg.moe_experts % expert_degree:
        raise ConfigError(
            f"model.moe_experts={cfg.moe_experts} is not divisible by the expert degree "
            f"{expert_degree}: each expert shard holds the same number of whole experts"
        )
    if cfg.moe and cfg.expert_hidden % model_degree:
        raise ConfigError(
            f"model.moe_ffn_hidden={cfg.expert_hidden} is not divisible by the model degree "
            f"{model_degree}, which splits each expert's inner width"
        )
    for what, size in (("num_heads", cfg.num_heads), ("mlp_hidden", cfg.mlp_hidden)):
        if size % model_degree:
            raise ConfigError(
                f"model.{what}={size} is not divisible by the model degree {model_degree}: "
                f"choose a model degree that divides it"
            )
    if cfg.kv_heads % model_degree and model_degree % cfg.kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={cfg.kv_heads} and the model degree {model_degree} do not "
            "divide one another: each model shard holds whole key/value heads, or the one head "
            "that its query heads share, so choose a model degree that divides num_kv_heads or "
            "a multiple of it"
        )
    if cfg.sequence_parallel and cfg.seq_len % model_degree:
        raise ConfigError(
            f"model.seq_len={cfg.seq_len} is not divisible by the model degree {model_degree}, "
            "which model.sequence_parallel splits it by: change one, or turn it off"
        )
    if cfg.hidden % cfg.num_heads:
        raise ConfigError(
            f"model.hidden={cfg.hidden} is not divisible by num_heads={cfg.num_heads}"
        )


def check_context(cfg: ModelConfig, context_degree: int, model_degree: int) -> None:
    """Refuse what context parallelism cannot split: a sequence that does not cut into 2 C
    equal chunks (the causal load balance gives each context rank two), or into C T under
    sequence parallelism; a fused attention kernel; a Mixture-of-Experts model (its capacity
    is per whole sequence)."""
    c = context_degree
    if cfg.seq_len % (2 * c):
        raise ConfigError(
            f"model.seq_len={cfg.seq_len} is not divisible by 2 x the context degree {c}: "
            f"each context rank holds two of {2 * c} equal chunks of the sequence, so choose "
            "a context degree whose double divides it"
        )
    if cfg.sequence_parallel and cfg.seq_len % (c * model_degree):
        raise ConfigError(
            f"model.seq_len={cfg.seq_len} is not divisible by context x model = "
            f"{c * model_degree}, which model.sequence_parallel splits the residual stream by: "
            "change a degree, or turn it off"
        )
    if cfg.attention != "einsum":
        raise ConfigError(
            f"model.attention={cfg.attention} on --mesh context={c}: the context-split "
            "attention core is written out (einsum): set model.attention=einsum"
        )
    if cfg.moe:
        raise ConfigError(
            f"--mesh context={c}: Mixture-of-Experts layers (model.moe_experts) do not run "
            "on a context-split sequence yet: use context=1"
        )


def check_batch(batch_size: int, micro_batches: int, data_degree: int) -> None:
    """`data_degree`: the shards the batch is split into (data times fsdp times expert)."""
    if batch_size % micro_batches:
        raise ConfigError(
            f"train.batch_size={batch_size} does not divide into {micro_batches} micro-batches"
        )
    if (batch_size // micro_batches) % data_degree:
        raise ConfigError(
            f"micro-batch size {batch_size // micro_batches} is not divisible by the data degree "
            f"{data_degree} (data x fsdp x expert, the axes that split the batch): make "
            "train.batch_size / train.micro_batches a multiple of it"
        )


def make(text: str, devices=None):
    """Build the (pipeline, data, fsdp, expert, context, model) mesh from a --mesh string over
    all (or the given) devices.

    Devices are laid out process by process, so a model group lies inside one process (one
    host) whenever the model degree divides its device count: the per-layer all-reduces then
    stay on the fast intra-node links, and next to them the context axis's key/value
    all-gathers and the experts' all-to-alls, then the fsdp groups' per-layer weight gathers;
    `data` (one gradient reduction per step) and, outermost, `pipeline` (point-to-point
    transfers between stages only) cross hosts.
    """
    import jax
    import numpy as np

    devices = jax.devices() if devices is None else devices
    degrees = resolve(parse(text), len(devices))
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.array(ordered, dtype=object).reshape(degrees)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
