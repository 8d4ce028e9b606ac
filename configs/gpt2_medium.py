"""GPT-2 medium (355M, the paper's smallest GPT-2): 24 layers, hidden 1024, 16 heads.

python train.py --config configs/gpt2_medium.py --mesh data=-1,model=1 --workdir runs/medium
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            seq_len=1024,
            num_layers=24,
            hidden=1024,
            num_heads=16,
            remat=True,
            compute_dtype="bfloat16",
        ),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000),
        train=TrainConfig(
            steps=300_000, batch_size=512, micro_batches=8, log_every=10, eval_every=1000
        ),
    )
