"""Every config file loads, and the paper's models have the paper's sizes (Tables 1 and 4)."""

from pathlib import Path

import pytest
from conftest import device_mesh, tiny_config

from megajax import config
from megajax.trainer import Trainer

CONFIGS = sorted(Path("configs").glob("*.py"))

# Tables 1 (GPT-2) and 4 (BERT) of arXiv 1909.08053: parameters as printed and the
# model-parallel degree. Two shapes are checked by the figure's printed rounding rather than
# within 1%: GPT-2 1.2B has 1.212B parameters (1.01% over; Narayanan et al. 2021's closed form
# gives 1.21B too) and BERT 1.3B has 1.281B (1.5% under: 24 layers of width 2048 cannot reach
# 1.3B; it is BERT-large's depth at twice its width).
PAPER = {
    "gpt2_medium": (355e6, 1),
    "megatron_gpt2_1p2b": (1.2e9, 1),
    "megatron_gpt2_2p5b": (2.5e9, 2),
    "megatron_gpt2_4p2b": (4.2e9, 4),
    "megatron_gpt2_8p3b": (8.3e9, 8),
    "megatron_bert_336m": (336e6, 1),
    "megatron_bert_1p3b": (1.3e9, 2),
    "megatron_bert_3p9b": (3.9e9, 4),
    "bert_base": (110e6, 1),  # Devlin et al. 2019
}
WITHIN_ROUNDING = {"megatron_gpt2_1p2b", "megatron_bert_1p3b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_documents_its_command(path):
    cfg = config.load(path)
    assert isinstance(cfg, config.Config)
    doc = path.read_text()
    assert f"--config configs/{path.name}" in doc


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts_match_tables_1_and_4(name):
    params, model_degree = PAPER[name]
    cfg = config.load(f"configs/{name}.py")
    # The paper's GPT-2s have heads of 96, its BERTs heads of 64.
    head_dim = {"gpt": 96, "bert": 64}[cfg.model.arch]
    assert cfg.model.head_dim == head_dim or name in ("gpt2_medium", "bert_base")
    trainer = Trainer(cfg, device_mesh(8 // model_degree, model_degree))  # abstract: no memory
    assert trainer.num_params == cfg.model.num_params(model_degree)
    n = trainer.num_params
    digits = len(str(int(params)).rstrip("0"))  # the figure's printed significant digits
    assert float(f"{n:.{digits}g}") == params, n
    if name not in WITHIN_ROUNDING:
        assert abs(n - params) / params < 0.01, n


# Table 1 of arXiv 2104.04473 (Narayanan et al. 2021, also the Megatron-LM repository's
# images/cases_april2021.png): parameters in billions as printed (one decimal), layers, hidden,
# GPUs and global batch; tensor parallelism 8 and the config's pipeline degree.
PAPER_2021 = {
    "megatron_gpt_39b": (39.1, 48, 8192, 512, 1536, 2),
    "megatron_gpt_146b": (145.6, 80, 12288, 1536, 2304, 8),
    "megatron_gpt_1t": (1008.0, 128, 25600, 3072, 3072, 64),
}


@pytest.mark.parametrize("name", sorted(PAPER_2021))
def test_2021_parameter_counts_and_batches_match_table_1(name):
    billions, layers, hidden, gpus, batch, pipeline = PAPER_2021[name]
    cfg = config.load(f"configs/{name}.py")
    m = cfg.model
    assert (m.num_layers, m.hidden, m.seq_len, m.padded_vocab_size(8)) == (
        layers,
        hidden,
        2048,
        51200,
    )
    assert round(m.num_params(8) / 1e9, 1) == billions
    data = gpus // (8 * pipeline)
    # One sequence per data-parallel replica and micro-batch.
    assert cfg.train.batch_size == batch and cfg.train.micro_batches * data == batch
    assert f"--mesh pipeline={pipeline},data={data},model=8" in open(f"configs/{name}.py").read()


def test_vocabulary_padding_follows_the_model_degree():
    cfg = config.load("configs/gpt2_small.py").model
    assert cfg.padded_vocab_size(1) == 50304
    assert cfg.padded_vocab_size(8) == 51200


@pytest.mark.parametrize("arch", ["bert", "bert_multiple_choice"])
@pytest.mark.parametrize("placement,binary", [("pre", "sop"), ("post", "nsp"), ("pre", "none")])
def test_bert_parameter_formula_counts_the_real_model(arch, placement, binary):
    cfg = config.replace(
        config.load("configs/bert_tiny.py"),
        model=dict(arch=arch, layernorm_placement=placement, binary_head=binary),
    )
    for model_degree in (1, 4):
        trainer = Trainer(cfg, device_mesh(1, model_degree))
        assert trainer.num_params == cfg.model.num_params(model_degree)


def test_unknown_architecture_or_placement_is_a_clear_error():
    with pytest.raises(config.ConfigError, match="layernorm_placement='middle'"):
        config.replace(config.Config(), model=dict(layernorm_placement="middle"))
    with pytest.raises(config.ConfigError, match="use one of gpt, bert"):
        config.override(config.Config(), ["model.arch=t5"])


def test_remat_takes_its_new_values_and_old_configs_still_load():
    with pytest.raises(config.ConfigError, match='none, full, selective.*true is now "full"'):
        config.override(config.Config(), ["model.remat=true"])
    with pytest.raises(config.ConfigError, match="none, full, selective"):
        config.override(config.Config(), ["model.remat=false"])
    cfg = config.override(config.Config(), ["model.remat=selective"])
    assert cfg.model.remat == "selective"
    # A run saved before remat had three values resumes with its meaning kept.
    for saved, now in ((True, "full"), (False, "none")):
        assert config.from_dict({"model": {"remat": saved}}).model.remat == now


def test_sequence_length_that_the_model_degree_does_not_divide_is_refused():
    cfg = tiny_config(seq_len=30, sequence_parallel=True)
    with pytest.raises(config.ConfigError, match="seq_len=30 is not divisible by the model deg"):
        Trainer(cfg, device_mesh(2, 4))
    Trainer(config.replace(cfg, model=dict(sequence_parallel=False)), device_mesh(2, 4))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_name_their_corpus_and_stop_clearly_without_it(name, tmp_path):
    from megajax.data import loader

    cfg = config.load(f"configs/{name}.py")
    assert cfg.data.source != config.DataConfig().source  # never tiny Shakespeare by default
    with pytest.raises(config.ConfigError, match=r"data.source: .* not found.*data.prepare"):
        loader.loaders(cfg, workdir=tmp_path, log=lambda _: None)


# Llama 2 7B and Llama 3 8B as published (Touvron et al. 2023; Meta 2024): 6.74B and 8.03B;
# the exact counts of Hugging Face's LlamaForCausalLM of these shapes, unpadded.
LLAMA = {"llama2_7b": (6.74e9, 6_738_415_616), "llama3_8b": (8.03e9, 8_030_261_248)}


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_llama_parameter_counts_match_the_published_ones(name):
    published, exact = LLAMA[name]
    cfg = config.load(f"configs/{name}.py")
    assert cfg.model.num_params(1) == exact  # the vocabulary is already a multiple of 128
    assert abs(exact - published) / published < 0.005
    trainer = Trainer(cfg, device_mesh(1, 8))  # abstract: no memory
    # Padded to a multiple of 128 * 8 rows, in the embedding and the untied head.
    padded = cfg.model.padded_vocab_size(8)
    assert trainer.num_params == exact + 2 * (padded - cfg.model.vocab_size) * cfg.model.hidden
    assert trainer.num_params == cfg.model.num_params(8)


def test_llama_options_refuse_what_the_plan_cannot_split():
    with pytest.raises(config.ConfigError, match="num_kv_heads=3 does not divide num_heads=8"):
        tiny_config(num_kv_heads=3)
    with pytest.raises(config.ConfigError, match="decoder .*arch=gpt"):
        config.replace(config.load("configs/bert_tiny.py"), model=dict(norm="rmsnorm"))
    with pytest.raises(config.ConfigError, match="norm='batchnorm'"):
        tiny_config(norm="batchnorm")
    # 6 key/value heads on 4 model shards: neither whole heads per shard nor one head's copies.
    cfg = tiny_config(hidden=96, num_heads=12, num_kv_heads=6, positions="rope", mlp="swiglu")
    with pytest.raises(config.ConfigError, match="num_kv_heads=6 and the model degree 4 do not"):
        Trainer(cfg, device_mesh(2, 4))
    Trainer(cfg, device_mesh(4, 2))  # 3 heads per shard
    Trainer(cfg, device_mesh(8, 1))


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.log_every=0", "train.log_every=0: must be >= 1"),
        ("train.micro_batches=0", "train.micro_batches=0: must be >= 1"),
        ("model.dropout=1", "model.dropout=1.0: must be in [0, 1)"),
        ("train.seed=4294967296", "train.seed=4294967296: must be in [0, 2**32)"),
        ("optim.beta2=1", "optim.beta2=1.0: must be in [0, 1)"),
        ("checkpoint.keep=0", "checkpoint.keep=0: must be >= 1"),
        ("train.on_nonfinite=halt", "train.on_nonfinite='halt': use skip or stop"),
    ],
)
def test_values_out_of_range_name_the_key_and_the_range(assignment, message):
    """Every section checks its numeric fields when it is made: from a config file, --set or a
    saved config.json alike."""
    with pytest.raises(config.ConfigError) as error:
        config.override(config.Config(), [assignment])
    assert str(error.value) == message


def test_the_race_recipe_runs_on_the_shipped_passages(tmp_path):
    """configs/race_bert_minilm.py's command reads data/race as shipped: both splits hold
    questions of both levels, and a batch of each can be built."""
    from megajax.data import loader

    cfg = config.load("configs/race_bert_minilm.py")
    train, val = loader.race_splits(cfg, ["data/race"])
    assert {r["level"] for r in train} == {r["level"] for r in val} == {"high", "middle"}
    _, train_data, val_data = loader.race_loaders(cfg, log=lambda _: None)
    for data in (train_data, val_data):
        assert data.batch(0)["tokens"].shape == (cfg.train.batch_size, 4, cfg.model.seq_len)
