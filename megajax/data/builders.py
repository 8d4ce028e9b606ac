"""TFDS builders that write rows to array_record files (no TensorFlow needed): RACE's questions
as text, and the token rows of the dataset layout before 2.0.0 (prepare.py now writes token rows
itself, megajax/data/shards.py; tests build the old layout with TokenRows to read it back).

The rows are computed before the builder runs; a builder only lays them out as a TFDS dataset
so that `tfds.builder_from_directory(...).as_data_source()` reads them back with random access.
Rows keep their order (shuffling is the loader's job, by seed).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"


class _RowsBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes `splits` ({name: iterable of feature dicts}) with the features of `_features()`."""

    VERSION = tfds.core.Version(VERSION)
    # TFDS looks for download checksums beside a builder's code (and needs the
    # importlib_resources backport to find code inside a package); these download nothing.
    code_path = None

    def __init__(self, *, splits: dict[str, Iterable[dict]], **kwargs):
        self._splits = splits
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        # Stored order = generation order: a long document's chunks stay consecutive.
        return tfds.core.DatasetInfo(
            builder=self, features=self._features(), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(rows) for name, rows in self._splits.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)  # the key is the row's position


class TokenRows(_RowsBuilder):
    """One row per chunk of a document: its token ids (int32), EOT included at document ends."""

    def _features(self):
        return tfds.features.FeaturesDict(
            {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        )


class SentenceRows(_RowsBuilder):
    """Token rows that also keep sentence boundaries (lengths in tokens), for BERT's pairs."""

    def _features(self):
        return tfds.features.FeaturesDict(
            {
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "sentence_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }
        )


class RaceRows(_RowsBuilder):
    """RACE as text, one row per question; the evaluation builds its own inputs from the text
    because a fill-in question has its `_` replaced by each option before tokenizing."""

    def _features(self):
        return tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "passage": tfds.features.Text(),  # the file it came from
                "level": tfds.features.Text(),  # its folder: middle or high in RACE
                "article": tfds.features.Text(),
                "question": tfds.features.Text(),
                "options": tfds.features.Sequence(tfds.features.Text(), length=4),
                "answer": tfds.features.Scalar(dtype=np.int32),  # 0..3 for A..D
            }
        )


BUILDERS = {"tokens": TokenRows, "sentences": SentenceRows, "race": RaceRows}


def build(kind: str, *, data_dir: str, splits: dict[str, Iterable[dict]]) -> str:
    """Write the splits under data_dir as TFDS dataset `kind`; returns the dataset's directory."""
    tfds.disable_progress_bar()  # prepare.py reports its own progress
    builder = BUILDERS[kind](splits=splits, data_dir=data_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own "prepared" lines
        builder.download_and_prepare()
    return str(builder.data_dir)


def data_sources(dataset_dir: str) -> dict:
    """{split: random-access source} of a dataset written by `build`."""
    return tfds.builder_from_directory(dataset_dir).as_data_source()
