"""A 4-layer Llama-style decoder (RMSNorm, RoPE, SwiGLU, 8 query heads sharing 4 key/value
heads, no biases, untied head) on tiny Shakespeare: seconds per step on a CPU. It reads the
shipped GPT-2 BPE, not a Llama tokenizer: the demo is of the blocks, not of a vocabulary.

    python train.py --config configs/llama_tiny.py --mesh data=2,model=4 --cpu_devices 8 \
        --workdir runs/llama_tiny --set train.steps=50
"""

from megajax.config import Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            seq_len=128,
            num_layers=4,
            hidden=128,
            num_heads=8,
            num_kv_heads=4,
            ffn_hidden=352,  # about 8/3 hidden, a multiple of 32 (Llama rounds to 256)
            dropout=0.0,  # Llama trains without dropout
            norm="rmsnorm",
            positions="rope",
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=500, beta2=0.95),
        train=TrainConfig(steps=500, batch_size=8, log_every=5, eval_every=25, eval_batches=2),
    )
