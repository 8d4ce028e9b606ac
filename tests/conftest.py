"""Every test runs on 8 faked CPU devices; meshes take subsets of them."""

from megajax import mesh

mesh.fake_cpu_devices(8)  # before anything initialises JAX's backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from megajax import config  # noqa: E402
from megajax.data import text  # noqa: E402


def device_mesh(data: int, model: int):
    """A (data, model) mesh over the first data * model faked devices."""
    return mesh.make(f"data={data},model={model}", devices=jax.devices()[: data * model])


def tiny_config(**model):
    """A model that compiles in seconds, with a vocabulary padded differently on each degree."""
    fields = dict(vocab_size=1100, seq_len=32, num_layers=2, hidden=64, num_heads=8)
    return config.replace(
        config.load("configs/gpt2_tiny.py"),
        model={**fields, **model},
        train=dict(batch_size=8, micro_batches=1),
    )


@pytest.fixture(scope="session")
def shakespeare_tokens():
    """GPT-2 token ids of the shipped tiny Shakespeare (training split)."""
    _, train, _ = text.load_tokens(config.DataConfig())
    return train


def real_batch(tokens: np.ndarray, *, step: int, batch_size: int, seq_len: int, vocab_size: int):
    """A batch of real text, with ids folded into a smaller test vocabulary."""
    x, y = text.batch(
        tokens, seed=0, step=step, rows=slice(None), batch_size=batch_size, seq_len=seq_len
    )
    return x % vocab_size, y % vocab_size
