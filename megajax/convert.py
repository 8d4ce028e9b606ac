"""Hugging Face GPT-2 and BERT <-> megajax weights, streamed one tensor at a time.

    python -m megajax.convert --hf DIR --out WORKDIR [--mesh data=D,model=M] [--cpu_devices N]
    python -m megajax.convert --checkpoint WORKDIR --to_hf DIR

Import writes a megajax checkpoint at step 0 (Hugging Face weights, fresh optimizer state) and
WORKDIR/config.json, which train.py and eval.py resume from. Each process reads each tensor
once and gives each of its devices only the slices it holds; export writes model.safetensors
tensor by tensor. The HF config's model_type picks a family, and the layout differences are in
its table: GPT-2's Conv1D weights are already [in, out] like megajax's kernels but its c_attn
columns are q | k | v, where megajax interleaves them by head; BERT's Linear weights are
[out, in] with separate query, key and value; both vocabularies are unpadded; both tie the
output embedding to the input one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megajax import cli, config, mesh
from megajax.config import ConfigError, ModelConfig

# --- the layout tables --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the transforms need to know: the model, and its vocabulary padded for the mesh."""

    model: ModelConfig
    padded_vocab: int


def _same(x, layout):
    return x


def _transpose(x, layout):  # torch Linear [out, in] <-> megajax kernel [in, out]
    return x.T


def _swap_groups(x, outer: int, inner: int):
    """Last axis (outer, inner, rest) -> (inner, outer, rest)."""
    shape = x.shape[:-1]
    x = x.reshape(*shape, outer, inner, -1)
    return np.swapaxes(x, -3, -2).reshape(*shape, -1)


def _qkv_from_hf(x, layout):
    """Columns (q|k|v, head, head_dim) -> (head, q|k|v, head_dim)."""
    return _swap_groups(x, 3, layout.model.num_heads)


def _qkv_to_hf(x, layout):
    return _swap_groups(x, layout.model.num_heads, 3)


def _vocab_from_hf(x, layout):
    return np.pad(x, [(0, layout.padded_vocab - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _vocab_to_hf(x, layout):
    return x[: layout.model.vocab_size]  # the padding rows are megajax's own


def _positions_from_hf(x, layout):
    """The first seq_len learned positions: a model may train on shorter sequences."""
    return x[: layout.model.seq_len]


SAME, LINEAR = (_same, _same), (_transpose, _transpose)
POSITIONS = (_positions_from_hf, _same)
QKV, VOCAB = (_qkv_from_hf, _qkv_to_hf), (_vocab_from_hf, _vocab_to_hf)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One megajax parameter (one layer's, for the stacked `h`) as Hugging Face tensors: their
    names ({i} = layer) and the transforms both ways, given the Layout."""

    names: tuple[str, ...]
    to_megajax: Callable  # (list of HF arrays, Layout) -> one megajax array
    to_hf: Callable  # (megajax array, Layout) -> list of HF arrays, as `names`


def _one(name: str, transforms=SAME) -> Rule:
    to_megajax, to_hf = transforms
    return Rule((name,), lambda xs, layout: to_megajax(xs[0], layout),
                lambda x, layout: [to_hf(x, layout)])  # fmt: skip


def _fused_qkv(pattern: str) -> Rule:
    """torch Linear query, key and value (weights [out, in] or biases) -> one head-interleaved
    qkv kernel [in, 3 * out] or bias, and back (.T leaves a bias as it is)."""

    def to_megajax(xs, layout):
        return _qkv_from_hf(np.concatenate([x.T for x in xs], axis=-1), layout)

    def to_hf(x, layout):
        return [part.T for part in np.split(_qkv_to_hf(x, layout), 3, axis=-1)]

    return Rule(tuple(pattern.format(part, i="{i}") for part in ("query", "key", "value")),
                to_megajax, to_hf)  # fmt: skip


def _norm(path: tuple, name: str) -> dict:
    return {path + ("scale",): _one(f"{name}.weight"), path + ("bias",): _one(f"{name}.bias")}


def _dense(path: tuple, name: str, kernel=SAME) -> dict:
    return {
        path + ("kernel",): _one(f"{name}.weight", kernel),
        path + ("bias",): _one(f"{name}.bias"),
    }


# megajax parameter path -> Rule. Names are those of the head models GPT2LMHeadModel and
# BertFor*; a bare GPT2Model or BertModel checkpoint lacks the base prefix (HFWeights strips it).
GPT2_TABLE = {
    ("wte", "embedding"): _one("transformer.wte.weight", VOCAB),
    ("wpe",): _one("transformer.wpe.weight", POSITIONS),
    **_norm(("ln_f",), "transformer.ln_f"),
    **_norm(("h", "ln_1"), "transformer.h.{i}.ln_1"),
    ("h", "attn", "qkv", "kernel"): _one("transformer.h.{i}.attn.c_attn.weight", QKV),
    ("h", "attn", "qkv", "bias"): _one("transformer.h.{i}.attn.c_attn.bias", QKV),
    **_dense(("h", "attn", "proj"), "transformer.h.{i}.attn.c_proj"),
    **_norm(("h", "ln_2"), "transformer.h.{i}.ln_2"),
    **_dense(("h", "mlp", "fc1"), "transformer.h.{i}.mlp.c_fc"),
    **_dense(("h", "mlp", "fc2"), "transformer.h.{i}.mlp.c_proj"),
}  # lm_head is tied to wte


def _bert_table(placement: str) -> dict:
    """BERT's table, layer norms "post" (transformers' Bert*) or "pre" (MegatronBert*)."""
    post, layer = placement == "post", "bert.encoder.layer.{i}."
    return {
        ("wte", "embedding"): _one("bert.embeddings.word_embeddings.weight", VOCAB),
        ("wpe",): _one("bert.embeddings.position_embeddings.weight", POSITIONS),
        ("wtt",): _one("bert.embeddings.token_type_embeddings.weight"),
        **(_norm(("ln_embed",), "bert.embeddings.LayerNorm") if post else {}),
        ("h", "attn", "qkv", "kernel"): _fused_qkv(layer + "attention.self.{}.weight"),
        ("h", "attn", "qkv", "bias"): _fused_qkv(layer + "attention.self.{}.bias"),
        **_dense(("h", "attn", "proj"), layer + "attention.output.dense", LINEAR),
        # post: ln_1(x + attn(x)), ln_2(y + mlp(y)); pre: x + attn(ln_1(x)), y + mlp(ln_2(y))
        **_norm(("h", "ln_1"), layer + ("attention.output.LayerNorm" if post else "attention.ln")),
        **_dense(("h", "mlp", "fc1"), layer + "intermediate.dense", LINEAR),
        **_dense(("h", "mlp", "fc2"), layer + "output.dense", LINEAR),
        **_norm(("h", "ln_2"), layer + ("output.LayerNorm" if post else "ln")),
        **({} if post else _norm(("ln_f",), "bert.encoder.ln")),
        **_dense(("pooler",), "bert.pooler.dense", LINEAR),
        **_dense(("mlm", "dense"), "cls.predictions.transform.dense", LINEAR),
        **_norm(("mlm", "ln"), "cls.predictions.transform.LayerNorm"),
        ("mlm", "bias"): _one("cls.predictions.bias", VOCAB),  # the tied decoder's bias too
        **_dense(("binary",), "cls.seq_relationship", LINEAR),
        **_dense(("choice",), "classifier", LINEAR),
    }


def _gpt2_fields(hf: dict) -> dict:
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(f"activation {hf['activation_function']!r}: megajax GPT-2 uses gelu_new")
    inner = hf.get("n_inner") or 4 * hf["n_embd"]
    if inner % hf["n_embd"]:
        raise ConfigError(f"n_inner={inner} is not a multiple of n_embd={hf['n_embd']}")
    return dict(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        seq_len=hf["n_positions"],
        num_layers=hf["n_layer"],
        hidden=hf["n_embd"],
        num_heads=hf["n_head"],
        mlp_ratio=inner // hf["n_embd"],
        dropout=hf.get("resid_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        layernorm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _gpt2_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_layer": cfg.num_layers,
        "n_embd": cfg.hidden,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_hidden,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "layer_norm_epsilon": cfg.layernorm_eps,
        "tie_word_embeddings": True,
        "bos_token_id": min(50256, cfg.vocab_size - 1),
        "eos_token_id": min(50256, cfg.vocab_size - 1),
    }


BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def binary_head_of(hf: dict) -> str | None:
    """What a BERT checkpoint's cls.seq_relationship predicts: "nsp" (transformers' meaning,
    label 1 = random B, as megajax's), "sop" when megajax wrote it, None when it has none."""
    if "megajax_binary_head" in hf:
        return hf["megajax_binary_head"]
    archs = hf.get("architectures") or []
    pair = any(a.endswith(("ForPreTraining", "ForNextSentencePrediction")) for a in archs)
    return "nsp" if pair else None


def _bert_fields(hf: dict) -> dict:
    act = hf.get("hidden_act", "gelu")
    if act not in BERT_ACTIVATIONS:
        raise ConfigError(f"hidden_act {act!r}: megajax BERT has {', '.join(BERT_ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type {hf['position_embedding_type']!r}: megajax "
                          "BERT learns absolute positions")  # fmt: skip
    hidden, inner = hf["hidden_size"], hf["intermediate_size"]
    if inner % hidden:
        raise ConfigError(f"intermediate_size={inner} is not a multiple of hidden_size={hidden}")
    # The architecture decides the heads, unless the user's config chose them (with_hf_model).
    choice = any(a.endswith("ForMultipleChoice") for a in hf.get("architectures") or [])
    return dict(
        arch="bert_multiple_choice" if choice else "bert",
        binary_head=("none" if choice else binary_head_of(hf)) or "none",
        vocab_size=hf["vocab_size"],
        seq_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        hidden=hidden,
        num_heads=hf["num_attention_heads"],
        mlp_ratio=inner // hidden,
        dropout=hf.get("hidden_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        layernorm_eps=hf.get("layer_norm_eps", 1e-12),
        layernorm_placement="post" if hf["model_type"] == "bert" else "pre",
        activation=BERT_ACTIVATIONS[act],
        type_vocab_size=hf.get("type_vocab_size", 2),
    )


def _bert_config(cfg: ModelConfig) -> dict:
    base = "Bert" if cfg.layernorm_placement == "post" else "MegatronBert"
    if cfg.arch == "bert_multiple_choice":
        head = "ForMultipleChoice"
    else:  # a sentence-order head is written as seq_relationship too, marked as such
        head = "ForMaskedLM" if cfg.binary_head == "none" else "ForPreTraining"
    hf = {
        "architectures": [base + head],
        "model_type": "bert" if base == "Bert" else "megatron-bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layernorm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    if head == "ForPreTraining" and cfg.binary_head == "sop":
        hf["megajax_binary_head"] = "sop"
    return hf


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face model_type: its table, and its config.json <-> megajax's ModelConfig."""

    base: str  # the base model's name prefix in its head models
    table: dict
    heads: tuple[str, ...]  # top-level parameters a checkpoint may lack: freshly initialised
    model_fields: Callable[[dict], dict]  # config.json -> ModelConfig fields
    hf_config: Callable[[ModelConfig], dict]


BERT_HEADS = ("pooler", "mlm", "binary", "choice")
FAMILIES = {
    "gpt2": Family("transformer.", GPT2_TABLE, (), _gpt2_fields, _gpt2_config),
    "bert": Family("bert.", _bert_table("post"), BERT_HEADS, _bert_fields, _bert_config),
    "megatron-bert": Family("bert.", _bert_table("pre"), BERT_HEADS, _bert_fields, _bert_config),
}


def family_of(hf: dict) -> Family:
    if hf.get("model_type") not in FAMILIES:
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported: expected one "
                          f"of {', '.join(FAMILIES)}")  # fmt: skip
    return FAMILIES[hf["model_type"]]


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face model_type a megajax model exports to."""
    if not cfg.is_bert:
        return "gpt2"
    return "bert" if cfg.layernorm_placement == "post" else "megatron-bert"


def model_config(hf: dict) -> ModelConfig:
    """megajax's ModelConfig for a Hugging Face config.json (the heads its architecture has)."""
    return ModelConfig(**family_of(hf).model_fields(hf))


def hf_config(cfg: ModelConfig) -> dict:
    return FAMILIES[model_type_of(cfg)].hf_config(cfg)


# --- reading and writing tensors -----------------------------------------------------------


class HFWeights:
    """Random access to the tensors of a save_pretrained directory, one tensor at a time."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.config = _read_json(directory / "config.json")
        single = directory / "model.safetensors"
        index = directory / "model.safetensors.index.json"
        if single.is_file() or index.is_file():
            from safetensors import safe_open

            files = [single] if single.is_file() else sorted(
                {directory / f for f in _read_json(index)["weight_map"].values()}
            )  # fmt: skip
            self._files = [safe_open(str(f), framework="numpy") for f in files]
            self._where = {k: f for f in self._files for k in f.keys()}  # noqa: SIM118
        elif (directory / "pytorch_model.bin").is_file():
            try:
                import torch
            except ImportError:
                raise ConfigError("reading pytorch_model.bin needs torch installed") from None
            state = torch.load(
                directory / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True
            )
            self._where = {k: _TorchTensor(v) for k, v in state.items()}
        else:
            raise ConfigError(f"{directory}: no model.safetensors or pytorch_model.bin")
        self.family = family_of(self.config)
        # A bare base model (GPT2Model, BertModel) names its tensors without the base prefix.
        base = self.family.base
        self._strip = "" if any(n.startswith(base) for n in self._where) else base

    def _key(self, name: str) -> str:
        return name.removeprefix(self._strip) if self._strip else name

    def has(self, name: str) -> bool:
        return self._key(name) in self._where

    def get(self, name: str) -> np.ndarray:
        key = self._key(name)
        if key not in self._where:
            raise ConfigError(f"the Hugging Face checkpoint has no tensor {key!r}")
        return np.asarray(self._where[key].get_tensor(key), dtype=np.float32)


class _TorchTensor:
    def __init__(self, tensor):
        self.tensor = tensor

    def get_tensor(self, _name):
        return self.tensor.float().numpy()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected a Hugging Face save_pretrained directory")
    return json.loads(path.read_text())


def write_safetensors(path: Path, tensors) -> None:
    """Write (name, shape, producer) triples as one safetensors file, one tensor in memory at a
    time: the header is known from the shapes, then each tensor's bytes follow in order."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = 4 * int(np.prod(shape))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype="<f4")
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced {array.shape}, header says {tuple(shape)}")
            f.write(array.tobytes())


# --- import and export ---------------------------------------------------------------------


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _names(rule: Rule, key: tuple, num_layers: int) -> list[str]:
    """Every Hugging Face tensor a parameter is made of, over all layers for the stacked `h`."""
    layers = range(num_layers) if key[0] == "h" else [None]
    return [name.format(i=i) for i in layers for name in rule.names]


def load_params(trainer, weights: HFWeights, *, log=print):
    """The model's parameters from Hugging Face weights: each tensor read once per process, each
    local device given only its slices.

    Heads the model has but the checkpoint lacks (a BertModel has no masked-LM or choice head)
    or holds for another task (an NSP head for a model with SOP) are freshly initialised, as
    Trainer.init_state would; a missing encoder tensor is an error."""
    import jax

    cfg = trainer.cfg.model
    layout = Layout(cfg, trainer.padded_vocab)
    table, heads = weights.family.table, weights.family.heads
    abstract = trainer.abstract_state()["params"]
    keys = [_path_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    absent = {k: [n for n in _names(table[k], k, cfg.num_layers) if not weights.has(n)]
              for k in keys}  # fmt: skip
    fresh = sorted({k[0] for k in keys if absent[k] and k[0] in heads})
    if "binary" in abstract and binary_head_of(weights.config) not in (None, cfg.binary_head):
        fresh = sorted({*fresh, "binary"})
    missing = [n for k in keys if k[0] not in heads for n in absent[k]]
    if missing:
        raise ConfigError(f"the Hugging Face checkpoint lacks {len(missing)} tensors of the "
                          f"model, e.g. {', '.join(missing[:3])}")  # fmt: skip
    if fresh:
        log(f"freshly initialised (train.seed={trainer.cfg.train.seed}), not in the Hugging Face "
            f"checkpoint for model.arch={cfg.arch}"
            f"{f', binary_head={cfg.binary_head}' if cfg.arch == 'bert' else ''}: "
            f"{', '.join(fresh)}")  # fmt: skip
    initial = trainer.fresh_params(fresh) if fresh else {}

    def leaf(path, target):
        key = _path_key(path)
        if key[0] in initial:
            node = initial
            for k in key:
                node = node[k]
            return node
        rule = table[key]

        def read(layer: int | None) -> np.ndarray:
            parts = [weights.get(name.format(i=layer)) for name in rule.names]
            return rule.to_megajax(parts, layout)

        return _from_host_reads(target, read, stacked=key[0] == "h", num_layers=cfg.num_layers)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _from_host_reads(target, read, *, stacked: bool, num_layers: int):
    """A global array of `target`'s shape and sharding whose local shards are filled from
    read(layer) (read(None) for an unstacked parameter). Each tensor is read once per process
    however many local devices hold a piece of it; stacked layers are read one at a time, so
    the host holds one whole layer beside the local shards."""
    import jax

    indices = target.sharding.addressable_devices_indices_map(target.shape)
    key_of = {
        device: tuple(s.indices(n) for s, n in zip(index, target.shape, strict=True))
        for device, index in indices.items()
    }
    distinct = {key_of[device]: index for device, index in indices.items()}  # data replicas: once
    if stacked:
        shape = target.sharding.shard_shape(target.shape)
        shards = {k: np.empty(shape, dtype=target.dtype) for k in distinct}
        rows = {k: range(num_layers)[index[0]] for k, index in distinct.items()}
        for layer in range(num_layers):
            whole = read(layer)
            for k, index in distinct.items():
                if layer in rows[k]:
                    shards[k][rows[k].index(layer)] = whole[index[1:]]
    else:
        whole = read(None)
        shards = {k: whole[index].astype(target.dtype) for k, index in distinct.items()}
    arrays = [jax.device_put(shards[key_of[device]], device) for device in indices]
    return jax.make_array_from_single_device_arrays(target.shape, target.sharding, arrays)


def hf_tensors(trainer, params):
    """(name, shape, producer) of every Hugging Face tensor; producers fetch one at a time."""
    import jax

    cfg = trainer.cfg.model
    layout = Layout(cfg, trainer.padded_vocab)
    out = []
    for path, node in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _path_key(path)
        rule = FAMILIES[model_type_of(cfg)].table[key]
        shape = node.shape[1:] if key[0] == "h" else node.shape
        # HF shapes from a zero-strided stand-in: the transforms only slice and view it.
        shapes = [x.shape for x in rule.to_hf(np.broadcast_to(np.float32(0), shape), layout)]
        last = {}  # query, key and value come from one fetch of their fused qkv

        def produce(part, layer, node=node, rule=rule, last=last):
            if last.get("layer", -1) != layer:
                x = node if layer is None else node[layer]
                last.update(layer=layer, parts=rule.to_hf(np.asarray(jax.device_get(x)), layout))
            return last["parts"][part]

        for i in range(cfg.num_layers) if key[0] == "h" else [None]:
            for part, (name, s) in enumerate(zip(rule.names, shapes, strict=True)):
                out.append((name.format(i=i), s, lambda f=produce, p=part, i=i: f(p, i)))
    return out


# Model options that are not the checkpoint's shape: the config's values are kept, and an
# explicit --set wins over the checkpoint's (GPT-2's resid_pdrop, BERT's hidden_dropout_prob...).
COMPUTE_OPTIONS = ("remat", "compute_dtype", "make_vocab_size_divisible_by", "attention")
TRAINING_OPTIONS = ("dropout", "init_std", "layernorm_eps")


def with_hf_model(
    cfg: config.Config, weights: HFWeights, *, arch_chosen: bool = False, overrides=()
):
    """`cfg` with the model shape of the Hugging Face checkpoint (compute options kept).

    `arch_chosen`: the user's config chose model.arch (a config file, or --set); then its
    family must be the checkpoint's, a BERT keeps the config's arch and heads, and a shorter
    model.seq_len than the checkpoint's positions is kept (its first positions are read).
    Otherwise the checkpoint's architecture decides them.

    `overrides`: the user's explicit SECTION.FIELD=VALUE assignments (--set). Those of
    model.dropout, init_std and layernorm_eps win over the checkpoint's values; one that
    contradicts the checkpoint's shape is an error."""
    fields = weights.family.model_fields(weights.config)
    if arch_chosen:
        if cfg.model.is_bert != (fields["arch"] != "gpt"):
            raise ConfigError(
                f"the Hugging Face checkpoint is a {weights.config['model_type']} model but the "
                f"config asks for model.arch={cfg.model.arch}: use a config of its family"
            )
        if cfg.model.is_bert:
            fields |= {k: getattr(cfg.model, k) for k in ("arch", "binary_head", "num_choices")}
        # Train on shorter sequences than the checkpoint has positions for: its first ones.
        fields["seq_len"] = min(fields["seq_len"], cfg.model.seq_len)
    hf = config.to_dict(config.Config(model=ModelConfig(**fields)))["model"]
    explicit = {k.partition("=")[0][len("model.") :] for k in overrides if k.startswith("model.")}
    for name in sorted(explicit - set(COMPUTE_OPTIONS) - set(TRAINING_OPTIONS)):
        if getattr(cfg.model, name) != hf[name]:
            raise ConfigError(
                f"model.{name}={getattr(cfg.model, name)} was set but the Hugging Face "
                f"checkpoint has {hf[name]}: drop the option or use another checkpoint"
            )
    kept = (*COMPUTE_OPTIONS, *(explicit & set(TRAINING_OPTIONS)))
    return config.replace(cfg, model={**hf, **{k: getattr(cfg.model, k) for k in kept}})


def import_hf(
    hf_dir: str,
    out: str,
    cfg: config.Config,
    device_mesh,
    *,
    arch_chosen=False,
    overrides=(),
    log=print,
) -> config.Config:
    from megajax.checkpoint import Checkpointer
    from megajax.trainer import Trainer

    weights = HFWeights(hf_dir)
    cfg = with_hf_model(cfg, weights, arch_chosen=arch_chosen, overrides=overrides)
    trainer = Trainer(cfg, device_mesh)
    state = trainer.state_from_params(load_params(trainer, weights, log=log))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2))
    ckpt = Checkpointer(out / "checkpoints", every=0, keep=3)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise ConfigError(f"{out} already holds checkpoints: choose an empty --out")
    ckpt.save(0, state, {"step": 0, "source": str(hf_dir)}, force=True)
    ckpt.close()
    return cfg


def export_hf(workdir: str, hf_dir: str, device_mesh) -> None:
    from megajax.checkpoint import Checkpointer
    from megajax.trainer import Trainer

    cfg = config.from_dict(_read_json(Path(workdir) / "config.json"))
    trainer = Trainer(cfg, device_mesh)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", every=0, keep=1)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"no checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(step, trainer.abstract_state())
    ckpt.close()
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf_tensors(trainer, state["params"]))
    (out / "config.json").write_text(json.dumps(hf_config(cfg.model), indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Hugging Face GPT-2, BERT <-> megajax")
    cli.add_flags(parser, config_required=False)
    parser.add_argument("--hf", help="a Hugging Face save_pretrained directory to import")
    parser.add_argument("--out", help="the megajax work directory to write")
    parser.add_argument("--checkpoint", help="a megajax work directory to export")
    parser.add_argument("--to_hf", help="the Hugging Face directory to write")
    args = parser.parse_args(argv)
    try:
        importing, exporting = bool(args.hf and args.out), bool(args.checkpoint and args.to_hf)
        if importing == exporting:
            raise ConfigError(
                "use either --hf DIR --out WORKDIR or --checkpoint WORKDIR --to_hf DIR"
            )
        cfg = cli.load_config(args) if args.config else config.Config()
        cli.start(args)
        if importing:
            chosen = bool(args.config) or any(s.startswith("model.arch=") for s in args.set)
            cfg = import_hf(
                args.hf,
                args.out,
                cfg,
                mesh.make(args.mesh),
                arch_chosen=chosen,
                overrides=args.set,
                log=cli.lead_print,
            )
            print(f"imported {args.hf} into {args.out} (step 0): {cfg.model}")
        else:
            export_hf(args.checkpoint, args.to_hf, mesh.make(args.mesh))
            print(f"exported {args.checkpoint} to {args.to_hf}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
