"""GPT windows pack the token stream without loss or padding; BERT pairs mask 15% (80/10/10),
keep the sentence order they claim, and balance it."""

import numpy as np
import pytest

from megajax.data import prepare
from megajax.data.samples import IGNORE, BertPairs, Dataset, GPTWindows


@pytest.fixture(scope="module")
def gpt_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "lambada"
    src = ["data/lambada/lambada_sample.jsonl"]
    return Dataset(prepare.prepare(src, out=out, fmt="lambada", log=lambda _: None))


def test_gpt_windows_lose_no_token_and_hold_no_padding(gpt_dataset):
    source = gpt_dataset.source("train")
    stream = np.concatenate([source[i]["tokens"] for i in range(len(source))])
    windows = GPTWindows(gpt_dataset, "train", seq_len=64)
    samples = [windows[i] for i in range(len(windows))]
    inputs = np.concatenate([s["inputs"] for s in samples])
    # Every token but the last < 64 is an input exactly once, and a target exactly once.
    assert len(stream) - len(inputs) - 1 < 64
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])
    np.testing.assert_array_equal(
        np.concatenate([s["targets"] for s in samples]), stream[1:][: len(inputs)]
    )
    assert all(s["inputs"].shape == (64,) and s["inputs"].dtype == np.int32 for s in samples)
    # Documents are joined by end-of-text, one after each document that ends in this split.
    splits = gpt_dataset.manifest["splits"]
    assert (stream == 50256).sum() == splits["train"]["documents"] > 800
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 1000
    with pytest.raises(IndexError):
        windows[len(windows)]


@pytest.fixture(scope="module")
def bert_samples(bert_dataset):
    pairs = BertPairs(bert_dataset, "train", max_len=64, seed=3)
    return pairs, [pairs[i] for i in range(min(len(pairs), 500))]


def test_bert_pairs_are_well_formed(bert_samples):
    pairs, samples = bert_samples
    for s in samples:
        n = int(s["padding_mask"].sum())
        tokens, types = s["tokens"], s["token_types"]
        assert tokens[0] == pairs.cls and (tokens[:n] == pairs.sep).sum() == 2
        assert tokens[n - 1] == pairs.sep and (tokens[n:] == pairs.pad).all()
        assert (s["padding_mask"][:n] == 1).all() and (types[n:] == 0).all()
        first_b = int(np.argmax(tokens == pairs.sep)) + 1
        assert (types[:first_b] == 0).all() and (types[first_b:n] == 1).all()
        assert first_b > 2 and n - first_b > 1  # both segments hold a token
        assert (s["labels"][n:] == IGNORE).all() and s["tokens"].shape == (64,)


def _find(haystack: np.ndarray, needle: np.ndarray, start: int = 0) -> int:
    text, sub = ",".join(map(str, haystack)) + ",", ",".join(map(str, needle)) + ","
    at = text.find(sub, len(",".join(map(str, haystack[:start]))) + (start > 0))
    return -1 if at < 0 else text[:at].count(",")


def test_sentence_order_labels_are_true_and_balanced(bert_dataset, bert_samples):
    pairs, samples = bert_samples
    source = bert_dataset.source("train")
    for i, s in enumerate(samples[:150]):
        original = np.where(s["labels"] != IGNORE, s["labels"], s["tokens"])
        n = int(s["padding_mask"].sum())
        sep = int(np.argmax(original == pairs.sep))
        a, b = original[1:sep], original[sep + 1 : n - 1]
        first, second = (b, a) if s["sentence_label"] else (a, b)
        row = source[int(pairs.samples[i][0])]["tokens"]
        at = _find(row, first)
        assert at >= 0 and _find(row, second, at + len(first)) >= 0  # in the text's order
    labels = np.array([s["sentence_label"] for s in samples])
    assert len(labels) >= 300 and abs(labels.mean() - 0.5) < 0.08  # 3 standard deviations


def test_masking_rate_and_80_10_10_split(bert_samples):
    pairs, samples = bert_samples
    masked = candidates = as_mask = as_random = kept = 0
    for s in samples:
        n = int(s["padding_mask"].sum())
        chosen = s["labels"][:n] != IGNORE
        candidates += n - 3
        masked += chosen.sum()
        after, before = s["tokens"][:n][chosen], s["labels"][:n][chosen]
        as_mask += (after == pairs.mask).sum()
        kept += (after == before).sum()
        as_random += ((after != pairs.mask) & (after != before)).sum()
        assert not np.isin(after, [pairs.cls, pairs.sep, pairs.pad]).any()
    assert masked / candidates == pytest.approx(0.15, abs=0.005)
    assert as_mask / masked == pytest.approx(0.8, abs=0.02)
    assert as_random / masked == pytest.approx(0.1, abs=0.015)
    assert kept / masked == pytest.approx(0.1, abs=0.015)


def test_about_a_tenth_of_the_pairs_are_short(bert_samples):
    pairs, _ = bert_samples
    targets = pairs.samples[:, 3]
    assert len(targets) > 300 and (targets < 61).mean() == pytest.approx(0.1, abs=0.05)


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(bert_dataset):
    def split_words(pairs, sample):
        n = int(sample["padding_mask"].sum())
        original = np.where(sample["labels"] != IGNORE, sample["labels"], sample["tokens"])[:n]
        chosen = sample["labels"][:n] != IGNORE
        # A '##' piece masked while the piece of its word before it is not (or the reverse).
        inside = pairs.continues[original[1:]] & ~np.isin(original[:-1], [pairs.cls, pairs.sep])
        return int(((chosen[1:] != chosen[:-1]) & inside).sum())

    whole = BertPairs(bert_dataset, "train", max_len=128, whole_word=True, seed=1)
    plain = BertPairs(bert_dataset, "train", max_len=128, whole_word=False, seed=1)
    assert sum(split_words(whole, whole[i]) for i in range(150)) == 0
    assert sum(split_words(plain, plain[i]) for i in range(150)) > 10


def test_next_sentence_negatives_come_from_another_row(bert_dataset):
    pairs = BertPairs(bert_dataset, "train", max_len=64, pair_task="nsp", seed=2)
    source = bert_dataset.source("train")
    found = {0: [], 1: []}
    for i in range(120):
        s = pairs[i]
        original = np.where(s["labels"] != IGNORE, s["labels"], s["tokens"])
        n = int(s["padding_mask"].sum())
        sep = int(np.argmax(original == pairs.sep))
        a, b = original[1:sep], original[sep + 1 : n - 1]
        row = source[int(pairs.samples[i][0])]["tokens"]
        at = _find(row, a)
        assert at >= 0  # A is always this row's text
        found[int(s["sentence_label"])].append(_find(row, b, at + len(a)) >= 0)
    assert all(found[0]) and len(found[0]) > 40  # B follows A in its row
    assert np.mean(found[1]) < 0.1 and len(found[1]) > 40  # B is from elsewhere
