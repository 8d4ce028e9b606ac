"""Local corpora -> token rows in array_record shards (megajax/data/shards.py), streamed.

    python -m megajax.data.prepare --format text --tokenizer gpt2 --out prepared/shakespeare \
        data/shakespeare/input.txt

Formats: `text` (a document per file), `blocks` (documents separated by blank lines), `jsonl`
(a document per line, in --field), `lambada` (jsonl with "text"), `wikitext` (WikiText's
tokenized files, a document per ` = Title = ` article), `race` (RACE's question files, kept
as text, one row per question) and `chat` (a conversation per line, rendered through the chat
template, a row of its ids and loss mask each: megajax/data/chat.py). A document ends with the
tokenizer's end-of-text token and, unless --no_bos, begins with its beginning-of-text token if
it has one (a tokenizer.json's, as Llama's <s>). The tail --val_fraction of the characters (of
the conversations) is held out as the `validation` split.
The dataset is written to a temporary directory beside --out and renamed only once complete,
with `megajax.json` (the manifest) written last: a directory without it is never read as a
dataset.

The corpus is read twice, a block at a time: once to count its characters, once to tokenize
batches of --batch_chars characters on --threads threads while the rows of the previous batch
are written. Memory holds a few batches, one document of the jsonl, blocks and wikitext formats
(text files are cut into pieces at line breaks that tokenize apart as together), and the index
(8 bytes a row, 4 a BERT sentence); the rows are those of tokenizing each document whole.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from megajax.config import ConfigError
from megajax.data import chat, shards
from megajax.data.corpora import (
    FORMATS,
    conversation_lines,
    count_lines,
    files,
    pieces,
    read_race,
)
from megajax.data.tokenizer import BertTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer

TOKENIZERS = ("gpt2", "bert", "char", "hf")
CHAT_TOKENIZERS = ("gpt2", "hf")  # those that give each token's characters
# How a conversation's record is laid out (the manifest's "record"; shards.Rows reads it).
CHAT_RECORD = "n token ids (dtype, little-endian), then n loss-mask bytes (1: trained on)"
# Each tokenizer's files, as data.vocab_dir and a dataset's tokenizer/ folder hold them (gpt2's
# sorted, the order cached datasets were always named by); char's characters come from the text.
TOKENIZER_FILES = {
    "gpt2": ("merges.txt", "vocab.json"),
    "bert": ("vocab.txt",),
    "hf": ("tokenizer.json",),
    "char": (),
}
MANIFEST = "megajax.json"
ROW_TOKENS = 2048  # long documents are stored as consecutive rows of at most this many tokens
BATCH_CHARS = 1 << 21  # characters tokenized at once (in pieces of corpora.PIECE_CHARS)
VERSION = "2.0.0"  # of the dataset layout; part of a cached dataset's name
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


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


def _encode(tokenizer, texts: list[str], threads: int):
    """[(tokens int32, sentence lengths int32 or None)] of the texts. BERT's sentences are the
    text's lines split after sentence ends, each tokenized alone; empty ones are dropped."""
    if not isinstance(tokenizer, BertTokenizer):
        encoded = tokenizer.encode_batch(texts, threads=threads)
        return [(np.asarray(t, np.int32), None) for t in encoded]
    sentences = [
        [s for line in text.split("\n") for s in _SENTENCE_END.split(line)] for text in texts
    ]
    ids = iter(tokenizer.encode_batch([s for group in sentences for s in group], threads=threads))
    out = []
    for group in sentences:
        encoded = [i for i in (next(ids) for _ in group) if i]
        lengths = np.array([len(i) for i in encoded], np.int32)
        tokens = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
        out.append((tokens, lengths))
    return out


class _Rows:
    """Cuts one split's token stream into stored rows as it comes: each document's tokens (after
    BOS where it begins, + EOT where it ends) in rows of at most ROW_TOKENS, BERT's cut between
    sentences (a sentence longer than ROW_TOKENS is a row of its own). The same rows as cutting
    each document whole."""

    def __init__(self, writer: shards.Writer, *, bos: int | None, eot: int | None):
        self.writer, self.bos, self.eot = writer, bos, eot
        self.tokens: list[np.ndarray] = []  # of the part of the document not yet in a row
        self.lengths: list[int] = []  # its sentences (BERT)
        self.size = 0
        self.documents = 0

    def add(
        self, tokens: np.ndarray, lengths: np.ndarray | None, *, first: bool, last: bool, eot: bool
    ):
        """A piece of a document; `first`: the document begins with it, `last`: the document's
        part in this split ends with it, `eot`: the document ends with it."""
        self.documents += eot
        if lengths is None:
            if first and self.bos is not None:
                tokens = np.concatenate([np.int32([self.bos]), tokens])
            if eot and self.eot is not None:
                tokens = np.append(tokens, np.int32(self.eot))
            self.tokens.append(tokens)
            self.size += len(tokens)
            if self.size >= ROW_TOKENS or last:
                stream = np.concatenate(self.tokens)
                whole = len(stream) if last else len(stream) - len(stream) % ROW_TOKENS
                for start in range(0, whole, ROW_TOKENS):
                    self.writer.write(stream[start : start + ROW_TOKENS])
                self.tokens, self.size = [stream[whole:]], len(stream) - whole
            return
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for s, n in enumerate(lengths.tolist()):
            if self.lengths and self.size + n > ROW_TOKENS:
                self._flush_sentences()
            self.tokens.append(tokens[bounds[s] : bounds[s + 1]])
            self.lengths.append(n)
            self.size += n
        if last and self.lengths:
            self._flush_sentences()

    def _flush_sentences(self):
        self.writer.write(np.concatenate(self.tokens), np.array(self.lengths, np.int32))
        self.tokens, self.lengths, self.size = [], [], 0


def _split(pieces, train_chars: int):
    """(split, text, first, last, eot) of the (text, ends) pieces: the first train_chars
    characters go to train, the rest to validation; the document the cut falls in ends its train
    part there, and its validation part continues it (it does not begin a document)."""
    remaining, first = train_chars, True
    for text, ends in pieces:
        if remaining >= len(text):
            yield "train", text, first, ends or remaining == len(text), ends
        elif remaining > 0:
            yield "train", text[:remaining], first, True, False
            yield "validation", text[remaining:], False, ends, ends
        else:
            yield "validation", text, first, ends, ends
        remaining -= len(text)
        first = ends


def _batches(items, chars: int):
    """Lists of items of about `chars` characters of text in all."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _release_free_memory():
    """Return freed heap pages to the system (glibc): batches are allocated on one thread and
    freed on another, and without this the two threads' heaps grow slowly with the corpus."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 (glibc only)
except (OSError, AttributeError):
    _LIBC = None


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


def tokenizer_files(name: str, vocab_dir) -> list[Path]:
    """The files the tokenizer is read from, the only ones of vocab_dir that a cached dataset's
    name hashes: gpt2's two in vocab_dir; bert's and hf's one in vocab_dir, or the file it names."""
    directory, names = Path(vocab_dir), TOKENIZER_FILES.get(name, ())
    if len(names) == 1 and not directory.is_dir():  # vocab.txt or tokenizer.json named itself
        found = [directory]
    else:
        found = [directory / f for f in names]
    for f in found:
        if not f.is_file():
            raise ConfigError(
                f"{f} not found: data.vocab_dir (--vocab_dir) holds the {name} tokenizer's files"
            )
    return found


def _save_tokenizer(name: str, *, vocab_dir, chars: set, into: Path):
    """(spec, tokenizer): the tokenizer's files copied into the dataset (it is read with the ids
    it was written with), checked by loading them before they are copied."""
    into.mkdir(parents=True)
    if name == "char":
        spec = {"name": "char", "chars": sorted(chars)}
        return spec, _tokenizer(spec, into)
    if name not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {name!r}: use one of {', '.join(TOKENIZERS)}")
    sources = tokenizer_files(name, vocab_dir)
    if name == "gpt2":
        tokenizer, spec = GPT2Tokenizer(vocab_dir), {"name": "gpt2"}
    elif name == "bert":
        tokenizer, spec = BertTokenizer(sources[0]), {"name": "bert", "lowercase": True}
    else:  # a Hugging Face tokenizer.json (Llama's)
        tokenizer, spec = HFTokenizer(sources[0]), {"name": "hf"}
    for source, kept in zip(sources, TOKENIZER_FILES[name], strict=True):
        shutil.copy(source, into / kept)
    return spec, tokenizer


def fingerprint(inputs, **options) -> str:
    """sha256 (first 16) of the input files' bytes and the options: names a cached dataset."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files(inputs):
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def prepare(
    inputs,
    *,
    out,
    fmt: str = "text",
    tokenizer: str = "gpt2",
    vocab_dir: str = "data/gpt2",
    add_bos: bool = True,
    field: str = "text",
    val_fraction: float = 0.1,
    split: str = "test",
    chat_template: str = "",
    threads: int | None = None,
    batch_chars: int = BATCH_CHARS,
    shard_bytes: int = shards.SHARD_BYTES,
    log=print,
) -> Path:
    """Tokenize `inputs` into a dataset at `out`; returns `out`. `add_bos`: each document begins
    with the tokenizer's beginning-of-text token, if it has one (not conversations: their
    template decides). `chat_template`: a .jinja file for fmt="chat" (default: vocab_dir's
    own, else chat.DEFAULT_TEMPLATE). Nothing is left at `out` (or anywhere) unless it
    completes."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another --out")
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    began = time.perf_counter()
    nbytes = sum(p.stat().st_size for p in files(inputs))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{uuid.uuid4().hex[:12]}"
    try:
        manifest = {"format": fmt, "inputs": [str(p) for p in inputs], "bytes": nbytes}
        if fmt == "race":
            from megajax.data import builders  # TFDS, for RACE's text rows only

            rows = read_race(inputs)
            manifest["splits"] = {split: {"rows": len(rows)}}
            builders.build("race", data_dir=str(tmp / "tfds"), splits={split: rows})
        elif fmt == "chat":
            manifest.update(
                _prepare_chat(
                    inputs,
                    tmp=tmp,
                    tokenizer=tokenizer,
                    vocab_dir=vocab_dir,
                    chat_template=chat_template,
                    val_fraction=val_fraction,
                    shard_bytes=shard_bytes,
                    log=log,
                )
            )
        else:
            manifest.update(
                _prepare_tokens(
                    inputs,
                    fmt=fmt,
                    field=field,
                    tmp=tmp,
                    tokenizer=tokenizer,
                    vocab_dir=vocab_dir,
                    add_bos=add_bos,
                    val_fraction=val_fraction,
                    threads=threads or os.cpu_count() or 1,
                    batch_chars=batch_chars,
                    shard_bytes=shard_bytes,
                    log=log,
                )
            )
        seconds = time.perf_counter() - began
        manifest.update(seconds=round(seconds, 3), version=VERSION)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks completion
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    unit = "conversations" if fmt == "chat" else "rows"
    counts = ", ".join(f"{k} {v['rows']:,} {unit}" for k, v in manifest["splits"].items())
    log(
        f"prepared {out}: {counts}; {nbytes / 1e6:.2f} MB of text in {seconds:.2f}s "
        f"({nbytes / 1e6 / seconds:.2f} MB/s)"
    )
    return out


def _prepare_tokens(
    inputs, *, fmt, field, tmp, tokenizer, vocab_dir, add_bos, val_fraction, threads,
    batch_chars, shard_bytes, log
) -> dict:  # fmt: skip
    """Two passes over the corpus, streamed: one counts its characters (where validation
    begins) and collects the character set, the next tokenizes batches of pieces on a
    background thread while this one cuts rows and writes shards."""
    total, chars = 0, set()
    for text, _ in pieces(inputs, fmt=fmt, field=field):
        total += len(text)
        if tokenizer == "char":
            chars.update(text)
    if not total:
        raise ConfigError(f"no text in {', '.join(map(str, inputs))} (an empty corpus)")
    spec, tok = _save_tokenizer(tokenizer, vocab_dir=vocab_dir, chars=chars, into=tmp / "tokenizer")
    train_chars = int(total * (1 - val_fraction))
    names = ["train", "validation"] if train_chars < total else ["train"]
    dtype = shards.dtype_for(tok.vocab_size)
    writers = {n: shards.Writer(tmp, n, dtype=dtype, shard_bytes=shard_bytes) for n in names}
    bos = tok.bos_id if add_bos else None
    rows = {n: _Rows(writers[n], bos=bos, eot=tok.eot_id) for n in names}
    progress = _Progress(total, log)

    def store(batch, encoded):
        for (name, _, first, last, eot), (tokens, lengths) in zip(batch, encoded, strict=True):
            rows[name].add(tokens, lengths, first=first, last=last, eot=eot)
        progress.update(sum(len(b[1]) for b in batch), sum(len(t) for t, _ in encoded))
        _release_free_memory()

    items = _split(pieces(inputs, fmt=fmt, field=field), train_chars)
    with ThreadPoolExecutor(1, "megajax-tokenize") as pool:
        ahead = collections.deque()  # (batch, its tokens), one tokenizing while one is stored
        for batch in _batches(items, batch_chars):
            ahead.append((batch, pool.submit(_encode, tok, [b[1] for b in batch], threads)))
            if len(ahead) > 1:
                batch, future = ahead.popleft()
                store(batch, future.result())
        while ahead:
            batch, future = ahead.popleft()
            store(batch, future.result())
    progress.update(0, 0, final=True)
    splits = {}
    for name in names:
        splits[name] = {**writers[name].close(), "documents": rows[name].documents}
        splits[name]["files"] = writers[name].files
        if not splits[name]["rows"]:
            raise ConfigError(f"the {name} split has no tokens: use more text")
    # add_bos: what was asked; bos: the token each document begins with (None: none written).
    return {"tokenizer": spec, "add_bos": add_bos, "bos": bos, "dtype": dtype, "splits": splits}


def _prepare_chat(
    inputs, *, tmp, tokenizer, vocab_dir, chat_template, val_fraction, shard_bytes, log
) -> dict:  # fmt: skip
    """Conversations, a JSON object a line, streamed: each rendered through the chat template
    and written as one record (CHAT_RECORD); the last val_fraction of them (at least one, if
    val_fraction > 0) are the validation split. A line that cannot be encoded stops it with
    its file and line."""
    if tokenizer not in CHAT_TOKENIZERS:
        raise ConfigError(
            f"conversations are read with the {' or '.join(CHAT_TOKENIZERS)} tokenizer (one that "
            f"gives each token's characters), not {tokenizer!r}"
        )
    total = count_lines(inputs)
    if not total:
        raise ConfigError(f"no conversations in {', '.join(map(str, inputs))} (an empty corpus)")
    held = max(1, round(total * val_fraction)) if val_fraction else 0
    if total - held < 1:
        raise ConfigError(
            f"{total} conversation(s) in {', '.join(map(str, inputs))}: too few to hold out "
            f"val_fraction={val_fraction} of them and train on the rest"
        )
    spec, tok = _save_tokenizer(tokenizer, vocab_dir=vocab_dir, chars=set(), into=tmp / "tokenizer")
    source, specials, origin = chat.template_source(vocab_dir, chat_template)
    try:
        template = chat.ChatTemplate(source, tok, specials)
    except chat.ChatError as e:  # it does not parse
        raise ConfigError(f"{origin}: {e}") from None
    (tmp / "tokenizer" / "chat_template.jinja").write_text(source, encoding="utf-8")
    names = ["train", "validation"] if held else ["train"]
    dtype = shards.dtype_for(tok.vocab_size)
    writers = {
        n: shards.Writer(tmp, n, dtype=dtype, shard_bytes=shard_bytes, masked=True) for n in names
    }
    scored = dict.fromkeys(names, 0)
    began = shown = time.perf_counter()
    for c, (k, path, line, record) in enumerate(conversation_lines(inputs)):
        try:
            ids, mask = template.encode(record)
        except chat.ChatError as e:
            raise ConfigError(f"{path} line {line}: {e}") from None
        name = names[c >= total - held]
        # first: the first token trained on as a target (truncation keeps it if first <= seq_len)
        first = int(np.argmax(mask[1:])) + 1
        writers[name].write(ids, mask=mask, file=k, line=line, first=first)
        scored[name] += int(mask[1:].sum())
        if (now := time.perf_counter()) - shown >= 1 or c + 1 == total:
            shown = now
            log(f"encoded {c + 1:,}/{total:,} conversations, {(c + 1) / (now - began):,.0f}/s")
    splits = {}
    for name in names:
        written = writers[name].close()  # rows (conversations) and tokens
        splits[name] = {**written, "scored": scored[name], "files": writers[name].files}
    return {
        "tokenizer": spec,
        "dtype": dtype,
        "record": CHAT_RECORD,
        "chat": {
            "template": "tokenizer/chat_template.jinja",
            "origin": origin,  # "default", or the file or directory it was read from
            "specials": template.specials,
            "mask": "generation blocks" if template.has_generation else "rendered prefixes",
        },
        "splits": splits,
    }


def load_chat_template(directory) -> chat.ChatTemplate:
    """The chat template a dataset of conversations was prepared with, over its tokenizer."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != "chat":
        raise ConfigError(f"{directory} holds no conversations (format {manifest.get('format')})")
    source = (directory / manifest["chat"]["template"]).read_text(encoding="utf-8")
    return chat.ChatTemplate(source, load_tokenizer(directory), manifest["chat"]["specials"])


def cached(
    source: str,
    *,
    tokenizer: str,
    vocab_dir: str,
    val_fraction: float,
    cache_dir,
    log,
    add_bos: bool = True,
    fmt: str = "text",
    chat_template: str = "",
    lead: bool = True,
    wait_s: float = 120,
):
    """A prepared dataset for `source`: itself if it is one, else the text file (fmt "text") or
    JSON Lines file of conversations (fmt "chat") prepared once into cache_dir, named by the
    fingerprint of its bytes, the tokenizer's files and the options (for conversations, the
    chat template's text and special tokens too), and reused after.

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
    if fmt == "chat":  # the template decides where BOS goes; it and its tokens name the data
        template, specials, _ = chat.template_source(vocab_dir, chat_template)
        options.update(format=fmt, chat_template=template, specials=specials)
    elif tokenizer == "hf":  # the one with a beginning-of-text token; the others' names stay
        options["add_bos"] = add_bos
    vocab = tokenizer_files(tokenizer, vocab_dir)
    kind = f"{tokenizer}-chat" if fmt == "chat" else tokenizer
    out = Path(cache_dir) / f"{path.stem}-{kind}-{fingerprint([path, *vocab], **options)}"
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
            fmt=fmt,
            tokenizer=tokenizer,
            vocab_dir=vocab_dir,
            add_bos=add_bos,
            chat_template=chat_template,
            val_fraction=val_fraction,
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="files or directories of the corpus")
    parser.add_argument("--out", required=True, help="the dataset directory to create")
    parser.add_argument("--format", default="text", choices=(*FORMATS, "chat"))
    parser.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    parser.add_argument(
        "--vocab_dir",
        help="vocab.json + merges.txt (gpt2), vocab.txt (bert) or tokenizer.json (hf); "
        "default data/gpt2 or data/bert",
    )
    parser.add_argument(
        "--no_bos",
        dest="add_bos",
        action="store_false",
        help="no beginning-of-text token before each document (a tokenizer.json's, as Llama's <s>)",
    )
    parser.add_argument("--field", default="text", help="the text field of --format jsonl")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out tail")
    parser.add_argument("--split", default="test", help="the split name of --format race")
    parser.add_argument(
        "--chat_template",
        default="",
        help="a .jinja chat template for --format chat (default: --vocab_dir's "
        "chat_template.jinja or tokenizer_config.json's, else megajax's own)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="tokenizing threads of GPT-2 BPE (0: one a core)"
    )
    parser.add_argument(
        "--batch_chars", type=int, default=BATCH_CHARS, help="characters tokenized at once"
    )
    parser.add_argument(
        "--shard_mb", type=int, default=shards.SHARD_BYTES >> 20, help="MiB of tokens a shard"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    vocab_dir = args.vocab_dir or ("data/bert" if args.tokenizer == "bert" else "data/gpt2")
    try:
        prepare(
            args.inputs,
            out=args.out,
            fmt=args.format,
            tokenizer=args.tokenizer,
            vocab_dir=vocab_dir,
            add_bos=args.add_bos,
            field=args.field,
            val_fraction=args.val_fraction,
            split=args.split,
            chat_template=args.chat_template,
            threads=args.threads or None,
            batch_chars=args.batch_chars,
            shard_bytes=args.shard_mb << 20,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
