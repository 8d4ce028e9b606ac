"""Hugging Face interoperability, proven against transformers itself."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import device_mesh, lm_logits
from transformers import GPT2Config, GPT2LMHeadModel

from megajax import config
from megajax.checkpoint import Checkpointer
from megajax.hf import weights as convert  # the conversion, without its command line
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# The commands run in this process: no step watchdog thread left in it (a finished run's
# last progress would arm it).
NO_WATCHDOG = ["--step_timeout", "0"]
SHAPES = {  # odd vocabularies, so megajax pads them differently on each model degree
    "vocab1003-h64-l2": dict(vocab_size=1003, n_embd=64, n_layer=2, n_head=4, n_positions=32),
    "vocab517-h96-l3": dict(vocab_size=517, n_embd=96, n_layer=3, n_head=8, n_positions=16),
}


def _save_hf(shape: str, path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPES[shape], eos_token_id=0, bos_token_id=0))
    with torch.no_grad():  # transformers zeroes biases at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """shape -> (a Hugging Face directory of that shape, a megajax work directory imported from
    it on one device), each made once, on first use."""
    cache = {}

    def get(shape: str) -> tuple[Path, Path]:
        if shape not in cache:
            root = tmp_path_factory.mktemp(shape)
            hf = _save_hf(shape, root / "hf")
            mj = root / "mj"
            convert.import_hf(str(hf), str(mj), config.Config(), device_mesh(1, 1), log=_quiet)
            cache[shape] = hf, mj
        return cache[shape]

    return get


@pytest.fixture(params=sorted(SHAPES))
def shape(request) -> str:
    return request.param


def _quiet(_line):
    pass


def _hf_logits(path, ids):
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _ids(path, batch=8):
    hf = json.loads((Path(path) / "config.json").read_text())
    rng = np.random.default_rng(0)
    return rng.integers(0, hf["vocab_size"], (batch, hf["n_positions"]))


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4)])
def test_imported_gpt2_gives_transformers_logits(made, shape, data, model):
    """The weights read onto the mesh, and the checkpoint imported on one device restored onto
    it: both give transformers' logits."""
    hf_dir, imported = made(shape)
    weights = convert.HFWeights(hf_dir)
    trainer = Trainer(convert.with_hf_model(config.Config(), weights), device_mesh(data, model))
    loaded = convert.load_params(trainer, weights, log=_quiet)
    ckpt = Checkpointer(imported / "checkpoints", every=0, keep=1)
    state, _ = ckpt.restore(0, trainer.abstract_state())
    ckpt.close()
    ids = _ids(hf_dir)
    theirs = _hf_logits(hf_dir, ids)
    for params in (loaded, state["params"]):
        ours = lm_logits(trainer, params, ids)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_export_then_transformers_loads_identical_outputs(made, shape, tmp_path):
    hf_dir, imported = made(shape)
    convert.export_hf(str(imported), str(tmp_path / "back"), device_mesh(4, 2), log=_quiet)
    ids = _ids(hf_dir)
    np.testing.assert_array_equal(_hf_logits(tmp_path / "back", ids), _hf_logits(hf_dir, ids))


def test_pytorch_bin_checkpoints_import_too(tmp_path):
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(**SHAPES["vocab1003-h64-l2"], eos_token_id=0))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the older format
    weights = convert.HFWeights(tmp_path / "bin")
    state = dict(model.transformer.named_parameters())
    np.testing.assert_array_equal(weights.get("transformer.h.1.attn.c_attn.weight"),
                                  state["h.1.attn.c_attn.weight"].detach().numpy())  # fmt: skip


def test_train_and_eval_start_from_a_hugging_face_directory(made, tmp_path, capsys):
    """eval.py and train.py's --hf_checkpoint, their main in this process, on 1 x 8 (its 8
    heads split 8 ways: no weight held twice, so the checkpoint is written without slicing
    replicas)."""
    import importlib.util

    import train

    hf_dir, _ = made("vocab517-h96-l3")
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    common = ["--mesh", "data=1,model=8", "--hf_checkpoint", str(hf_dir), "--set",
              "data.tokenizer=char", "--set", "data.val_fraction=0.01", "--workdir", str(tmp_path),
              *NO_WATCHDOG]  # fmt: skip
    assert eval_cli.main(common) == 0, capsys.readouterr().err[-2000:]
    before = json.loads((tmp_path / "eval_val.json").read_text())["loss"]
    argv = ["--config", "configs/shakespeare_char.py", *common, "--set", "train.steps=3",
            "--set", "train.eval_every=0"]  # fmt: skip
    assert train.main(argv) == 0, capsys.readouterr().err[-2000:]
    hf_vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved["vocab_size"] == hf_vocab  # the Hugging Face shape, not the config file's
    assert before == pytest.approx(np.log(hf_vocab), rel=0.1)  # a random model: near uniform


def test_import_into_a_trained_run_is_refused_before_its_config_is_touched(made, tmp_path, capsys):
    """Check first, write last: a directory holding checkpoints keeps its config.json, and a
    checkpoint that cannot be read writes nothing."""
    import jax.numpy as jnp

    from megajax.convert import main as convert_command

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"trained": "config"}')
    ckpt = Checkpointer(run / "checkpoints", every=0, keep=1)
    ckpt.save(3, {"x": jnp.zeros(2)}, {"step": 3}, force=True)
    ckpt.close()
    hf_dir = shutil.copytree(made("vocab1003-h64-l2")[0], tmp_path / "hf")
    assert convert_command(["--hf", str(hf_dir), "--out", str(run), *NO_WATCHDOG]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (run / "config.json").read_text() == '{"trained": "config"}'

    hf = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**hf, "n_layer": 3}))  # a layer too many
    argv = ["--hf", str(hf_dir), "--out", str(tmp_path / "new"), *NO_WATCHDOG]
    assert convert_command(argv) == 2
    assert "lacks" in capsys.readouterr().err and not (tmp_path / "new").exists()


class _NotProcess0:
    """jax as a process other than 0 of a job sees it."""

    def __getattr__(self, name):
        import jax

        return getattr(jax, name)

    @staticmethod
    def process_index():
        return 1


def test_export_writes_from_process_0_alone_with_the_runs_tokenizer(made, tmp_path, monkeypatch):
    """Every process gathers each tensor, process 0 alone writes; the directory carries the
    GPT-2 BPE files the run was prepared with (its data.vocab_dir gone since), and
    transformers' AutoTokenizer loads it."""
    from transformers import AutoTokenizer

    from megajax.convert import main as convert_command
    from megajax.data import prepare

    hf_dir, imported = made("vocab1003-h64-l2")
    run = shutil.copytree(imported, tmp_path / "run")  # imported on one device
    saved = json.loads((run / "config.json").read_text())
    saved["data"]["vocab_dir"] = str(tmp_path / "moved")
    (run / "config.json").write_text(json.dumps(saved))
    prepared = run / "data" / "input-gpt2-0123"
    (prepared / "tokenizer").mkdir(parents=True)
    (prepared / prepare.MANIFEST).write_text(json.dumps({"tokenizer": {"name": "gpt2"}}))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "data/gpt2" / name, prepared / "tokenizer" / name)
    gathered, real_gather = [], convert.multihost_utils.process_allgather
    monkeypatch.setattr(
        convert.multihost_utils,
        "process_allgather",
        lambda x, tiled: gathered.append(x.shape) or real_gather(x, tiled=tiled),
    )
    argv = ["--checkpoint", str(run), "--mesh", "data=2,model=4", *NO_WATCHDOG, "--to_hf"]
    with monkeypatch.context() as elsewhere:
        elsewhere.setattr(convert, "jax", _NotProcess0())
        assert convert_command([*argv, str(tmp_path / "other")]) == 0
    assert not (tmp_path / "other").exists()
    as_other, gathered[:] = list(gathered), []
    assert convert_command([*argv, str(tmp_path / "out")]) == 0
    assert as_other == gathered and len(gathered) == 4 + 12 * 2  # each parameter, each layer
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode("Hello world") == [15496, 995]
    ids = _ids(hf_dir)
    np.testing.assert_array_equal(_hf_logits(tmp_path / "out", ids), _hf_logits(hf_dir, ids))
