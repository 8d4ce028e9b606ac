"""Conversations for fine-tuning: the shipped demo conversations are what their script makes of
the shipped plays."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/chat/shakespeare_chat.jsonl"


def test_the_demo_conversations_are_made_from_the_shipped_plays():
    """data/chat/shakespeare_chat.jsonl is what its script makes of tiny Shakespeare, a few
    hundred conversations well under 1 MB, each alternating user and assistant after a system
    line, every turn a speech of the play."""
    spec = importlib.util.spec_from_file_location(
        "make_shakespeare_chat", ROOT / "data/chat/make_shakespeare_chat.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    plays = (ROOT / "data/shakespeare/input.txt").read_text(encoding="utf-8")
    made = make.conversations(plays)[:: make.STRIDE]
    shipped = DEMO.read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in made)
    assert 300 <= len(made) <= 600 and DEMO.stat().st_size < 1 << 19
    speeches = {s for _, s in make.speeches(plays)}
    for c in made:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2)
        assert all(m["content"] in speeches for m in c["messages"][1:])
