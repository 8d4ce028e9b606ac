"""AdamW with Megatron-LM's schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.config import OptimConfig

# Parameters under this key are stacked over layers: their leading axis counts layers.
STACKED = "h"


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then decay to min_lr at decay_steps, then min_lr."""

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * step / max(cfg.warmup_steps, 1)
        frac = jnp.clip(
            (step - cfg.warmup_steps) / max(cfg.decay_steps - cfg.warmup_steps, 1), 0, 1
        )
        if cfg.schedule == "cosine":
            decayed = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            decayed = cfg.lr + (cfg.min_lr - cfg.lr) * frac
        elif cfg.schedule == "constant":
            decayed = jnp.asarray(cfg.lr, jnp.float32)
        else:
            raise ValueError(f"optim.schedule={cfg.schedule!r}: use cosine, linear or constant")
        return jnp.where(step < cfg.warmup_steps, warm, decayed)

    return lr


def decay_mask(params):
    """True for the parameters weight decay applies to: every matrix (kernels and embeddings),
    no vector (biases, layer-norm scales), as Megatron-LM decays."""

    def is_matrix(path, x):
        stacked = getattr(path[0], "key", None) == STACKED
        return x.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule={cfg.schedule!r}: use cosine, linear or constant")
    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    adamw = optax.adamw(
        schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    return optax.chain(*clip, adamw)


def shard_over_data(shapes, specs, logical, data_degree: int, expert_degree: int = 1):
    """The distributed optimizer's layout: each parameter's spec with `data` added on the first
    dimension that `model` leaves whole, that `data_degree` divides and that is not the stacked
    `layers` axis (the layer scan slices that axis, so a split there would reduce each layer's
    gradient whole inside the loop). `logical` holds each parameter's logical axis names.
    With an `expert` axis, a parameter it does not split (all but the experts') is split over
    `data` and `expert` together, its whole data-parallel group, where the dimension allows.
    Returns (specs, key paths of the parameters with no such dimension: replicated over data)."""
    replicated = []

    def split(path, shape, spec, names):
        dims = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
        names = tuple(names or ()) + (None,) * (len(shape.shape) - len(names or ()))
        groups = [(parallel.DATA, data_degree)]
        if expert_degree > 1 and parallel.EXPERT not in dims:
            groups.insert(0, ((parallel.DATA, parallel.EXPERT), data_degree * expert_degree))
        for group, degree in groups:
            for i, (size, axis, name) in enumerate(zip(shape.shape, dims, names, strict=True)):
                if axis is None and name != "layers" and size % degree == 0:
                    return P(*dims[:i], group, *dims[i + 1 :])
        replicated.append("/".join(str(getattr(k, "key", k)) for k in path))
        return spec

    if data_degree == 1 and expert_degree == 1:
        return specs, []
    return jax.tree_util.tree_map_with_path(split, shapes, specs, logical), replicated
