"""GPT-2 small (124M): 12 layers, hidden 768, 12 heads, context 1024.

python train.py --config configs/gpt2_small.py --mesh data=-1,model=1 --workdir runs/small
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(seq_len=1024, num_layers=12, hidden=768, num_heads=12),
        optim=OptimConfig(
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=2000,
            decay_steps=600_000,
            beta2=0.95,
            weight_decay=0.1,
        ),
        train=TrainConfig(
            steps=600_000, batch_size=480, micro_batches=40, log_every=10, eval_every=1000
        ),
    )
