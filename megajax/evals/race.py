"""RACE accuracy of a multiple-choice BERT, overall and per level (middle, high)."""

from __future__ import annotations

import jax
import numpy as np

from megajax.data.samples import RaceQuestions
from megajax.evals import batched
from megajax.models import bert
from megajax.sharded_model import ShardedModel


def score(sharded: ShardedModel, params, questions: RaceQuestions, *, log=None) -> dict:
    """Predict each question's option (the highest score of its four [CLS] encodings) in
    batches sharded like training (batched.padded_batches: fillers are not counted). Returns
    accuracy, n, and accuracy_<level>, n_<level>."""
    n = len(questions)
    with sharded.context():
        scores = jax.jit(lambda p, b: bert.choice_logits(sharded.model(p), b))
    predictions = []
    for start, rows in batched.padded_batches(sharded, questions, log=log, label="questions"):
        with sharded.context():
            logits = scores(params, sharded.put_eval_batch(rows))
        # Every process needs every prediction to count them: (batch, options) is tiny.
        predictions += list(_gather(logits).argmax(-1)[: n - start])
    return _accuracies(questions.rows, predictions)


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def _accuracies(rows: list[dict], predictions: list[int]) -> dict:
    correct = np.array([p == r["answer"] for p, r in zip(predictions, rows, strict=True)])
    out = {"accuracy": float(correct.mean()), "n": len(rows)}
    for level in sorted({r["level"] for r in rows}):
        mine = np.array([r["level"] == level for r in rows])
        out[f"accuracy_{level}"] = float(correct[mine].mean())
        out[f"n_{level}"] = int(mine.sum())
    return out
