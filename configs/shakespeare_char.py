"""nanoGPT's CPU "baby GPT" on the characters of tiny Shakespeare, for a direct comparison.

nanoGPT reaches a validation loss of about 1.88 with these settings (its README, CPU run).

    python train.py --config configs/shakespeare_char.py --workdir runs/shakespeare_char
"""

from megajax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=65, seq_len=64, num_layers=4, hidden=128, num_heads=4, dropout=0.0
        ),
        optim=OptimConfig(
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            decay_steps=2000,
            beta2=0.99,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        data=DataConfig(tokenizer="char"),
        train=TrainConfig(steps=2000, batch_size=12, log_every=50, eval_every=250, eval_batches=20),
    )
