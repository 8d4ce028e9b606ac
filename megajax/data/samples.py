"""Training samples read with random access from a prepared dataset.

GPTWindows: the split's documents joined end to end (each followed by the end-of-text token,
and preceded by a tokenizer.json's beginning-of-text token, written at preparation), cut into
windows of seq_len + 1 tokens advanced by seq_len, so every token is a target exactly once
(Megatron-LM's GPT dataset); with `documents`, each window's segments and positions restart
after each end-of-text token. ChatRows: conversations packed whole into rows of seq_len
(or one a row), only their assistants' tokens trained on. BertPairs: sentence pairs with
sentence-order prediction and masked positions (Megatron-LM's BERT dataset, ALBERT's SOP).
Sample i is a pure function of i (and the seed): any process can build any sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megajax.config import ConfigError
from megajax.data import shards
from megajax.data.prepare import MANIFEST, load_tokenizer

IGNORE = -1  # label of positions that are not predicted


class Dataset:
    """A directory written by `python -m megajax.data.prepare`: manifest, splits, tokenizer."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise ConfigError(
                f"{self.path} is not a prepared dataset (no {MANIFEST}; prepare it with "
                f"python -m megajax.data.prepare, or its preparation was interrupted)"
            )
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        self._sources = {}

    @property
    def is_chat(self) -> bool:
        """Whether it holds conversations (a token mask with each row), not documents."""
        return self.manifest.get("format") == "chat"

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def tokenizer(self):
        return load_tokenizer(self.path)

    def source(self, split: str):
        """Random-access rows of a split: array_record shards (shards.Rows), or the TFDS
        datasets of RACE and of the layout before 2.0.0."""
        if split not in self.manifest["splits"]:
            raise ConfigError(f"{self.path} has no {split!r} split (it has {self.splits})")
        if split not in self._sources:
            files = self.manifest["splits"][split].get("files")
            if files is not None:
                self._sources[split] = shards.Rows(
                    self.path,
                    split,
                    files=files,
                    dtype=self.manifest["dtype"],
                    masked=self.is_chat,
                )
            else:
                from megajax.data import builders  # TFDS: imported only when read

                (tfds_dir,) = (self.path / "tfds").glob(f"*/{builders.VERSION}")
                self._sources.update(builders.data_sources(str(tfds_dir)))
        return self._sources[split]

    def index(self, split: str) -> dict[str, np.ndarray]:
        """Row lengths (and BERT sentence lengths) of a split, without reading its rows."""
        self.source(split)
        with np.load(self.path / "index" / f"{split}.npz") as f:
            return dict(f)


class GPTWindows:
    """Sample i = tokens [i * seq_len, i * seq_len + seq_len + 1) of the joined split, as
    {'inputs', 'targets'}: (seq_len,) int32 each, targets = inputs shifted by one.

    With `documents` (data.reset_attention, Megatron-LM's --reset-attention-mask and
    --reset-position-ids) also 'weights' (all 1: every target is trained on), 'segments' (from
    1, one more after each end-of-text input) and 'positions' (from 0 in each segment): a
    document's end-of-text token is the last input of its segment, and a target of it."""

    def __init__(self, dataset: Dataset, split: str, *, seq_len: int, documents: bool = False):
        self.source = dataset.source(split)
        self.seq_len = seq_len
        self.offsets = np.concatenate([[0], np.cumsum(dataset.index(split)["row_tokens"])])
        self.num_tokens = int(self.offsets[-1])
        self.name = f"{dataset.path.name}/{split}"
        self.eot = None
        if documents:
            self.eot = dataset.tokenizer().eot_id
            if self.eot is None:
                raise ConfigError(
                    f"data.reset_attention: {self.name}'s tokenizer has no end-of-text token "
                    "to find its documents by (the char tokenizer): set it false"
                )
        if self.num_tokens < seq_len + 1:
            raise ConfigError(
                f"{self.name} has {self.num_tokens} tokens, too few for windows of "
                f"{seq_len + 1}: use more text or a smaller model.seq_len"
            )

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def window(self, i: int) -> np.ndarray:
        """(seq_len + 1,) tokens of window i, read from the one or few rows it spans."""
        start = i * self.seq_len
        stop = start + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        # One read per row: a window spans one or two, and __getitems__ starts a thread pool.
        tokens = np.concatenate([self.source[r]["tokens"] for r in range(first, last)])
        begin = start - self.offsets[first]
        return tokens[begin : begin + self.seq_len + 1]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        w = self.window(i)
        sample = {"inputs": w[:-1], "targets": w[1:]}
        if self.eot is not None:
            # a new segment begins after each end-of-text input
            begins = np.r_[True, sample["inputs"][:-1] == self.eot]
            segments = np.cumsum(begins, dtype=np.int32)
            index = np.arange(self.seq_len, dtype=np.int32)
            positions = index - np.maximum.accumulate(np.where(begins, index, 0))
            ones = np.ones(self.seq_len, np.int32)
            sample |= {"weights": ones, "segments": segments, "positions": positions}
        return sample


class ChatRows:
    """Conversations as GPT samples of seq_len positions: {'inputs', 'targets', 'weights',
    'segments', 'positions'}, (seq_len,) int32 each.

    A conversation of n tokens gives n - 1 (input, target) pairs, one segment (numbered from 1
    in its row) with positions 0 .. n - 2, weighted by its loss mask of tokens 1 .. n - 1; the
    rest of a row is padding (all 0). `pack`: conversations fill rows in their stored order,
    greedily (a new row when the next does not fit); else one a row. One longer than seq_len + 1
    tokens is cut to its first seq_len + 1 (or, `truncate` false, refused), and left out if
    that leaves it nothing to train on. The plan (which conversations each row holds) is
    computed once from the index, without reading a token; sample i reads only its own."""

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        *,
        seq_len: int,
        pack: bool = True,
        truncate: bool = True,
        log=print,
    ):
        if not dataset.is_chat:
            raise ConfigError(
                f"{dataset.path} holds text, not conversations: data.format=chat reads a JSON "
                "Lines file of conversations (or a dataset prepared from one with --format chat)"
            )
        self.source = dataset.source(split)
        self.seq_len, self.pack, self.name = seq_len, pack, f"{dataset.path.name}/{split}"
        index = dataset.index(split)
        lengths, first = index["row_tokens"], index["first"]
        longest = seq_len + 1
        long = np.flatnonzero(lengths > longest)
        if len(long) and not truncate:
            c = int(long[0])
            where = self._where(dataset, index, c)
            raise ConfigError(
                f"{len(long)} conversation(s) of {self.name} are longer than model.seq_len + 1 = "
                f"{longest} tokens, the first {where} with {int(lengths[c])}: shorten them, raise "
                "model.seq_len, or set data.truncate=true to cut them"
            )
        kept = np.flatnonzero(first <= seq_len)  # a target left to train on after the cut
        if len(long):
            dropped = len(lengths) - len(kept)
            lost = f"; {dropped:,} of them keep no assistant token and are left out"
            lost = lost if dropped else ""
            log(
                f"data: {len(long):,} of {len(lengths):,} conversations of {self.name} are "
                f"longer than model.seq_len + 1 = {longest} tokens and are cut to it{lost}"
            )
        if not len(kept):
            raise ConfigError(f"{self.name} has no conversation to train on")
        self.conversations = kept  # (kept,) stored row of each, in order
        self.lengths = np.minimum(lengths[kept], longest)  # tokens of each, after the cut
        self.num_tokens = int(self.lengths.sum())
        self.rows = self._plan(self.lengths - 1, seq_len) if pack else np.arange(len(kept) + 1)

    @staticmethod
    def _where(dataset: Dataset, index: dict, c: int) -> str:
        inputs = dataset.manifest.get("inputs", [])
        if "line" in index and int(index["file"][c]) < len(inputs):
            return f"(line {int(index['line'][c])} of {inputs[int(index['file'][c])]})"
        return f"(conversation {c})"

    @staticmethod
    def _plan(pairs: np.ndarray, seq_len: int) -> np.ndarray:
        """(rows + 1,) the first conversation of each row, and their number at the end: each
        row takes conversations in order while their pairs fit in seq_len."""
        starts, used = [0], 0
        for c, n in enumerate(pairs.tolist()):
            if used + n > seq_len:
                starts.append(c)
                used = 0
            used += n
        starts.append(len(pairs))
        return np.asarray(starts, np.int64)

    def __len__(self) -> int:
        return len(self.rows) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        out = {k: np.zeros(self.seq_len, np.int32) for k in FIELDS}
        at = 0
        for k, c in enumerate(range(int(self.rows[i]), int(self.rows[i + 1]))):
            n = int(self.lengths[c])
            row = self.source[int(self.conversations[c])]
            ids, mask = row["tokens"][:n], row["mask"][:n]
            span = slice(at, at + n - 1)
            out["inputs"][span], out["targets"][span] = ids[:-1], ids[1:]
            out["weights"][span] = mask[1:]
            out["segments"][span] = k + 1
            out["positions"][span] = np.arange(n - 1)
            at += n - 1
        return out


FIELDS = ("inputs", "targets", "weights", "segments", "positions")  # of a sample with documents


class BertPairs:
    """BERT samples: [CLS] A [SEP] B [SEP] from consecutive sentences of one row, padded to
    max_len. Outputs, each (max_len,) int32 unless noted: tokens, token_types (0 for A, 1 for
    B), padding_mask (1 on real tokens), labels (the original token at masked positions, else
    IGNORE), and sentence_label (): for pair_task "sop" (sentence order), 1 if A and B were
    swapped; for "nsp" (next sentence), 1 if B was replaced by text from another row."""

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        *,
        max_len: int = 512,
        short_prob: float = 0.1,
        mask_prob: float = 0.15,
        whole_word: bool = False,
        pair_task: str = "sop",
        seed: int = 0,
    ):
        if pair_task not in ("sop", "nsp", "none"):
            raise ConfigError(f"pair task {pair_task!r}: use sop, nsp or none")
        self.pair_task = pair_task
        tok = dataset.tokenizer()
        if not hasattr(tok, "mask_id"):
            raise ConfigError(f"{dataset.path} was not prepared with the bert tokenizer")
        self.source = dataset.source(split)
        self.max_len, self.mask_prob, self.whole_word, self.seed = (
            max_len,
            mask_prob,
            whole_word,
            seed,
        )
        self.cls, self.sep, self.mask, self.pad = tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id
        self.continues = tok.continuation_mask()
        # Random replacements are real word pieces, never [PAD], [CLS], [unused..] and the like.
        self.replacements = np.array(
            [i for i, t in enumerate(tok.tokens) if not (t.startswith("[") and t.endswith("]"))]
        )
        self.samples = self._map(dataset.index(split), short_prob)
        self.name = f"{dataset.path.name}/{split}"
        if not len(self.samples):
            raise ConfigError(f"{self.name} has no two-token stretch of text for a BERT pair")

    def _map(self, index, short_prob) -> np.ndarray:
        """(samples, 4) rows of (row, first sentence, end sentence, target length): sentences
        are gathered until they reach the target, max_len - 3 or, short_prob of the time, a
        random shorter one (BERT's short sequences)."""
        rng = np.random.default_rng([self.seed, 1])
        longest = self.max_len - 3  # room for [CLS], [SEP], [SEP]
        lengths = index["sentence_lengths"]
        starts = np.concatenate([[0], np.cumsum(index["row_sentences"])])
        out = []
        for row in range(len(starts) - 1):
            first, total = 0, 0
            target = self._target(rng, longest, short_prob)
            row_lengths = lengths[starts[row] : starts[row + 1]]
            for s, n in enumerate(row_lengths):
                total += n
                if total >= target or s == len(row_lengths) - 1:
                    if total >= 2:
                        out.append((row, first, s + 1, target))
                    first, total = s + 1, 0
                    target = self._target(rng, longest, short_prob)
        return np.array(out, np.int64).reshape(-1, 4)

    @staticmethod
    def _target(rng, longest, short_prob) -> int:
        return int(rng.integers(2, longest + 1)) if rng.random() < short_prob else longest

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row, first, end, target = (int(v) for v in self.samples[i])
        rng = np.random.default_rng([self.seed, 2, i])
        item = self.source[row]
        bounds = np.concatenate([[0], np.cumsum(item["sentence_lengths"])])
        tokens = item["tokens"][bounds[first] : bounds[end]]
        # Split between sentences if there are several, else inside the one sentence.
        cuts = bounds[first + 1 : end] - bounds[first]
        cut = int(rng.choice(cuts)) if len(cuts) else int(rng.integers(1, len(tokens)))
        a, b = list(tokens[:cut]), list(tokens[cut:])
        flipped = self.pair_task != "none" and rng.random() < 0.5
        if flipped and self.pair_task == "nsp":
            b = self._random_segment(row, len(b), rng)
        a, b = _truncate_pair(a, b, target, rng)
        if flipped and self.pair_task == "sop":
            a, b = b, a
        ids = np.array([self.cls, *a, self.sep, *b, self.sep], np.int32)
        types = np.array([0] * (len(a) + 2) + [1] * (len(b) + 1), np.int32)
        ids, labels = self._mask(ids, rng)
        pad = self.max_len - len(ids)
        return {
            "tokens": np.pad(ids, (0, pad), constant_values=self.pad),
            "token_types": np.pad(types, (0, pad)),
            "padding_mask": np.pad(np.ones(len(ids), np.int32), (0, pad)),
            "labels": np.pad(labels, (0, pad), constant_values=IGNORE),
            "sentence_label": np.int32(flipped),
        }

    def _random_segment(self, row: int, length: int, rng) -> list:
        """`length` tokens (or fewer) from a random sentence start of another row: a next
        sentence that is not (BERT's negative NSP pair)."""
        rows = len(self.source)
        other = int(rng.integers(rows - 1)) if rows > 1 else row
        other += other >= row and rows > 1
        item = self.source[other]
        starts = np.concatenate([[0], np.cumsum(item["sentence_lengths"])[:-1]])
        begin = int(rng.choice(starts))
        return list(item["tokens"][begin : begin + length])

    def _mask(self, ids: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """mask_prob of the non-special positions (whole words if whole_word) are predicted:
        80% become [MASK], 10% a random piece, 10% stay. Returns (ids, labels)."""
        candidates = np.flatnonzero((ids != self.cls) & (ids != self.sep))
        # A candidate starts a word unless whole_word and it is a '##' piece right after one.
        starts = np.ones(len(candidates), bool)
        if self.whole_word:
            starts[1:] = ~((np.diff(candidates) == 1) & self.continues[ids[candidates[1:]]])
        word = np.cumsum(starts) - 1  # (candidates,) the word of each candidate
        sizes = np.bincount(word).tolist()
        goal = max(1, round(len(candidates) * self.mask_prob))
        take, total = np.zeros(len(sizes), bool), 0
        for w in rng.permutation(len(sizes)).tolist():  # words in random order, as BERT
            if total + sizes[w] <= goal:
                take[w], total = True, total + sizes[w]
            if total == goal:
                break
        chosen = candidates[take[word]]
        labels = np.full(len(ids), IGNORE, np.int32)
        labels[chosen] = ids[chosen]
        out = ids.copy()
        r = rng.random(len(chosen))
        out[chosen[r < 0.8]] = self.mask
        randomized = chosen[(r >= 0.8) & (r < 0.9)]
        out[randomized] = rng.choice(self.replacements, size=len(randomized))
        return out, labels


def _truncate_pair(a: list, b: list, target: int, rng) -> tuple[list, list]:
    """Drop tokens from the longer segment, at its front or back at random, until the pair fits
    in target tokens (BERT's truncate_seq_pair); each keeps at least one token."""
    while len(a) + len(b) > target:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


class RaceQuestions:
    """RACE questions as multiple-choice samples (Megatron-LM's RACE task): for each option,
    [CLS] question-with-option [SEP] article [SEP], where the option fills the question's `_`
    blank (or follows the question), the article is cut at its end to fit max_len, and token
    types are 0 up to the first [SEP], 1 after. Outputs (options, max_len) int32 tokens,
    token_types and padding_mask, and label () the answer's index."""

    def __init__(self, rows: list[dict], tokenizer, *, max_len: int, name: str = "race"):
        self.rows, self.tok, self.max_len, self.name = rows, tokenizer, max_len, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.rows[i]
        article = self.tok.encode(_clean(row["article"]))
        encoded = [self.encode(row["question"], option, article) for option in row["options"]]
        return {
            **{k: np.stack([e[k] for e in encoded]) for k in encoded[0]},
            "label": np.int32(row["answer"]),
        }

    def encode(self, question: str, option: str, article: list[int]) -> dict[str, np.ndarray]:
        qa = question.replace("_", option) if "_" in question else f"{question} {option}"
        a = self.tok.encode(_clean(qa))
        ids = [self.tok.cls_id, *a, self.tok.sep_id, *article][: self.max_len - 1]
        ids.append(self.tok.sep_id)
        types = np.zeros(self.max_len, np.int32)
        types[len(a) + 2 : len(ids)] = 1
        pad = self.max_len - len(ids)
        return {
            "tokens": np.array(ids + [self.tok.pad_id] * pad, np.int32),
            "token_types": types,
            "padding_mask": np.array([1] * len(ids) + [0] * pad, np.int32),
        }


def _clean(text: str) -> str:
    """Newlines and runs of spaces -> one space (Megatron-LM's clean_text)."""
    return " ".join(text.replace("\n", " ").split())
