"""optim.grad_reduce="step" under both pipeline schedules (the schedule run manual over the
batch axes, each device on its own rows): the gradients' sums over `data` and `model` once per
step whatever the micro-batches, and the default path's model trained (tests/test_grad_reduce.py
holds the helpers and the unpipelined path)."""

import jax
import pytest
from test_grad_reduce import (
    _assert_same_training,
    _batch_reductions,
    _cfg,
    _counts,
    _model_gradient_sums,
    _parameter_elements,
    _train,
)

from megajax import config, mesh
from megajax.trainer import Trainer

PIPELINED = "pipeline=2,data=2,model=2"


def _pipelined(schedule, reduce, micro, distributed=False):
    cfg = _cfg("gpt-sp", reduce=reduce, micro=micro, distributed=distributed, num_layers=4)
    cfg = config.replace(cfg, train=dict(pipeline_schedule=schedule))
    trainer = Trainer(cfg, mesh.make(PIPELINED, devices=jax.devices()[:8]))
    return trainer, trainer.compile_train_step()[0]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelines_sum_over_data_once_and_train_the_default_paths_model(
    shakespeare_tokens, schedule
):
    """Under either pipeline schedule (run manual over the batch axes: each device runs its
    own rows through the schedule) the gradients are summed over `data` once per step at 4
    and 8 micro-batches, where the default path sums each tick's, and so are the sums over
    `model` of the norms and biases under sequence parallelism; with the distributed
    optimizer too, the losses and gradient norms of 3 steps (dropout on) and the parameters
    after them equal the default path's."""
    counts, model_sums = {}, {}
    for micro in (4, 8):
        trainer, step = _pipelined(schedule, "step", micro)
        counts[micro] = _counts(_batch_reductions(trainer, step))
        model_sums[micro] = _model_gradient_sums(trainer, step)["sums"]
    assert counts[4] == counts[8] and counts[4][0] <= 2, counts
    # The norms' and biases' copies (sequence parallelism) summed over `model` once too.
    assert model_sums[4] == model_sums[8], model_sums
    # At most each gradient once (XLA sums the position table's on each model shard's half
    # of it, which it gathers over `model` after).
    assert counts[8][1] <= _parameter_elements(trainer) + 2, counts
    default_trainer, default_step = _pipelined(schedule, "micro_batch", 4)
    assert _counts(_batch_reductions(default_trainer, default_step))[0] > 4 * counts[4][0]
    runs = {}
    for reduce, distributed in (("micro_batch", False), ("step", True)):
        runs[reduce] = _train(*_pipelined(schedule, reduce, 4, distributed), shakespeare_tokens)
    _assert_same_training(runs["step"], runs["micro_batch"])
