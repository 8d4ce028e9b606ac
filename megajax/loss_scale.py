"""Megatron-LM's dynamic loss scaling (`DynamicGradScaler`) for float16 training.

The loss is multiplied by `scale` before the backward pass so that small float16 gradients do
not flush to zero, and the gradients are divided by it before the update. A step whose
gradients overflow is skipped. The scale:
- halves (never below min_loss_scale) on an overflowing step once `hysteresis` overflowing
  steps have been counted since the last growth;
- doubles after loss_scale_window consecutive clean steps, which also re-arms the hysteresis.
"""

from __future__ import annotations

import jax.numpy as jnp

from megajax.config import OptimConfig


def init(cfg: OptimConfig) -> dict:
    """The scaler's state: the scale, clean steps since the last change, overflows left."""
    return {
        "scale": jnp.float32(cfg.initial_loss_scale),
        "growth_tracker": jnp.int32(0),
        "hysteresis_tracker": jnp.int32(cfg.hysteresis),
    }


def update(state: dict, finite, cfg: OptimConfig) -> dict:
    """The scaler after a step whose gradients were all finite (`finite`) or not."""
    scale, growth, hysteresis = (
        state["scale"],
        state["growth_tracker"],
        state["hysteresis_tracker"],
    )
    # Overflow: reset the clean-step count, spend one unit of hysteresis, back off when spent.
    left = hysteresis - 1
    backed_off = jnp.where(left <= 0, jnp.maximum(scale * 0.5, cfg.min_loss_scale), scale)
    # Clean: count the step; a full window doubles the scale and re-arms the hysteresis.
    clean = growth + 1
    grow = clean == cfg.loss_scale_window
    return {
        "scale": jnp.where(finite, jnp.where(grow, scale * 2.0, scale), backed_off),
        "growth_tracker": jnp.where(finite & ~grow, clean, 0).astype(jnp.int32),
        "hysteresis_tracker": jnp.where(
            finite, jnp.where(grow, cfg.hysteresis, hysteresis), left
        ).astype(jnp.int32),
    }
