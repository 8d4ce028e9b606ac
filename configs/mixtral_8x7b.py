"""Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088): Mistral 7B's 32 layers (hidden 4096, 32
query heads sharing 8 key/value heads, vocabulary 32,000, RoPE base 10^6) with each MLP a
sparse block of 8 SwiGLU experts of width 14,336, 2 per token; 46.7B parameters, 12.9B active.

Laid out on 64 H100s as data=8,expert=8: one expert per device in each group of 8 (the
all-to-alls stay inside a node), everything else replicated on it and data-parallel over all
64 (the batch splits over data and expert); the optimizer's state split 64 ways, the
experts' 8 ways over `data`. Needs
Mixtral's tokenizer.json in data/mixtral and a corpus prepared with it (megajax/recipes.py);
or start from Hugging Face weights with --hf_checkpoint DIR.

    python train.py --config configs/mixtral_8x7b.py --mesh data=8,expert=8 \
        --workdir runs/mixtral_8x7b
"""

from megajax import config
from megajax.config import Config
from megajax.recipes import llama


def get_config() -> Config:
    cfg = llama(
        vocab_size=32000,
        seq_len=4096,
        num_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=1e6,
        tokenizer_dir="data/mixtral",
    )
    return config.replace(
        cfg,
        model=dict(
            moe_experts=8,
            moe_top_k=2,
            moe_aux_loss=0.02,
            sequence_parallel=False,  # model=1: nothing to split the sequence over
            remat="full",
        ),
        optim=dict(distributed=True),
        # 1,024 sequences of 4,096 tokens per step; micro-batches of one sequence per device.
        train=dict(micro_batches=16),
    )
