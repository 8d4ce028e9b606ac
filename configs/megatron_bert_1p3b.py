"""Megatron-LM BERT 1.3B (paper Table 4): 24 layers, hidden 2048, 32 heads (head dimension 64).

Trained with the paper's recipe (megajax/recipes.py) on 2-way model parallelism.

    python train.py --config configs/megatron_bert_1p3b.py --mesh data=-1,model=2 \
        --workdir runs/bert_1p3b --set data.source=PREPARED_CORPUS
"""

from megajax.config import Config
from megajax.recipes import megatron_bert


def get_config() -> Config:
    return megatron_bert(num_layers=24, hidden=2048, num_heads=32)
