"""Supervised fine-tuning of a Llama on conversations: LoRA of rank 16 on every projection of
every layer (--set lora.rank=0: full fine-tuning), the assistant's tokens trained on, packed
into rows of up to 4,096 tokens. The model is the checkpoint's (Llama 3 8B's shape until one
replaces it), and so is the tokenizer: start from Hugging Face weights or from a megajax run.

    python train.py --config configs/llama_sft.py --hf_checkpoint DIR \
        --set data.source=FILE.jsonl --mesh data=-1,model=8 --workdir runs/sft
    python train.py --config configs/llama_sft.py --init_from RUN --set data.source=FILE.jsonl
    python -m megajax.convert --checkpoint runs/sft --to_hf OUT [--lora_adapter]

FILE.jsonl holds one conversation a line ({"messages": [...]} or {"prompt", "completion"}).
"""

import dataclasses

from megajax.config import CheckpointConfig, Config, DataConfig, LoRAConfig, OptimConfig
from megajax.recipes import llama


def get_config() -> Config:
    base = llama(
        vocab_size=128256,
        seq_len=4096,
        num_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
        tokenizer_dir="data/llama3",
    )
    return dataclasses.replace(
        base,
        # The checkpoint's tokenizer (--hf_checkpoint's tokenizer.json, --init_from's run's).
        data=DataConfig(source="data/sft/conversations.jsonl", format="chat"),
        # Every linear layer of the blocks adapted, as QLoRA does (arXiv 2305.14314);
        # alpha = 2 x rank; LR 2e-4 warmed up over 30 steps, then a cosine; no weight decay.
        lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.05, targets="qkv,proj,fc1,fc2"),
        optim=OptimConfig(
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=30,
            decay_steps=1000,
            beta2=0.999,
            weight_decay=0.0,
            clip_norm=1.0,
        ),  # fmt: skip
        train=dataclasses.replace(
            base.train, steps=1000, batch_size=64, micro_batches=16, eval_every=100
        ),
        checkpoint=CheckpointConfig(every=200, keep=2),
    )
