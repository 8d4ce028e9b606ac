"""The Megatron-LM plan (arXiv 1909.08053, section 3) as one table: logical axis -> mesh axis.

Model code names only logical axes. With T = the `model` degree:
- `heads` splits the fused QKV columns (whole heads per shard) and the attention output rows;
- `mlp` splits fc1's columns and fc2's rows;
- `vocab` splits the word embedding by rows; the tied LM head then yields vocabulary-sharded
  logits, which the cross-entropy reduces without gathering them;
- `batch` splits the data over `data`; everything else is replicated on every model shard.
Changing the plan is a change to RULES alone.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("vocab", MODEL),
    ("heads", MODEL),
    ("mlp", MODEL),
    ("embed", None),
    ("length", None),
    ("position", None),
    ("layers", None),
)
_RULES = dict(RULES)


def spec(*logical: str | None) -> P:
    """PartitionSpec for a tensor whose dimensions carry these logical names."""
    return P(*(None if name is None else _RULES[name] for name in logical))


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Pin an activation's layout so the compiler emits the plan's collectives, no others."""
    return jax.lax.with_sharding_constraint(x, spec(*logical))
