"""Mesh flags: degrees, -1, device checks, and XLA_FLAGS kept."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megajax import mesh
from megajax.config import ConfigError


def test_minus_one_takes_the_remaining_devices():
    assert mesh.resolve(mesh.parse("data=-1,model=4"), 8) == (1, 2, 1, 1, 1, 4)
    assert mesh.resolve(mesh.parse("model=-1"), 8) == (1, 1, 1, 1, 1, 8)
    assert mesh.resolve(mesh.parse(""), 1) == (1, 1, 1, 1, 1, 1)
    assert mesh.resolve(mesh.parse("pipeline=2,data=-1,model=2"), 8) == (2, 2, 1, 1, 1, 2)
    assert mesh.resolve(mesh.parse("data=2,expert=-1,model=2"), 8) == (1, 2, 1, 2, 1, 2)
    assert mesh.resolve(mesh.parse("context=-1,model=2"), 8) == (1, 1, 1, 1, 4, 2)
    assert mesh.resolve(mesh.parse("data=2,fsdp=-1"), 8) == (1, 2, 4, 1, 1, 1)


def test_pipeline_axis_is_outermost_and_model_innermost():
    import jax

    m = mesh.make("pipeline=2,data=2,model=2", devices=jax.devices()[:8])
    assert m.axis_names == ("pipeline", "data", "fsdp", "expert", "context", "model")
    ids = np.vectorize(lambda d: d.id)(m.devices)
    assert ids[0, 0, 0, 0, 0].tolist() == [0, 1] and ids[1, 0, 0, 0, 0, 0] == 4  # model neighbours
    two_axis = mesh.make("data=2,model=4", devices=jax.devices()[:8])
    assert dict(two_axis.shape) == {
        "pipeline": 1, "data": 2, "fsdp": 1, "expert": 1, "context": 1, "model": 4
    }  # fmt: skip
    experts = np.vectorize(lambda d: d.id)(mesh.make("data=2,expert=2,model=2").devices)
    assert experts[0, :, 0, :, 0, 0].tolist() == [[0, 2], [4, 6]]  # expert inside data
    # context between expert and model: a context group's ranks are model groups apart
    context = np.vectorize(lambda d: d.id)(mesh.make("data=2,context=2,model=2").devices)
    assert context[0, 0, 0, 0, :, :].tolist() == [[0, 1], [2, 3]]
    # fsdp inside data, outside expert: an fsdp group's ranks are expert x context x model apart
    fsdp = np.vectorize(lambda d: d.id)(mesh.make("data=2,fsdp=2,model=2").devices)
    assert fsdp[0, :, :, 0, 0, 0].tolist() == [[0, 2], [4, 6]]


def test_mesh_that_does_not_match_the_devices_is_refused():
    with pytest.raises(ConfigError, match="needs 8 devices but 6 are present"):
        mesh.resolve(mesh.parse("data=2,model=4"), 6)
    with pytest.raises(ConfigError, match="needs 2 devices but 1 is present"):
        mesh.resolve(mesh.parse("data=2"), 1)
    with pytest.raises(ConfigError, match="do not divide"):
        mesh.resolve(mesh.parse("data=-1,model=3"), 8)
    with pytest.raises(ConfigError, match="at most one axis"):
        mesh.resolve(mesh.parse("data=-1,model=-1"), 8)


def test_cpu_devices_adds_to_existing_xla_flags():
    code = (
        "import os; os.environ['XLA_FLAGS'] = '--xla_dump_to=/tmp/x "
        "--xla_force_host_platform_device_count=2'\n"
        "from megajax import mesh; mesh.fake_cpu_devices(4)\n"
        "import jax; print(jax.device_count(), os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out[0] == "4"
    assert "--xla_dump_to=/tmp/x" in out and "--xla_force_host_platform_device_count=4" in out
