"""Local corpora read as documents: text files, blank-line blocks, JSON Lines, LAMBADA,
WikiText-103 articles, and RACE questions; bad input raises a ConfigError that says which file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from megajax.config import ConfigError

FORMATS = ("text", "blocks", "jsonl", "lambada", "wikitext", "race")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_BLOCK_SEPARATOR = re.compile(r"\n\s*\n")


BLOCK_BYTES = 1 << 22  # read size of the streamed files
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters


def _blocks(path: Path):
    """The file's text in blocks of about BLOCK_BYTES, cut between characters."""
    size = BLOCK_BYTES
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    with open(path, "rb") as f:
        offset, rest = 0, b""
        while True:
            data = f.read(size)
            at_end = not data
            data = rest + data
            cut = len(data)
            if not at_end:  # keep a character that may continue in the next block for it
                while cut > max(0, len(data) - 4) and data[cut - 1] & 0xC0 == 0x80:
                    cut -= 1
                cut = cut - 1 if cut and data[cut - 1] >= 0xC0 else len(data)
            data, rest = data[:cut], data[cut:]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{path} is not UTF-8 text ({e.reason} at byte {offset + e.start})"
                ) from None
            offset += len(data)
            if text:
                yield text
            if at_end:
                return


def _read(path: Path) -> str:
    return "".join(_blocks(path))


def _lines(path: Path):
    """The file's lines (split at \\n only), streamed."""
    rest = ""
    for block in _blocks(path):
        lines = (rest + block).split("\n")
        rest = lines.pop()
        yield from lines
    yield rest


def files(inputs) -> list[Path]:
    """The input paths, a directory standing for its files (sorted, recursively)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise ConfigError(f"{path} is an empty directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path} not found")
    if not files:
        raise ConfigError("no input files given")
    return files


def _jsonl(path: Path, field: str):
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(f"{path} line {n}: no text field {field!r} (set --field)")
        yield row[field]


def _wikitext(path: Path):
    """Split at top-level ` = Title = ` lines; sections (` = = ... = = `) stay in the article."""
    lines = []
    for line in _lines(path):
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in lines):
            yield "\n".join(lines).strip("\n")
            lines = []
        lines.append(line)
    yield "\n".join(lines).strip("\n")


def _blank_line_blocks(path: Path):
    """re.split(r"\\n\\s*\\n", text), streamed: a separator cannot reach past a non-space
    character, so the text up to the last one is split for good."""
    rest = ""
    for block in _blocks(path):
        text = rest + block
        end = len(text.rstrip())
        docs = _BLOCK_SEPARATOR.split(text[:end])
        rest = docs.pop() + text[end:]
        yield from docs
    yield from _BLOCK_SEPARATOR.split(rest)


def _cut(blocks, size: int):
    """(piece, ends) of one document given as text blocks: pieces of about `size` characters
    cut at line breaks that tokenize apart as together (_last_cut); a stretch without one stays
    whole. The last piece has ends=True; a document of only spaces gives nothing."""
    text, start, cut_before = "", 0, False
    for block in blocks:
        text, start = text[start:] + block, 0
        while len(text) - start > size:
            at = _last_cut(text, start, start + size) or _last_cut(text, start, len(text))
            if not at:
                break  # no line break to cut at yet: read on
            yield text[start:at], False
            start, cut_before = at, True
    if cut_before or text[start:].strip():
        yield text[start:], True


def _last_cut(text: str, start: int, limit: int) -> int:
    """The last position in (start, limit] just after a line break where pieces may be cut, or 0:
    a break that follows a non-space character and precedes a non-space one, or one space-like
    character and a non-space one. GPT-2's pre-tokenizer, BERT's line-by-line sentences and
    characters tokenize the text on each side of it apart exactly as the whole: the break is a
    token of its own and no token looks across it (a longer run of spaces around it would be
    split differently)."""
    i = text.rfind("\n", start, limit)
    while i > start:
        after = text[i + 1 : i + 3]
        if not text[i - 1].isspace() and (after[:1].strip() or after[1:].strip()):
            return i + 1
        i = text.rfind("\n", start, i)
    return 0


def _documents(path: Path, fmt: str, field: str):
    if fmt in ("jsonl", "lambada"):
        return _jsonl(path, "text" if fmt == "lambada" else field)
    if fmt == "blocks":
        return _blank_line_blocks(path)
    if fmt == "wikitext":
        return _wikitext(path)
    return [_read(path)]


def _check(fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")


def read_documents(inputs, *, fmt: str, field: str = "text") -> list[str]:
    """The documents of the input files, in order; empty documents dropped."""
    _check(fmt)
    docs = [d for path in files(inputs) for d in _documents(path, fmt, field) if d.strip()]
    if not docs:
        raise ConfigError(f"no text in {', '.join(map(str, inputs))} (an empty corpus)")
    return docs


def pieces(inputs, *, fmt: str, field: str = "text", size: int | None = None):
    """(text, ends) of the non-empty documents of read_documents(), streamed: a document longer
    than `size` (PIECE_CHARS) characters comes in pieces that tokenize as it does (ends=True on
    its last). Memory holds one document of --format jsonl, blocks and wikitext, a few pieces
    of a text file."""
    _check(fmt)
    size = size or PIECE_CHARS
    for path in files(inputs):
        if fmt == "text":
            yield from _cut(_blocks(path), size)
            continue
        for doc in _documents(path, fmt, field):
            if doc.strip():
                yield from _cut([doc], size)


def count_lines(inputs) -> int:
    """Non-blank lines of the input files, streamed (the conversations of a chat corpus)."""
    return sum(1 for path in files(inputs) for line in _lines(path) if line.strip())


def conversation_lines(inputs):
    """(file number, path, line number, JSON value) of each non-blank line of JSON Lines files,
    streamed; a line that is not JSON raises a ConfigError naming its file and line."""
    for k, path in enumerate(files(inputs)):
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                yield k, path, n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n}: not JSON ({e.msg})") from None


def read_race(inputs) -> list[dict]:
    """RACE files (one JSON object each) -> one row per question, answer as 0..3."""
    rows = []
    for path in files(inputs):
        try:
            item = json.loads(_read(path))
            questions, options, answers = item["questions"], item["options"], item["answers"]
            article, ident = item["article"], item.get("id", path.name)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a RACE file ({type(e).__name__}: {e})") from None
        if not (len(questions) == len(options) == len(answers)):
            raise ConfigError(f"{path}: questions, options and answers differ in number")
        for q, (question, opts, answer) in enumerate(zip(questions, options, answers, strict=True)):
            if len(opts) != 4 or answer not in ("A", "B", "C", "D"):
                raise ConfigError(f"{path} question {q}: expected 4 options and an answer A-D")
            rows.append(
                dict(
                    id=f"{ident}-{q}",
                    passage=str(path),
                    level=path.parent.name,
                    article=article,
                    question=question,
                    options=list(opts),
                    answer="ABCD".index(answer),
                )
            )
    if not rows:
        raise ConfigError(f"no questions in {', '.join(map(str, inputs))} (an empty corpus)")
    return rows
