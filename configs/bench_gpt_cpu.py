"""The CPU benchmark shape: a 14M-parameter GPT step (6 layers, width 384, 6 heads, 256 x 8
tokens, vocabulary 8192, no dropout, AdamW), timed against Hugging Face's GPT-2 in PyTorch.

    python -m megajax.bench --config configs/bench_gpt_cpu.py --torch

The vocabulary is 8,192, not GPT-2's 50,257, so that the step is dominated by the transformer
rather than the LM head. Its batches are real text: tiny Shakespeare with GPT-2 BPE ids folded
modulo 8,192 (several words share an id), which is fine for timing but not a language model to
train: train.py refuses it because the tokenizer's vocabulary is larger than the model's.
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=8192, seq_len=256, num_layers=6, hidden=384, num_heads=6, dropout=0.0
        ),
        optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10, decay_steps=1000),
        train=TrainConfig(steps=30, batch_size=8, log_every=10, eval_every=0),
    )
