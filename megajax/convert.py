"""Hugging Face GPT-2 <-> megajax weights, streamed one tensor at a time.

    python -m megajax.convert --hf DIR --out WORKDIR [--mesh data=D,model=M] [--cpu_devices N]
    python -m megajax.convert --checkpoint WORKDIR --to_hf DIR

Import writes a megajax checkpoint at step 0 (Hugging Face weights, fresh optimizer state) and
WORKDIR/config.json, which train.py and eval.py resume from. Each device reads only the slices
of the tensors it holds; export writes model.safetensors tensor by tensor. Layout differences
are in TABLE: GPT-2's Conv1D weights are already [in, out] like megajax's kernels, its c_attn
columns are q | k | v while megajax interleaves them by head, and its vocabulary is unpadded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
from pathlib import Path

import numpy as np

from megajax import cli, config, mesh
from megajax.config import ConfigError, ModelConfig

# --- the layout table ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the transforms need to know: the model, and its vocabulary padded for the mesh."""

    model: ModelConfig
    padded_vocab: int


def _same(x, layout):
    return x


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


SAME, QKV, VOCAB = (_same, _same), (_qkv_from_hf, _qkv_to_hf), (_vocab_from_hf, _vocab_to_hf)

# megajax parameter path -> (Hugging Face GPT-2 name, {i} = layer, (import, export) transforms)
# Each transform maps one tensor (one layer's, for the stacked `h`) given the Layout.
TABLE = {
    ("wte", "embedding"): ("wte.weight", VOCAB),
    ("wpe",): ("wpe.weight", SAME),
    ("ln_f", "scale"): ("ln_f.weight", SAME),
    ("ln_f", "bias"): ("ln_f.bias", SAME),
    ("h", "ln_1", "scale"): ("h.{i}.ln_1.weight", SAME),
    ("h", "ln_1", "bias"): ("h.{i}.ln_1.bias", SAME),
    ("h", "attn", "qkv", "kernel"): ("h.{i}.attn.c_attn.weight", QKV),
    ("h", "attn", "qkv", "bias"): ("h.{i}.attn.c_attn.bias", QKV),
    ("h", "attn", "proj", "kernel"): ("h.{i}.attn.c_proj.weight", SAME),
    ("h", "attn", "proj", "bias"): ("h.{i}.attn.c_proj.bias", SAME),
    ("h", "ln_2", "scale"): ("h.{i}.ln_2.weight", SAME),
    ("h", "ln_2", "bias"): ("h.{i}.ln_2.bias", SAME),
    ("h", "mlp", "fc1", "kernel"): ("h.{i}.mlp.c_fc.weight", SAME),
    ("h", "mlp", "fc1", "bias"): ("h.{i}.mlp.c_fc.bias", SAME),
    ("h", "mlp", "fc2", "kernel"): ("h.{i}.mlp.c_proj.weight", SAME),
    ("h", "mlp", "fc2", "bias"): ("h.{i}.mlp.c_proj.bias", SAME),
}


def model_config(hf: dict) -> ModelConfig:
    """megajax's ModelConfig for a Hugging Face GPT-2 config.json."""
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported: expected gpt2")
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(f"activation {hf['activation_function']!r}: megajax GPT-2 uses gelu_new")
    inner = hf.get("n_inner") or 4 * hf["n_embd"]
    if inner % hf["n_embd"]:
        raise ConfigError(f"n_inner={inner} is not a multiple of n_embd={hf['n_embd']}")
    return ModelConfig(
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


def hf_config(cfg: ModelConfig) -> dict:
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
        names = set(self._where)
        self.prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""

    def get(self, name: str) -> np.ndarray:
        key = self.prefix + name
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


def load_params(trainer, weights: HFWeights):
    """The model's parameters from Hugging Face weights, each device reading only its slices."""
    import jax

    cfg = trainer.cfg.model
    layout = Layout(cfg, trainer.padded_vocab)
    abstract = trainer.abstract_state()["params"]

    def leaf(path, target):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        name, (to_megajax, _) = TABLE[key]

        def read(layer: int | None) -> np.ndarray:
            return to_megajax(weights.get(name.format(i=layer)), layout)

        def shard(index):
            if key[0] == "h":  # stacked layers: read the layers this shard covers
                layers = range(cfg.num_layers)[index[0]]
                return np.stack([read(i)[index[1:]] for i in layers])
            return read(None)[index]

        return jax.make_array_from_callback(target.shape, target.sharding, shard)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def hf_tensors(trainer, params):
    """(name, shape, producer) of every Hugging Face tensor; producers fetch one at a time."""
    import jax

    cfg = trainer.cfg.model
    layout = Layout(cfg, trainer.padded_vocab)
    layers = range(cfg.num_layers)
    out = []
    for key, (name, (_, to_hf)) in TABLE.items():
        node = params
        for k in key:
            node = node[k]

        def produce(node=node, to_hf=to_hf, layer=None):
            x = node if layer is None else node[layer]
            return to_hf(np.asarray(jax.device_get(x)), layout)

        shape = list(node.shape[1:] if key[0] == "h" else node.shape)
        if to_hf is _vocab_to_hf:
            shape[0] = cfg.vocab_size
        for i in layers if key[0] == "h" else [None]:
            out.append((name.format(i=i), shape, lambda p=produce, i=i: p(layer=i)))
    return [("transformer." + n, s, p) for n, s, p in out]  # lm_head is tied to wte


def with_hf_model(cfg: config.Config, weights: HFWeights) -> config.Config:
    """`cfg` with the model shape of the Hugging Face checkpoint (compute options kept)."""
    keep = ("remat", "compute_dtype", "make_vocab_size_divisible_by")
    hf = config.to_dict(config.Config(model=model_config(weights.config)))["model"]
    return config.replace(cfg, model={**hf, **{k: getattr(cfg.model, k) for k in keep}})


def import_hf(hf_dir: str, out: str, cfg: config.Config, device_mesh) -> config.Config:
    from megajax.checkpoint import Checkpointer
    from megajax.trainer import Trainer

    weights = HFWeights(hf_dir)
    cfg = with_hf_model(cfg, weights)
    trainer = Trainer(cfg, device_mesh)
    state = trainer.state_from_params(load_params(trainer, weights))
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
    parser = argparse.ArgumentParser(description="Hugging Face GPT-2 <-> megajax checkpoints")
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
            cfg = import_hf(args.hf, args.out, cfg, mesh.make(args.mesh))
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
