"""Megatron-LM GPT-2 2.5B (paper Table 1): 54 layers, hidden 1920, 20 heads, 2-way model parallel.

Trained as in the paper: Adam, LR 1.5e-4 with 3k warmup and cosine decay to 1e-5 over 300k
iterations, weight decay 0.01, clip 1.0, batch 512 x 1024 tokens, activation recomputation.

    python train.py --config configs/megatron_gpt2_2p5b.py --mesh data=-1,model=2 \
        --workdir runs/gpt2_2p5b
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            seq_len=1024,
            num_layers=54,
            hidden=1920,
            num_heads=20,
            remat=True,
            compute_dtype="bfloat16",
        ),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000),
        train=TrainConfig(
            steps=300_000, batch_size=512, micro_batches=16, log_every=10, eval_every=1000
        ),
    )
