"""Hugging Face Llama interoperability (GQA, untied head, RoPE base other than 10,000), proven
against transformers' LlamaForCausalLM."""

import numpy as np
import pytest
import torch
from conftest import device_mesh, lm_logits
from transformers import LlamaConfig, LlamaForCausalLM

from megajax import config
from megajax.checkpoint import Checkpointer
from megajax.hf import weights as convert  # the conversion, without its command line
from megajax.trainer import Trainer

# The commands run in this process: no step watchdog thread left in it (a finished run's
# last progress would arm it).
NO_WATCHDOG = ["--step_timeout", "0"]

SHAPE = dict(
    vocab_size=1003,  # odd: megajax pads it differently on each model degree
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=32,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    with torch.no_grad():  # norms start at 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (8, 32))


def _hf_logits(path, ids):
    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_llama_config_round_trips(hf_dir):
    weights = convert.HFWeights(hf_dir)
    m = convert.with_hf_model(config.Config(), weights).model
    assert (m.norm, m.positions, m.mlp, m.bias, m.tie_embeddings) == (
        "rmsnorm", "rope", "swiglu", False, False
    )  # fmt: skip
    assert (m.num_kv_heads, m.ffn_hidden, m.rope_theta) == (4, 96, 500000.0)
    back = LlamaConfig(**convert.hf_config(m))
    for key, value in SHAPE.items():
        if key != "rope_theta":
            assert getattr(back, key) == value, key
    assert back.rope_parameters["rope_theta"] == 500000.0


# On 8 model shards the 4 key/value heads' weight is split by rows; each shard gathers it and
# computes its own head.
@pytest.mark.parametrize("data,model", [(1, 1), (2, 4), (1, 8)])
def test_imported_llama_gives_transformers_logits(hf_dir, ids, data, model):
    weights = convert.HFWeights(hf_dir)
    cfg = convert.with_hf_model(config.Config(), weights)
    trainer = Trainer(cfg, device_mesh(data, model))
    params = convert.load_params(trainer, weights, log=lambda _: None)
    ours, theirs = lm_logits(trainer, params, ids), _hf_logits(hf_dir, ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """(config, work directory) of the Llama imported on one device."""
    workdir = tmp_path_factory.mktemp("imported")
    cfg = convert.import_hf(
        str(hf_dir), str(workdir), config.Config(), device_mesh(1, 1), log=lambda _: None
    )
    return cfg, workdir


def test_exported_llama_loads_in_transformers_with_identical_outputs(
    imported, hf_dir, ids, tmp_path
):
    convert.export_hf(str(imported[1]), str(tmp_path / "back"), device_mesh(4, 2))
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    theirs = LlamaForCausalLM.from_pretrained(hf_dir).state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(_hf_logits(tmp_path / "back", ids), _hf_logits(hf_dir, ids))


def test_restored_import_matches_on_another_mesh(imported, hf_dir, ids):
    """The imported checkpoint restores onto a mesh it was not written on, one that splits the
    key/value weight by rows, not by heads."""
    cfg, workdir = imported
    trainer = Trainer(cfg, device_mesh(1, 8))
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=1)
    state, _ = ckpt.restore(0, trainer.abstract_state())
    ckpt.close()
    theirs = _hf_logits(hf_dir, ids)
    ours = lm_logits(trainer, state["params"], ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # unequal lengths


def test_imported_llama_greedy_equals_transformers(hf_dir):
    """On 2 x 4: the KV cache holds num_kv_heads heads of keys turned at their positions (a
    left-padded prompt starts at position 0). One head per model shard, on 1 x 8, is the
    generation CLI's in test_imported_llama_lambada_and_wikitext_..."""
    from megajax import generate

    weights = convert.HFWeights(hf_dir)
    trainer = Trainer(convert.with_hf_model(config.Config(), weights), device_mesh(2, 4))
    params = convert.load_params(trainer, weights, log=lambda _: None)
    out = generate.Generator(trainer, params)(PROMPTS, new_tokens=8, temperature=0.0)
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    for prompt, ours in zip(PROMPTS, out["tokens"], strict=True):
        ids = torch.tensor([prompt])
        theirs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_checkpoint_tokenizer_json_is_read_and_its_absence_said(hf_dir, tmp_path):
    """A Llama directory with tokenizer.json trains and generates with it (data.tokenizer=hf);
    one without keeps the configured tokenizer, and asking for hf there says what is missing."""
    import shutil

    from tokenizers.implementations import ByteLevelBPETokenizer

    from megajax.data import loader
    from megajax.data.tokenizer import HFTokenizer

    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, tmp_path / name)
    without = convert.with_hf_model(config.Config(), convert.HFWeights(tmp_path))
    assert without.data.tokenizer == "gpt2"
    asked = config.replace(without, data=dict(tokenizer="hf", vocab_dir=str(tmp_path)))
    with pytest.raises(config.ConfigError, match="tokenizer.json not found"):
        loader.tokenizer_for(asked, workdir=None, hf_checkpoint=None)
    bpe = ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt")
    bpe.save(str(tmp_path / "tokenizer.json"))
    cfg = convert.with_hf_model(config.Config(), convert.HFWeights(tmp_path))
    assert (cfg.data.tokenizer, cfg.data.vocab_dir) == ("hf", str(tmp_path))
    tokenizer = loader.tokenizer_for(cfg, workdir=None, hf_checkpoint=str(tmp_path))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.encode("Hello") == [15496]


def test_imported_llama_lambada_and_wikitext_read_its_tokenizer_and_equal_transformers(
    hf_dir, tmp_path, capsys
):
    """eval.py --hf_checkpoint on a Llama directory with a SentencePiece-style tokenizer.json
    ("▁w3" ... "▁w1002", "<s>" put first): LAMBADA's greedy predictions and WikiText's
    perplexity are transformers' on the same ids, "<s>" first. Three of five passages end in
    the word transformers predicts: accuracy 3/5."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, tmp_path / name)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"▁w{i}": i for i in range(3, 1003)}
    sp = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    sp.save(str(tmp_path / "tokenizer.json"))

    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(5):
        context = rng.integers(3, 1003, 12)
        with torch.no_grad():
            (next_id,) = model(torch.tensor([[1, *context]])).logits[0, -1:].argmax(-1).tolist()
        assert next_id >= 3  # a word, not a special token
        last = next_id if i < 3 else 3 + (next_id - 2) % 1000
        lines.append(json.dumps({"text": " ".join(f"w{t}" for t in [*context, last])}))
    (tmp_path / "five.jsonl").write_text("\n".join(lines) + "\n")
    text_ids = rng.integers(3, 1003, 20)
    (tmp_path / "wiki.tokens").write_text(" ".join(f"w{t}" for t in text_ids))
    with torch.no_grad():
        ids = torch.tensor([[1, *text_ids]])
        loss = model(ids, labels=ids).loss.item()  # the mean over the 20 words after "<s>"

    spec = importlib.util.spec_from_file_location("eval_cli", Path("eval.py").resolve())
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    results = []
    for task, data in (("lambada", "five.jsonl"), ("wikitext103", "wiki.tokens")):
        argv = ["--task", task, "--data", str(tmp_path / data), "--hf_checkpoint", str(tmp_path),
                "--mesh", "data=2,model=4", *NO_WATCHDOG]  # fmt: skip
        assert eval_cli.main(argv) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    lambada, wiki = results
    assert (lambada["accuracy"], lambada["bos"], lambada["merged_boundaries"]) == (3 / 5, True, 0)
    assert (wiki["tokens"], wiki["original_tokens"], wiki["bos"]) == (21, 20, True)
    assert wiki["ppl"] == pytest.approx(np.exp(loss), rel=1e-4)
    assert wiki["adjusted_ppl"] == pytest.approx(wiki["ppl"], rel=1e-6)  # 20 targets either way

    # Generation reads a prompt the same way, "<s>" first: greedy tokens equal transformers'.
    from megajax import generate

    argv = ["--hf_checkpoint", str(tmp_path), "--prompt", "w5 w6 w7", "--max_new_tokens", "4",
            "--temperature", "0", "--mesh", "data=1,model=8", *NO_WATCHDOG]  # fmt: skip
    assert generate.main(argv) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"][0]["tokens"]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 4:].tolist()  # fmt: skip
    assert ours == theirs


def test_a_bfloat16_checkpoint_imports_with_transformers_logits(hf_dir, ids, tmp_path):
    """What Llama 3 ships: bfloat16 safetensors written by transformers. The weights read
    exactly (bfloat16 widens to float32 without rounding), so the logits are transformers'
    run in float32 on the same bfloat16 values, to float32 rounding."""
    LlamaForCausalLM.from_pretrained(hf_dir).to(torch.bfloat16).save_pretrained(tmp_path)
    weights = convert.HFWeights(tmp_path)
    assert weights.get("model.norm.weight").dtype == np.float32
    trainer = Trainer(convert.with_hf_model(config.Config(), weights), device_mesh(2, 4))
    params = convert.load_params(trainer, weights, log=lambda _: None)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = lm_logits(trainer, params, ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_bfloat16_export_loads_in_transformers_with_its_tokenizer(hf_dir, tmp_path):
    """--to_hf --dtype bfloat16: BF16 safetensors whose weights are the float32 ones rounded to
    nearest, loaded by transformers; the run's tokenizer.json and tokenizer_config.json travel
    along and AutoTokenizer reads them."""
    import json
    import shutil
    import struct

    from tokenizers.implementations import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    from megajax.convert import main as convert_command
    from megajax.data.tokenizer import HFTokenizer

    source, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    shutil.copytree(hf_dir, source)
    bpe = ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt")
    bpe.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    imported = ["--hf", str(source), "--out", str(run), "--mesh", "model=8", *NO_WATCHDOG]
    assert convert_command(imported) == 0
    argv = ["--checkpoint", str(run), "--to_hf", str(out), "--dtype", "bfloat16", *NO_WATCHDOG]
    assert convert_command([*argv, "--mesh", "data=2,model=4"]) == 0

    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    ours = LlamaForCausalLM.from_pretrained(out)
    assert ours.dtype == torch.bfloat16
    ours = ours.state_dict()
    theirs = LlamaForCausalLM.from_pretrained(hf_dir).state_dict()  # the imported float32
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Hello world, again"
    assert tokenizer.encode(text) == HFTokenizer(source).encode(text)
    assert tokenizer.model_max_length == 32
