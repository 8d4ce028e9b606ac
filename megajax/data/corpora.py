"""Local corpora read as documents: text files, blank-line blocks, JSON Lines, LAMBADA,
WikiText-103 articles, and RACE questions; bad input raises a ConfigError that says which file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from megajax.config import ConfigError

FORMATS = ("text", "blocks", "jsonl", "lambada", "wikitext", "race")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


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


def _jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(f"{path} line {n}: no text field {field!r} (set --field)")
        docs.append(row[field])
    return docs


def _wikitext(text: str) -> list[str]:
    """Split at top-level ` = Title = ` lines; sections (` = = ... = = `) stay in the article."""
    docs, lines = [], []
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in lines):
            docs.append("\n".join(lines).strip("\n"))
            lines = []
        lines.append(line)
    docs.append("\n".join(lines).strip("\n"))
    return docs


def read_documents(inputs, *, fmt: str, field: str = "text") -> list[str]:
    """The documents of the input files, in order; empty documents dropped."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    docs = []
    for path in files(inputs):
        if fmt in ("jsonl", "lambada"):
            docs += _jsonl(path, "text" if fmt == "lambada" else field)
        elif fmt == "blocks":
            docs += re.split(r"\n\s*\n", _read(path))
        elif fmt == "wikitext":
            docs += _wikitext(_read(path))
        else:
            docs.append(_read(path))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(f"no text in {', '.join(map(str, inputs))} (an empty corpus)")
    return docs


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


def split_validation(docs: list[str], val_fraction: float):
    """(train, validation), each a list of (text, ends_document): the validation split is the
    tail val_fraction of the characters; the document it starts in is cut there."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    remaining = int(sum(map(len, docs)) * (1 - val_fraction))
    train, val = [], []
    for doc in docs:
        if remaining >= len(doc):
            train.append((doc, True))
        elif remaining > 0:
            train.append((doc[:remaining], False))
            val.append((doc[remaining:], True))
        else:
            val.append((doc, True))
        remaining -= len(doc)
    return train, val
