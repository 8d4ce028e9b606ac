"""Hugging Face GPT-2, BERT and Llama <-> megajax weights, streamed one tensor at a time.

Import (import_hf) writes a megajax checkpoint at step 0 (Hugging Face weights, fresh optimizer
state) and WORKDIR/config.json, which train.py and eval.py resume from. Each process reads each
tensor once and gives each of its devices only the slices it holds (load_params); export
(export_hf) writes model.safetensors tensor by tensor. The HF config's model_type picks a
family; the layout differences are in its table (megajax.hf.families). The command line is
megajax/convert.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes  # bfloat16 for numpy: safetensors' numpy reader needs it registered
import numpy as np
from jax.experimental import multihost_utils

from megajax import config, lora
from megajax.config import ConfigError
from megajax.hf.families import (
    FAMILIES,
    Layout,
    Rule,
    binary_head_of,
    family_of,
    hf_config,
    model_type_of,
)

# --- reading and writing tensors -----------------------------------------------------------


class HFWeights:
    """Random access to the tensors of a save_pretrained directory, one tensor at a time."""

    def __init__(self, directory: str | Path):
        directory = self.directory = Path(directory)
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


# Export dtypes: safetensors' name and numpy's type for each.
DTYPES = {"float32": ("F32", np.dtype("<f4")), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}


def write_safetensors(path: Path, tensors, *, dtype: str = "float32") -> None:
    """Write (name, shape, producer) triples as one safetensors file of `dtype` (DTYPES), one
    tensor in memory at a time: the header is known from the shapes, then each tensor's bytes
    follow in order. bfloat16 rounds each float32 value to the nearest (ties to even)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    name_of, np_dtype = DTYPES[dtype]
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = np_dtype.itemsize * int(np.prod(shape))
        header[name] = {
            "dtype": name_of,
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
            array = np.ascontiguousarray(np.asarray(produce(), np.float32).astype(np_dtype))
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced {array.shape}, header says {tuple(shape)}")
            f.write(array.tobytes())


# --- import and export ---------------------------------------------------------------------


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _names(rule: Rule, key: tuple, num_layers: int, model) -> list[str]:
    """Every Hugging Face tensor a parameter is made of, over all layers for the stacked `h`."""
    layers = range(num_layers) if key[0] == "h" else [None]
    return [name.format(i=i) for i in layers for name in rule.tensor_names(model)]


def load_params(sharded, weights: HFWeights, *, log=print):
    """The model's parameters from Hugging Face weights: each tensor read once per process, each
    local device given only its slices.

    Heads the model has but the checkpoint lacks (a BertModel has no masked-LM or choice head)
    or holds for another task (an NSP head for a model with SOP) are freshly initialised, as
    ShardedModel.fresh_params would, and so are LoRA adapters (lora.rank > 0); a missing
    encoder tensor is an error."""
    cfg = sharded.cfg.model
    layout = Layout(cfg, sharded.padded_vocab)
    table, heads = weights.family.table, weights.family.heads
    abstract = sharded.abstract_params()
    if sharded.cfg.lora.rank:  # the base model is read; the adapters start afresh
        abstract = lora.split(abstract, sharded.cfg.lora)[1]
    keys = [_path_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    absent = {k: [n for n in _names(table[k], k, cfg.num_layers, cfg) if not weights.has(n)]
              for k in keys}  # fmt: skip
    fresh = sorted({k[0] for k in keys if absent[k] and k[0] in heads})
    if "binary" in abstract and binary_head_of(weights.config) not in (None, cfg.binary_head):
        fresh = sorted({*fresh, "binary"})
    missing = [n for k in keys if k[0] not in heads for n in absent[k]]
    if missing:
        raise ConfigError(f"the Hugging Face checkpoint lacks {len(missing)} tensors of the "
                          f"model, e.g. {', '.join(missing[:3])}")  # fmt: skip
    if fresh:
        log(f"freshly initialised (train.seed={sharded.cfg.train.seed}), not in the Hugging Face "
            f"checkpoint for model.arch={cfg.arch}"
            f"{f', binary_head={cfg.binary_head}' if cfg.arch == 'bert' else ''}: "
            f"{', '.join(fresh)}")  # fmt: skip
    initial = sharded.fresh_params(fresh) if fresh else {}

    def leaf(path, target):
        key = _path_key(path)
        if key[0] in initial:
            node = initial
            for k in key:
                node = node[k]
            return node
        rule = table[key]

        def read(layer: int | None) -> np.ndarray:
            parts = [weights.get(name.format(i=layer)) for name in rule.tensor_names(cfg)]
            return rule.to_megajax(parts, layout)

        return _from_host_reads(target, read, stacked=key[0] == "h", num_layers=cfg.num_layers)

    params = jax.tree_util.tree_map_with_path(leaf, abstract)
    return lora.join(params, sharded.fresh_adapters())


def _from_host_reads(target, read, *, stacked: bool, num_layers: int):
    """A global array of `target`'s shape and sharding whose local shards are filled from
    read(layer) (read(None) for an unstacked parameter). Each tensor is read once per process
    however many local devices hold a piece of it; stacked layers are read one at a time, so
    the host holds one whole layer beside the local shards."""
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


def hf_tensors(sharded, params):
    """(name, shape, producer) of every Hugging Face tensor; producers fetch one at a time."""

    cfg = sharded.cfg.model
    layout = Layout(cfg, sharded.padded_vocab)
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
                # Whole on every process (a collective where the mesh spans several): every
                # process must call the producers in the same order.
                whole = multihost_utils.process_allgather(x, tiled=True)
                last.update(layer=layer, parts=rule.to_hf(np.asarray(whole), layout))
            return last["parts"][part]

        for i in range(cfg.num_layers) if key[0] == "h" else [None]:
            names = rule.tensor_names(cfg)
            for part, (name, s) in enumerate(zip(names, shapes, strict=True)):
                out.append((name.format(i=i), s, lambda f=produce, p=part, i=i: f(p, i)))
    return out


# Kept from the config, or won by an explicit --set, over a checkpoint's (config.with_model_of).
COMPUTE_OPTIONS, TRAINING_OPTIONS = config.COMPUTE_OPTIONS, config.TRAINING_OPTIONS


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
    cfg = config.with_model_of(
        cfg, fields, overrides=overrides, source="the Hugging Face checkpoint"
    )
    llama = weights.config.get("model_type") == "llama"
    directory, default = weights.directory, config.DataConfig().vocab_dir
    if llama and cfg.data.tokenizer == "gpt2" and (directory / "tokenizer.json").is_file():
        # A Llama checkpoint's own tokenizer in place of the default GPT-2 BPE.
        cfg = config.replace(cfg, data=dict(tokenizer="hf", vocab_dir=str(directory)))
    elif cfg.data.tokenizer == "gpt2" and cfg.data.vocab_dir == default:
        # A GPT-2 checkpoint's own vocab.json and merges.txt (and its chat template, if any).
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            cfg = config.replace(cfg, data=dict(vocab_dir=str(directory)))
    return cfg


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
    """A megajax work directory `out` (config.json, a checkpoint at step 0) from the Hugging
    Face directory `hf_dir`. A directory that holds checkpoints already is refused before
    anything is read or written; nothing is written until the weights have been read."""
    from megajax.checkpoint import Checkpointer
    from megajax.trainer import Trainer

    out = Path(out)
    if (out / "checkpoints").is_dir():
        held = Checkpointer(out / "checkpoints", every=0, keep=3)
        step = held.latest_step()
        held.close()
        if step is not None:
            raise ConfigError(f"{out} already holds checkpoints (step {step}): choose an empty "
                              "--out")  # fmt: skip
    weights = HFWeights(hf_dir)
    cfg = with_hf_model(cfg, weights, arch_chosen=arch_chosen, overrides=overrides)
    trainer = Trainer(cfg, device_mesh)
    state = trainer.state_from_params(load_params(trainer, weights, log=log))
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2))
    ckpt = Checkpointer(out / "checkpoints", every=0, keep=3)
    ckpt.save(0, state, {"step": 0, "source": str(hf_dir)}, force=True)
    ckpt.close()
    return cfg


def export_hf(
    workdir: str,
    hf_dir: str,
    device_mesh,
    *,
    step: int | None = None,
    dtype: str = "float32",
    lora_adapter: bool = False,
    log=print,
) -> None:
    """The run's checkpoint at `step` (default: the newest) as a Hugging Face directory:
    model.safetensors in `dtype`, config.json and the run's tokenizer files (tokenizer_files).
    A LoRA run's adapters are merged into the weights; with `lora_adapter`, they are written
    alone instead, as a PEFT adapter directory (megajax.hf.adapters). Every process reads and
    gathers; process 0 alone writes."""
    from megajax.checkpoint import Checkpointer
    from megajax.sharded_model import ShardedModel

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    cfg = config.from_dict(_read_json(Path(workdir) / "config.json"))
    sharded = ShardedModel(cfg, device_mesh)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", every=0, keep=1)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {ckpt.directory}")
        params = ckpt.restore_params(step, sharded.abstract_params())
    finally:
        ckpt.close()
    if lora_adapter:
        _write_peft(sharded, params, Path(hf_dir), dtype=dtype)
        return
    tensors = hf_tensors(sharded, sharded.merged_params(params))
    if jax.process_index() != 0:
        for _, _, produce in tensors:  # the gathers are collectives: take part, write nothing
            produce()
        return
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, dtype=dtype)
    hf = {**hf_config(cfg.model), "dtype": dtype}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    files = tokenizer_files(cfg, workdir)
    for f in files:
        shutil.copy(f, out / f.name)
    if files:
        log(f"tokenizer: {', '.join(f.name for f in files)} from {files[0].parent}")
    else:
        log(f"no Hugging Face tokenizer files for data.tokenizer={cfg.data.tokenizer} "
            f"(vocab_dir {cfg.data.vocab_dir}): {out} holds the model alone")  # fmt: skip


def _write_peft(sharded, params, out: Path, *, dtype: str) -> None:
    """The adapters of `params` as a PEFT adapter directory `out` (process 0 writes)."""
    from megajax.hf import adapters

    if sharded.cfg.lora.rank == 0:
        raise ConfigError("--lora_adapter: this run has no LoRA adapters (lora.rank=0); export "
                          "the model itself without --lora_adapter")  # fmt: skip
    tensors = adapters.peft_tensors(sharded, params)  # gathered on every process
    if jax.process_index() != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / adapters.WEIGHTS, tensors, dtype=dtype)
    (out / adapters.CONFIG).write_text(json.dumps(adapters.peft_config(sharded), indent=2))


# --- the tokenizer beside the weights ------------------------------------------------------

# The files transformers' AutoTokenizer reads, by data.tokenizer: those that must be there, and
# those copied when present.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_files(cfg: config.Config, workdir: str | Path) -> list[Path]:
    """The run's tokenizer as Hugging Face files: from its prepared data (WORKDIR/data/*, or a
    prepared data.source), which holds the files the run was trained with, else from
    data.vocab_dir; tokenizer_config.json and the like from the first directory holding
    them. Empty for a character-level run, a BERT over GPT-2 ids (a config's default, e.g. an
    imported BERT's) or a GPT over WordPiece, or where the files are gone."""
    from megajax.data import loader, prepare

    required = prepare.TOKENIZER_FILES.get(cfg.data.tokenizer)
    bert = cfg.model.is_bert
    if not required or (cfg.data.tokenizer, bert) in (("gpt2", True), ("bert", False)):
        return []  # characters; or a family's default left in a config it never read with
    prepared = [Path(loader.sources(cfg.data.source)[0][0])]
    prepared += sorted(p for p in (Path(workdir) / "data").glob("*") if p.is_dir())
    places = []
    for dataset in prepared:
        manifest = dataset / prepare.MANIFEST
        if manifest.is_file():
            if json.loads(manifest.read_text())["tokenizer"]["name"] == cfg.data.tokenizer:
                places.append(dataset / "tokenizer")
    vocab = Path(cfg.data.vocab_dir)
    places.append(vocab if vocab.is_dir() or not vocab.suffix else vocab.parent)
    source = next((d for d in places if all((d / f).is_file() for f in required)), None)
    if source is None:
        return []
    found = [source / f for f in required]
    for name in COMPANION_FILES:
        where = next((d / name for d in [source, *places] if (d / name).is_file()), None)
        if where is not None:
            found.append(where)
    return found
