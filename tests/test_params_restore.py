"""A trained run read back for evaluation, generation, serving and export: the parameters
alone (no Adam moments read), equal bit for bit to a full restore on any mesh, and a --step
that was never saved answered with the steps that were."""

import json

import jax
import numpy as np
import pytest
from conftest import device_mesh, tiny_config

from megajax import cli, config, convert, generate
from megajax.checkpoint import Checkpointer
from megajax.config import ConfigError
from megajax.trainer import Trainer

STEPS = (2, 4)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls, page cache included (Linux)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run saved on one device at steps 2 and 4, its Adam moments filled with noise (zeros
    would compress to nothing and hide what is read); a vocabulary that pads differently on
    1 x 8. The noise is added on the host: no program compiled per moment's shape."""
    cfg = tiny_config(vocab_size=4099, hidden=128)
    workdir = tmp_path_factory.mktemp("trained")
    (workdir / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    trainer = Trainer(cfg, device_mesh(1, 1))
    state = jax.device_get(trainer.init_state())
    rng = np.random.default_rng(1)
    noise = lambda x: x + rng.standard_normal(x.shape).astype(x.dtype)  # noqa: E731
    state["opt_state"] = jax.tree.map(lambda x: noise(x) if x.ndim else x, state["opt_state"])
    state = jax.device_put(state, trainer.state_sharding)
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=5)
    for step in STEPS:
        ckpt.save(step, state, {"step": step}, force=True)
    ckpt.close()
    return workdir, cfg


def _args(workdir, *extra):
    return generate.parse_args(["--workdir", str(workdir), "--mesh", "data=1,model=8", *extra])


@pytest.fixture
def arrays_read(monkeypatch):
    """The TensorStore specs (naming the on-disk arrays) whose data Orbax reads: one
    deserialization per array; metadata reads are not counted."""
    from orbax.checkpoint._src.serialization import serialization

    names, real = [], serialization.async_deserialize

    async def spy(sharding, spec, *args, **kwargs):
        names.append(json.dumps(spec if isinstance(spec, dict) else spec.to_json()))
        return await real(sharding, spec, *args, **kwargs)

    monkeypatch.setattr(serialization, "async_deserialize", spy)
    return names


def test_loading_a_trained_model_reads_its_parameters_alone(trained, arrays_read):
    """What eval.py, generation and the server load: the newest step's parameters on another
    mesh, bit for bit a full restore's; no optimizer array is read, and about a third of the
    state's bytes are."""
    workdir, cfg = trained
    args = _args(workdir)
    cli.load_trained(args, cfg)  # once first: modules imported on first use read files too
    arrays_read.clear()
    start = _bytes_read()
    _, params, step = cli.load_trained(args, cfg)
    params_only, read = _bytes_read() - start, list(arrays_read)

    trainer = Trainer(cfg, device_mesh(1, 8))
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=5)
    arrays_read.clear()
    start = _bytes_read()
    full, _ = ckpt.restore(STEPS[-1], trainer.abstract_state())
    whole_state = _bytes_read() - start
    ckpt.close()

    assert step == STEPS[-1]
    assert len(read) == len(jax.tree.leaves(params)) and all('"params.' in r for r in read)
    assert any('"opt_state.' in r for r in arrays_read)  # the spy sees a full restore's
    assert params_only < 0.6 * whole_state, (params_only, whole_state)  # 1/3 plus metadata
    assert jax.tree.structure(params) == jax.tree.structure(full["params"])
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(full["params"]), strict=True):
        assert ours.sharding == theirs.sharding
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_step_never_saved_is_named_with_the_saved_ones(trained, tmp_path, capsys):
    workdir, cfg = trained
    with pytest.raises(ConfigError, match=r"no checkpoint at step 3 .*saved: 2, 4"):
        cli.load_trained(_args(workdir, "--step", "3"), cfg)
    argv = ["--checkpoint", str(workdir), "--to_hf", str(tmp_path), "--step", "3",
            "--step_timeout", "0"]  # fmt: skip
    assert convert.main(argv) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err


def test_loading_builds_no_optimizer(trained):
    """eval.py, generation and the server get the model's graph and layout alone."""
    workdir, cfg = trained
    sharded, params, _ = cli.load_trained(_args(workdir), cfg)
    assert not isinstance(sharded, Trainer) and not hasattr(sharded, "tx")
    assert jax.tree.structure(params) == jax.tree.structure(sharded.abstract_params())
