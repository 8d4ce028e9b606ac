"""Megatron-LM GPT-2 8.3B (paper Table 1): 72 layers, hidden 3072, 32 heads.

Trained with the paper's recipe (megajax/recipes.py) on 8-way model parallelism.

    python train.py --config configs/megatron_gpt2_8p3b.py --mesh data=-1,model=8 \
        --workdir runs/gpt2_8p3b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt2


def get_config() -> Config:
    return megatron_gpt2(num_layers=72, hidden=3072, num_heads=32)
