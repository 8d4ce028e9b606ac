"""Megatron-LM BERT 336M (paper Table 4): 24 layers, hidden 1024, 16 heads (head dimension 64).

Trained with the paper's recipe (megajax/recipes.py) on 1-way model parallelism.

    python train.py --config configs/megatron_bert_336m.py --mesh data=-1,model=1 \
        --workdir runs/bert_336m --set data.source=PREPARED_CORPUS
"""

from megajax.config import Config
from megajax.recipes import megatron_bert


def get_config() -> Config:
    return megatron_bert(num_layers=24, hidden=1024, num_heads=16)
