"""LoRA fine-tuning of the tiny GPT-2 (configs/gpt2_tiny.py's run) on conversations made from
the shipped plays: the assistant's speeches trained on, packed into rows of 128 tokens.

    python train.py --config configs/gpt2_tiny_sft.py --init_from runs/tiny \
        --mesh data=2,model=4 --cpu_devices 8 --workdir runs/tiny_sft

The model is --init_from's (its newest parameters, adapters merged); --set lora.rank=0 trains
every weight instead. docs/finetuning.md has the held-out chat loss before and after.
"""

from megajax.config import Config, DataConfig, LoRAConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(seq_len=128, num_layers=4, hidden=128, num_heads=8, dropout=0.1),
        data=DataConfig(source="data/chat/shakespeare_chat.jsonl", format="chat"),
        lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets="qkv,proj,fc1,fc2"),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=5, decay_steps=60, beta2=0.99),
        train=TrainConfig(steps=60, batch_size=8, log_every=5, eval_every=20, eval_batches=4),
    )
