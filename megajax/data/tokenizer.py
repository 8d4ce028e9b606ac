"""Tokenizers loaded from local files only: GPT-2 byte-level BPE, a Hugging Face tokenizer.json,
BERT WordPiece, characters."""

from __future__ import annotations

import functools
import json
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken

from megajax.config import ConfigError

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py) in the equivalent possessive form tiktoken runs.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
EOT = "<|endoftext|>"


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in vocab.json."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class GPT2Tokenizer:
    """GPT-2 BPE from vocab.json + merges.txt, run by tiktoken.

    tiktoken merges by rank; GPT-2's rank of a merged token equals its id (256 + merge index),
    which `__init__` checks against merges.txt, so the ids are those of GPT-2's own BPE.
    """

    bos_id = None  # GPT-2 starts no text with a token of its own; <|endoftext|> ends documents

    def __init__(self, vocab_dir: str | Path):
        vocab_dir = Path(vocab_dir)
        for name in ("vocab.json", "merges.txt"):
            if not (vocab_dir / name).is_file():
                raise ConfigError(f"GPT-2 tokenizer: {vocab_dir / name} not found (data.vocab_dir)")
        vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
        decode = {c: b for b, c in _byte_to_unicode().items()}
        ranks = {bytes(decode[c] for c in tok): i for tok, i in vocab.items() if tok != EOT}
        merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [m for m in merges if m and not m.startswith("#version")]
        for i, merge in enumerate(merges):
            if vocab.get(merge.replace(" ", "")) != 256 + i:
                raise ConfigError(f"{vocab_dir}: merges.txt line {i} does not match vocab.json")
        self.eot_id = vocab[EOT]
        self.vocab_size = len(vocab)
        # What transformers' GPT2Tokenizer names them, which chat templates may use.
        self.special_tokens = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        self._token_bytes = np.zeros(self.vocab_size, np.int64)  # each token's length in bytes
        for token, i in ranks.items():
            self._token_bytes[i] = len(token)
        self._token_bytes[self.eot_id] = len(EOT.encode())
        self._pool = None
        self._enc = tiktoken.Encoding(
            "gpt2-local",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self.eot_id},
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, threads: int = 2) -> list[list[int]]:
        """encode() of each text, on `threads` threads (tiktoken releases the GIL). The threads
        are kept from call to call: new ones each time would each leave a malloc arena behind."""
        if self._pool is None or self._pool._max_workers != threads:
            self._pool = ThreadPoolExecutor(threads, "megajax-bpe")
        return list(self._pool.map(self._enc.encode_ordinary, texts))

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids))

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """The ids of a text whose <|endoftext|> are the token itself (a rendered chat), and
        each token's (start, end) characters, (tokens, 2): those its bytes belong to, as Hugging
        Face tokenizers give them (tokens that split one character's bytes each span it)."""
        ids = self._enc.encode(text, allowed_special={EOT})
        if not ids:
            return [], np.zeros((0, 2), np.int64)
        ends = np.cumsum(self._token_bytes[ids])  # in bytes of the UTF-8 text
        starts = ends - self._token_bytes[ids]
        utf8 = np.frombuffer(text.encode("utf-8"), np.uint8)
        char = np.cumsum((utf8 & 0xC0) != 0x80) - 1  # the character each byte belongs to
        return ids, np.stack([char[starts], char[ends - 1] + 1], axis=1)

    def token_text(self, i: int) -> str:
        return self._enc.decode([i])


class HFTokenizer:
    """A Hugging Face tokenizer.json (Llama 2's and Llama 3's), run by the `tokenizers`
    package. `path`: the file or the directory holding it (data.vocab_dir, or the checkpoint)."""

    # The end-of-document token, by the names the common tokenizers give it.
    EOT_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(
                f"{file} not found: a Llama-style model reads its own tokenizer.json; copy the "
                "checkpoint's into that directory (data.vocab_dir, or the --hf_checkpoint "
                "directory), or train with data.tokenizer=gpt2 and the shipped GPT-2 BPE"
            )
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(n) for n in self.EOT_NAMES]
        if all(i is None for i in ids):
            raise ConfigError(f"{file}: no end-of-text token ({', '.join(self.EOT_NAMES)})")
        self.eot_id = next(i for i in ids if i is not None)
        # The beginning-of-text token the file's post-processor puts before a text (Llama's <s>
        # or <|begin_of_text|>), or None. encode() leaves it out: preparation puts it before a
        # document, not before each piece of one.
        plain, special = (self._tok.encode("a", add_special_tokens=s).ids for s in (False, True))
        self.bos_id = special[0] if plain and special[1 : len(plain) + 1] == plain else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, threads: int = 2) -> list[list[int]]:
        """encode() of each text; `tokenizers` runs a batch on its own Rust threads."""
        del threads  # RAYON_NUM_THREADS sets them
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of a text, its special tokens parsed and none added (a rendered chat), and
        each token's (start, end) characters."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def token_text(self, i: int) -> str:
        return self._tok.id_to_token(i)


class CharTokenizer:
    """One id per distinct character of the text, in sorted order (nanoGPT's shakespeare_char)."""

    bos_id = None

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in text]

    def encode_batch(self, texts: list[str], *, threads: int = 1) -> list[np.ndarray]:
        """encode() of each text, vectorized: the sorted characters' code points are searched."""
        codes = np.array([ord(c) for c in self.chars], np.uint32)
        out = []
        for text in texts:
            points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
            ids = np.searchsorted(codes, points)
            if len(ids) and (ids.max() >= len(codes) or np.any(codes[ids] != points)):
                raise ConfigError(f"a character of {text[:40]!r}... is not in the character set")
            out.append(ids.astype(np.int32))
        return out

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def _is_punctuation(ch: str) -> bool:
    """BERT's punctuation: every non-letter/number ASCII symbol, and Unicode class P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    """CJK ideographs, which BERT splits into one token each."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class BertTokenizer:
    """BERT's uncased WordPiece from vocab.txt (id = line number), as google-research/bert does it.

    Normalize (drop control characters, whitespace to spaces, space out CJK ideographs,
    lowercase, strip accents), split on whitespace and punctuation, then split each word greedily
    into the longest vocabulary pieces, continuation pieces prefixed with '##'.
    """

    max_word_chars = 100  # longer words become [UNK], as in BERT
    bos_id = None  # [CLS] starts a pair, put there by the samples, not by preparation

    def __init__(self, vocab_file: str | Path, *, lowercase: bool = True):
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise ConfigError(f"BERT tokenizer: {vocab_file} not found (a WordPiece vocab.txt)")
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if name not in self.vocab:
                raise ConfigError(f"{vocab_file}: no {name} token; not a BERT vocabulary")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.mask_id = self.vocab["[MASK]"]
        self.vocab_size = len(tokens)
        self.eot_id = None
        self.lowercase = lowercase
        self._fast = None  # Hugging Face's WordPiece, built on first use by encode_batch

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if ch in "\t\n\r" or unicodedata.category(ch) == "Zs" or ch.isspace():
                out.append(" ")
            elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
                continue
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text.lower())
            text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return text

    def words(self, text: str) -> list[str]:
        """Normalized text split on whitespace and around each punctuation character."""
        words = []
        for chunk in self._normalize(text).split():
            start = 0
            for i, ch in enumerate(chunk):
                if _is_punctuation(ch):
                    if i > start:
                        words.append(chunk[start:i])
                    words.append(ch)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]  # a word with an unknown piece is one [UNK], as in BERT
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for word in self.words(text) for i in self._wordpiece(word)]

    def encode_batch(self, texts: list[str], *, threads: int = 2) -> list[list[int]]:
        """encode() of each text by Hugging Face's Rust WordPiece built from the same vocabulary
        and rules (the same ids on the shipped corpora: tests/test_data_tokenizers.py), on all
        cores (RAYON_NUM_THREADS sets how many), about 10x the pure-Python encode()."""
        if self._fast is None:
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

            fast = Tokenizer(
                models.WordPiece(
                    self.vocab, unk_token="[UNK]", max_input_chars_per_word=self.max_word_chars
                )
            )
            fast.normalizer = normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, lowercase=self.lowercase
            )
            fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            self._fast = fast
        encoded = self._fast.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encoded]

    def decode(self, ids) -> str:
        text = " ".join(self.tokens[i] for i in ids)
        return text.replace(" ##", "")

    def continuation_mask(self):
        """(vocab,) bool: True for '##' pieces, which continue the word before them."""
        return np.array([t.startswith("##") for t in self.tokens])


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of a text as a model reads it from its start: after the tokenizer's
    beginning-of-text token where it has one (a Llama tokenizer.json's, which Hugging Face
    tokenizers put first by default). For prompts and evaluation texts, not training data."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + list(tokenizer.encode(text))
