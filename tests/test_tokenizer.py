"""Tokenizers from local files: GPT-2's ids, lossless round trips, and a batch from the step."""

from megajax.data.tokenizer import CharTokenizer, GPT2Tokenizer


def test_gpt2_bpe_gives_gpt2_ids():
    tok = GPT2Tokenizer("data/gpt2")
    # Ids of GPT-2's published encoder for these strings.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" it's 2026!") == [340, 338, 1160, 2075, 0]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257


def test_gpt2_bpe_round_trips_the_whole_corpus():
    tok = GPT2Tokenizer("data/gpt2")
    corpus = open("data/shakespeare/input.txt", encoding="utf-8").read()
    ids = tok.encode(corpus)
    assert len(ids) == 338025  # nanoGPT's count for tiny Shakespeare with GPT-2 BPE
    assert tok.decode(ids) == corpus


def test_char_tokenizer_matches_nanogpt_vocabulary():
    corpus = open("data/shakespeare/input.txt", encoding="utf-8").read()
    tok = CharTokenizer(corpus)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(corpus[:1000])) == corpus[:1000]
