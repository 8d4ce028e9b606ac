"""Megatron-LM GPT-2 2.5B (paper Table 1): 54 layers, hidden 1920, 20 heads.

Trained with the paper's recipe (megajax/recipes.py) on 2-way model parallelism.

    python train.py --config configs/megatron_gpt2_2p5b.py --mesh data=-1,model=2 \
        --workdir runs/gpt2_2p5b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt2


def get_config() -> Config:
    return megatron_gpt2(num_layers=54, hidden=1920, num_heads=20)
