"""GPT-2 medium (355M, the paper's smallest GPT-2): 24 layers, hidden 1024, 16 heads.

Trained with the paper's recipe (megajax/recipes.py) on 1-way model parallelism.

    python train.py --config configs/gpt2_medium.py --mesh data=-1,model=1 \
        --workdir runs/medium
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt2


def get_config() -> Config:
    return megatron_gpt2(num_layers=24, hidden=1024, num_heads=16)
