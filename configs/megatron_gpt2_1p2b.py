"""Megatron-LM GPT-2 1.2B (paper Table 1): 40 layers, hidden 1536, 16 heads.

Trained with the paper's recipe (megajax/recipes.py) on 1-way model parallelism.

    python train.py --config configs/megatron_gpt2_1p2b.py --mesh data=-1,model=1 \
        --workdir runs/gpt2_1p2b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt2


def get_config() -> Config:
    return megatron_gpt2(num_layers=40, hidden=1536, num_heads=16)
