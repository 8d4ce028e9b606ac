"""Llama 3 8B (Meta 2024): 32 layers, hidden 4096, 32 query heads sharing 8 key/value heads,
SwiGLU width 14,336, vocabulary 128,256, context 8,192, RoPE base 500,000; 8.03B parameters.

Needs Llama 3's tokenizer.json in data/llama3 and a corpus prepared with it
(megajax/recipes.py); or start from Hugging Face weights with --hf_checkpoint DIR.

    python train.py --config configs/llama3_8b.py --mesh data=-1,model=8 \
        --workdir runs/llama3_8b
"""

from megajax.config import Config
from megajax.recipes import llama


def get_config() -> Config:
    return llama(
        vocab_size=128256,
        seq_len=8192,
        num_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
        tokenizer_dir="data/llama3",
    )
