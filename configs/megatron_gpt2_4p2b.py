"""Megatron-LM GPT-2 4.2B (paper Table 1): 64 layers, hidden 2304, 24 heads.

Trained with the paper's recipe (megajax/recipes.py) on 4-way model parallelism.

    python train.py --config configs/megatron_gpt2_4p2b.py --mesh data=-1,model=4 \
        --workdir runs/gpt2_4p2b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt2


def get_config() -> Config:
    return megatron_gpt2(num_layers=64, hidden=2304, num_heads=24)
