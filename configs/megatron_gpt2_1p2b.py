"""Megatron-LM GPT-2 1.2B (paper Table 1): 40 layers, hidden 1536, 16 heads, 1-way model parallel.

Trained as in the paper: Adam, LR 1.5e-4 with 3k warmup and cosine decay to 1e-5 over 300k
iterations, weight decay 0.01, clip 1.0, batch 512 x 1024 tokens, activation recomputation.

    python train.py --config configs/megatron_gpt2_1p2b.py --mesh data=-1,model=1 \
        --workdir runs/gpt2_1p2b
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            seq_len=1024,
            num_layers=40,
            hidden=1536,
            num_heads=16,
            remat=True,
            compute_dtype="bfloat16",
        ),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000),
        train=TrainConfig(
            steps=300_000, batch_size=512, micro_batches=16, log_every=10, eval_every=1000
        ),
    )
