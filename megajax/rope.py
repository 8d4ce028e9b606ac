"""Rotary position embeddings (RoPE), plain or stretched past the context a model was trained
at (model.rope_scaling): Llama 3.1's scaling and YaRN, computed as transformers computes them
(`_compute_llama3_parameters`, `_compute_yarn_parameters` in modeling_rope_utils.py), in
float32 and in the same order, so that an imported checkpoint gives transformers' logits at
every position. Local to each head: no communication."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from megajax.config import RopeScaling

PLAIN = RopeScaling()


def rope(
    x: jax.Array, positions: jax.Array, *, theta: float, scaling: RopeScaling = PLAIN
) -> jax.Array:
    """x turned by its positions in the rotate-half pairing (Hugging Face's and
    Megatron-Core's): dimension i of each head turns with i + head_dim / 2. x: (batch, length,
    heads, head_dim); positions: (batch, length)."""
    half = x.shape[-1] // 2
    freqs, scale = frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # (batch, length, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:  # YaRN's attention factor: q.k grows by its square
        cos, sin = cos * scale, sin * scale
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def frequencies(head_dim: int, theta: float, scaling: RopeScaling = PLAIN):
    """(inverse frequencies (head_dim / 2,) in float32, the factor cos and sin are scaled by)."""
    freqs = 1.0 / theta ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim)
    if scaling.type == "llama3":
        return _llama3(freqs, scaling), 1.0
    if scaling.type == "yarn":
        return _yarn(head_dim, theta, scaling), yarn_attention_factor(scaling)
    return freqs, 1.0


def _llama3(freqs, s: RopeScaling):
    """Llama 3.1: wavelengths past original / low_freq_factor stretched by `factor`, those
    under original / high_freq_factor kept, those between blended by where they fall."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    stretched = jnp.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * stretched / s.factor + smooth * stretched
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, stretched)


def _yarn(head_dim: int, theta: float, s: RopeScaling):
    """YaRN: the dimensions that turn more than beta_fast times over the original context keep
    their frequency (extrapolation), those that turn fewer than beta_slow times are divided by
    `factor` (interpolation), and a linear ramp over the dimensions between blends the two."""

    def dimension(turns):  # the dimension pair that turns `turns` times over the context
        ratio = s.original_max_position_embeddings / (turns * 2 * math.pi)
        return head_dim * math.log(ratio) / (2 * math.log(theta))

    low, high = dimension(s.beta_fast), dimension(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp  # the share of each frequency extrapolated
    inverse = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # 1 / freqs
    return 1.0 / (s.factor * inverse) * (1 - kept) + 1.0 / inverse * kept


def yarn_attention_factor(s: RopeScaling) -> float:
    """The factor YaRN scales cos and sin by: attention_factor when set, else 0.1 ln(factor) +
    1 (or, with mscale and mscale_all_dim, the ratio of those forms)."""

    def m(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.attention_factor:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return m(s.factor, s.mscale) / m(s.factor, s.mscale_all_dim)
    return m(s.factor)
