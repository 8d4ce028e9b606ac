"""Writes shakespeare_chat.jsonl: conversations made from the dialogue of the shipped tiny
Shakespeare (data/shakespeare/input.txt), one JSON object a line.

    python data/chat/make_shakespeare_chat.py   # rewrites data/chat/shakespeare_chat.jsonl

The play text is a sequence of speeches, each a block `NAME:\\nlines` separated by blank lines.
A stretch of speeches where two characters answer each other (A, B, A, B, ...) becomes a
conversation (crowds such as "All" take no part): a system message casting the model as B, A's
speeches as the user's turns and B's as the assistant's, at most MAX_TURNS exchanges and
MAX_CHARS characters, ending on B. Every STRIDE-th such conversation is kept, in the order of
the play, so the last ones (the validation split's tail) come from its end.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "data/shakespeare/input.txt"
OUT = Path(__file__).resolve().parent / "shakespeare_chat.jsonl"
MAX_TURNS = 3  # exchanges (a user turn and the reply) in one conversation
MAX_CHARS = 1200  # of the speeches in one conversation
MAX_SPEECH = 500  # longer speeches end a stretch
STRIDE = 5  # every fifth conversation is kept: about 400 of them
CROWDS = {"All", "ALL", "Citizens", "Both"}  # speakers who are not one character
_SPEAKER = re.compile(r"^([A-Za-z][A-Za-z' ]*):$")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) of each block of the play."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = _SPEAKER.match(lines[0])
        if match and len(lines) > 1:
            out.append((match.group(1), "\n".join(lines[1:])))
    return out


def conversations(text: str) -> list[dict]:
    """Every exchange between two characters, as {"messages": [...]}."""
    found, said, i = [], speeches(text), 0
    while i + 1 < len(said):
        (a, _), (b, _) = said[i], said[i + 1]
        turns, chars, j = [], 0, i
        while (
            j + 1 < len(said)
            and len(turns) < MAX_TURNS
            and (said[j][0], said[j + 1][0]) == (a, b)
            and max(len(said[j][1]), len(said[j + 1][1])) <= MAX_SPEECH
            and chars + len(said[j][1]) + len(said[j + 1][1]) <= MAX_CHARS
        ):
            turns.append((said[j][1], said[j + 1][1]))
            chars += len(said[j][1]) + len(said[j + 1][1])
            j += 2
        if a == b or not turns or {a, b} & CROWDS:
            i += 1
            continue
        system = f"You are {b.title()}, speaking with {a.title()}. Answer in your own voice."
        messages = [{"role": "system", "content": system}]
        for question, answer in turns:
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        found.append({"messages": messages})
        i = j
    return found


def main():
    kept = conversations(SOURCE.read_text(encoding="utf-8"))[::STRIDE]
    lines = [json.dumps(c, ensure_ascii=False) for c in kept]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(lines)} conversations, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
