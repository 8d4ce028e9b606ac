"""Language-model batches from one local text file: random windows, reproducible from the step.

A batch is a pure function of (seed, step, split), so a resumed run sees exactly the batches it
would have seen, and every process can build its own rows of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megajax.config import ConfigError, DataConfig
from megajax.data.tokenizer import CharTokenizer, GPT2Tokenizer


def load_tokens(cfg: DataConfig):
    """(tokenizer, train ids, validation ids) of cfg.source; the last val_fraction is validation."""
    path = Path(cfg.source)
    if not path.is_file():
        raise ConfigError(f"data.source: {path} not found (a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"data.source: {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if cfg.tokenizer == "gpt2":
        tokenizer = GPT2Tokenizer(cfg.vocab_dir)
    elif cfg.tokenizer == "char":
        tokenizer = CharTokenizer(text)
    else:
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}: use 'gpt2' or 'char'")
    n = len(text)
    cut = int(n * (1 - cfg.val_fraction))
    train = np.asarray(tokenizer.encode(text[:cut]), np.int32)
    val = np.asarray(tokenizer.encode(text[cut:]), np.int32)
    return tokenizer, train, val


def batch(tokens: np.ndarray, *, seed: int, step: int, rows, batch_size: int, seq_len: int):
    """Rows `rows` (a slice or indices) of the global batch of `step`: (inputs, targets), each
    (number of rows, seq_len). Only the requested windows are read."""
    if len(tokens) <= seq_len + 1:
        raise ConfigError(
            f"the text has {len(tokens)} tokens, too few for windows of {seq_len + 1}: "
            f"use a longer data.source or a smaller model.seq_len"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)[rows]
    windows = np.stack([tokens[i : i + seq_len + 1] for i in starts])
    return windows[:, :-1], windows[:, 1:]
