"""Global batches as a pure function of (seed, step): shuffled, blended, sharded by process.

Position j of the global sample stream (batch k holds j = k * batch_size ... + batch_size - 1)
is given to a dataset by a fixed blending pattern, and the dataset's c-th sample is element
c mod N of that dataset's permutation for epoch c // N, drawn from (seed, dataset, epoch) and
computed for that one element (permutation.py: nothing of size N is built). No state is carried
from batch to batch, so `state()` is the next step and `restore()` sets it: a resumed run, on
any number of processes, sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from megajax.config import ConfigError
from megajax.data.permutation import Permutation

PERIOD = 4096  # length of the blending pattern; realized weights are within 1/PERIOD
PREFETCH = 4  # training batches built ahead, off the training thread
# The sample order, saved in state(): 1 shuffled each epoch with a permutation held in memory
# (numpy's, before this version); 2 with permutation.Permutation, one index at a time.
ORDER = 2


def blend_pattern(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """(period,) dataset of each position: each next position goes to the dataset furthest
    behind its share (Megatron-LM's blending), so every prefix tracks the weights."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"blending weights {list(weights)}: need non-negative, not all zero")
    w = w / w.sum()
    counts = np.zeros(len(w))
    pattern = np.empty(period, np.int64)
    for j in range(period):
        d = int(np.argmax(w * (j + 1) - counts))
        pattern[j] = d
        counts[d] += 1
    return pattern


class Loader:
    """Batches of samples from one or more datasets (each with __len__ and __getitem__ giving a
    dict of arrays). `batch(step)` is this process's `rows` of global batch `step` (all rows
    by default), each field (len(rows), ...). Which rows a process feeds follows from where
    its devices sit in the mesh: Trainer.train_rows and Trainer.eval_rows."""

    def __init__(
        self,
        datasets: Sequence,
        *,
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        shuffle: bool = True,
        rows: Sequence[int] | None = None,
        prefetch: int = 0,
    ):
        rows = range(batch_size) if rows is None else [int(r) for r in rows]
        if not all(0 <= r < batch_size for r in rows):
            raise ConfigError(f"rows {list(rows)} are not all rows of a batch of {batch_size}")
        for d in datasets:
            if len(d) == 0:
                raise ConfigError(f"{getattr(d, 'name', d)} has no samples")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(datasets)
        if len(self.weights) != len(self.datasets):
            raise ConfigError(f"{len(self.weights)} weights for {len(self.datasets)} datasets")
        self.pattern = blend_pattern(self.weights)
        # Samples of each dataset before each pattern position, and in a whole period.
        self._before = np.stack([np.cumsum(self.pattern == d) for d in range(len(datasets))])
        self._before -= np.stack([self.pattern == d for d in range(len(datasets))])
        self._per_period = self._before[:, -1] + (self.pattern[-1] == np.arange(len(datasets)))
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rows = rows
        self.step = 0
        self._perms = {}
        # `prefetch` batches after the next are built by one thread while the step runs (XLA
        # releases the GIL); one builder, so the permutations' cache has a single writer.
        self.prefetch = prefetch
        self._ahead: collections.deque = collections.deque()  # (step, future), in order
        self._builder = ThreadPoolExecutor(1, "megajax-batches") if prefetch else None

    def _permutation(self, d: int, epoch: int) -> Permutation | range:
        """Dataset d's order in `epoch` (its round keys kept for the epochs in use)."""
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.datasets):
                self._perms.clear()  # only the current (and maybe next) epochs are in use
            n = len(self.datasets[d])
            self._perms[key] = Permutation(n, (self.seed, d, epoch)) if self.shuffle else range(n)
        return self._perms[key]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(dataset, epoch, sample index) of global stream position `position`."""
        period, offset = divmod(position, PERIOD)
        d = int(self.pattern[offset])
        count = period * int(self._per_period[d]) + int(self._before[d, offset])
        epoch, c = divmod(count, len(self.datasets[d]))
        return d, epoch, int(self._permutation(d, epoch)[c])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        samples = []
        for r in self.rows:
            d, _, i = self.locate(step * self.batch_size + r)
            samples.append(self.datasets[d][i])
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    @property
    def num_tokens(self) -> int:
        """Tokens of the datasets that count them (GPT windows), for the log."""
        return sum(getattr(d, "num_tokens", 0) for d in self.datasets)

    def epoch(self, step: int | None = None) -> float:
        """Epochs of the first dataset completed before `step` (default: the next step)."""
        step = self.step if step is None else step
        share = self._per_period[0] / PERIOD
        return step * self.batch_size * share / len(self.datasets[0])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.prefetch:
            out = self.batch(self.step)
            self.step += 1
            return out
        if self._ahead and self._ahead[0][0] != self.step:  # restored elsewhere: start over
            self._ahead.clear()
        ahead = self._ahead[-1][0] + 1 if self._ahead else self.step
        while len(self._ahead) <= self.prefetch:
            self._ahead.append((ahead, self._builder.submit(self.batch, ahead)))
            ahead += 1
        _, future = self._ahead.popleft()
        self.step += 1
        return future.result()

    def state(self) -> dict:
        """A small JSON-serializable dict: the next step, and what it is a step of."""
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "sizes": [len(d) for d in self.datasets],
            "weights": self.weights,
            "order": ORDER,
        }

    def restore(self, state: dict, *, log=print) -> None:
        """Continue from `state()`; refuses one taken over other data, seed or batch size. A
        state of the order before (1, no "order" saved) continues at its step in this order,
        with a line saying so: its position is kept, but the epoch under way is reshuffled."""
        mine = self.state()
        changed = [k for k in mine if k not in ("step", "order") and state.get(k) != mine[k]]
        if changed:
            raise ConfigError(
                f"the data loader's saved state does not match this run ({', '.join(changed)} "
                f"changed: saved {[state.get(k) for k in changed]}, now "
                f"{[mine[k] for k in changed]})"
            )
        order = int(state.get("order", 1))
        if order > ORDER:
            raise ConfigError(
                f"the data loader's saved state is of sample order {order}, newer than this "
                f"megajax's {ORDER}: resume with the megajax that saved it"
            )
        if order < ORDER:
            log(
                f"data: the checkpoint's loader state (step {state['step']}) is of sample order "
                f"{order}, whose per-epoch permutations this version no longer builds; "
                f"continuing from step {state['step']} in order {ORDER}: every dataset keeps "
                f"its epoch and position in it, but the rest of the epoch under way is drawn "
                f"anew (some of its samples come twice, others wait for the next epoch)"
            )
        self.step = int(state["step"])


def sources(source: str) -> tuple[list[str], list[float]]:
    """'PATH' or 'W1:PATH1,W2:PATH2' (blending weights, as Megatron-LM's --data-path)."""
    paths, weights = [], []
    for item in source.split(","):
        weight, sep, path = item.partition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            w, path = 1.0, item  # a colon inside a path, not a weight
        paths.append(path if sep else item)
        weights.append(w)
    return paths, weights


def _samples(cfg, dataset, split: str, *, log=print):
    """The samples model.arch trains on: GPT windows (with their documents' bounds if
    data.reset_attention), rows of conversations (data.format=chat) or BERT sentence pairs."""
    from megajax.data import samples

    if cfg.data.format == "chat":
        return samples.ChatRows(
            dataset,
            split,
            seq_len=cfg.model.seq_len,
            pack=cfg.data.pack,
            truncate=cfg.data.truncate,
            log=log,
        )
    if cfg.model.arch == "gpt":
        return samples.GPTWindows(
            dataset, split, seq_len=cfg.model.seq_len, documents=cfg.data.reset_attention
        )
    if cfg.model.arch == "bert":
        return samples.BertPairs(
            dataset,
            split,
            max_len=cfg.model.seq_len,
            short_prob=cfg.data.short_seq_prob,
            mask_prob=cfg.data.mask_prob,
            whole_word=cfg.data.whole_word_masking,
            pair_task=cfg.model.binary_head,
            seed=cfg.train.seed + (split != "train"),
        )
    raise ConfigError(f"model.arch={cfg.model.arch} has no text samples")


def race_splits(cfg, paths) -> tuple[list[dict], list[dict]]:
    """RACE questions of the files or folders in `paths` -> (train, validation): the last
    data.val_fraction of each level's passages (middle, high; in path order) are held out, whole
    passages, so that validation reports both levels."""
    from megajax.data import corpora

    rows = corpora.read_race(paths)
    levels: dict[str, dict[str, None]] = {}  # each level's passages, in order, once each
    for r in rows:
        levels.setdefault(r["level"], {})[r["passage"]] = None
    held = set()
    for passages in map(list, levels.values()):
        held.update(passages[len(passages) - round(cfg.data.val_fraction * len(passages)) :])
    return [r for r in rows if r["passage"] not in held], [r for r in rows if r["passage"] in held]


def race_questions(cfg, rows: list[dict], *, name: str, tokenizer=None):
    """RACE question rows as the model's multiple-choice samples, in the WordPiece ids of
    `tokenizer` (default: data.vocab_dir's)."""
    from megajax.data import samples
    from megajax.data.tokenizer import BertTokenizer

    tokenizer = tokenizer or BertTokenizer(f"{cfg.data.vocab_dir}/vocab.txt")
    return samples.RaceQuestions(rows, tokenizer, max_len=cfg.model.seq_len, name=name)


def race_loaders(cfg, *, log=print, train_rows=None, eval_rows=None):
    """(tokenizer, train Loader, validation Loader) of RACE questions for a multiple-choice
    BERT: data.source is RACE's folder layout (or files), read as JSON, tokenized per sample."""
    from megajax.data.tokenizer import BertTokenizer

    tokenizer = BertTokenizer(f"{cfg.data.vocab_dir}/vocab.txt")
    paths, _ = sources(cfg.data.source)
    train, val = race_splits(cfg, paths)
    log(f"RACE: {len(train)} training and {len(val)} validation questions from {cfg.data.source}")
    made = [
        Loader(
            [race_questions(cfg, rows, name=split, tokenizer=tokenizer)],
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed + offset,
            rows=rows_of_batch,
        )
        for split, offset, rows, rows_of_batch in (
            ("train", 0, train, train_rows),
            ("validation", 1, val, eval_rows),
        )
    ]
    return tokenizer, *made


def loaders(cfg, *, workdir, log=print, train_rows=None, eval_rows=None, lead=True):
    """(tokenizer, train Loader, validation Loader) for cfg.data.source: prepared datasets or
    text files (with data.format=chat, JSON Lines files of conversations), prepared once into
    workdir/data, blended by their weights. Each loader yields the given rows (default all) of
    each global batch: for GPT {'inputs', 'targets'}, (rows, seq_len) int32 each, and with
    data.documents 'weights', 'segments' and 'positions' too (models.batch_fields); for BERT
    the fields of BertPairs. Sources are prepared by the lead process only; the others wait."""
    from megajax.data import prepare, samples  # here: samples imports array_record, the Loader not

    if cfg.model.arch == "bert_multiple_choice":
        return race_loaders(cfg, log=log, train_rows=train_rows, eval_rows=eval_rows)
    if cfg.model.is_bert != (cfg.data.tokenizer == "bert"):
        raise ConfigError(
            f"model.arch={cfg.model.arch} with data.tokenizer={cfg.data.tokenizer!r}: BERT "
            "models read WordPiece ids (data.tokenizer=bert, data.vocab_dir=data/bert), GPT "
            "models gpt2 or char ids"
        )

    paths, weights = sources(cfg.data.source)
    datasets = [
        samples.Dataset(
            prepare.cached(
                p,
                tokenizer=cfg.data.tokenizer,
                vocab_dir=cfg.data.vocab_dir,
                add_bos=cfg.data.add_bos,
                fmt=cfg.data.format,
                chat_template=cfg.data.chat_template,
                val_fraction=cfg.data.val_fraction,
                cache_dir=f"{workdir}/data",
                log=log,
                lead=lead,
            )
        )
        for p in paths
    ]
    for d in datasets:
        if d.manifest["tokenizer"]["name"] != cfg.data.tokenizer:
            raise ConfigError(
                f"data.source: {d.path} was prepared with the {d.manifest['tokenizer']['name']} "
                f"tokenizer but data.tokenizer is {cfg.data.tokenizer!r}: set it to match"
            )
    if len({json.dumps(d.manifest["tokenizer"], sort_keys=True) for d in datasets}) > 1:
        raise ConfigError("data.source: the blended datasets have different character sets")
    for d in datasets:
        if d.is_chat != (cfg.data.format == "chat"):
            held = "conversations" if d.is_chat else "text"
            raise ConfigError(
                f"data.source: {d.path} holds {held} but data.format is {cfg.data.format!r}: "
                "set it to match"
            )
    made = [
        Loader(
            [_samples(cfg, d, split, log=log) for d in datasets],
            weights=weights,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed + offset,
            rows=rows,
            prefetch=prefetch,
        )
        for split, offset, rows, prefetch in (
            ("train", 0, train_rows, PREFETCH),
            ("validation", 1, eval_rows, 0),
        )
    ]
    return datasets[0].tokenizer(), *made


def tokenizer_for(cfg, *, workdir: str | None, hf_checkpoint: str | None):
    """The tokenizer a GPT was trained with, for text that generation, the server and the evals
    read: a run's prepared data (characters included), the tokenizer.json or GPT-2 BPE files of
    a Hugging Face directory, or data.vocab_dir."""
    from pathlib import Path

    import jax

    from megajax.data import prepare
    from megajax.data.tokenizer import GPT2Tokenizer, HFTokenizer

    if cfg.model.arch != "gpt" or cfg.data.tokenizer == "bert":
        raise ConfigError(
            f"reading text needs a GPT (model.arch=gpt) over gpt2, hf or char ids, not "
            f"model.arch={cfg.model.arch} with data.tokenizer={cfg.data.tokenizer}"
        )
    if hf_checkpoint and (Path(hf_checkpoint) / "tokenizer.json").is_file():
        return HFTokenizer(hf_checkpoint)
    if hf_checkpoint and (Path(hf_checkpoint) / "vocab.json").is_file():
        return GPT2Tokenizer(hf_checkpoint)
    if cfg.data.tokenizer == "hf":
        return HFTokenizer(cfg.data.vocab_dir)
    if cfg.data.tokenizer == "gpt2":
        return GPT2Tokenizer(cfg.data.vocab_dir)
    if not workdir:
        raise ConfigError("a character-level model needs its --workdir (its character set)")
    paths, _ = sources(cfg.data.source)  # a blend's datasets share one character set
    dataset = prepare.cached(
        paths[0],
        tokenizer=cfg.data.tokenizer,
        vocab_dir=cfg.data.vocab_dir,
        add_bos=cfg.data.add_bos,
        val_fraction=cfg.data.val_fraction,
        cache_dir=f"{workdir}/data",
        log=lambda _: None,
        lead=jax.process_index() == 0,
    )
    return prepare.load_tokenizer(dataset)
