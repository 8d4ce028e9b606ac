"""Batches are a pure function of (seed, step): reproducible, resumable from a JSON state,
split disjointly over processes, epoch by epoch permutations, blended by weight."""

import collections
import json

import numpy as np
import pytest

from megajax import config
from megajax.config import ConfigError
from megajax.data import prepare
from megajax.data.loader import PERIOD, Loader, loaders
from megajax.data.samples import Dataset, GPTWindows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """LAMBADA and WikiText prepared with the GPT-2 BPE: two real datasets to blend."""
    root = tmp_path_factory.mktemp("loader")
    lambada = prepare.prepare(
        ["data/lambada/lambada_sample.jsonl"], out=root / "l", fmt="lambada", log=lambda _: None
    )
    wiki = prepare.prepare(
        ["data/wikitext103/wiki.valid.head429.tokens"], out=root / "w", log=lambda _: None
    )
    return lambada, wiki


@pytest.fixture(scope="module")
def windows(prepared):
    return [GPTWindows(Dataset(p), "train", seq_len=32) for p in prepared]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_and_another_seed_others(windows):
    a, b = (Loader(windows[:1], batch_size=8, seed=5) for _ in range(2))
    c = Loader(windows[:1], batch_size=8, seed=6)
    first = [next(a) for _ in range(4)]
    assert all(_equal(x, next(b)) for x in first)
    assert not _equal(first[0], next(c))
    assert not _equal(first[0], first[1])
    assert first[0]["inputs"].shape == (8, 32)


def test_a_restored_loader_continues_exactly(windows):
    loader = Loader(windows, weights=[0.3, 0.7], batch_size=8, seed=0)
    for _ in range(7):
        next(loader)
    saved = json.loads(json.dumps(loader.state()))  # what a checkpoint stores
    expected = [next(loader) for _ in range(3)]
    resumed = Loader(windows, weights=[0.3, 0.7], batch_size=8, seed=0)
    resumed.restore(saved)
    assert saved["step"] == 7 and all(_equal(e, next(resumed)) for e in expected)
    other = Loader(windows, weights=[0.5, 0.5], batch_size=8, seed=0)
    with pytest.raises(ConfigError, match="weights changed"):
        other.restore(saved)


def test_process_rows_are_disjoint_and_make_up_the_global_batch(windows):
    whole = Loader(windows, batch_size=8, seed=1)
    for n in (2, 4, 8):
        per = 8 // n
        shards = [
            Loader(windows, batch_size=8, seed=1, rows=range(i * per, (i + 1) * per))
            for i in range(n)
        ]
        for step in (0, 3):
            parts = [s.batch(step) for s in shards]
            assert all(p["inputs"].shape == (per, 32) for p in parts)
            glued = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            assert _equal(glued, whole.batch(step))
    positions = [whole.locate(3 * 8 + r) for r in range(8)]
    assert len(set(positions)) == 8  # every row a different sample
    interleaved = Loader(windows, batch_size=8, seed=1, rows=[0, 4, 1, 5])  # micro-batch rows
    assert _equal(interleaved.batch(2), {k: v[[0, 4, 1, 5]] for k, v in whole.batch(2).items()})
    with pytest.raises(ConfigError, match="not all rows"):
        Loader(windows, batch_size=8, seed=1, rows=[7, 8])


def test_each_epoch_is_a_new_permutation_of_all_samples(windows):
    loader = Loader(windows[1:], batch_size=4, seed=2)
    n = len(windows[1])
    epochs = [[loader.locate(j) for j in range(e * n, (e + 1) * n)] for e in range(2)]
    for e, located in enumerate(epochs):
        assert {d for d, _, _ in located} == {0} and {ep for _, ep, _ in located} == {e}
        assert sorted(i for _, _, i in located) == list(range(n))
    assert [i for *_, i in epochs[0]] != [i for *_, i in epochs[1]]
    assert loader.epoch(n) == pytest.approx(4.0)  # n batches of 4 samples: 4 epochs


def test_blending_weights_hold_in_every_stretch(windows):
    loader = Loader(windows, weights=[0.25, 0.75], batch_size=16, seed=0)
    picks = np.array([loader.locate(j)[0] for j in range(3 * PERIOD + 100)])
    for length in (16, 160, 1600, len(picks)):
        assert abs((picks[:length] == 0).sum() - 0.25 * length) <= 1
    batch = loader.batch(11)
    for row, j in enumerate(range(11 * 16, 12 * 16)):  # each row comes from its dataset
        d, _, i = loader.locate(j)
        np.testing.assert_array_equal(batch["inputs"][row], windows[d][i]["inputs"])


def test_train_sources_blend_prepared_datasets_and_text_files(prepared, windows, tmp_path):
    source = f"1:{prepared[0]},3:data/wikitext103/wiki.valid.head429.tokens"
    cfg = config.replace(
        config.load("configs/gpt2_tiny.py"), model=dict(seq_len=32), data=dict(source=source)
    )
    tok, train, val = loaders(cfg, workdir=tmp_path, log=lambda _: None)
    assert tok.vocab_size == 50257 and train.weights == [1.0, 3.0]
    assert [len(d) for d in train.datasets] == [len(w) for w in windows]
    assert len(list((tmp_path / "data").iterdir())) == 1  # the text file, prepared in workdir
    assert 0 < val.num_tokens < train.num_tokens / 5 and next(train)["inputs"].shape == (8, 32)
    char = config.replace(cfg, data=dict(tokenizer="char"))
    with pytest.raises(ConfigError, match="prepared with the gpt2 tokenizer"):
        loaders(char, workdir=tmp_path / "c", log=lambda _: None)


def test_prefetching_builds_the_same_batches_off_the_training_thread(windows):
    import threading

    class Recording:  # a dataset that notes which thread builds its samples
        def __init__(self, inner):
            self.inner, self.threads = inner, set()

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            self.threads.add(threading.current_thread().name)
            return self.inner[i]

    data = Recording(windows[0])
    ahead = Loader([data], batch_size=8, seed=3, prefetch=2)
    plain = Loader(windows[:1], batch_size=8, seed=3)
    assert all(_equal(next(ahead), next(plain)) for _ in range(5))
    assert threading.current_thread().name not in data.threads
    ahead.restore(plain.state() | {"step": 1})  # a restore drops what was built ahead
    plain.restore(plain.state() | {"step": 1})
    assert all(_equal(next(ahead), next(plain)) for _ in range(3)) and ahead.step == 4


def test_a_char_models_tokenizer_reads_the_first_source_as_the_loader_does(tmp_path):
    """data.source is parsed in one place: generation and the evaluations take a character-level
    model's characters from the first source of the blend that trained it, a path with a colon
    in it included."""
    from megajax.data.loader import tokenizer_for

    folder = tmp_path / "corpus:2024"
    folder.mkdir()
    (folder / "text.txt").write_text("a colon in the folder's name\n" * 40, encoding="utf-8")
    for source in (f"{folder}/text.txt", f"0.5:{folder}/text.txt,0.5:{folder}/text.txt"):
        cfg = config.replace(
            config.load("configs/gpt2_tiny.py"),
            model=dict(seq_len=32),
            data=dict(source=source, tokenizer="char"),
        )
        trained, _, _ = loaders(cfg, workdir=tmp_path, log=lambda _: None)
        read = tokenizer_for(cfg, workdir=str(tmp_path), hf_checkpoint=None)
        assert read.chars == trained.chars == sorted(set("a colon in the folder's name\n"))


class _Sized:
    """A dataset of n samples, each its own index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": np.array(i)}


def test_an_epochs_order_is_a_permutation_computed_index_by_index():
    """Each epoch's order is a bijection of range(n) computed per index (a keyed Feistel network,
    walked back into range): every size gives a permutation, one of its own for each seed,
    dataset and epoch."""
    from megajax.data.permutation import Permutation

    for n in (1, 2, 3, 4, 5, 7, 8, 16, 17, 31, 64, 97, 127, 128, 1000, 1024, 4099):
        assert sorted(Permutation(n, (0, 0, 0))[i] for i in range(n)) == list(range(n)), n
    orders = {
        key: [Permutation(97, key)[i] for i in range(97)]
        for key in ((0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0))
    }
    assert len({tuple(o) for o in orders.values()}) == 4
    assert orders[0, 0, 0] == [Permutation(97, (0, 0, 0))[i] for i in range(97)]  # pure
    firsts = collections.Counter(Permutation(7, (seed, 0, 0))[0] for seed in range(700))
    assert sorted(firsts) == list(range(7)) and max(firsts.values()) < 140  # 100 each expected


def test_locating_a_sample_among_a_billion_builds_nothing_of_their_size():
    import time
    import tracemalloc

    loader = Loader([_Sized(10**9)], batch_size=8, seed=0)
    tracemalloc.start()
    began = time.perf_counter()
    located = [loader.locate(j) for j in (0, 1, 10**9 - 1, 10**9, 3 * 10**9 + 7)]
    seconds, (_, peak) = time.perf_counter() - began, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100_000 and seconds < 1
    assert [(d, epoch) for d, epoch, _ in located] == [(0, 0), (0, 0), (0, 0), (0, 1), (0, 3)]
    assert len({i for *_, i in located}) == 5 and all(0 <= i < 10**9 for *_, i in located)


def test_a_state_saved_in_the_order_before_resumes_at_its_step_with_a_line(windows):
    """Loader states saved before the order was computed per index (no "order") continue at
    their step in the new order, saying so; one of a newer order is refused."""
    loader = Loader(windows, weights=[0.3, 0.7], batch_size=8, seed=0)
    assert loader.state()["order"] == 2
    older = {k: v for k, v in loader.state().items() if k != "order"} | {"step": 5}
    lines = []
    loader.restore(older, log=lines.append)
    expected = Loader(windows, weights=[0.3, 0.7], batch_size=8, seed=0).batch(5)
    assert loader.step == 5 and _equal(next(loader), expected)
    assert len(lines) == 1 and "order 1" in lines[0] and "step 5" in lines[0]
    with pytest.raises(ConfigError, match="order 3, newer"):
        loader.restore(loader.state() | {"order": 3}, log=lines.append)
