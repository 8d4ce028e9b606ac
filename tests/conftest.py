"""Every test runs on 8 faked CPU devices; meshes take subsets of them.

Compiling is nearly all of the suite's time, so the tests compile cheaply and once:
- XLA:CPU's LLVM back end runs at -O0, with its older fusion emitters (`TEST_XLA_FLAGS`): the
  optimized HLO, and so every collective the audits read, is the same; only the machine code
  is made differently and less optimized, which tiny test shapes do not notice (a GPT's train
  step compiles in a third of the time);
- one compilation cache per test run (`JAX_COMPILATION_CACHE_DIR`, a fresh directory unless
  set): a program that several tests, or several processes a test starts, compile is compiled
  once per run. Set MEGAJAX_TEST_CACHE=DIR to keep the cache between local runs.
Processes that tests start get the same settings (`subprocess_env`).
"""

import importlib.metadata
import os
import tempfile
from pathlib import Path

from megajax import mesh

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
# XLA stops at start on a flag it does not know: the emitter switch is set for the jaxlib the
# requirements pin, which has it.
if importlib.metadata.version("jaxlib").startswith("0.10."):
    TEST_XLA_FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("MEGAJAX_TEST_CACHE") or tempfile.mkdtemp(
    prefix="megajax-tests-xla-"
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
mesh.fake_cpu_devices(8)  # before anything initialises JAX's backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from megajax import config  # noqa: E402
from megajax.data import prepare  # noqa: E402
from megajax.data.samples import BertPairs, Dataset  # noqa: E402
from megajax.data.tokenizer import GPT2Tokenizer  # noqa: E402

WIKI = "data/wikitext103/wiki.valid.head429.tokens"
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict:
    """The environment for a megajax command a test starts: this run's compiler settings and
    cache; the command fakes its own devices (--cpu_devices replaces the device count)."""
    return {**os.environ, **extra}


def device_mesh(data: int, model: int):
    """A (data, model) mesh over the first data * model faked devices."""
    return mesh.make(f"data={data},model={model}", devices=jax.devices()[: data * model])


def tiny_config(**model):
    """A model that compiles in seconds, with a vocabulary padded differently on each degree."""
    fields = dict(vocab_size=1100, seq_len=32, num_layers=2, hidden=64, num_heads=8)
    return config.replace(
        config.load("configs/gpt2_tiny.py"),
        model={**fields, **model},
        train=dict(batch_size=8, micro_batches=1),
    )


@pytest.fixture(scope="session")
def shakespeare_tokens():
    """GPT-2 token ids of the shipped tiny Shakespeare (its first 90%, the training split)."""
    text = open(config.DataConfig().source, encoding="utf-8").read()
    return np.asarray(GPT2Tokenizer("data/gpt2").encode(text[: int(0.9 * len(text))]), np.int32)


def real_batch(tokens: np.ndarray, *, step: int, batch_size: int, seq_len: int, vocab_size: int):
    """Windows of real text at seeded random offsets, ids folded into a small test vocabulary."""
    starts = np.random.default_rng(step).integers(0, len(tokens) - seq_len - 1, batch_size)
    windows = np.stack([tokens[i : i + seq_len + 1] for i in starts]) % vocab_size
    return windows[:, :-1], windows[:, 1:]


# A Llama-style decoder: grouped-query attention (16 query heads sharing 2 key/value heads, so
# that model degrees 1 and 2 split them and 4 and 8 split the kv weight by rows, each shard
# gathering it to compute its own head), SwiGLU, RMSNorm, RoPE, no biases, untied head.
LLAMA = dict(num_heads=16, num_kv_heads=2, ffn_hidden=96, norm="rmsnorm", positions="rope",
             rope_theta=500000.0, mlp="swiglu", bias=False, tie_embeddings=False)  # fmt: skip


def llama_config(**model):
    """tiny_config made a Llama (LLAMA)."""
    return tiny_config(**{**LLAMA, **model})


def bert_config(**model):
    """A BERT that compiles in seconds (the bert_tiny recipe, smaller)."""
    fields = dict(seq_len=32, num_layers=2, hidden=64, num_heads=8)
    return config.replace(
        config.load("configs/bert_tiny.py"),
        model={**fields, **model},
        train=dict(batch_size=8, micro_batches=1),
    )


@pytest.fixture(scope="session")
def bert_dataset(tmp_path_factory):
    """The shipped WikiText-103 slice in WordPiece ids, sentence by sentence."""
    out = tmp_path_factory.mktemp("bert") / "wiki"
    kw = dict(fmt="wikitext", tokenizer="bert", vocab_dir="data/bert", val_fraction=0)
    return Dataset(prepare.prepare([WIKI], out=out, log=lambda _: None, **kw))


def bert_batch(
    dataset, *, step: int, batch_size: int, seq_len: int, pair_task="sop", vocab_size=None
) -> dict:
    """Real BERT samples (masked, sentence pairs) stacked into one batch; with `vocab_size`, the
    word pieces at or above it folded into it (the special tokens, ids 0 to 103, stay), so that a
    test model's vocabulary and head can be small."""
    pairs = BertPairs(dataset, "train", max_len=seq_len, pair_task=pair_task, seed=1)
    rows = np.random.default_rng(step).integers(0, len(pairs), batch_size)
    samples = [pairs[int(i)] for i in rows]
    batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    if vocab_size is not None:
        for k in ("tokens", "labels"):
            batch[k] = np.where(batch[k] >= vocab_size, batch[k] % vocab_size, batch[k])
    return batch


def lm_logits(trainer, params, ids):
    """A GPT's logits for token ids (batch, length) on the trainer's mesh, the vocabulary's
    padding cut off: what a Hugging Face model's logits are compared with."""
    vocab = trainer.cfg.model.vocab_size
    with trainer.context():
        f = jax.jit(lambda p, x: (lambda m: m(x) @ m.lm_head.T)(trainer.model(p)))
        batch = trainer.put_eval_batch({"inputs": ids, "targets": ids})
        return np.asarray(f(params, batch["inputs"]))[..., :vocab]


# A small GPT-2 checkpoint and a server over it (test_serve.py, test_lm_eval.py) ---------------

# GPT-2's vocabulary and tokenizer; positions for whole LAMBADA passages (lm-eval's tests). A wide
# initialisation makes the random model's choices clear-cut (top-two logit gaps over 0.01),
# so float rounding between implementations cannot flip a greedy token.
HF_SHAPE = dict(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                initializer_range=0.2)  # fmt: skip


def make_hf_gpt2(path: Path) -> Path:
    """A random GPT-2 saved by transformers, biases made to count, with GPT-2's BPE files (as
    megajax.convert --to_hf writes them): what megajax, transformers and lm-eval all load."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**HF_SHAPE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "data/gpt2" / name, path / name)
    return path


def load_generator(hf_dir: Path, mesh=(2, 2)):
    """(Generator, tokenizer) of the checkpoint on the mesh, as megajax.generate.load gives."""
    from megajax import generate
    from megajax.data import loader
    from megajax.hf import weights as convert
    from megajax.sharded_model import ShardedModel

    weights = convert.HFWeights(hf_dir)
    cfg = convert.with_hf_model(config.Config(), weights)
    sharded = ShardedModel(cfg, device_mesh(*mesh))
    params = convert.load_params(sharded, weights, log=lambda _: None)
    tokenizer = loader.tokenizer_for(cfg, workdir=None, hf_checkpoint=str(hf_dir))
    return generate.Generator(sharded, params), tokenizer


def start_server(hf_dir: Path, *, max_rows: int, **limits):
    """(base URL, Server) of a warmed-up server on a free loopback port, over the checkpoint
    on 2 x 2."""
    from megajax import serve
    from megajax.data import chat

    generator, tokenizer = load_generator(hf_dir)
    eng = serve.start_engine(generator, tokenizer, max_rows=max_rows, max_queue=8, warm_up=True)
    template = chat.template_for(tokenizer, hf_dir)
    server = serve.Server(eng, tokenizer, template, model_name="tiny-gpt2", **limits)
    _, port = serve.serve_in_thread(serve.make_app(server))
    return f"http://127.0.0.1:{port}", server
