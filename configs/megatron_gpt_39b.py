"""Megatron-LM GPT 39.1B (arXiv 2104.04473, Table 1): 48 layers, hidden 8192, 64 heads.

The paper's layout: tensor parallelism 8, pipeline parallelism 2, data parallelism 32
(512 A100 80GB), global batch 1536; it measured 138 teraFLOP/s per GPU (44% of peak).

    python train.py --config configs/megatron_gpt_39b.py \
        --mesh pipeline=2,data=32,model=8 --workdir runs/gpt_39b
"""

from megajax.config import Config
from megajax.recipes import megatron_gpt_2021


def get_config() -> Config:
    return megatron_gpt_2021(
        num_layers=48, hidden=8192, num_heads=64, batch_size=1536, data_degree=32
    )
