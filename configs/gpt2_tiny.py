"""A 4-layer GPT-2 on tiny Shakespeare with the GPT-2 BPE: seconds per step on a CPU.

    python train.py --config configs/gpt2_tiny.py --mesh data=2,model=4 --cpu_devices 8 \
        --workdir runs/tiny --set train.steps=50
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(seq_len=128, num_layers=4, hidden=128, num_heads=8, dropout=0.1),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=500, beta2=0.99),
        train=TrainConfig(steps=500, batch_size=8, log_every=5, eval_every=25, eval_batches=2),
    )
