"""eval.py: every held-out token scored once, the same on any mesh; WikiText-103 and LAMBADA
measured as Megatron-LM measures them, equal to plain one-window-at-a-time computations."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import device_mesh, subprocess_env, tiny_config

from megajax import config, run
from megajax.checkpoint import Checkpointer
from megajax.data.tokenizer import GPT2Tokenizer, HFTokenizer
from megajax.evals import lambada, perplexity, wikitext
from megajax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "data/wikitext103/wiki.valid.head429.tokens"
LAMBADA = ROOT / "data/lambada/lambada_sample.jsonl"


def _eval_main(argv, capsys) -> tuple[int, str, str]:
    """eval.py's main in this process (its 8 faked devices): exit status, stdout and stderr.
    Without a step watchdog: a run in this process must not leave a thread that could stop it."""
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([*map(str, argv), "--step_timeout", "0"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _repadded(params: dict, rows: int) -> dict:
    """Host parameters with the embedding's padding cut or zero-filled to `rows` (the padding
    rows are never read: the logits past model.vocab_size are dropped)."""
    table = params["wte"]["embedding"][:rows]
    table = np.pad(table, ((0, rows - len(table)), (0, 0)))
    return {**params, "wte": {**params["wte"], "embedding": table}}


def test_perplexity_scores_every_window_once_whatever_the_batch(shakespeare_tokens):
    cfg = tiny_config()
    tokens = shakespeare_tokens[: 11 * 32 + 1] % cfg.model.vocab_size
    windows = [{"inputs": tokens[i : i + 32], "targets": tokens[i + 1 : i + 33]}
               for i in range(0, 11 * 32, 32)]  # fmt: skip
    wide = Trainer(cfg, device_mesh(2, 4))  # batches of 8
    params = wide.init_state()["params"]
    one = Trainer(config.replace(cfg, train=dict(batch_size=1)), device_mesh(1, 1))
    host = _repadded(jax.device_get(params), one.padded_vocab)  # the same model, one device
    scores = [
        perplexity.score(wide, params, windows),
        perplexity.score(one, jax.device_put(host, one.param_sharding), windows),
    ]
    assert (
        scores[0]["tokens"] == scores[1]["tokens"] == 11 * 32
    )  # 8 + 3: the padding is not counted
    assert scores[0]["nll"] == pytest.approx(scores[1]["nll"], rel=1e-5)
    assert scores[0]["ppl"] == pytest.approx(np.exp(scores[0]["nll"] / (11 * 32)))


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A character-level tiny GPT trained for 3 steps on 2 x 4 by run.train; the last 1% of
    its text held out (11,154 tokens: 348 windows of 32 targets, then a tail of 17)."""
    workdir = tmp_path_factory.mktemp("char_run")
    cfg = config.replace(
        tiny_config(vocab_size=65),
        data=dict(tokenizer="char", val_fraction=0.01),
        train=dict(steps=3, eval_every=0),
    )
    run.train(cfg, device_mesh(2, 4), workdir, log=lambda _: None)
    return workdir


def _check_val(workdir, stdout: str) -> dict:
    """eval.py --task val's result in `workdir`, checked against what the run saved."""
    result = json.loads((workdir / "eval_val.json").read_text())
    assert result["step"] == 3 and f"perplexity {result['ppl']:.2f}" in stdout
    assert result["ppl"] == pytest.approx(np.exp(result["loss"]))
    assert result["loss"] == pytest.approx(4.05, abs=0.15)  # near ln(65) after 3 steps
    (manifest,) = (workdir / "data").glob("*/megajax.json")
    held_out = json.loads(manifest.read_text())["splits"]["validation"]["tokens"]
    assert held_out % 32 != 1 and result["tokens"] == held_out - 1  # every target, the tail too
    return result


def test_eval_restores_the_checkpoint_on_any_mesh(char_run, capsys):
    """Saved on 2 x 4; restored there and on 1 x 8, where the vocabulary pads differently."""
    losses = []
    for mesh in ("data=2,model=4", "data=1,model=8"):
        code, out, err = _eval_main(["--workdir", char_run, "--mesh", mesh], capsys)
        assert code == 0, err
        losses.append(_check_val(char_run, out)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_eval_command_restores_the_checkpoint_on_one_device(char_run, capsys):
    """`python eval.py` end to end, in a process of its own with one device: the loss of the
    2 x 4 mesh."""
    code, _, err = _eval_main(["--workdir", char_run, "--mesh", "data=2,model=4"], capsys)
    assert code == 0, err
    on_mesh = json.loads((char_run / "eval_val.json").read_text())["loss"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--workdir", str(char_run), "--cpu_devices", "1"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert _check_val(char_run, out.stdout)["loss"] == pytest.approx(on_mesh, rel=1e-5)


@pytest.mark.parametrize(
    "num_tokens, seq_len, overlap",
    [(100, 16, 4), (17, 16, 4), (5, 16, 4), (98, 16, 16), (40, 8, 1), (21, 8, 3)],
)
def test_wikitext_windows_score_every_target_once(num_tokens, seq_len, overlap):
    tokens = np.arange(100, 100 + num_tokens)
    windows = wikitext.Windows(tokens, seq_len=seq_len, overlap=overlap)
    times_scored = np.zeros(num_tokens, int)
    for i, w in enumerate(windows):
        scored = np.flatnonzero(w["weights"])
        assert len(scored) > 0  # no window is wasted
        if i > 0:
            assert scored.min() >= seq_len - overlap  # later windows: their last `overlap` only
        assert np.all(w["targets"][scored] == tokens[i * overlap + scored + 1])
        assert np.all(w["inputs"][1:] == w["targets"][:-1])  # one sequence, shifted
        times_scored[w["targets"][scored] - 100] += 1
    assert times_scored[0] == 0 and np.all(times_scored[1:] == 1)


def test_original_tokens_are_counted_on_single_spaces():
    # " = Title = \n Words @-@ here . \n \n" stripped is "= Title = \n Words @-@ here ."; its
    # pieces between single spaces: "=", "Title", "=", "\n", "Words", "@-@", "here", "." -> 8.
    assert wikitext.count_original_tokens(" = Title = \n Words @-@ here . \n \n") == 8
    assert wikitext.count_original_tokens("a  b") == 3  # two spaces: an empty token between


def test_wikitext_detokenizer_undoes_the_release_tokenization():
    text = ' = = Early life = = \n He was born in 1 @,@ 200 @-@ year @-@ old ( the " town " ) . \n'
    assert (
        wikitext.detokenize(text)
        == ' == Early life ==\nHe was born in 1,200-year-old (the "town").\n'
    )


@pytest.fixture(scope="module")
def bpe_state():
    """(config, host state) of an untrained model over the GPT-2 BPE's ids, initialised on
    2 x 4. A wide initialisation makes its predictions far from uniform, so sums over the wrong
    targets would differ."""
    cfg = tiny_config(vocab_size=50257, init_std=0.3)
    return cfg, jax.device_get(Trainer(cfg, device_mesh(2, 4)).init_state())


def _save_run(workdir, cfg, state) -> Path:
    """A work directory holding `cfg` and the host `state` as its step-0 checkpoint, written
    from 2 x 4."""
    workdir.mkdir(exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    trainer = Trainer(cfg, device_mesh(2, 4))
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=1)
    ckpt.save(0, jax.device_put(state, trainer.state_sharding), {"step": 0}, force=True)
    ckpt.wait()
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def bpe_run(bpe_state, tmp_path_factory):
    """A work directory with the untrained BPE model (bpe_state) at step 0."""
    cfg, state = bpe_state
    return _save_run(tmp_path_factory.mktemp("bpe_run"), cfg, state), cfg


def _plain_log_probs(workdir, cfg):
    """(id sequences, the positions wanted of each) -> float64 log-probabilities, (positions,
    vocab) for each sequence: unsharded forward passes of 64 sequences at once, right-padded to
    seq_len (causal: the padding changes no earlier position), one program for every length."""
    trainer = Trainer(cfg, device_mesh(1, 1))
    ckpt = Checkpointer(workdir / "checkpoints", every=0, keep=1)
    params = ckpt.restore(0, trainer.abstract_state())[0]["params"]
    ckpt.close()
    with trainer.context():
        hidden = jax.jit(lambda p, x: trainer.model(p)(x))
        table = np.asarray(jax.jit(lambda p: trainer.model(p).lm_head)(params), np.float64)
    table = table[: cfg.model.vocab_size]

    def log_probs(sequences, positions):
        out = []
        for begin in range(0, len(sequences), 64):
            batch = np.zeros((64, cfg.model.seq_len), np.int32)
            for row, ids in enumerate(sequences[begin : begin + 64]):
                batch[row, : len(ids)] = ids
            with trainer.context():
                h = np.asarray(hidden(params, batch), np.float64)
            for row, wanted in enumerate(positions[begin : begin + 64]):
                logits = h[row, list(wanted)] @ table.T
                logits -= logits.max(-1, keepdims=True)
                out.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
        return out

    return log_probs


def test_wikitext_perplexity_equals_a_plain_computation(bpe_run, gpt2_json, tmp_path, capsys):
    """... and a model read through a tokenizer.json holding GPT-2's BPE scores the same."""
    workdir, cfg = bpe_run
    text = WIKITEXT.read_bytes().decode("utf-8")[:3000]
    (tmp_path / "slice.tokens").write_bytes(text.encode("utf-8"))
    argv = ["--task", "wikitext103", "--data", tmp_path / "slice.tokens", "--overlap", "12",
            "--mesh", "data=2,model=4", "--workdir", workdir]  # fmt: skip
    code, out, _ = _eval_main(argv, capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result == json.loads((workdir / "eval_wikitext103.json").read_text())
    hf = ["--set", "data.tokenizer=hf", "--set", f"data.vocab_dir={gpt2_json}"]
    code, out, _ = _eval_main([*argv, *hf], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1]) == result

    # Slide by 12 and score the targets no earlier window reached.
    ids = GPT2Tokenizer("data/gpt2").encode(wikitext.detokenize(text))
    windows, reached, start = [], 0, 0  # (ids, the first position whose target is new)
    while reached < len(ids) - 1:
        chunk = ids[start : start + cfg.model.seq_len + 1]
        windows.append((chunk, max(reached - start, 0)))
        reached, start = start + len(chunk) - 1, start + 12
    scored = _plain_log_probs(workdir, cfg)(
        [chunk[:-1] for chunk, _ in windows],
        [range(first, len(chunk) - 1) for chunk, first in windows],
    )
    nll = -sum(
        lp[np.arange(len(lp)), chunk[first + 1 :]].sum()
        for lp, (chunk, first) in zip(scored, windows, strict=True)
    )
    original = len(text.strip().split(" "))
    assert result["tokens"] == len(ids) and result["original_tokens"] == original
    assert result["ppl"] == pytest.approx(np.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert result["adjusted_ppl"] == pytest.approx(np.exp(nll / (original - 1)), rel=1e-5)
    assert result["adjusted_ppl"] > result["ppl"]  # fewer original tokens than BPE tokens


def test_lambada_strict_target_is_the_whole_last_word():
    tokenizer = GPT2Tokenizer("data/gpt2")
    text = "I look at him.\n\nHe looked at Harlin"
    context, target = lambada.example(text, tokenizer, strict=True)
    assert target == tokenizer.encode(" Harlin") and len(target) == 2
    assert context == tokenizer.encode("I look at him.\n\nHe looked at")
    context, target = lambada.example(text, tokenizer, strict=False)
    assert context + target == tokenizer.encode(text) and target == tokenizer.encode(" Harlin")[1:]


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory):
    """A directory holding GPT-2's BPE as a tokenizer.json (data.tokenizer=hf)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("gpt2_json")
    ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt").save(
        str(path / "tokenizer.json")
    )
    return path


def test_gpt2_ids_are_kept_and_a_tokenizer_json_of_them_gives_the_same(gpt2_json):
    """Every shipped LAMBADA passage: the GPT-2 BPE's strict example is Megatron-LM's (context
    encoded alone, then " " + word), and GPT-2's BPE read from a tokenizer.json gives the same
    examples and the same WikiText ids as tiktoken's."""
    gpt2, hf = GPT2Tokenizer("data/gpt2"), HFTokenizer(gpt2_json)
    assert gpt2.bos_id is None and hf.bos_id is None
    for line in LAMBADA.read_text("utf-8").splitlines():
        text = json.loads(line)["text"]
        word = text.split()[-1]
        megatron = (gpt2.encode(text[: text.rfind(word)].strip()), gpt2.encode(" " + word))
        assert lambada.example(text, gpt2) == megatron == lambada.example(text, hf)
        assert lambada.example(text, gpt2, strict=False) == lambada.example(text, hf, strict=False)
        assert not lambada.merged_boundary(text, hf)
    text = WIKITEXT.read_bytes().decode("utf-8")
    assert wikitext.token_ids(text, hf) == wikitext.token_ids(text, gpt2)


def test_lambada_target_is_the_last_word_as_the_passage_writes_it(tmp_path):
    """SentencePiece-style BPE with "<s>" put first by the post-processor, its prefix space
    written as Llama 2's tokenizer.json does (a "▁" prepended to any text, so " Harlin" alone
    gets an extra "▁" token) or by a Metaspace pre-tokenizer: the target is the passage's own
    "▁Har", "lin", after "<s>". A pre-tokenizer that gives the space to the word before ("at ")
    merges across the boundary: the target then starts with that token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    pieces = ["<unk>", "<s>", "</s>", "▁", *"Healotkdrin", "▁H", "▁He", "▁a", "▁at", "▁Ha",
              "▁Har", "li", "lin", "▁l", "oo", "▁loo", "ke", "ked", "▁looked", "▁▁"]  # fmt: skip
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "H"), ("▁H", "e"), ("▁", "a"), ("▁a", "t"), ("▁H", "a"), ("▁Ha", "r"),
              ("l", "i"), ("li", "n"), ("▁", "l"), ("o", "o"), ("▁l", "oo"), ("k", "e"),
              ("ke", "d"), ("▁loo", "ked"), ("▁", "▁")]  # fmt: skip
    ids = [vocab[p] for p in ("▁He", "▁looked", "▁at", "▁Har", "lin")]
    text, bos = "He looked at Harlin", vocab["<s>"]
    for form in ("prepend", "metaspace"):
        sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
        if form == "prepend":
            sp.normalizer = normalizers.Sequence(
                [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
        else:
            sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        sp.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
        sp.save(str(tmp_path / f"{form}.json"))
        tokenizer = HFTokenizer(tmp_path / f"{form}.json")
        assert (tokenizer.bos_id, tokenizer.eot_id) == (bos, vocab["</s>"])
        assert tokenizer.encode(text) == ids
        if form == "prepend":
            assert tokenizer.encode(" Harlin") == [vocab["▁"], *ids[3:]]
        assert lambada.example(text, tokenizer) == ([bos, *ids[:3]], ids[3:])
        assert lambada.example(text, tokenizer, strict=False) == ([bos, *ids[:4]], ids[4:])
        assert not lambada.merged_boundary(text, tokenizer)
        assert wikitext.token_ids(text, tokenizer) == [bos, *ids]

    words = {w: i for i, w in enumerate(["<unk>", "</s>", "He ", "looked ", "at", "at ", "Harlin"])}
    before = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    before.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    before.save(str(tmp_path / "before.json"))
    tokenizer = HFTokenizer(tmp_path / "before.json")
    assert tokenizer.bos_id is None and tokenizer.encode("He looked at") == [2, 3, 4]
    assert lambada.example(text, tokenizer) == ([2, 3], [5, 6])  # "at " is predicted
    assert lambada.merged_boundary(text, tokenizer)


def test_lambada_strict_needs_every_token_of_the_word_and_non_strict_only_the_last():
    cfg = tiny_config()
    trainer = Trainer(cfg, device_mesh(2, 4))
    params = trainer.init_state()["params"]
    plain = Trainer(cfg, device_mesh(1, 1))
    host_params = _repadded(jax.device_get(params), plain.padded_vocab)
    with plain.context():
        hidden = jax.jit(lambda p, x: plain.model(p)(x))
        table = np.asarray(jax.jit(lambda p: plain.model(p).lm_head)(host_params))

    def greedy(ids):  # the next token after ids, from full logits on one device
        padded = np.zeros((1, 8), np.int32)  # right-padded: causal, one program for all
        padded[0, : len(ids)] = ids
        with plain.context():
            h = np.asarray(hidden(host_params, padded))[0, len(ids) - 1]
        return int(np.argmax(h @ table[: cfg.model.vocab_size].T))

    context = [17, 400, 23, 5, 999, 61]
    first = greedy(context)
    second = greedy([*context, first])
    wrong = (first + 1) % cfg.model.vocab_size
    after_wrong = greedy([*context, wrong])
    examples = [
        (context, [first, second]),  # both right
        (context, [first, (second + 1) % cfg.model.vocab_size]),  # the second wrong
        (context, [wrong, after_wrong]),  # the first wrong, the last right
    ]
    strict = lambada.correct(trainer, params, examples)
    last_only = lambada.correct(trainer, params, [(c + t[:-1], t[-1:]) for c, t in examples])
    assert (strict, last_only) == (1, 2)


def _always_predicting(workdir, cfg, state, token: int):
    """A work directory whose model (the host `state`'s, altered) predicts `token` after any
    context: the final layer norm outputs a constant, the direction of `token`'s embedding,
    made the longest one."""
    params = jax.tree.map(np.array, state["params"])
    wte = params["wte"]["embedding"]
    wte[token] *= 10 * np.linalg.norm(wte, axis=1).max() / np.linalg.norm(wte[token])
    params["ln_f"]["scale"][:] = 0
    params["ln_f"]["bias"][:] = wte[token] / np.linalg.norm(wte[token])
    return _save_run(workdir, cfg, {**state, "params": params})


def test_lambada_accuracy_equals_a_plain_computation(tmp_path, gpt2_json, bpe_state, capsys):
    """... and a model read through a tokenizer.json holding GPT-2's BPE scores the same."""
    cfg, state = bpe_state
    texts = [json.loads(line)["text"] for line in LAMBADA.read_text("utf-8").splitlines()[:5]]
    # Three of five examples end in " signs", the word the model always predicts: an
    # accuracy strictly between 0 and 1, which no constant evaluator can produce.
    texts[3:5] = [t.rsplit(" ", 1)[0] + " signs" for t in texts[3:5]]
    assert texts[0].endswith(" signs")
    lines = [json.dumps({"text": t}) for t in texts]  # longer than seq_len: cut
    (tmp_path / "five.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = GPT2Tokenizer("data/gpt2")
    (signs,) = tokenizer.encode(" signs")
    workdir = _always_predicting(tmp_path / "run", cfg, state, signs)
    log_probs = _plain_log_probs(workdir, cfg)
    for flags, strict in (([], True), (["--no_strict"], False)):
        argv = ["--task", "lambada", "--data", tmp_path / "five.jsonl", "--workdir", workdir,
                "--mesh", "data=2,model=4", *flags]  # fmt: skip
        code, out, _ = _eval_main(argv, capsys)
        assert code == 0
        result = json.loads(out.strip().splitlines()[-1])
        targets, inputs = [], []
        for line in lines:
            context, target = lambada.example(json.loads(line)["text"], tokenizer, strict=strict)
            targets.append(target)
            inputs.append((context + target)[-(cfg.model.seq_len + 1) : -1])
        last = [range(len(x) - len(t), len(x)) for x, t in zip(inputs, targets, strict=True)]
        predicted = [lp.argmax(-1).tolist() for lp in log_probs(inputs, last)]
        right = sum(p == t for p, t in zip(predicted, targets, strict=True))
        assert result["n"] == 5 and result["strict"] == strict
        assert result["accuracy"] == right / 5 == 3 / 5
        if strict:
            hf = ["--set", "data.tokenizer=hf", "--set", f"data.vocab_dir={gpt2_json}"]
            code, out, _ = _eval_main([*argv, *hf], capsys)
            assert code == 0 and json.loads(out.strip().splitlines()[-1]) == result


def test_a_char_model_cannot_read_wikitext(tmp_path, capsys):
    argv = ["--task", "wikitext103", "--data", WIKITEXT, "--config", "configs/shakespeare_char.py",
            "--workdir", tmp_path]  # fmt: skip
    code, _, err = _eval_main(argv, capsys)
    assert code == 2 and "GPT-2 BPE" in err


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused(gpt2_json, tmp_path, capsys):
    argv = ["--task", "lambada", "--data", LAMBADA, "--config", "configs/llama_tiny.py",
            "--set", "data.tokenizer=hf", "--set", f"data.vocab_dir={gpt2_json}",
            "--set", "model.vocab_size=32000", "--workdir", tmp_path]  # fmt: skip
    code, _, err = _eval_main(argv, capsys)
    assert code == 2 and "model.vocab_size=32000 is smaller than the hf tokenizer's 50257" in err


def test_held_out_windows_are_built_only_for_the_rows_a_process_feeds(tmp_path, monkeypatch):
    """eval.py --task val scores perplexity.EveryTarget: each held-out split's windows weighed 1,
    then its tail in one zero-padded window, item by item the list eval.py built before (so the
    scores are those of the list), but each window built only when its row is fed: a process
    feeding rows 2 and 3 of each batch of 8 builds only those windows, and a score builds each
    window once (the token count comes from the same pass)."""
    import collections
    from types import SimpleNamespace

    from megajax.data import prepare, samples
    from megajax.evals import batched

    text = tmp_path / "plays.txt"
    text.write_text(open(config.DataConfig().source, encoding="utf-8").read()[:5000])
    dataset = samples.Dataset(
        prepare.prepare([text], out=tmp_path / "char", tokenizer="char", val_fraction=0.5,
                        log=lambda _: None)
    )  # fmt: skip
    splits = [samples.GPTWindows(dataset, s, seq_len=32) for s in ("train", "validation")]
    listed = []  # as eval.py built them: every window of every split, then each tail
    for windows in splits:
        tokens = np.concatenate([windows.source[r]["tokens"] for r in range(len(windows.source))])
        for start in range(0, len(tokens) - 1, 32):
            chunk = np.zeros(33, np.int32)
            chunk[: len(tokens[start : start + 33])] = tokens[start : start + 33]
            weights = (np.arange(32) < len(tokens) - 1 - start).astype(np.float32)
            listed.append({"inputs": chunk[:-1], "targets": chunk[1:], "weights": weights})
    every = perplexity.EveryTarget(splits)
    assert len(every) == len(listed) == len(splits[0]) + len(splits[1]) + 2  # both have tails
    for i, expected in enumerate(listed):
        assert all(np.array_equal(every[i][k], v) for k, v in expected.items()), i

    built = []
    plain = samples.GPTWindows.__getitem__
    monkeypatch.setattr(
        samples.GPTWindows, "__getitem__", lambda w, i: built.append((w.name, i)) or plain(w, i)
    )
    items = [(w.name, j) for w in splits for j in [*range(len(w)), None]]  # None: a tail
    process = SimpleNamespace(cfg=tiny_config(), eval_rows=np.array([2, 3]))  # of batches of 8
    assert len(list(batched.padded_batches(process, every))) == -(-len(every) // 8)
    fed = [items[i] for b in range(0, len(every), 8) for i in (b + 2, b + 3) if i < len(every)]
    assert sorted(built) == sorted(item for item in fed if item[1] is not None)
    built.clear()
    trainer = Trainer(tiny_config(vocab_size=65), device_mesh(2, 4))  # char_run's programs
    params = trainer.init_state()["params"]
    streamed = perplexity.score(trainer, params, every)
    once = collections.Counter(item for item in items if item[1] is not None)
    once[items[0]] += -len(every) % 8  # the last batch's rows past the end copy item 0
    assert collections.Counter(built) == once
    assert streamed["tokens"] == sum(w.num_tokens - 1 for w in splits)
    assert streamed == pytest.approx(perplexity.score(trainer, params, listed), rel=1e-6)
