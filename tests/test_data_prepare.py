"""`python -m megajax.data.prepare`: each corpus format becomes a dataset that reads back the
text it was made from, streamed into the rows of preparing it whole, in bounded memory; bad input
ends in one clear line and leaves no dataset behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megajax.config import ConfigError
from megajax.data import corpora, prepare
from megajax.data.samples import Dataset
from megajax.data.tokenizer import BertTokenizer, GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "data/wikitext103/wiki.valid.head429.tokens"
EOT = 50256


def _rows(dataset: Dataset, split: str) -> list[np.ndarray]:
    source = dataset.source(split)
    return [source[i]["tokens"] for i in range(len(source))]


def test_text_files_read_back_as_their_documents_joined_by_end_of_text(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("The first document.\nIt has two lines.\n", encoding="utf-8")
    b.write_text("Second doc, with ünïcode — and more words.", encoding="utf-8")
    out = prepare.prepare([a, b], out=tmp_path / "ds", val_fraction=0, log=lambda _: None)
    tok = GPT2Tokenizer("data/gpt2")
    stored = np.concatenate(_rows(Dataset(out), "train")).tolist()
    assert stored == tok.encode(a.read_text()) + [EOT] + tok.encode(b.read_text()) + [EOT]
    assert Dataset(out).splits == ["train"]


def test_long_documents_are_stored_in_consecutive_rows_and_the_tail_is_held_out(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(prepare, "ROW_TOKENS", 100)
    out = prepare.prepare([WIKI], out=tmp_path / "ds", fmt="wikitext", log=lambda _: None)
    ds = Dataset(out)
    tok = ds.tokenizer()
    train, val = (np.concatenate(_rows(ds, s)) for s in ("train", "validation"))
    assert max(len(r) for r in _rows(ds, "train")) == 100
    articles = corpora.read_documents([WIKI], fmt="wikitext")
    assert len(articles) == 6 and articles[1].startswith(" = Frank Headlam = ")
    assert (train == EOT).sum() + (val == EOT).sum() == 6  # the cut article ends in validation
    text = tok.decode(np.concatenate([train, val]).tolist()).replace("<|endoftext|>", "")
    assert text == "".join(articles)
    held_out = len(tok.decode(val.tolist()).replace("<|endoftext|>", ""))
    assert held_out == pytest.approx(0.1 * len(text), abs=1)
    manifest = ds.manifest["splits"]
    assert manifest["train"]["tokens"] + manifest["validation"]["tokens"] == len(train) + len(val)


def test_jsonl_lambada_and_blank_line_blocks_give_one_document_each(tmp_path):
    lambada = ROOT / "data/lambada/lambada_sample.jsonl"
    assert len(corpora.read_documents([lambada], fmt="lambada")) == 1000
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("one\nstill one\n\ntwo\n \n\nthree", encoding="utf-8")
    assert corpora.read_documents([blocks], fmt="blocks") == ["one\nstill one", "two", "three"]
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"body": "x y"}\n\n{"body": "z"}\n', encoding="utf-8")
    assert corpora.read_documents([custom], fmt="jsonl", field="body") == ["x y", "z"]


def test_race_keeps_article_question_options_and_answer_as_text(tmp_path):
    out = prepare.prepare(
        [ROOT / "data/race"], out=tmp_path / "race", fmt="race", log=lambda _: None
    )
    source = Dataset(out).source("test")
    originals = [json.loads(p.read_text()) for p in sorted((ROOT / "data/race").rglob("*.txt"))]
    assert len(source) == sum(len(o["questions"]) for o in originals)
    row, first = source[0], originals[0]
    assert row["article"].decode() == first["article"]
    assert row["question"].decode() == first["questions"][0]
    assert [o.decode() for o in row["options"]] == first["options"][0]
    assert row["answer"] == "ABCD".index(first["answers"][0])


def _prepare_cli(*args, cwd=ROOT) -> subprocess.Popen:
    """`python -m megajax.data.prepare ARGS`, started (text stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "megajax.data.prepare", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_bad_input_fails_in_one_line_and_leaves_nothing(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    cases = [
        ([tmp_path / "missing.txt"], "missing.txt not found"),
        ([latin1], "latin1.txt is not UTF-8 text (invalid continuation byte at byte 3)"),
        ([empty], "(an empty corpus)"),
        ([bad_json, "--format", "jsonl"], "bad.jsonl line 2: not JSON"),
    ]
    runs = [_prepare_cli(*args, "--out", tmp_path / f"out{i}") for i, (args, _) in enumerate(cases)]
    for run, (_, message) in zip(runs, cases, strict=True):  # the processes run at once
        _, stderr = run.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert run.returncode == 2, stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt", "latin1.txt"]


def test_a_failure_after_writing_began_removes_the_partial_dataset(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A sentence here." + " " * 40, encoding="utf-8")  # the held-out tail: spaces
    with pytest.raises(ConfigError, match="the validation split has no tokens"):
        prepare.prepare(
            [text], out=tmp_path / "ds", tokenizer="bert", vocab_dir="data/bert", val_fraction=0.5
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_a_killed_preparation_is_never_read_as_a_dataset(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(WIKI.read_text(encoding="utf-8") * 40, encoding="utf-8")  # ~4.5 MB
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megajax.data.prepare", str(big), "--out", str(out)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".ds.incomplete-*/tokenizer")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: tokenizing has begun, shards may be partial
    proc.wait()
    (partial,) = tmp_path.glob(".ds.incomplete-*")
    assert not out.exists()
    with pytest.raises(ConfigError, match="preparation was interrupted"):
        Dataset(partial)
    small = tmp_path / "small.txt"
    small.write_text("Enough text for a dataset.", encoding="utf-8")
    prepare.prepare([small], out=out, val_fraction=0, log=lambda _: None)  # not in the way
    assert Dataset(out).manifest["splits"]["train"]["documents"] == 1


def test_a_text_source_is_prepared_once_and_then_reused(tmp_path):
    lines = []
    kw = dict(tokenizer="gpt2", vocab_dir="data/gpt2", val_fraction=0.1, cache_dir=tmp_path)
    first = prepare.cached(str(WIKI), log=lines.append, **kw)
    again = prepare.cached(str(WIKI), log=lines.append, **kw)
    assert first == again and sum("prepared" in line for line in lines) == 1
    assert prepare.cached(str(first), log=lines.append, **kw) == first  # a dataset is itself
    char = prepare.cached(str(WIKI), log=lines.append, **{**kw, "tokenizer": "char"})
    assert char != first and Dataset(char).tokenizer().vocab_size < 200
    with pytest.raises(ConfigError, match="data.source: .*nope.txt not found"):
        prepare.cached(str(tmp_path / "nope.txt"), log=lines.append, **kw)
    (tmp_path / "made_by_hand").mkdir()
    with pytest.raises(ConfigError, match="made_by_hand is not a prepared dataset"):
        prepare.cached(str(tmp_path / "made_by_hand"), log=lines.append, **kw)


def _whole_document_rows(docs, val_fraction, tok, *, eot, row_tokens):
    """{split: [(tokens, sentence lengths or None)]}: the rows of preparing the corpus in one
    piece, as megajax did before streaming: the tail val_fraction of the characters held out
    (the document it starts in cut there), each document part tokenized whole and cut into
    rows of at most row_tokens (BERT's between sentences)."""
    remaining = int(sum(map(len, docs)) * (1 - val_fraction))
    parts = {"train": [], "validation": []}
    for doc in docs:
        if remaining >= len(doc):
            parts["train"].append((doc, True))
        elif remaining > 0:
            parts["train"].append((doc[:remaining], False))
            parts["validation"].append((doc[remaining:], True))
        else:
            parts["validation"].append((doc, True))
        remaining -= len(doc)
    rows = {}
    for name, texts in parts.items():
        rows[name] = []
        for text, ends in texts:
            if eot is None:  # BERT: sentences of each line, rows cut between them
                sentences = [
                    ids
                    for line in text.split("\n")
                    for s in prepare._SENTENCE_END.split(line)
                    if (ids := tok.encode(s))
                ]
                row = []
                for sentence in sentences:
                    if row and sum(map(len, row)) + len(sentence) > row_tokens:
                        rows[name].append(row)
                        row = []
                    row.append(sentence)
                rows[name] += [row] if row else []
                continue
            ids = tok.encode(text) + [eot] * ends
            rows[name] += [[ids[i : i + row_tokens]] for i in range(0, len(ids), row_tokens)]
    return {
        name: [(sum(r, []), [len(s) for s in r] if eot is None else None) for r in split_rows]
        for name, split_rows in rows.items()
    }


@pytest.mark.parametrize("tokenizer", ["gpt2", "bert"])
def test_streamed_preparation_writes_the_rows_of_whole_documents(tokenizer, tmp_path, monkeypatch):
    """Read in 7-byte blocks, cut into pieces of ~300 characters, tokenized 4,000 characters at
    a time: the rows equal those of the whole documents (BERT: by the pure-Python WordPiece)."""
    monkeypatch.setattr(prepare, "ROW_TOKENS", 100)
    monkeypatch.setattr(corpora, "BLOCK_BYTES", 7)
    monkeypatch.setattr(corpora, "PIECE_CHARS", 300)
    text = tmp_path / "mixed.txt"  # verse (many cuts), WikiText (few: its lines end in spaces)
    plays, wiki = (ROOT / "data/shakespeare/input.txt").read_text(), WIKI.read_text()
    text.write_text(plays[:40_000] + wiki[:20_000] + "\n\n\nÜnïcödé — 中文字 ﬁ.\n" + plays[-5_000:])
    corpus = [(text, "text"), (ROOT / "data/lambada/lambada_sample.jsonl", "lambada")]
    vocab_dir = f"data/{tokenizer}"
    for path, fmt in corpus:
        out = prepare.prepare(
            [path],
            out=tmp_path / fmt,
            fmt=fmt,
            tokenizer=tokenizer,
            vocab_dir=vocab_dir,
            batch_chars=4000,
            shard_bytes=20_000,
            log=lambda _: None,
        )
        ds = Dataset(out)
        docs = corpora.read_documents([path], fmt=fmt)
        tok = BertTokenizer("data/bert/vocab.txt") if tokenizer == "bert" else ds.tokenizer()
        expected = _whole_document_rows(docs, 0.1, tok, eot=ds.tokenizer().eot_id, row_tokens=100)
        for split, rows in expected.items():
            source = ds.source(split)
            assert len(source) == len(rows) > 10
            for i, (tokens, lengths) in enumerate(rows):
                assert source[i]["tokens"].tolist() == tokens, (fmt, split, i)
                if lengths is not None:
                    assert source[i]["sentence_lengths"].tolist() == lengths, (fmt, split, i)
            assert ds.manifest["splits"][split]["rows"] == len(rows)
        assert len(ds.manifest["splits"]["train"]["files"]) > 1  # sharded as it went
    assert len(corpora.read_documents([text], fmt="text")) == 1  # one document, in pieces


def _peak_rss_mb(*corpora: Path) -> list[float]:
    """VmHWM (MB) of a process that prepares each corpus in batches of 64 K characters, one
    process each, run at once."""
    code = (
        "import sys; from megajax.data import prepare; assert prepare.main(sys.argv[1:]) == 0; "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    runs = []
    for corpus in corpora:
        args = [corpus, "--out", corpus.with_suffix(".ds"), "--tokenizer", "char",
                "--batch_chars", 65536, "--shard_mb", 4]  # fmt: skip
        runs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *map(str, args)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        )
    peaks = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        peaks.append(int(stdout.split()[-1]) / 1024)
    return peaks


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """A corpus 4 times larger (40 MB against 10 MB, one document) raises the peak RSS of its
    preparation by less than a third of the added text; holding the text alone would add all
    of it, and preparation before streaming held about 11 times it."""
    plays = (ROOT / "data/shakespeare/input.txt").read_text()
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(plays * 9)
    large.write_text(plays * 36)
    added_mb = (large.stat().st_size - small.stat().st_size) / 2**20
    small_mb, large_mb = _peak_rss_mb(small, large)
    assert large_mb - small_mb < added_mb / 3, (large_mb - small_mb, added_mb)


def test_datasets_of_the_previous_tfds_layout_still_read(tmp_path):
    """Layout 1.0.0 kept the rows in a TFDS dataset (tfds/); such a directory reads as before."""
    from megajax.data import builders

    new = Dataset(prepare.prepare([WIKI], out=tmp_path / "new", fmt="wikitext", log=print))
    old = tmp_path / "old"
    shutil.copytree(new.path, old, ignore=shutil.ignore_patterns("rows"))
    rows = {s: [new.source(s)[i] for i in range(len(new.source(s)))] for s in new.splits}
    builders.build("tokens", data_dir=str(old / "tfds"), splits=rows)
    manifest = json.loads((old / prepare.MANIFEST).read_text())
    for split in manifest["splits"].values():
        del split["files"]
    (old / prepare.MANIFEST).write_text(json.dumps({**manifest, "version": "1.0.0"}))
    for split, expected in rows.items():
        source = Dataset(old).source(split)
        assert [source[i]["tokens"].tolist() for i in range(len(source))] == [
            r["tokens"].tolist() for r in expected
        ]


def test_one_process_prepares_a_text_source_while_the_others_wait(tmp_path, monkeypatch):
    import threading

    kw = dict(tokenizer="char", vocab_dir="data/gpt2", val_fraction=0.1, cache_dir=tmp_path)
    calls, follower = [], {}
    real = prepare.prepare
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    wait = threading.Thread(
        target=lambda: follower.update(
            path=prepare.cached(str(WIKI), lead=False, log=lambda _: None, **kw)
        )
    )
    wait.start()
    time.sleep(0.6)  # past the follower's first look and its first half-second wait
    assert wait.is_alive() and not list(tmp_path.iterdir())  # it waits, writing nothing
    lead = prepare.cached(str(WIKI), log=lambda _: None, **kw)
    wait.join(timeout=60)
    assert follower["path"] == lead and len(calls) == 1
    # Nobody preparing where it looks (a work directory not shared by the hosts): one line.
    with pytest.raises(ConfigError, match="process 0 is not preparing .* every host sees"):
        prepare.cached(str(WIKI), lead=False, log=lambda _: None, wait_s=0.6,
                       **{**kw, "cache_dir": tmp_path / "elsewhere"})  # fmt: skip


def test_a_cached_dataset_is_named_by_its_tokenizer_files_not_their_directory(tmp_path):
    """A text data.source trained with --hf_checkpoint: data.vocab_dir is the checkpoint's
    directory, and only the tokenizer's own files (tokenizer.json; GPT-2's vocab.json and
    merges.txt) name the cached dataset, so weights beside them are never read. The GPT-2 BPE's
    cached datasets keep the names they had when the whole directory was hashed."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(ROOT / "data/gpt2", checkpoint)
    ByteLevelBPETokenizer(str(checkpoint / "vocab.json"), str(checkpoint / "merges.txt")).save(
        str(checkpoint / "tokenizer.json")
    )
    weights = checkpoint / "model.safetensors"
    kw = dict(val_fraction=0.1, cache_dir=tmp_path / "cache", log=lambda _: None)
    names = {}
    for tokenizer in ("gpt2", "hf"):
        weights.write_bytes(b"the first weights")
        names[tokenizer] = prepare.cached(
            str(WIKI), tokenizer=tokenizer, vocab_dir=str(checkpoint), **kw
        )
        weights.write_bytes(b"other weights")
        again = prepare.cached(str(WIKI), tokenizer=tokenizer, vocab_dir=str(checkpoint), **kw)
        assert again == names[tokenizer]
    file = checkpoint / "tokenizer.json"  # named itself
    assert prepare.cached(str(WIKI), tokenizer="hf", vocab_dir=str(file), **kw) == names["hf"]
    shipped = prepare.cached(str(WIKI), tokenizer="gpt2", vocab_dir="data/gpt2", **kw)
    assert shipped == names["gpt2"] and len(list((tmp_path / "cache").iterdir())) == 2
    assert shipped.name == "wiki.valid.head429-gpt2-6ec04571802f892e"  # as before


def test_documents_begin_with_a_tokenizer_jsons_beginning_of_text_token(tmp_path):
    """A tokenizer.json whose post-processor starts a text with <s> (Llama's; here GPT-2's BPE
    with one added): each document is prepared as <s>, its ids, end of text, as Megatron-LM's
    Llama preprocessing writes it and as evaluation and generation read text; the held-out part
    of the document the cut falls in continues it, without <s>. data.add_bos=False (--no_bos)
    writes none; the switch is in the manifest and names the cached dataset."""
    from tokenizers import processors
    from tokenizers.implementations import ByteLevelBPETokenizer

    from megajax import config
    from megajax.data import loader

    bpe = ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt")
    bpe.add_special_tokens(["<s>"])
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    bpe.save(str(tmp_path / "tokenizer.json"))
    first, second = "The first document.\n", "The second, cut by the held-out tail of the corpus."
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(first, encoding="utf-8")
    b.write_text(second, encoding="utf-8")
    cut = int(0.7 * len(first + second)) - len(first)  # in the second document
    gpt2 = GPT2Tokenizer("data/gpt2")
    train = [*gpt2.encode(first), EOT, *gpt2.encode(second[:cut])]
    with_bos = [bos, *gpt2.encode(first), EOT, bos, *gpt2.encode(second[:cut])]
    validation = [*gpt2.encode(second[cut:]), EOT]
    kw = dict(tokenizer="hf", vocab_dir=str(tmp_path), val_fraction=0.3, log=lambda _: None)
    ds = Dataset(prepare.prepare([a, b], out=tmp_path / "bos", **kw))
    assert np.concatenate(_rows(ds, "train")).tolist() == with_bos
    assert np.concatenate(_rows(ds, "validation")).tolist() == validation
    assert (ds.manifest["add_bos"], ds.manifest["bos"]) == (True, bos)
    argv = [a, b, "--out", tmp_path / "plain", "--tokenizer", "hf", "--vocab_dir", tmp_path]
    assert prepare.main([str(x) for x in [*argv, "--val_fraction", "0.3", "--no_bos"]]) == 0
    plain = Dataset(tmp_path / "plain")
    assert np.concatenate(_rows(plain, "train")).tolist() == train
    assert (plain.manifest["add_bos"], plain.manifest["bos"]) == (False, None)

    firsts = {}
    for tokenizer, vocab_dir in (("hf", tmp_path), ("gpt2", "data/gpt2")):
        for add_bos in (True, False):
            cfg = config.replace(
                config.load("configs/gpt2_tiny.py"),
                model=dict(seq_len=32),
                data=dict(source=str(WIKI), tokenizer=tokenizer, vocab_dir=str(vocab_dir),
                          add_bos=add_bos),
            )  # fmt: skip
            _, train_data, _ = loader.loaders(cfg, workdir=tmp_path / "run", log=lambda _: None)
            (windows,) = train_data.datasets
            firsts[tokenizer, add_bos] = (windows.name, int(windows[0]["inputs"][0]))
    assert firsts["hf", True][1] == bos and firsts["hf", False][1] != bos
    assert firsts["hf", True][0] != firsts["hf", False][0]  # cached apart
    assert firsts["gpt2", True] == firsts["gpt2", False]  # no such token: the same dataset
    assert firsts["gpt2", True][0].startswith("wiki.valid.head429-gpt2-6ec04571802f892e")
