"""Llama 2 7B (Touvron et al. 2023): 32 layers, hidden 4096, 32 heads (no grouping), SwiGLU
width 11,008, vocabulary 32,000, context 4,096, RoPE base 10,000; 6.74B parameters.

Needs Llama 2's tokenizer.json in data/llama2 and a corpus prepared with it
(megajax/recipes.py); or start from Hugging Face weights with --hf_checkpoint DIR.

    python train.py --config configs/llama2_7b.py --mesh data=-1,model=8 \
        --workdir runs/llama2_7b
"""

from megajax.config import Config
from megajax.recipes import llama


def get_config() -> Config:
    return llama(
        vocab_size=32000,
        seq_len=4096,
        num_kv_heads=32,
        ffn_hidden=11008,
        rope_theta=10000.0,
        tokenizer_dir="data/llama2",
    )
