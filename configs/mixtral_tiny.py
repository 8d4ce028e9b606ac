"""A 4-layer Mixtral-style decoder (8 SwiGLU experts, each token routed to 2; 8 query heads
sharing 4 key/value heads, RMSNorm, RoPE, no biases, untied head) on tiny Shakespeare: seconds
per step on a CPU, its experts split over the `expert` axis. It reads the shipped GPT-2 BPE.

    python train.py --config configs/mixtral_tiny.py --mesh data=2,expert=2,model=2 \
        --cpu_devices 8 --workdir runs/mixtral_tiny --set train.steps=50
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
            dropout=0.0,
            norm="rmsnorm",
            positions="rope",
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
            moe_experts=8,
            moe_top_k=2,
            moe_ffn_hidden=256,  # 2 of 8 experts active: the FLOPs of a 512-wide dense MLP
            moe_aux_loss=0.02,  # Mixtral's router_aux_loss_coef
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=500, beta2=0.95),
        train=TrainConfig(steps=500, batch_size=8, log_every=5, eval_every=25, eval_batches=2),
    )
