"""Megatron-LM GPT 1,008B (1T) (arXiv 2104.04473, Table 1): 128 layers, hidden 25600, 160 heads.

The paper's layout: tensor parallelism 8, pipeline parallelism 64, data parallelism 6
(3072 A100 80GB), global batch 3072; it measured 163 teraFLOP/s per GPU (52% of peak).

    python train.py --config configs/megatron_gpt_1t.py \
        --mesh pipeline=64,data=6,model=8 --workdir runs/gpt_1t
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt_2021


def get_config() -> Config:
    return megatron_gpt_2021(
        num_layers=128, hidden=25600, num_heads=160, batch_size=3072, data_degree=6
    )
