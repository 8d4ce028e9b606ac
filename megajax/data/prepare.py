"""Local corpora -> a TFDS dataset (array_record) of token ids, tokenized once.

    python -m megajax.data.prepare --format text --tokenizer gpt2 --out prepared/shakespeare \
        data/shakespeare/input.txt

Formats: `text` (a document per file), `blocks` (documents separated by blank lines), `jsonl`
(a document per line, in --field), `lambada` (jsonl with "text"), `wikitext` (WikiText's
tokenized files, a document per ` = Title = ` article) and `race` (RACE's question files, kept
as text, one row per question). The tail --val_fraction of the characters is held out as the
`validation` split. The dataset is written to a temporary directory beside --out and renamed
only once complete, with `megajax.json` (the manifest) written last: a directory without it is
never read as a dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from megajax.config import ConfigError
from megajax.data.corpora import FORMATS, files, read_documents, read_race, split_validation
from megajax.data.tokenizer import BertTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer

TOKENIZERS = ("gpt2", "bert", "char", "hf")
MANIFEST = "megajax.json"
ROW_TOKENS = 2048  # long documents are stored as consecutive rows of at most this many tokens
# Characters below which a process pool costs more to start than it saves (tiktoken encodes
# about 5 M characters/s per core, the pure-Python WordPiece about 0.5 M).
POOL_CHARS = {"gpt2": 32_000_000, "char": 32_000_000, "bert": 2_000_000, "hf": 32_000_000}
VERSION = "1.0.0"  # of the dataset layout; part of a cached dataset's name
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


# Tokenizing, in this process or in a pool of workers that each load the tokenizer once.
_TOKENIZER = None


def load_tokenizer(dataset_or_spec):
    """The tokenizer of a prepared dataset directory (its manifest and tokenizer/ files)."""
    directory = Path(dataset_or_spec)
    spec = json.loads((directory / MANIFEST).read_text())["tokenizer"]
    return _tokenizer(spec, directory / "tokenizer")


def _tokenizer(spec: dict, files: Path):
    if spec["name"] == "gpt2":
        return GPT2Tokenizer(files)
    if spec["name"] == "bert":
        return BertTokenizer(files / "vocab.txt", lowercase=spec["lowercase"])
    if spec["name"] == "hf":
        return HFTokenizer(files)
    return CharTokenizer("".join(spec["chars"]))


def _init_worker(spec: dict, files: str):
    global _TOKENIZER
    _TOKENIZER = _tokenizer(spec, Path(files))


def _encode(docs: list[str]):
    """[(tokens int32, sentence lengths int32 or None)] of the documents, by _TOKENIZER."""
    out = []
    for doc in docs:
        if isinstance(_TOKENIZER, BertTokenizer):
            sentences = [
                ids
                for line in doc.split("\n")
                for s in _SENTENCE_END.split(line)
                if (ids := _TOKENIZER.encode(s))
            ]
            lengths = np.array([len(s) for s in sentences], np.int32)
            tokens = np.array([i for s in sentences for i in s], np.int32)
            out.append((tokens, lengths))
        else:
            out.append((np.array(_TOKENIZER.encode(doc), np.int32), None))
    return out


def _batches(docs, *, target_chars: int = 1 << 18):
    """Documents grouped into work items of about target_chars characters."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= target_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _rows(encoded, ends, eot):
    """Feature dicts of the stored rows: each document's tokens (+ EOT if it ends there), cut
    into chunks of at most ROW_TOKENS (BERT rows are cut between sentences)."""
    for (tokens, lengths), end in zip(encoded, ends, strict=True):
        if lengths is None:
            if end and eot is not None:
                tokens = np.append(tokens, np.int32(eot))
            for start in range(0, len(tokens), ROW_TOKENS):
                yield {"tokens": tokens[start : start + ROW_TOKENS]}
            continue
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        first = 0
        for s in range(1, len(lengths) + 1):
            last = s == len(lengths)
            if last or bounds[s + 1] - bounds[first] > ROW_TOKENS:
                yield {
                    "tokens": tokens[bounds[first] : bounds[s]],
                    "sentence_lengths": lengths[first:s],
                }
                first = s


class _Progress:
    """A progress line at most once a second: MB of text tokenized, MB/s, tokens."""

    def __init__(self, total_chars: int, log):
        self.total, self.done, self.tokens, self.log = total_chars, 0, 0, log
        self.began = self.shown = time.perf_counter()

    def update(self, chars: int, tokens: int, *, final: bool = False):
        self.done += chars
        self.tokens += tokens
        now = time.perf_counter()
        if final or now - self.shown >= 1:
            self.shown = now
            seconds = max(now - self.began, 1e-9)
            self.log(
                f"tokenized {self.done / 1e6:.1f}/{self.total / 1e6:.1f} M chars, "
                f"{self.done / 1e6 / seconds:.2f} M chars/s, {self.tokens:,} tokens"
            )


def _tokenize_all(parts, *, spec, files, workers, log):
    """{split: [(tokens, lengths)]} for {split: [(text, ends)]}, in a pool if it pays off."""
    total = sum(len(t) for docs in parts.values() for t, _ in docs)
    progress = _Progress(total, log)
    pool = None
    if workers > 1 and total >= POOL_CHARS[spec["name"]]:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(spec, str(files))
        )
    else:
        _init_worker(spec, str(files))
    try:
        result = {}
        for name, docs in parts.items():
            batches = list(_batches([t for t, _ in docs]))
            encoded = []
            mapped = pool.imap(_encode, batches) if pool else map(_encode, batches)
            for batch, done in zip(batches, mapped, strict=True):
                encoded += done
                progress.update(sum(map(len, batch)), sum(len(t) for t, _ in done))
            result[name] = encoded
    finally:
        if pool:
            pool.terminate()
    progress.update(0, 0, final=True)
    return result


def _save_tokenizer(name: str, *, vocab_dir, docs, into: Path) -> dict:
    """Copy the tokenizer's files into the dataset (it is read with the ids it was written with)."""
    into.mkdir(parents=True)
    if name == "gpt2":
        GPT2Tokenizer(vocab_dir)  # checks the files before they are copied
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(Path(vocab_dir) / f, into / f)
        return {"name": "gpt2"}
    if name == "bert":
        vocab = Path(vocab_dir) / "vocab.txt" if Path(vocab_dir).is_dir() else Path(vocab_dir)
        BertTokenizer(vocab)
        shutil.copy(vocab, into / "vocab.txt")
        return {"name": "bert", "lowercase": True}
    if name == "char":
        return {"name": "char", "chars": sorted(set().union(*map(set, docs)))}
    if name == "hf":  # a Hugging Face tokenizer.json (Llama's)
        source = Path(vocab_dir) / "tokenizer.json" if Path(vocab_dir).is_dir() else vocab_dir
        HFTokenizer(source)
        shutil.copy(source, into / "tokenizer.json")
        return {"name": "hf"}
    raise ConfigError(f"--tokenizer {name!r}: use one of {', '.join(TOKENIZERS)}")


def fingerprint(inputs, **options) -> str:
    """sha256 (first 16) of the input files' bytes and the options: names a cached dataset."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files(inputs):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def prepare(
    inputs,
    *,
    out,
    fmt: str = "text",
    tokenizer: str = "gpt2",
    vocab_dir: str = "data/gpt2",
    field: str = "text",
    val_fraction: float = 0.1,
    split: str = "test",
    workers: int | None = None,
    log=print,
) -> Path:
    """Tokenize `inputs` into a dataset at `out`; returns `out`. Nothing is left at `out` (or
    anywhere) unless it completes."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another --out")
    began = time.perf_counter()
    nbytes = sum(p.stat().st_size for p in files(inputs))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{uuid.uuid4().hex[:12]}"
    from megajax.data import builders  # here: tokenizing workers import this module, not TFDS

    try:
        manifest = {"format": fmt, "inputs": [str(p) for p in inputs], "bytes": nbytes}
        if fmt == "race":
            rows = read_race(inputs)
            manifest["splits"] = {split: {"rows": len(rows)}}
            builders.build("race", data_dir=str(tmp / "tfds"), splits={split: rows})
        else:
            manifest.update(
                _prepare_tokens(
                    read_documents(inputs, fmt=fmt, field=field),
                    tmp=tmp,
                    tokenizer=tokenizer,
                    vocab_dir=vocab_dir,
                    val_fraction=val_fraction,
                    workers=workers or os.cpu_count() or 1,
                    log=log,
                )
            )
        seconds = time.perf_counter() - began
        manifest.update(seconds=round(seconds, 3), version=VERSION)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks completion
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{k} {v['rows']:,} rows" for k, v in manifest["splits"].items())
    log(
        f"prepared {out}: {counts}; {nbytes / 1e6:.2f} MB of text in {seconds:.2f}s "
        f"({nbytes / 1e6 / seconds:.2f} MB/s)"
    )
    return out


def _prepare_tokens(docs, *, tmp, tokenizer, vocab_dir, val_fraction, workers, log) -> dict:
    spec = _save_tokenizer(tokenizer, vocab_dir=vocab_dir, docs=docs, into=tmp / "tokenizer")
    train, val = split_validation(docs, val_fraction)
    parts = {"train": train, "validation": val} if val else {"train": train}
    encoded = _tokenize_all(parts, spec=spec, files=tmp / "tokenizer", workers=workers, log=log)
    eot = _tokenizer(spec, tmp / "tokenizer").eot_id
    splits, rows = {}, {}
    (tmp / "index").mkdir()
    for name, docs_of_split in parts.items():
        rows[name] = list(_rows(encoded[name], [e for _, e in docs_of_split], eot))
        if not rows[name]:
            raise ConfigError(f"the {name} split has no tokens: use more text")
        index = {"row_tokens": np.array([len(r["tokens"]) for r in rows[name]], np.int64)}
        if tokenizer == "bert":
            index["sentence_lengths"] = np.concatenate([r["sentence_lengths"] for r in rows[name]])
            index["row_sentences"] = np.array([len(r["sentence_lengths"]) for r in rows[name]])
        np.savez(tmp / "index" / f"{name}.npz", **index)
        splits[name] = {
            "rows": len(rows[name]),
            "documents": sum(e for _, e in docs_of_split),
            "tokens": int(index["row_tokens"].sum()),
        }
    from megajax.data import builders

    kind = "sentences" if tokenizer == "bert" else "tokens"
    builders.build(kind, data_dir=str(tmp / "tfds"), splits=rows)
    return {"tokenizer": spec, "splits": splits}


def cached(
    source: str,
    *,
    tokenizer: str,
    vocab_dir: str,
    val_fraction: float,
    cache_dir,
    log,
    lead: bool = True,
    wait_s: float = 120,
):
    """A prepared dataset for `source`: itself if it is one, else the text file prepared once
    into cache_dir (named by the fingerprint of its bytes and options, reused after).

    In a multi-process job only the lead process prepares; the others (lead=False) wait for its
    manifest, and stop with a clear line if after `wait_s` seconds nobody is preparing it in
    cache_dir (a work directory the hosts do not share)."""
    path = Path(source)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"data.source: {path} is not a prepared dataset (no {MANIFEST})")
    if not path.is_file():
        raise ConfigError(
            f"data.source: {path} not found: name a text file or a dataset prepared by "
            f"`python -m megajax.data.prepare CORPUS --out {path}` (--set data.source=PATH)"
        )
    options = dict(tokenizer=tokenizer, val_fraction=val_fraction, version=VERSION)
    vocab = [Path(vocab_dir)] if tokenizer != "char" else []
    out = Path(cache_dir) / f"{path.stem}-{tokenizer}-{fingerprint([path, *vocab], **options)}"
    if (out / MANIFEST).is_file():
        return out
    if out.exists():  # not a dataset (prepare renames only complete ones): made by hand
        raise ConfigError(f"{out} exists but is not a prepared dataset: remove it")
    if not lead:
        return _wait_for(out, wait_s, log)
    try:
        return prepare(
            [path],
            out=out,
            tokenizer=tokenizer,
            vocab_dir=vocab_dir,
            val_fraction=val_fraction,
            workers=1,
            log=log,
        )
    except OSError:
        if (out / MANIFEST).is_file():  # another process (host) finished it first
            return out
        raise


def _wait_for(out: Path, wait_s: float, log) -> Path:
    """`out` once the lead process has renamed it complete (its manifest inside)."""
    began, told = time.monotonic(), time.monotonic()
    log(f"waiting for process 0 to prepare {out}")
    while not (out / MANIFEST).is_file():
        now = time.monotonic()
        underway = any(out.parent.glob(f".{out.name}.incomplete-*"))
        if not underway and now - began > wait_s:
            raise ConfigError(
                f"process 0 is not preparing {out} after {wait_s:.0f}s: the work directory "
                f"must be a file system every host sees"
            )
        if now - told > 300:
            log(f"still waiting for process 0 to prepare {out} ({now - began:.0f}s)")
            told = now
        time.sleep(0.5)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="files or directories of the corpus")
    parser.add_argument("--out", required=True, help="the dataset directory to create")
    parser.add_argument("--format", default="text", choices=FORMATS)
    parser.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    parser.add_argument(
        "--vocab_dir",
        help="vocab.json + merges.txt (gpt2), vocab.txt (bert) or tokenizer.json (hf); "
        "default data/gpt2 or data/bert",
    )
    parser.add_argument("--field", default="text", help="the text field of --format jsonl")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out tail")
    parser.add_argument("--split", default="test", help="the split name of --format race")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: all)")
    args = parser.parse_args(argv)
    vocab_dir = args.vocab_dir or ("data/bert" if args.tokenizer == "bert" else "data/gpt2")
    try:
        prepare(
            args.inputs,
            out=args.out,
            fmt=args.format,
            tokenizer=args.tokenizer,
            vocab_dir=vocab_dir,
            field=args.field,
            val_fraction=args.val_fraction,
            split=args.split,
            workers=args.workers or None,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
