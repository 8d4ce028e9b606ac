"""Text generation: the KV cache decodes exactly as recomputing the sequence would, on every
mesh; sampling on vocabulary-sharded logits obeys its filters; an imported GPT-2 generates and
scores as transformers does (the server's tests: test_serve.py)."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import bert_config, device_mesh, tiny_config
from transformers import GPT2Config, GPT2LMHeadModel

from megajax import config, generate, hlo, loss, sampling, serve
from megajax.config import ConfigError
from megajax.data.tokenizer import GPT2Tokenizer
from megajax.hf import weights as convert  # the conversion, without its command line
from megajax.trainer import Trainer

MESHES = [(1, 1), (2, 4), (1, 8)]
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # unequal lengths
# New tokens: on the tiny GPT, 11 + 30 pass its 32 positions, so every program decodes with the
# KV cache and then with the sliding window; transformers' GPT-2 has no window, hence HF_NEW.
NEW, HF_NEW = 30, 8


@pytest.fixture(scope="module")
def generators():
    """The same tiny random GPT (float32) on each mesh; its vocabulary pads differently on each.
    Initialised once, on 2 x 4; the other meshes get its values laid out from the host."""
    cfg = tiny_config()
    trainer = Trainer(cfg, device_mesh(2, 4))
    made = {(2, 4): generate.Generator(trainer, _fresh_params(trainer))}
    host = jax.device_get(made[2, 4].params)
    for data, model in set(MESHES) - {(2, 4)}:
        trainer = Trainer(cfg, device_mesh(data, model))
        params = jax.device_put(_repadded(host, trainer.padded_vocab), trainer.param_sharding)
        made[data, model] = generate.Generator(trainer, params)
    return made


def _repadded(params, rows: int):
    """Host parameters with the embedding's padding cut or zero-filled to `rows` (padding rows
    are never read: the logits past model.vocab_size are masked)."""
    table = params["wte"]["embedding"][:rows]
    table = np.pad(table, ((0, rows - len(table)), (0, 0)))
    return {**params, "wte": {**params["wte"], "embedding": table}}


def _fresh_params(trainer):
    """Freshly initialised parameters (train.seed), without optimizer state."""
    return trainer.fresh_params(list(trainer.state_sharding["params"]))


_PREDICT = {}  # one compiled full-sequence argmax per generator


def _greedy_by_recompute(generator, prompts, new_tokens):
    """Greedy decoding without a cache: the whole sequence through the model for each token."""
    trainer, params = generator.sharded, generator.params
    cfg = trainer.cfg.model
    rows = -(-len(prompts) // generator.data_degree) * generator.data_degree

    def predict(p, x):
        model = trainer.model(p)
        return loss.argmax(model(x), model.lm_head, vocab_size=cfg.vocab_size)

    seqs = [list(p) for p in prompts]
    with trainer.context():
        predict = _PREDICT.setdefault(id(generator), jax.jit(predict))
        for _ in range(new_tokens):
            x = np.zeros((rows, cfg.seq_len), np.int32)  # right-padded: causal, so harmless
            windows = [s[-cfg.seq_len :] for s in seqs]  # past seq_len: the last seq_len
            for i, w in enumerate(windows):
                x[i, : len(w)] = w
            best = np.asarray(predict(params, x))
            for s, w, b in zip(seqs, windows, best, strict=False):
                s.append(int(b[len(w) - 1]))
    return np.array([s[-new_tokens:] for s in seqs])


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_cached_greedy_equals_recompute(generators, mesh):
    """... and past seq_len, on the last seq_len tokens (11 + 30: 9 past the 32 positions)."""
    generator = generators[mesh]
    out = generator(PROMPTS, new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"], _greedy_by_recompute(generator, PROMPTS, NEW))


def test_decoding_communicates_only_model_all_reduces_never_logits(generators):
    """Per new token: the plan's 1 + 2 * layers activation all-reduces over `model` (of one
    position while the KV cache has room, of the whole window after) and a few of one number
    per sequence for sampling; nothing over `data`, no logits moved."""
    generator = generators[2, 4]
    program = generator._compiled(4, 16, NEW, False)  # 3 prompts, padded to the data degree
    found = hlo.collectives(program.as_text(), {"data": 2, "model": 4})
    assert {(c.kind, c.axes) for c in found} == {("all-reduce", ("model",))}
    rows, cfg = 2, generator.sharded.cfg.model  # rows per data shard
    per_layer = 1 + 2 * cfg.num_layers
    cached = cfg.seq_len - 16 + 1  # tokens chosen while the cache has room, the first by prefill

    def runs(length):
        return [c for c in found if c.shapes == ((rows, length, cfg.hidden),)]

    per_token, window, prefill = runs(1), runs(cfg.seq_len), runs(16)
    assert sum(c.runs for c in per_token) == (cached - 1) * per_layer
    assert sum(c.runs for c in window) == (NEW - cached) * per_layer
    assert sum(c.runs for c in prefill) == per_layer
    scalars = [c for c in found if all(s == (rows,) for s in c.shapes)]
    assert len(per_token) + len(window) + len(prefill) + len(scalars) == len(found)


def test_top_k_1_equals_greedy(generators):
    generator = generators[2, 4]
    greedy = generator(PROMPTS, new_tokens=NEW, temperature=0.0)["tokens"]
    for seed in (0, 1):
        sampled = generator(PROMPTS, new_tokens=NEW, temperature=2.0, top_k=1, seed=seed)
        np.testing.assert_array_equal(sampled["tokens"], greedy)


def test_same_seed_same_samples_on_every_mesh(generators):
    options = dict(new_tokens=NEW, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    outs = [generators[m](PROMPTS, **options) for m in MESHES]
    for out in outs[1:]:
        np.testing.assert_array_equal(out["tokens"], outs[0]["tokens"])
        np.testing.assert_allclose(out["logprobs"], outs[0]["logprobs"], rtol=1e-5)
    other_seed = generators[2, 4](PROMPTS, **{**options, "seed": 8})["tokens"]
    assert (other_seed != outs[0]["tokens"]).any()


@pytest.fixture(scope="module")
def constructed():
    """sampling.sample on a known distribution: the head's rows are the logits (hidden size 1),
    over a vocabulary of 61 padded to 64 and split over 4 model shards; 512 rows of keys."""
    mesh = device_mesh(2, 4)
    vocab, rows = 61, 512
    logits = np.random.default_rng(0).normal(0, 2, vocab).astype(np.float32)
    table = np.zeros((64, 1), np.float32)
    table[:vocab, 0] = logits
    hidden = np.ones((rows, 1), np.float32)
    keys = np.random.default_rng(0).integers(0, 2**32, (rows, 2), dtype=np.uint32)  # key data
    sample = jax.jit(
        lambda k, t, p: sampling.sample(
            hidden, table, k, temperature=1.0, top_k=t, top_p=p, vocab_size=vocab
        )[0]
    )

    def draw(top_k, top_p):
        with jax.set_mesh(mesh):
            return np.asarray(sample(keys, top_k, top_p))

    return logits, draw


def test_top_k_never_leaves_the_k_most_likely(constructed):
    logits, draw = constructed
    for k in (1, 3, 10):
        seen = set(draw(k, 1.0).tolist())
        assert seen <= set(np.argsort(-logits)[:k].tolist())
        assert len(seen) == k if k <= 3 else len(seen) > 3  # the set is really sampled


def test_top_p_never_leaves_the_nucleus(constructed):
    logits, draw = constructed
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    for p in (0.3, 0.6, 0.9):
        size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest set with mass >= p
        nucleus = set(order[:size].tolist())
        tokens = set(draw(0, p).tolist())
        assert tokens <= nucleus
        assert len(tokens) > 1 or size == 1
    assert set(draw(5, 0.9).tolist()) <= set(order[:5].tolist())


def test_bert_is_refused():
    trainer = Trainer(bert_config(), device_mesh(1, 1))
    with pytest.raises(ConfigError, match="needs a GPT"):
        generate.Generator(trainer, None)


# transformers -------------------------------------------------------------------------------

HF_SHAPE = dict(vocab_size=1003, n_embd=64, n_layer=2, n_head=4, n_positions=32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random small GPT-2 saved by transformers, its biases made to count."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**HF_SHAPE, eos_token_id=0, bos_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_generator(hf_dir):
    weights = convert.HFWeights(hf_dir)
    cfg = convert.with_hf_model(config.Config(), weights)
    trainer = Trainer(cfg, device_mesh(2, 4))
    return generate.Generator(trainer, convert.load_params(trainer, weights, log=lambda _: None))


@pytest.fixture(scope="module")
def hf_greedy(hf_generator):
    """Greedy tokens and their log-probabilities, in one batch (the program the generation
    command compiles for 3 samples of 8 tokens)."""
    return hf_generator(PROMPTS, new_tokens=HF_NEW, temperature=0.0)


def test_imported_gpt2_greedy_equals_transformers(hf_dir, hf_greedy):
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    for prompt, ours in zip(PROMPTS, hf_greedy["tokens"], strict=True):
        ids = torch.tensor([prompt])  # alone, unpadded: the batch's padding must not matter
        theirs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=HF_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_imported_gpt2_logprobs_equal_transformers(hf_dir, hf_generator, hf_greedy):
    """The decoded tokens' log-probabilities, and those of prompts scored whole (no new
    tokens: the prompt and the greedy tokens after it)."""
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    sequences = [p + t.tolist() for p, t in zip(PROMPTS, hf_greedy["tokens"], strict=True)]
    scored = hf_generator(sequences, new_tokens=0, prompt_logprobs=True)
    for i, (prompt, sequence) in enumerate(zip(PROMPTS, sequences, strict=True)):
        seq = torch.tensor([sequence])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, :-1].double(), -1)
        theirs = logp.gather(-1, seq[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(scored["prompt_logprobs"][i], theirs, rtol=0, atol=2e-5)
        decoded = hf_greedy["logprobs"][i]
        np.testing.assert_allclose(decoded, theirs[len(prompt) - 1 :], rtol=0, atol=2e-5)


def test_generate_command_prints_samples_then_json(hf_dir, capsys):
    argv = ["--hf_checkpoint", str(hf_dir), "--prompt", "a b c", "--max_new_tokens", str(HF_NEW),
            "--num_samples", "3", "--temperature", "0", "--mesh", "data=2,model=4",
            "--step_timeout", "0"]  # fmt: skip
    assert generate.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    first, *others = result["samples"]
    assert len(others) == 2 and all(other == first for other in others)
    assert len(first["tokens"]) == HF_NEW and result["tokens_per_sec"] > 0


def test_chat_renders_the_message_and_stops_at_the_end_of_the_turn(hf_dir, tmp_path, capsys):
    """--chat: the user's message rendered through the checkpoint's template with its
    generation prompt; the reply cut before the template's end-of-sequence token, here made
    the first one that a seeded sample repeats no earlier token with."""
    import shutil

    directory = shutil.copytree(hf_dir, tmp_path / "chat")
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' c d' }}{% endif %}"
    )
    argv = ["--hf_checkpoint", str(directory), "--prompt", "a b", "--chat", "--seed", "3",
            "--temperature", "1", "--max_new_tokens", str(HF_NEW), "--mesh", "data=2,model=4",
            "--step_timeout", "0"]  # fmt: skip

    def reply():
        assert generate.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("a b c d")  # the rendered prompt, printed before its reply
        return json.loads(out.strip().splitlines()[-1])["samples"][0]["tokens"]

    whole = reply()  # the tokenizer's end of text is out of this model's vocabulary
    assert len(whole) == HF_NEW
    tok = GPT2Tokenizer("data/gpt2")
    k = next(k for k in range(1, HF_NEW) if whole[k] not in whole[:k])
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": tok.token_text(whole[k])})
    )
    assert reply() == whole[:k]


def test_long_prompt_and_foreign_ids_are_clear_errors(hf_generator):
    with pytest.raises(ConfigError, match="33 tokens exceeds the model's 32 positions"):
        hf_generator([[1] * 33], new_tokens=3)
    with pytest.raises(ConfigError, match="outside the model's 1003"):
        hf_generator([[1, 1003]], new_tokens=3)


def test_a_sharded_model_without_optimizer_generates_as_the_trainer_does(generators):
    """Generation needs the model's graph and layout, not a Trainer: the same fresh
    parameters, the same greedy tokens."""
    from megajax.sharded_model import ShardedModel

    sharded = ShardedModel(tiny_config(), device_mesh(2, 4))
    params = sharded.fresh_params()
    on_trainer = generators[2, 4]
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(on_trainer.params), strict=True)
    for ours, theirs in pairs:
        assert ours.sharding == theirs.sharding
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    out = generate.Generator(sharded, params)(PROMPTS, new_tokens=NEW, temperature=0.0)
    expected = on_trainer(PROMPTS, new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"], expected["tokens"])


def test_help_texts_name_llama_beside_gpt2(capsys):
    for parse in (generate.parse_args, serve.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Llama" in text.split("options:")[0]  # the description
        assert "Hugging Face GPT-2 or Llama directory" in text  # --hf_checkpoint
