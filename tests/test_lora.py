"""LoRA (lora.rank > 0): adapters laid out by the plan add no collective to the base plan's, the
base weights are frozen (no gradient, no optimizer state), fresh adapters leave the model as it
was, and the trained adapters leave megajax both merged into the weights and as a PEFT adapter
directory, each giving transformers (and peft) the megajax logits.

One LoRA train step on 2 x 4 is compiled once (`step_2x4`) for the audit, the losses and the
state; the export tests share one imported Llama and one GPT-2 with random adapters.
"""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import device_mesh, llama_config, lm_logits, real_batch
from test_collectives import (
    test_cross_entropy_reduces_only_token_sized_tensors as _cross_entropy_reduces_token_sized,
)
from test_collectives import (
    test_two_allreduces_per_layer_forward_and_two_backward as _two_allreduces_per_layer,
)
from test_plan import _check_against_compiled
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from megajax import config, finetune, hlo, lora
from megajax.checkpoint import Checkpointer
from megajax.config import ConfigError
from megajax.hf import weights as convert
from megajax.plan.compiled import make_plan
from megajax.sharded_model import ShardedModel
from megajax.trainer import Trainer

DATA, MODEL = 2, 4
STEPS = 5
LORA = dict(rank=4, alpha=8.0, dropout=0.1)


def _cfg(**lora_fields):
    """A Llama (grouped-query attention whose kv weight 2 x 4 splits by rows) with dropout on,
    its LoRA adapters' too, and a learning rate that moves them in a few steps."""
    return config.replace(
        llama_config(dropout=0.1),
        lora={**LORA, **lora_fields},
        optim=dict(lr=1e-2, warmup_steps=0),
    )


LORAC = config.LoRAConfig(**LORA)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of abstract arrays."""
    return sum(
        x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape)))
        for x in jax.tree.leaves(tree)
    )


@pytest.fixture(scope="module")
def step_2x4():
    """(cfg, trainer, compiled train step, its collectives) of the LoRA step on 2 x 4."""
    cfg = _cfg()
    trainer = Trainer(cfg, device_mesh(DATA, MODEL))
    compiled, _ = trainer.compile_train_step()
    return cfg, trainer, compiled, hlo.collectives(compiled.as_text(), {"data": 2, "model": 4})


def _adapter_shard_shapes(trainer) -> set:
    """Each adapter factor's per-device shape, whole and per layer, on both orientations."""
    adapters = trainer.split(trainer.abstract_state()["params"])[0]
    shapes = set()
    for x in jax.tree.leaves(adapters):
        local = x.sharding.shard_shape(x.shape)
        shapes |= {local, local[1:], local[1:][::-1]}
    return shapes


def test_config_names_the_targets():
    assert config.LoRAConfig(targets="qkv, fc2").target_names == ("qkv", "fc2")
    with pytest.raises(ConfigError, match="lora.targets='qkv,mlp'"):
        config.LoRAConfig(targets="qkv,mlp")
    cfg = config.override(config.Config(), ["lora.rank=16", "lora.targets=proj"])
    assert (cfg.lora.rank, cfg.lora.targets) == (16, "proj")


# --- the plan: no collective beyond the base layer's ----------------------------------------


def test_lora_step_has_the_base_plans_model_allreduces(step_2x4):
    """2 forward + 2 backward (b, s, h) all-reduces over `model` per layer, the embedding's and
    the head's, the cross-entropy's three: the base plan's (tests/test_collectives.py), with
    adapters on every projection of the layer."""
    cfg, trainer, _, found = step_2x4
    _two_allreduces_per_layer((cfg, trainer, found))
    _cross_entropy_reduces_token_sized((cfg, trainer, found))


def test_lora_step_gathers_only_the_base_plans_kv_weight(step_2x4):
    """The kv weight split by rows is gathered, as the base plan does; the adapters gather
    nothing and, their base frozen, nothing is reduce-scattered (the base plan's kv gradient)."""
    cfg, _, _, found = step_2x4
    m = cfg.model
    others = [(c.kind, c.shapes, c.runs) for c in found if c.kind != "all-reduce"]
    assert others == [("all-gather", ((m.hidden, 2 * m.kv_heads * m.head_dim),), m.num_layers)]


def test_gradients_are_reduced_for_the_adapters_alone(step_2x4):
    """Every all-reduce over `data` carries adapter gradients (the base weights have none): the
    factors split over `model` over `data`, those whole on every model shard (A of QKV and
    fc1, B of the attention output and fc2) over `data` and `model` in the same collective."""
    cfg, trainer, _, found = step_2x4
    # and the q and kv adapters' A side by side (attention.Attention: one matmul)
    adapters = _adapter_shard_shapes(trainer) | {(cfg.model.hidden, 2 * cfg.lora.rank)}
    gradients = [c for c in found if "data" in c.axes]
    assert {c.axes for c in gradients} == {("data",), ("data", "model")}
    for c in gradients:
        for shape in c.shapes:
            squeezed = tuple(d for d in shape if d != 1)
            assert squeezed == () or shape in adapters or squeezed in adapters, (c.axes, shape)


def test_base_weights_have_no_gradient_and_no_optimizer_state(step_2x4):
    cfg, trainer, compiled, _ = step_2x4
    state = trainer.abstract_state()
    adapters, frozen = trainer.split(state["params"])
    with trainer.context():
        grads = jax.eval_shape(trainer.gradients, state, trainer.abstract_batch(micro=True))[1]
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    # Adam's two float32 moments of each adapter factor, and two step counts: nothing else.
    n = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"])) == 8 * n + 8
    assert n < 0.1 * sum(x.size for x in jax.tree.leaves(frozen))
    # The compiled step takes the float32 weights, the adapters' moments and the batch.
    batch = trainer.abstract_batch(micro=True)
    expected = sum(_per_device_bytes(t) for t in (state, batch))
    assert compiled.memory_analysis().argument_size_in_bytes == expected


# --- the numbers -----------------------------------------------------------------------------


def test_fresh_adapters_give_the_base_logits():
    """B = 0 (A random): the adapted model's logits are the plain model's, on 2 x 4 (the kv
    adapter's B then whole on every shard, each taking its head's columns)."""
    cfg = _cfg()
    plain = ShardedModel(config.replace(cfg, lora=dict(rank=0)), device_mesh(DATA, MODEL))
    adapted = ShardedModel(cfg, device_mesh(DATA, MODEL))
    base, params = plain.fresh_params(), adapted.fresh_params()
    a = jax.device_get(params["h"]["attn"]["q"]["lora"]["a"])
    assert np.abs(a).max() > 0 and not np.any(
        jax.device_get(params["h"]["mlp"]["fc2"]["lora"]["b"])
    )
    ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, cfg.model.seq_len))
    np.testing.assert_array_equal(lm_logits(adapted, params, ids), lm_logits(plain, base, ids))


@pytest.fixture(scope="module")
def runs(step_2x4, shakespeare_tokens):
    """(metrics, state before, state after) of STEPS steps on 2 x 4 and on 1 x 1."""
    cfg, trainer_2x4, compiled_2x4, _ = step_2x4
    m = cfg.model
    shape = dict(batch_size=cfg.train.batch_size, seq_len=m.seq_len, vocab_size=m.vocab_size)
    batches = [real_batch(shakespeare_tokens, step=i, **shape) for i in range(STEPS)]
    out = {}
    for mesh, trainer in (((2, 4), trainer_2x4), ((1, 1), Trainer(cfg, device_mesh(1, 1)))):
        step_fn = compiled_2x4 if mesh == (2, 4) else trainer.compile_train_step()[0]
        state = trainer.init_state()
        before = jax.device_get(state["params"])
        metrics = []
        for x, y in batches:
            state, met = step_fn(state, trainer.put_batch({"inputs": x, "targets": y}))
            metrics.append({k: float(v) for k, v in met.items() if k in ("loss", "grad_norm")})
        out[mesh] = metrics, before, jax.device_get(state["params"])
    return out


def test_lora_losses_identical_on_2x4_and_1x1(runs):
    (ours, _, after), (reference, _, after_1x1) = runs[(2, 4)], runs[(1, 1)]
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=f"step {step} {k}")
    adapters, adapters_1x1 = lora.split(after, LORAC), lora.split(after_1x1, LORAC)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 adapters[0], adapters_1x1[0])  # fmt: skip
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_training_moves_the_adapters_and_leaves_the_base_bit_for_bit(runs):
    _, before, after = runs[(2, 4)]
    (trained_before, frozen_before), (trained_after, frozen_after) = (
        lora.split(before, LORAC), lora.split(after, LORAC)
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    assert not np.any(trained_before["h"]["mlp"]["fc2"]["lora"]["b"])  # B starts at zero
    assert np.abs(trained_after["h"]["mlp"]["fc2"]["lora"]["b"]).max() > 1e-3


# --- the dry run ------------------------------------------------------------------------------


def test_dry_run_counts_frozen_weights_without_gradients_or_moments():
    """The analytic memory of a LoRA step (float32 weights; gradients, update and moments of
    the adapters alone) equals the compiled program's arguments byte for byte and its
    temporaries within the dry run's tolerance."""
    cfg = config.replace(_cfg(dropout=0.0), train=dict(micro_batches=2))
    p = make_plan(cfg, device_mesh(DATA, MODEL))
    _check_against_compiled(p)
    full = estimates_of(config.replace(cfg, lora=dict(rank=0)))
    lora_est = estimates_of(cfg)
    assert lora_est.optimizer < 0.1 * full.optimizer
    assert lora_est.weights == full.weights + lora_est.update  # the base's, plus the adapters
    assert lora_est.update < 0.1 * full.update  # an update (and gradients) of the adapters alone
    assert p["params"]["trainable_per_device"] < 0.1 * p["params"]["per_device"]


def estimates_of(cfg):
    from megajax.plan.estimates import estimate_memory

    return estimate_memory(cfg, data_degree=DATA, model_degree=MODEL)


# --- export: merged, and as a PEFT adapter ----------------------------------------------------

LLAMA = dict(vocab_size=1003, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
GPT2 = dict(vocab_size=1003, n_embd=64, n_layer=2, n_head=4, n_positions=32)


def _save(kind: str, path):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    else:
        model = GPT2LMHeadModel(GPT2Config(**GPT2, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(path)
    return path


# GPT-2 with adapters on c_attn and the MLP's c_proj only: its attention output is also named
# c_proj, so the adapter's target_modules must tell them apart.
TARGETS = {"llama": "qkv,proj,fc1,fc2", "gpt2": "qkv,fc2"}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lora_run(request, tmp_path_factory):
    """(kind, Hugging Face base directory, megajax LoRA work directory with random adapters
    at step 0, its logits on ids, ids)."""
    kind = request.param
    hf_dir = _save(kind, tmp_path_factory.mktemp(f"{kind}-base"))
    workdir = tmp_path_factory.mktemp(f"{kind}-lora")
    weights = convert.HFWeights(hf_dir)
    cfg = config.replace(config.Config(), lora=dict(rank=4, alpha=8.0, targets=TARGETS[kind]))
    cfg = convert.with_hf_model(cfg, weights)
    trainer = Trainer(cfg, device_mesh(DATA, MODEL))
    params = convert.load_params(trainer, weights, log=lambda _: None)
    adapters, frozen = trainer.split(params)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree.map(
        lambda x: jax.device_put(0.3 * jax.random.normal(next(keys), x.shape), x.sharding),
        adapters,
    )
    params = lora.join(adapters, frozen)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=1)
    ckpt.save(0, trainer.state_from_params(params), {"step": 0}, force=True)
    ckpt.close()
    ids = np.random.default_rng(0).integers(0, 1003, (8, 32))
    return kind, hf_dir, workdir, lm_logits(trainer, params, ids), ids


def _hf_model(kind, path):
    cls = LlamaForCausalLM if kind == "llama" else GPT2LMHeadModel
    return cls.from_pretrained(path).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _close(ours, theirs):
    """float32 rounding: x W + s (x A) B against x (W + s A B), adapters of scale 0.3 (a wrong
    scale or a misplaced column moves logits by more than 0.1)."""
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=5e-5 * np.abs(theirs).max())


def test_merged_export_gives_transformers_the_megajax_logits(lora_run, tmp_path):
    kind, hf_dir, workdir, ours, ids = lora_run
    convert.export_hf(str(workdir), str(tmp_path), device_mesh(4, 2), log=lambda _: None)
    theirs = _logits(_hf_model(kind, tmp_path), ids)
    _close(ours, theirs)
    assert np.abs(theirs - _logits(_hf_model(kind, hf_dir), ids)).max() > 0.1  # it moved


def test_peft_adapter_on_the_base_gives_the_megajax_logits(lora_run, tmp_path):
    """peft.PeftModel.from_pretrained on the base transformers saved: the fused adapters
    (Llama's q | k | v and gate | up, k | v under grouped-query attention) are per-module ones
    sharing A, their B split by the fused layout's columns."""
    from peft import PeftModel

    kind, hf_dir, workdir, ours, ids = lora_run
    convert.export_hf(str(workdir), str(tmp_path), device_mesh(2, 4), lora_adapter=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    if kind == "llama":
        modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    else:
        modules = ["attn.c_attn", "mlp.c_proj"]
    assert sorted(written["target_modules"]) == sorted(modules)
    model = PeftModel.from_pretrained(_hf_model(kind, hf_dir), tmp_path).eval()
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert len(lora_a) == 2 * len(modules)
    if kind == "llama":  # k and v share the kv adapter's A
        k, v = (lora_a[f"base_model.model.model.layers.1.self_attn.{m}_proj.lora_A.default.weight"]
                for m in "kv")  # fmt: skip
        torch.testing.assert_close(k, v, rtol=0, atol=0)
    _close(ours, _logits(model, ids))


@pytest.mark.parametrize("lora_run", ["llama"], indirect=True)  # one family suffices
def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run):
    """--init_from: full fine-tuning starts from what the LoRA run computes; a new LoRA run
    from the same weights with fresh adapters (B = 0), on another mesh."""
    _, _, workdir, ours, ids = lora_run
    cfg = finetune.with_run_model(config.Config(), workdir)
    assert (cfg.model.num_kv_heads, cfg.model.mlp, cfg.lora.rank) == (4, "swiglu", 0)
    full = ShardedModel(cfg, device_mesh(1, 8))
    _close(lm_logits(full, finetune.params_from_run(full, workdir, log=lambda _: None), ids), ours)
    again = ShardedModel(config.replace(cfg, lora=dict(rank=2)), device_mesh(1, 8))
    params = finetune.params_from_run(again, workdir, log=lambda _: None)
    assert not np.any(jax.device_get(params["h"]["attn"]["q"]["lora"]["b"]))
    _close(lm_logits(again, params, ids), ours)


def test_train_refuses_two_starting_points(tmp_path, capsys):
    import train

    argv = ["--config", "configs/llama_sft.py", "--hf_checkpoint", "x", "--init_from", "y"]
    assert train.main(argv + ["--workdir", str(tmp_path)]) == 2
    assert "pass one" in capsys.readouterr().err


def test_sft_config_is_lora_on_chat():
    cfg = config.load("configs/llama_sft.py")
    assert cfg.lora.rank > 0 and cfg.data.format == "chat"
    assert config.override(cfg, ["lora.rank=0"]).lora.rank == 0  # full fine-tuning
