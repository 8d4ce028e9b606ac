"""A 4-layer BERT (pre-LN, the paper's arrangement) pretrained on tiny Shakespeare with the
BERT WordPiece vocabulary: masked LM + sentence-order prediction, seconds per step on a CPU.

    python train.py --config configs/bert_tiny.py --mesh data=2,model=4 --cpu_devices 8 \
        --workdir runs/bert --set train.steps=50

`--set model.layernorm_placement=post` gives the original BERT arrangement.
"""

from megajax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            arch="bert",
            vocab_size=30522,
            seq_len=128,
            num_layers=4,
            hidden=128,
            num_heads=8,
            dropout=0.1,
            activation="gelu",
            layernorm_placement="pre",
        ),
        data=DataConfig(tokenizer="bert", vocab_dir="data/bert"),
        optim=OptimConfig(
            lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=500, schedule="linear", beta2=0.99
        ),
        train=TrainConfig(steps=500, batch_size=16, log_every=5, eval_every=25, eval_batches=2),
    )
