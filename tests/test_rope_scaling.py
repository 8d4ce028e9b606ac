"""RoPE stretched past the trained context (model.rope_scaling: Llama 3.1's "llama3" and
YaRN), proven against transformers' LlamaForCausalLM: tiny Llamas trained (nominally) at 16
positions and run at 64, where the scaling changes every logit."""

import jax
import numpy as np
import pytest
import torch
from conftest import device_mesh, lm_logits
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megajax import config, generate, rope
from megajax.config import ConfigError
from megajax.hf import families
from megajax.hf import weights as convert  # the conversion, without its command line
from megajax.trainer import Trainer

SHAPE = dict(
    vocab_size=1003,
    hidden_size=128,  # head_dim 16: 8 frequencies, spread across YaRN's ramp
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
ORIGINAL = 16  # the context the scaling stretches: every test runs past it
# transformers 5's rope_parameters for each type; YaRN with its own betas and an untruncated
# ramp, so that more of its fields are read than the defaults.
SCALINGS = {
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=ORIGINAL),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=16.0,
                 beta_slow=1.0, truncate=False, original_max_position_embeddings=ORIGINAL),
}  # fmt: skip
LENGTH = 64


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A random LlamaForCausalLM saved by transformers for each scaling, the same weights."""
    dirs = {}
    for kind, rope_parameters in SCALINGS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=dict(rope_parameters)))
        with torch.no_grad():  # norms start at 1: make them count
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(1.0, 0.1)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (8, LENGTH))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits.numpy()


def _imported(path, data, model):
    weights = convert.HFWeights(path)
    trainer = Trainer(convert.with_hf_model(config.Config(), weights), device_mesh(data, model))
    return trainer, convert.load_params(trainer, weights, log=lambda _: None)


@pytest.mark.parametrize("kind,mesh", [("llama3", (2, 4)), ("yarn", (1, 8))])
def test_imported_scaled_llama_gives_transformers_logits_past_the_original_context(
    hf_dirs, ids, kind, mesh
):
    """On 2 x 4 the 4 key/value heads are split by heads, on 1 x 8 by rows; 64 positions, four
    times the 16 the scaling starts from. The same weights with the plain RoPE give other
    logits, so the scaling is what is compared."""
    trainer, params = _imported(hf_dirs[kind], *mesh)
    assert trainer.cfg.model.rope_scaling.type == kind
    ours = lm_logits(trainer, params, ids)
    theirs = _hf_logits(LlamaForCausalLM.from_pretrained(hf_dirs[kind]), ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())

    plain_config = LlamaConfig(**SHAPE, rope_theta=SCALINGS[kind]["rope_theta"])
    plain = LlamaForCausalLM(plain_config)
    plain.load_state_dict(LlamaForCausalLM.from_pretrained(hf_dirs[kind]).state_dict())
    unscaled = _hf_logits(plain, ids)
    assert np.abs(ours - unscaled).max() > 100 * 1e-5 * np.abs(theirs).max()


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_frequencies_and_attention_factor_equal_transformers(kind):
    """Llama 3.1's own numbers (head_dim 128, 8,192 stretched 8 times) and YaRN's with
    DeepSeek's mscale pair, beside the test models' (head_dim 16)."""
    cases = [(16, 64, SCALINGS[kind])]
    if kind == "llama3":
        big = dict(SCALINGS[kind], factor=8.0, original_max_position_embeddings=8192)
    else:
        big = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, mscale=1.0,
                   mscale_all_dim=0.707, original_max_position_embeddings=4096)  # fmt: skip
    cases.append((128, 131072, big))
    for head_dim, positions, rope_parameters in cases:
        hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                         max_position_embeddings=positions,
                         rope_parameters=dict(rope_parameters))  # fmt: skip
        theirs, their_factor = ROPE_INIT_FUNCTIONS[kind](hf)
        cfg = families.model_config(hf.to_dict())
        ours, factor = rope.frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6, atol=0)
        assert factor == pytest.approx(their_factor, rel=1e-12)
        plain, _ = rope.frequencies(head_dim, cfg.rope_theta)
        assert not np.allclose(np.asarray(ours), np.asarray(plain))
        assert (factor != 1.0) == (kind == "yarn")


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_exported_config_round_trips_the_scaling(hf_dirs, kind):
    """config.json -> megajax -> config.json: transformers reads back the same rope_parameters
    (as rope_parameters and, for older transformers, rope_scaling), and the old format with
    "type" and a top-level rope_theta imports alike."""
    saved = LlamaConfig.from_pretrained(hf_dirs[kind])
    cfg = convert.with_hf_model(config.Config(), convert.HFWeights(hf_dirs[kind])).model
    exported = families.hf_config(cfg)
    assert exported["rope_scaling"] == {
        k: v for k, v in exported["rope_parameters"].items() if k != "rope_theta"
    }
    back = LlamaConfig(**exported)
    assert back.rope_parameters == saved.rope_parameters
    assert back.max_position_embeddings == LENGTH
    theirs, factor = ROPE_INIT_FUNCTIONS[kind](saved)
    again, again_factor = ROPE_INIT_FUNCTIONS[kind](back)
    torch.testing.assert_close(again, theirs, rtol=0, atol=0)
    assert again_factor == factor

    old = {k: v for k, v in SCALINGS[kind].items() if k not in ("rope_type", "rope_theta")}
    older = {**SHAPE, "model_type": "llama", "rope_theta": SCALINGS[kind]["rope_theta"],
             "rope_scaling": {"type": kind, **old}}  # fmt: skip
    assert families.model_config(older) == cfg


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_a_scaled_llama_imported_and_exported_gives_the_same_logits(hf_dirs, ids, kind, tmp_path):
    """python -m megajax.convert --hf, then --to_hf: the exported directory loads in
    transformers with the scaling and the logits it was imported with."""
    convert.import_hf(str(hf_dirs[kind]), str(tmp_path / "run"), config.Config(),
                      device_mesh(1, 1), log=lambda _: None)  # fmt: skip
    convert.export_hf(str(tmp_path / "run"), str(tmp_path / "back"), device_mesh(2, 4),
                      log=lambda _: None)  # fmt: skip
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.rope_parameters == LlamaConfig.from_pretrained(hf_dirs[kind]).rope_parameters
    original = LlamaForCausalLM.from_pretrained(hf_dirs[kind])
    np.testing.assert_array_equal(_hf_logits(back, ids), _hf_logits(original, ids))


def test_an_unscaled_llama_exports_as_before():
    llama = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    exported = families.hf_config(config.replace(config.Config(), model=llama).model)
    assert exported["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert "rope_scaling" not in exported


def test_a_rope_scaling_set_on_the_command_line_applies_over_the_checkpoints(hf_dirs):
    """--set model.rope_scaling.* stretches an imported Llama further (what a context
    extension fine-tunes): the checkpoint's other fields stay."""
    sets = ["model.rope_scaling.factor=8", "model.positions=rope"]
    cfg = config.override(config.Config(), sets)
    weights = convert.HFWeights(hf_dirs["llama3"])
    scaling = convert.with_hf_model(cfg, weights, overrides=sets).model.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_position_embeddings) == (
        "llama3", 8.0, ORIGINAL
    )  # fmt: skip


PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # unequal lengths
NEW = 24  # 11 + 24 tokens: past the 16 positions of the original context, within the 64


def test_scaled_generation_equals_recompute_and_transformers(hf_dirs):
    """YaRN (its attention factor on cos and sin) on 2 x 4: greedy tokens from the KV cache,
    keys turned once at their positions, equal the whole sequence recomputed for each token,
    and transformers' generate."""
    trainer, params = _imported(hf_dirs["yarn"], 2, 4)
    out = generate.Generator(trainer, params)(PROMPTS, new_tokens=NEW, temperature=0.0)

    vocab = trainer.cfg.model.vocab_size
    with trainer.context():
        predict = jax.jit(lambda p, x: (lambda m: m(x) @ m.lm_head.T)(trainer.model(p)))
        seqs = [list(p) for p in PROMPTS]
        for _ in range(NEW):
            rows = trainer.cfg.train.batch_size  # an eval batch's; right-padded: causal, harmless
            x = np.zeros((rows, LENGTH), np.int32)
            for i, s in enumerate(seqs):
                x[i, : len(s)] = s
            batch = trainer.put_eval_batch({"inputs": x, "targets": x})
            logits = np.asarray(predict(params, batch["inputs"]))[..., :vocab]
            for i, s in enumerate(seqs):
                s.append(int(logits[i, len(s) - 1].argmax()))
    np.testing.assert_array_equal(out["tokens"], [s[-NEW:] for s in seqs])

    model = LlamaForCausalLM.from_pretrained(hf_dirs["yarn"]).eval()
    for prompt, ours in zip(PROMPTS, out["tokens"], strict=True):
        prompt_ids = torch.tensor([prompt])
        theirs = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].numpy()  # fmt: skip
        np.testing.assert_array_equal(ours, theirs)


LLAMA3 = ["model.positions=rope", "model.rope_scaling.type=llama3",
          "model.rope_scaling.original_max_position_embeddings=8192"]  # fmt: skip


def test_related_fields_may_be_set_in_any_order():
    """The type set before the context it needs, or (reversed) before positions=rope: the
    values are checked once all are set."""
    for sets in (LLAMA3, LLAMA3[::-1]):
        scaling = config.override(config.Config(), sets).model.rope_scaling
        assert (scaling.type, scaling.original_max_position_embeddings) == ("llama3", 8192)


@pytest.mark.parametrize(
    "assignments,message",
    [
        (["model.rope_scaling.factor=0.5"], "model.rope_scaling.factor=0.5: must be >= 1"),
        (["model.rope_scaling.type=linear"],
         "model.rope_scaling.type='linear': use one of none, llama3, yarn"),
        (["model.rope_scaling.beta_slow=0"], "model.rope_scaling.beta_slow=0.0: must be > 0"),
        (["model.rope_scaling.mscale=-1"], "model.rope_scaling.mscale=-1.0: must be >= 0"),
        (LLAMA3[1:], "model.rope_scaling.type=llama3 scales RoPE: it needs model.positions=rope, "
                     "not learned"),
        (LLAMA3[:2], "model.rope_scaling.original_max_position_embeddings=0: a llama3 RoPE needs "
                     "the context the model was trained at, >= 1"),
        ([*LLAMA3, "model.rope_scaling.high_freq_factor=1"],
         "model.rope_scaling.high_freq_factor=1: must be > low_freq_factor=1"),
        ([*LLAMA3, "model.rope_scaling.type=yarn", "model.rope_scaling.beta_fast=0.5"],
         "model.rope_scaling.beta_fast=0.5: must be >= beta_slow=1"),
        (["model.rope_scaling.beta=3"], "unknown config key 'model.rope_scaling.beta': "
         "model.rope_scaling has ['attention_factor', 'beta_fast', 'beta_slow', 'factor', "
         "'high_freq_factor', 'low_freq_factor', 'mscale', 'mscale_all_dim', "
         "'original_max_position_embeddings', 'truncate', 'type']"),
        (["model.rope_scaling=llama3"], "--set model.rope_scaling=llama3: model.rope_scaling is "
         "a section: set its fields, e.g. model.rope_scaling.type=..."),
    ],
)  # fmt: skip
def test_bad_rope_scaling_names_the_key_and_the_range(assignments, message):
    """Checked once every --set is applied, so related fields may come in any order; a saved
    config.json is checked the same way."""
    with pytest.raises(ConfigError) as error:
        config.override(config.Config(), assignments)
    assert str(error.value) == message
    with pytest.raises(ConfigError, match="unknown config keys in model.rope_scaling: .'beta'"):
        config.from_dict({"model": {"rope_scaling": {"beta": 3}}})


@pytest.mark.parametrize(
    "rope_parameters,message",
    [
        (dict(rope_type="linear", factor=2.0), "rope_type 'linear': megajax's RoPE is the "
         "default one, or scaled as llama3 or yarn"),
        (dict(rope_type="dynamic", factor=2.0), "rope_type 'dynamic'"),
        (dict(rope_type="llama3", factor=8.0), "rope_type 'llama3' without high_freq_factor, "
         "low_freq_factor"),
        (dict(rope_type="default", partial_rotary_factor=0.5),
         "partial_rotary_factor=0.5: megajax's RoPE turns the whole head"),
    ],
)  # fmt: skip
def test_a_rope_megajax_does_not_compute_is_refused_on_import(rope_parameters, message):
    hf = {**SHAPE, "model_type": "llama", "rope_parameters": rope_parameters}
    with pytest.raises(ConfigError, match=message):
        families.model_config(hf)


def test_the_llama3_1_config_is_llama3_8b_with_llama_3_1s_rope_scaling():
    cfg = config.load("configs/llama3_1_8b.py").model
    scaling = cfg.rope_scaling
    fields = (scaling.type, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor)
    assert fields == ("llama3", 8.0, 1.0, 4.0)
    assert scaling.original_max_position_embeddings == 8192
    assert cfg.seq_len == 8192 and cfg.num_params() == 8_030_261_248
    assert config.replace(config.load("configs/llama3_8b.py"), model=dict(
        rope_scaling=scaling)).model == cfg  # fmt: skip
