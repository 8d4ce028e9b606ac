"""Training recipes that several config files share."""

from __future__ import annotations

import dataclasses

from megajax.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RopeScaling,
    TrainConfig,
)

# The paper's corpus (section 4.1): Wikipedia, CC-Stories, RealNews and OpenWebText, 174 GB
# deduplicated, prepared once with `python -m megajax.data.prepare` for each tokenizer. Nothing
# ships it: a run fails at start until it exists or --set data.source names another corpus.
GPT2_CORPUS = "data/megatron_corpus_gpt2"
BERT_CORPUS = "data/megatron_corpus_bert"
# A corpus for the Llama configs, prepared with the model's own tokenizer.json (none ships).
LLAMA_CORPUS = "data/llama_corpus"


def megatron_gpt2(*, num_layers: int, hidden: int, num_heads: int) -> Config:
    """GPT-2 trained as in arXiv 1909.08053: Adam, LR 1.5e-4 with 3k warmup and cosine decay to
    1e-5 over 300k iterations, weight decay 0.01, clip 1.0, batch 512 x 1024 tokens, activation
    recomputation, half-precision matmuls (bf16 here, fp16 in the paper)."""
    return Config(
        model=ModelConfig(
            seq_len=1024,
            num_layers=num_layers,
            hidden=hidden,
            num_heads=num_heads,
            remat="full",
            compute_dtype="bfloat16",
        ),
        data=DataConfig(source=GPT2_CORPUS),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000),
        train=TrainConfig(
            steps=300_000, batch_size=512, micro_batches=16, log_every=10, eval_every=1000
        ),
    )


def megatron_bert(*, num_layers: int, hidden: int, num_heads: int) -> Config:
    """BERT trained as in arXiv 1909.08053, section 5.3: the original BERT's 30,522-token
    WordPiece vocabulary, sequences of 512, layer norms rearranged before each sublayer (the
    paper's Figure 7), sentence-order prediction instead of next-sentence prediction, whole-word
    masking, batch 1024, Adam with LR 1e-4 warmed up over 10k iterations and decayed linearly
    over 2M, weight decay 0.01, activation recomputation, half-precision matmuls."""
    return Config(
        model=ModelConfig(
            arch="bert",
            vocab_size=30522,
            seq_len=512,
            num_layers=num_layers,
            hidden=hidden,
            num_heads=num_heads,
            layernorm_placement="pre",
            activation="gelu",
            binary_head="sop",
            remat="full",
            compute_dtype="bfloat16",
        ),
        data=DataConfig(
            source=BERT_CORPUS, tokenizer="bert", vocab_dir="data/bert", whole_word_masking=True
        ),
        optim=OptimConfig(
            lr=1e-4, min_lr=1e-5, warmup_steps=10_000, decay_steps=2_000_000, schedule="linear"
        ),
        train=TrainConfig(
            steps=2_000_000, batch_size=1024, micro_batches=32, log_every=10, eval_every=1000
        ),
    )


def megatron_gpt_2021(
    *, num_layers: int, hidden: int, num_heads: int, batch_size: int, data_degree: int
) -> Config:
    """GPT as scaled in arXiv 2104.04473 (Table 1): sequences of 2,048 tokens, GPT-2's
    vocabulary padded to 51,200 at 8-way tensor parallelism, 8-way tensor parallelism inside a
    node and pipeline stages across nodes. The table fixes the global batch and the number of
    GPUs, hence the data-parallel degree; it does not print the micro-batch size, so one sequence
    per data-parallel replica and micro-batch is taken here (micro_batches = batch / data). The
    optimizer is the 2019 recipe's: the paper measured throughput, not a training run."""
    base = megatron_gpt2(num_layers=num_layers, hidden=hidden, num_heads=num_heads)
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, seq_len=2048),
        train=dataclasses.replace(
            base.train, batch_size=batch_size, micro_batches=batch_size // data_degree
        ),
    )


def llama(
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_heads: int,
    ffn_hidden: int,
    rope_theta: float,
    tokenizer_dir: str,
    rope_scaling: RopeScaling | None = None,
) -> Config:
    """A Llama 2 / Llama 3 8B-class decoder (32 layers, hidden 4096, 32 query heads; RMSNorm,
    RoPE, SwiGLU, no biases, untied head) trained as Touvron et al. 2023 describe: AdamW with
    beta2 0.95, eps 1e-5, weight decay 0.1, clip 1.0, LR 3e-4 warmed up over 2,000 steps and
    decayed by a cosine to a tenth, about 4M tokens per batch, bf16 matmuls. Its tokenizer is
    the checkpoint's tokenizer.json (data.tokenizer="hf"); neither it nor a corpus ships.

    Micro-batches of 16,384 tokens with sequence parallelism and selective recomputation: what
    the dry run finds to fit one H100 of a model=8 group (Llama 3 8B: 42.4 GB analytic). With
    data=D, divide train.micro_batches by D to keep that micro-batch per device. `rope_scaling`:
    a RoPE stretched past the context it was trained at (Llama 3.1's)."""
    return Config(
        model=ModelConfig(
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_layers=32,
            hidden=4096,
            num_heads=32,
            num_kv_heads=num_kv_heads,
            ffn_hidden=ffn_hidden,
            dropout=0.0,
            layernorm_eps=1e-5,
            norm="rmsnorm",
            positions="rope",
            rope_theta=rope_theta,
            rope_scaling=rope_scaling or RopeScaling(),
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
            remat="selective",
            sequence_parallel=True,
            compute_dtype="bfloat16",
        ),
        data=DataConfig(source=LLAMA_CORPUS, tokenizer="hf", vocab_dir=tokenizer_dir),
        optim=OptimConfig(
            lr=3e-4,
            min_lr=3e-5,
            warmup_steps=2000,
            decay_steps=500_000,
            beta2=0.95,
            eps=1e-5,
            weight_decay=0.1,
        ),
        train=TrainConfig(
            steps=500_000,
            batch_size=4_194_304 // seq_len,
            micro_batches=4_194_304 // 16_384,
            log_every=10,
            eval_every=1000,
        ),
    )
