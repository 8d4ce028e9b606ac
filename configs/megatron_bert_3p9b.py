"""Megatron-LM BERT 3.9B (paper Table 4): 48 layers, hidden 2560, 40 heads (head dimension 64).

Trained with the paper's recipe (megajax/recipes.py) on 4-way model parallelism.

    python train.py --config configs/megatron_bert_3p9b.py --mesh data=-1,model=4 \
        --workdir runs/bert_3p9b --set data.source=PREPARED_CORPUS
"""

from megajax.config import Config
from megajax.recipes import megatron_bert


def get_config() -> Config:
    return megatron_bert(num_layers=48, hidden=2560, num_heads=40)
