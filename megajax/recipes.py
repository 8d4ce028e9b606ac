"""Training recipes that several config files share."""

from __future__ import annotations

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def megatron_gpt2(*, num_layers: int, hidden: int, num_heads: int) -> Config:
    """GPT-2 trained as in arXiv 1909.08053: Adam, LR 1.5e-4 with 3k warmup and cosine decay to
    1e-5 over 300k iterations, weight decay 0.01, clip 1.0, batch 512 x 1024 tokens, activation
    recomputation, half-precision matmuls (bf16 here, fp16 in the paper)."""
    return Config(
        model=ModelConfig(
            seq_len=1024,
            num_layers=num_layers,
            hidden=hidden,
            num_heads=num_heads,
            remat=True,
            compute_dtype="bfloat16",
        ),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000),
        train=TrainConfig(
            steps=300_000, batch_size=512, micro_batches=16, log_every=10, eval_every=1000
        ),
    )
