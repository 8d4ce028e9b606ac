"""Hugging Face BERT interoperability, proven against transformers itself."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import device_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import config, convert, parallel
from megajax.models import bert
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # odd vocabularies, so megajax pads them differently on each model degree
    "vocab1001-h64-l2": dict(vocab_size=1001, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=256,
                             max_position_embeddings=32, hidden_act="gelu"),
    "vocab515-h96-l3": dict(vocab_size=515, hidden_size=96, num_hidden_layers=3,
                            num_attention_heads=8, intermediate_size=192, type_vocab_size=3,
                            max_position_embeddings=16, hidden_act="gelu_new"),
}  # fmt: skip
HEADS = {"pretraining": transformers.BertForPreTraining,
         "multiple_choice": transformers.BertForMultipleChoice}  # fmt: skip


def _save_hf(shape: str, head: str, path: Path) -> Path:
    torch.manual_seed(0)
    model = HEADS[head](transformers.BertConfig(**SHAPES[shape], layer_norm_eps=1e-12))
    with torch.no_grad():  # transformers inits layer norms to (1, 0), biases to 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


CASES = [(s, h) for s in sorted(SHAPES) for h in HEADS]


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
    convert.import_hf(str(hf_dir), str(tmp_path / "mj"), config.Config(), device_mesh(2, 4))
    convert.export_hf(str(tmp_path / "mj"), str(tmp_path / "back"), device_mesh(4, 2))
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
