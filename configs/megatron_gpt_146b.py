"""Megatron-LM GPT 145.6B (arXiv 2104.04473, Table 1): 80 layers, hidden 12288, 96 heads.

The paper's layout: tensor parallelism 8, pipeline parallelism 8, data parallelism 24
(1536 A100 80GB), global batch 2304; it measured 148 teraFLOP/s per GPU (47% of peak).

    python train.py --config configs/megatron_gpt_146b.py \
        --mesh pipeline=8,data=24,model=8 --workdir runs/gpt_146b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt_2021


def get_config() -> Config:
    return megatron_gpt_2021(
        num_layers=80, hidden=12288, num_heads=96, batch_size=2304, data_degree=24
    )
