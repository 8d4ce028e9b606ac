"""A fine-grained Mixture-of-Experts decoder shaped as OLMoE-1B-7B (Muennighoff et al. 2024,
arXiv 2409.02060): 16 layers of hidden 2048 and 16 heads, each MLP 64 small SwiGLU experts of
width 1,024 with 8 per token, weighted by their softmax probabilities unrenormalised;
vocabulary 50,304; 6.9B parameters, 1.3B active. (OLMoE also normalises q and k, which
megajax's attention does not.) It reads GPT-2's BPE as OLMoE's data does not ship.

    python train.py --config configs/olmoe_1b_7b.py --mesh data=-1,expert=8 \
        --workdir runs/olmoe_1b_7b
"""

from megajax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=50304,
            seq_len=4096,
            num_layers=16,
            hidden=2048,
            num_heads=16,
            dropout=0.0,
            norm="rmsnorm",
            positions="rope",
            rope_theta=10000.0,
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
            moe_experts=64,
            moe_top_k=8,
            moe_ffn_hidden=1024,
            moe_router="softmax_topk",
            moe_aux_loss=0.01,
            moe_z_loss=0.001,
            remat="full",
            compute_dtype="bfloat16",
        ),
        data=DataConfig(source="data/shakespeare/input.txt"),
        optim=OptimConfig(
            lr=4e-4,
            min_lr=4e-5,
            warmup_steps=2000,
            decay_steps=500_000,
            beta2=0.95,
            weight_decay=0.1,
            distributed=True,
        ),  # fmt: skip
        train=TrainConfig(steps=500_000, batch_size=1024, micro_batches=16, log_every=10),
    )
