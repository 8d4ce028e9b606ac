"""Hugging Face Mixtral interoperability (GQA, 4 experts, top-2), proven against transformers'
MixtralForCausalLM: logits on one device and on an expert-parallel mesh, the router's
load-balancing loss, and an export that gives back the same tensors."""

import jax
import numpy as np
import pytest
import torch
from conftest import device_mesh, lm_logits
from transformers import MixtralConfig, MixtralForCausalLM

from megajax import config, mesh
from megajax.hf import weights as convert
from megajax.trainer import Trainer

SHAPE = dict(
    vocab_size=1003,  # odd: padded differently on each model degree
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    router_aux_loss_coef=0.02,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE))
    with torch.no_grad():  # norms start at 1 and routers near uniform: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (8, 32))


@pytest.fixture(scope="module")
def theirs(hf_dir, ids):
    """transformers' logits and router aux loss on `ids`."""
    model = MixtralForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), output_router_logits=True)
    return out.logits.numpy(), float(out.aux_loss)


def test_mixtral_config_round_trips(hf_dir):
    m = convert.with_hf_model(config.Config(), convert.HFWeights(hf_dir)).model
    assert (m.moe_experts, m.moe_top_k, m.moe_ffn_hidden, m.num_kv_heads) == (4, 2, 32, 2)
    assert m.moe_aux_loss == 0.02 and m.moe_router == "topk_softmax"
    back = MixtralConfig(**convert.hf_config(m))
    for key, value in SHAPE.items():
        assert getattr(back, key) == value, key


@pytest.mark.parametrize("text", ["data=1", "data=2,expert=2,model=2"])
def test_imported_mixtral_gives_transformers_logits_and_aux_loss(hf_dir, ids, theirs, text):
    weights = convert.HFWeights(hf_dir)
    cfg = convert.with_hf_model(config.Config(), weights)
    cfg = config.replace(cfg, train=dict(batch_size=len(ids)))
    n = 8 if "," in text else 1
    trainer = Trainer(cfg, mesh.make(text, devices=jax.devices()[:n]))
    params = convert.load_params(trainer, weights, log=lambda _: None)
    logits, aux = theirs
    ours = lm_logits(trainer, params, ids)
    np.testing.assert_allclose(ours, logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    with trainer.context():
        batch = trainer.put_eval_batch({"inputs": ids, "targets": ids})
        _, metrics = jax.jit(lambda p, b: trainer.loss(p, b, None))(params, batch)
    np.testing.assert_allclose(float(metrics["moe_aux_loss"]), aux, rtol=1e-5)


def test_exported_mixtral_gives_back_the_same_tensors(hf_dir, tmp_path):
    workdir = tmp_path / "imported"
    convert.import_hf(
        str(hf_dir), str(workdir), config.Config(), device_mesh(1, 1), log=lambda _: None
    )
    convert.export_hf(
        str(workdir), str(tmp_path / "back"), mesh.make("expert=4,model=2"), log=lambda _: None
    )
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    want = MixtralForCausalLM.from_pretrained(hf_dir).state_dict()
    assert ours.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # unequal lengths


def test_imported_mixtral_greedy_equals_transformers_on_an_expert_parallel_mesh(hf_dir):
    """Decoding through the KV cache on data=2,expert=2,model=2: the prompts (padded to the
    4 rows the batch splits into) route their tokens to experts on other shards."""
    from megajax import generate

    weights = convert.HFWeights(hf_dir)
    trainer = Trainer(
        convert.with_hf_model(config.Config(), weights), mesh.make("data=2,expert=2,model=2")
    )
    params = convert.load_params(trainer, weights, log=lambda _: None)
    out = generate.Generator(trainer, params)(PROMPTS, new_tokens=8, temperature=0.0)
    model = MixtralForCausalLM.from_pretrained(hf_dir).eval()
    for prompt, ours in zip(PROMPTS, out["tokens"], strict=True):
        ids = torch.tensor([prompt])
        theirs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].numpy()
        np.testing.assert_array_equal(ours, theirs)
