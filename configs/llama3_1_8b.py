"""Llama 3.1 8B (Meta 2024): Llama 3 8B's shape (32 layers, hidden 4096, 32 query heads sharing
8 key/value heads, SwiGLU width 14,336, vocabulary 128,256, RoPE base 500,000; 8.03B
parameters) with its RoPE stretched to a 131,072-token context: Llama 3.1's scaling, factor 8
beyond the 8,192 positions it was first trained at (wavelengths past 8,192 stretched 8 times,
those under 2,048 kept, a smooth blend between).

The model serves 131,072 positions; it trains here on 8,192-token sequences, Llama 3's: a
131,072-token sequence needs the sequence split through attention, `--mesh context=16,model=8
--set model.seq_len=131072 --set model.context_attention=ring` (docs/context.md: 35.8 GB per
device in the dry run).

Needs Llama 3.1's tokenizer.json in data/llama3 and a corpus prepared with it
(megajax/recipes.py); or start from Hugging Face weights with --hf_checkpoint DIR.

    python train.py --config configs/llama3_1_8b.py --mesh data=-1,model=8 \
        --workdir runs/llama3_1_8b
"""

from megajax.config import Config, RopeScaling
from megajax.recipes import llama


def get_config() -> Config:
    return llama(
        vocab_size=128256,
        seq_len=8192,
        num_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tokenizer_dir="data/llama3",
    )
