"""BERT-base as Devlin et al. (2019) trained it (110M parameters): 12 layers, hidden 768, 12
heads, the original post-LN arrangement, next-sentence prediction, sequences of 512, batch 256,
LR 1e-4 warmed up over 10k steps and decayed linearly over 1M.

    python train.py --config configs/bert_base.py --mesh data=-1,model=1 \
        --workdir runs/bert_base --set data.source=PREPARED_CORPUS
"""

from megajax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            arch="bert",
            vocab_size=30522,
            seq_len=512,
            num_layers=12,
            hidden=768,
            num_heads=12,
            layernorm_placement="post",
            activation="gelu",
            layernorm_eps=1e-12,
            binary_head="nsp",
        ),
        # BooksCorpus and English Wikipedia in Devlin et al.; nothing ships it (see recipes.py).
        data=DataConfig(source="data/bert_base_corpus", tokenizer="bert", vocab_dir="data/bert"),
        optim=OptimConfig(
            lr=1e-4, min_lr=0.0, warmup_steps=10_000, decay_steps=1_000_000, schedule="linear"
        ),
        train=TrainConfig(steps=1_000_000, batch_size=256, log_every=10, eval_every=1000),
    )
