"""The 1F1B schedule (train.pipeline_schedule=1f1b, models/pipeline_1f1b.py): the one-stage
run's losses, plain and interleaved; the collective-permutes its arithmetic predicts; the head
run only under the last stage's branch; temporary memory that does not grow with the
micro-batches; clear refusals.

The model, batches and reference are tests/test_pipeline.py's: an 8-layer tiny model, 16
sequences of 32 tokens in 8 micro-batches, dropout on, 3 steps at the full learning rate, the
(data=2, model=4) mesh accumulating the same micro-batches one after another as reference.
"""

import jax
import numpy as np
import pytest
from test_pipeline import (  # noqa: F401 (batches: test_pipeline's fixture, used here too)
    BATCH,
    MICRO,
    REFERENCE,
    RTOL,
    STEPS,
    VOCAB,
    _config,
    _mesh,
    _train,
    batches,
)

from megajax import config, hlo, mesh, models, pipeline_arithmetic
from megajax.config import ConfigError
from megajax.plan import activations
from megajax.plan import compiled as plan_compiled
from megajax.trainer import Trainer

FSDP_MESH = "pipeline=2,fsdp=2,model=2"


def _1f1b(arch, repeats=1, **train):
    cfg = _config(arch, repeats)
    return config.replace(cfg, train=dict(pipeline_schedule="1f1b", **train))


# The Llama runs with the memory switches on (its reference too): sequence parallelism,
# selective recomputation inside the recomputed stage, the distributed optimizer.
SWITCHES = {
    "llama": dict(
        model=dict(sequence_parallel=True, remat="selective"), optim=dict(distributed=True)
    ),
}


@pytest.fixture(scope="module")
def compiled():
    """(trainer, compiled train step) per (arch, (pipeline, data, model, repeats), schedule)."""
    cache = {}

    def get(arch, layout, schedule="1f1b"):
        if (arch, layout, schedule) not in cache:
            cfg = config.replace(
                _config(arch, layout[3]),
                train=dict(pipeline_schedule=schedule),
                **SWITCHES.get(arch, {}),
            )
            trainer = Trainer(cfg, _mesh(*layout[:3]))
            cache[arch, layout, schedule] = trainer, trainer.compile_train_step()[0]
        return cache[arch, layout, schedule]

    return get


# Both meshes, v = 1 and 2, GPT-2 and the Llama (grouped-query attention, RoPE, SwiGLU, untied
# head; SWITCHES) in two cases; BERT's pieces (its pooler and binary head on the last stage) in
# a third.
CASES = [
    pytest.param("gpt", (2, 2, 2, 1), id="gpt-2x2x2-v1"),
    pytest.param("llama", (4, 1, 2, 2), id="llama-4x1x2-v2", marks=pytest.mark.slow),
    pytest.param("bert", (4, 1, 2, 1), id="bert-4x1x2-v1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,layout", CASES)
def test_losses_equal_the_one_stage_run(compiled, batches, arch, layout):  # noqa: F811 (the imported fixture)
    _, reference = _train(*compiled(arch, REFERENCE, "gpipe"), batches[arch])
    trainer, step_fn = compiled(arch, layout)
    _, losses = _train(trainer, step_fn, batches[arch])
    np.testing.assert_allclose(losses, reference, rtol=RTOL)


def test_fsdp_inside_the_stages_equals_the_one_stage_run(compiled, batches):  # noqa: F811
    """fsdp=2 inside each stage: each layer's weights gathered just in time in the stage's
    forward and again in its recomputed backward, on every tick; the one-stage run's
    losses."""
    trainer = Trainer(_1f1b("gpt"), mesh.make(FSDP_MESH, devices=jax.devices()[:8]))
    step_fn = trainer.compile_train_step()[0]
    p, m = trainer.schedule.stages, MICRO
    per_tick = trainer.cfg.model.num_layers // p * pipeline_arithmetic.ticks(p, 1, m, "1f1b")
    gathers = [
        c
        for c in hlo.collectives(step_fn.as_text(), dict(trainer.mesh.shape))
        if c.kind == "all-gather" and c.axes == ("fsdp",) and c.runs == per_tick
    ]
    layer_weights = len(jax.tree.leaves(trainer.abstract_state()["params"]["h"]))
    assert len(gathers) >= 2 * layer_weights, (len(gathers), layer_weights)
    _, losses = _train(trainer, step_fn, batches["gpt"])
    _, reference = _train(*compiled("gpt", REFERENCE, "gpipe"), batches["gpt"])
    np.testing.assert_allclose(losses, reference, rtol=RTOL)


@pytest.mark.parametrize(
    "arch,layout",
    [
        pytest.param("gpt", (2, 2, 2, 1), id="2x2x2-v1"),
        pytest.param("llama", (4, 1, 2, 2), id="4x1x2-v2", marks=pytest.mark.slow),
    ],
)
def test_permutes_over_pipeline_are_the_arithmetics(compiled, arch, layout):
    """Two activation-sized collective-permutes per tick (outputs on, cotangents back), of
    one micro-batch's share (its length split over `model` too with sequence parallelism)."""
    trainer, step_fn = compiled(arch, layout)
    p, d, _, v = layout
    found = hlo.collectives(step_fn.as_text(), dict(trainer.mesh.shape))
    over_pipeline = [c for c in found if c.kind == "collective-permute" and "pipeline" in c.axes]
    m = trainer.cfg.model
    length = m.seq_len // (layout[2] if m.sequence_parallel else 1)  # split over `model`
    share = (BATCH // MICRO // d, length, m.hidden)
    assert over_pipeline and all(c.shapes == (share,) for c in over_pipeline)
    runs = sum(c.runs for c in over_pipeline)
    assert (
        runs
        == pipeline_arithmetic.transfers(p, v, MICRO, "1f1b")
        == 2 * (v * MICRO + v * p + p - 2)
    )


def test_head_runs_only_inside_the_last_stages_branch(compiled):
    """Every matmul with the vocabulary (the logits and the head's weight gradient) sits in a
    conditional's branch, and the logits are one micro-batch's: GPipe's run unconditionally on
    every stage, over all micro-batches at once."""
    for schedule, rows, in_branch in (
        ("1f1b", BATCH // MICRO // 2, True),
        ("gpipe", BATCH // 2, False),
    ):
        trainer, step_fn = compiled("gpt", (2, 2, 2, 1), schedule)
        vocab_rows = trainer.padded_vocab // trainer.mesh.shape["model"]
        found = [(s, b) for s, b in hlo.dots(step_fn.as_text()) if vocab_rows in s]
        logits = (rows * trainer.cfg.model.seq_len, vocab_rows)
        assert logits in [s for s, _ in found], (schedule, found)
        assert all(b == in_branch for _, b in found), (schedule, found)


def test_dry_run_counts_the_compiled_transfers_and_a_flat_memory(compiled):
    """The dry run's pipeline figures (megajax/plan/) for the compiled 1F1B step: the
    collective-permutes it predicts are those compiled, and its activation estimate does not
    grow with m where GPipe's does."""
    trainer, step_fn = compiled("gpt", (2, 2, 2, 1))
    found = hlo.collectives(step_fn.as_text(), dict(trainer.mesh.shape))
    summary = plan_compiled.pipeline_summary(trainer.cfg, stages=2, data=2, model=2, found=found)
    assert summary["schedule"] == "1f1b" and summary["in_flight_micro_batches"] == 3
    assert summary["transfers_compiled"] == summary["transfers"] == 20
    assert summary["transfer_bytes_compiled"] == summary["transfer_bytes"]  # float32 here

    def estimate(schedule, micro):
        return activations.pipelined_activation_bytes(
            trainer.cfg.model, batch=1, model_degree=2, stages=2, repeats=1, micro=micro,
            schedule=schedule,
        )["total"]  # fmt: skip

    assert estimate("1f1b", 2) == estimate("1f1b", 8) < estimate("gpipe", 2) < estimate("gpipe", 8)


def test_temporary_memory_is_flat_in_the_micro_batches(compiled):
    """Compiled temporaries at m = P, 2P, 4P (one sequence per micro-batch and device): equal
    under 1F1B (its ring of 2P - 1 stage inputs does not depend on m)."""
    _, at_4p = compiled("gpt", (2, 2, 2, 1))  # m = 8 = 4P
    sizes = [at_4p.memory_analysis().temp_size_in_bytes]
    for m in (2, 4):
        cfg = _1f1b("gpt", micro_batches=m, batch_size=2 * m)
        sizes.append(Trainer(cfg, _mesh(2, 2, 2)).compile_train_step()[0])
        sizes[-1] = sizes[-1].memory_analysis().temp_size_in_bytes
    assert sizes[0] == sizes[1] == sizes[2], sizes


def test_what_1f1b_does_not_run_is_refused():
    with pytest.raises(ConfigError, match="pipeline_schedule='zb'"):
        config.replace(_config("gpt"), train=dict(pipeline_schedule="zb"))
    with pytest.raises(ConfigError, match="not a multiple of the 4 pipeline stages"):
        Trainer(_1f1b("gpt", 2, micro_batches=6, batch_size=12), _mesh(4, 1, 2))
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        models.pieces(config.replace(_config("gpt"), model=dict(moe_experts=4)).model)
    with pytest.raises(ConfigError, match="arch=bert_multiple_choice"):
        models.pieces(
            config.replace(_config("bert"), model=dict(arch="bert_multiple_choice")).model
        )


def test_schedule_arithmetic():
    a = pipeline_arithmetic
    assert a.ticks(4, 1, 8, "1f1b") == 14 and a.ticks(4, 2, 8, "1f1b") == 26
    assert a.transfers(2, 1, 8, "1f1b") == 20 and a.transfers(1, 1, 8, "1f1b") == 0
    # Stage inputs kept: GPipe's grow with m, 1F1B's do not.
    assert [a.saved_inputs(4, 1, m) for m in (4, 8, 16)] == [7, 11, 19]
    assert [a.saved_inputs(4, 1, m, "1f1b") for m in (4, 8, 16)] == [7, 7, 7]
    assert a.saved_inputs(4, 2, 16, "1f1b") == 15
