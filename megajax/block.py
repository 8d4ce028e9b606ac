"""A transformer layer: self-attention and the feed-forward block with their layer norms,
dropout and residual adds, in the order model.layernorm_placement says."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from megajax.attention import Attend, Attention
from megajax.dropout import dropout
from megajax.layers import MLP, norm
from megajax.parallel import constrain


class Block(nnx.Module):
    """A transformer layer, its layer norms placed as model.layernorm_placement says:
    "pre" (GPT-2; the paper's BERT): x + attn(ln_1(x)), then y + mlp(ln_2(y));
    "post" (the original BERT): ln_1(x + attn(x)), then ln_2(y + mlp(y)).
    The parameters are the same; only the order of operations differs. `feed_forward`: the
    class of the MLP's place (layers.MLP, or moe.MoE, which also returns router statistics)."""

    def __init__(self, cfg, *, rngs, feed_forward=None):
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2's residual-branch scaling
        # Selective recomputation keeps what the paper counts (its Table 2): a layer norm's
        # input, not its float32 intermediates; GeLU's input and output, not its insides.
        selective = cfg.remat == "selective"
        self.ln_1 = norm(cfg, recompute=selective)
        self.attn = Attention(cfg, out_std=out_std, rngs=rngs)
        self.ln_2 = norm(cfg, recompute=selective)
        self.mlp = (feed_forward or MLP)(cfg, out_std=out_std, rngs=rngs)
        self.dropout_rate = cfg.dropout
        self.post_ln = cfg.layernorm_placement == "post"

    def __call__(self, x, *, attend: Attend, key) -> jax.Array:
        """x: (batch, length, hidden), split over `model` along the length under sequence
        parallelism; `attend` as Attention reads it."""
        return self.forward(x, attend=attend, key=key)[0]

    def forward(self, x, *, attend: Attend, key) -> tuple[jax.Array, dict]:
        """The layer's output and its feed-forward block's statistics (a MoE router's; {}
        for an MLP)."""
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        rate = self.dropout_rate
        x = constrain(x, "batch", "residual_length", "embed")
        drop = functools.partial(dropout, rate=rate, order=attend.order)
        if self.post_ln:
            x = self.ln_1(x + drop(self.attn(x, attend=attend, key=keys[0]), key=keys[1]))
            y, stats = self._feed_forward(x, keys[2])
            return self.ln_2(x + drop(y, key=keys[2])), stats
        x = x + drop(self.attn(self.ln_1(x), attend=attend, key=keys[0]), key=keys[1])
        y, stats = self._feed_forward(self.ln_2(x), keys[2])
        return x + drop(y, key=keys[2]), stats

    def _feed_forward(self, x, key) -> tuple[jax.Array, dict]:
        y = self.mlp(x, key=key)
        return y if isinstance(y, tuple) else (y, {})

    def extend(self, x, k_cache, v_cache, *, start, positions, mask):
        """The layer on new tokens attending a KV cache (Attention.extend), without dropout:
        (output, new keys, new values)."""
        at = dict(start=start, positions=positions, mask=mask)
        if self.post_ln:
            y, k, v = self.attn.extend(x, k_cache, v_cache, **at)
            x = self.ln_1(x + y)
            return self.ln_2(x + self._feed_forward(x, None)[0]), k, v
        y, k, v = self.attn.extend(self.ln_1(x), k_cache, v_cache, **at)
        x = x + y
        return x + self._feed_forward(self.ln_2(x), None)[0], k, v
