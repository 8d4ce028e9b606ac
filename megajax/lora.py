"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen Dense layer plus a trainable low-rank update,
y = x W + (alpha / rank) dropout(x) A B, with A (d_in, rank) and B (rank, d_out).

Adapters are attached to a built model (`attach`): every Dense that `lora.targets` names gets a
submodule `lora` holding `a` and `b`, so that their paths in the parameter tree are the layer's
path plus ("lora", "a") or ("lora", "b"). They follow the plan: A takes the kernel's row axis
and B its column axis, so on a column-parallel layer (QKV, fc1) B is split by columns and A is
whole, and on a row-parallel one (the attention output, fc2) A is split by rows and B is whole
(layers.Dense computes them where the base layer's inputs and partial sums already are). Init
as PEFT's: A uniform in +-1 / sqrt(d_in) (kaiming_uniform with a = sqrt(5)), B zero, so a fresh
adapter leaves the model's outputs as they were.

With lora.rank > 0 the adapters are the only trainable parameters (`trainable`); `split` and
`join` part the parameter tree into (trainable, frozen) and back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.config import LoRAConfig
from megajax.dropout import dropout, kept
from megajax.layers import Dense

ADAPTER = "lora"  # the adapter submodule's name in a Dense, and so in parameter paths
# lora.targets names -> the Dense layers (paths inside a block) they adapt; "qkv" is the fused
# QKV, or under grouped-query attention the q and kv layers (each its own A).
TARGETS = {
    "qkv": (("attn", "qkv"), ("attn", "q"), ("attn", "kv")),
    "proj": (("attn", "proj"),),
    "fc1": (("mlp", "fc1"),),
    "fc2": (("mlp", "fc2"),),
}
# Row axes whose split is the base layer's memory layout, not its math: the kv weight split by
# rows where model shards outnumber key/value heads is gathered whole to compute; its A stays
# whole on every shard instead (rank x hidden: small).
WHOLE_ROWS = ("kv_embed",)


class Adapter(nnx.Module):
    """The low-rank update of one Dense: scale * dropout(x) @ a @ b. Stacked layers' adapters
    lead with the layer axis, as their kernels do."""

    def __init__(self, kernel: nnx.Param, *, cfg: LoRAConfig, key: jax.Array):
        *lead, d_in, d_out = kernel.shape
        *lead_axes, rows, cols = kernel.get_metadata()["out_sharding"]
        # The logical axes of A's rows and B's columns.
        self.rows, self.cols = (None if rows in WHOLE_ROWS else rows), cols
        bound = 1 / d_in**0.5
        uniform = lambda k, s, dtype=jnp.float32: jax.random.uniform(  # noqa: E731
            k, s, dtype, -bound, bound
        )
        a_init = nnx.with_partitioning(uniform, (*lead_axes, self.rows, None))
        b_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (*lead_axes, None, cols))
        self.a = nnx.Param(a_init(key, (*lead, d_in, cfg.rank)))  # (..., d_in, rank)
        self.b = nnx.Param(b_init(None, (*lead, cfg.rank, d_out)))  # (..., rank, d_out)
        self.scale = cfg.alpha / cfg.rank
        self.rate = cfg.dropout

    def __call__(self, x: jax.Array, key=None) -> jax.Array:
        return self.apply(dropout(x, self.rate, key), self.a[...], self.b[...])

    def keep_mask(self, shape, key):
        """Where the adapter's dropout (PEFT's lora_dropout) keeps its input, the bits
        dropout.dropout draws; None without dropout (rate 0, or key None)."""
        if key is None or self.rate == 0.0:
            return None
        return kept(key, self.rate, shape)

    def factors(self) -> tuple[jax.Array, jax.Array]:
        return self.a[...], self.b[...]

    def specs(self):
        """PartitionSpecs of one layer's a and b; a factor held as one copy per `model` shard
        (parallel.model_copies) has its copies over `model`."""
        copies = P(parallel.MODEL)
        a = copies if parallel.model_copies(self.a[...], 2) else parallel.spec(self.rows, None)
        b = copies if parallel.model_copies(self.b[...], 2) else parallel.spec(None, self.cols)
        return a, b

    def apply(self, x, a, b):
        """scale * x @ a @ b in x's dtype, x already dropped (shard_map bodies call it on their
        local pieces)."""
        return self.up(jnp.einsum("...i,ir->...r", x, a.astype(x.dtype)), b)

    def up(self, low, b):
        """scale * (x A) @ b."""
        return jnp.einsum("...r,ro->...o", low, (self.scale * b).astype(low.dtype))


def targets(cfg: LoRAConfig) -> tuple[tuple[str, ...], ...]:
    """The Dense paths inside a block that lora.targets adapts."""
    return tuple(p for name in cfg.target_names for p in TARGETS[name])


def attach(model: nnx.Module, cfg: LoRAConfig, *, seed: int) -> nnx.Module:
    """Give each targeted Dense of `model` an Adapter (in place); rank 0 attaches nothing."""
    if cfg.rank == 0:
        return model
    wanted = targets(cfg)
    key = jax.random.fold_in(jax.random.key(seed), 0x10AA)  # apart from the model's own streams
    found = [
        (path, m)
        for path, m in nnx.iter_graph(model)
        if isinstance(m, Dense) and tuple(path[-2:]) in wanted and path[0] == "h"
    ]
    for i, (_, dense) in enumerate(found):
        dense.lora = Adapter(dense.kernel, cfg=cfg, key=jax.random.fold_in(key, i))
    return model


def split(tree: dict, cfg: LoRAConfig) -> tuple[dict, dict]:
    """(trainable, frozen): a tree shaped like the parameters (nested dicts: parameters,
    specs, shardings...) parted into two nested dicts. Full fine-tuning (rank 0) trains every
    parameter; LoRA only those inside adapters."""
    if cfg.rank == 0:
        return tree, {}
    return _part(tree, adapters=True), _part(tree, adapters=False)


def _part(tree: dict, *, adapters: bool, inside: bool = False) -> dict:
    out = {}
    for k, v in tree.items():
        within = inside or k == ADAPTER
        if isinstance(v, dict):
            if sub := _part(v, adapters=adapters, inside=within):
                out[k] = sub
        elif within == adapters:
            out[k] = v
    return out


def join(a: dict, b: dict) -> dict:
    """The nested dict holding the leaves of both `a` and `b` (split's inverse)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = join(out[k], v) if k in out else v
    return out


def merge(params: dict, cfg: LoRAConfig) -> dict:
    """The parameters without adapters, each adapted kernel made W + (alpha / rank) A B: the
    plain model that computes what the adapted one does (run it under jax.jit to keep the
    kernels' layouts)."""
    if cfg.rank == 0:
        return params
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and ADAPTER in v:
            a, b = v[ADAPTER]["a"], v[ADAPTER]["b"]
            update = (cfg.alpha / cfg.rank) * jnp.einsum("...ir,...ro->...io", a, b)
            out[k] = {
                **{n: x for n, x in v.items() if n != ADAPTER},
                "kernel": v["kernel"] + update,
            }
        else:
            out[k] = merge(v, cfg) if isinstance(v, dict) else v
    return out
