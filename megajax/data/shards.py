"""Token rows on disk: array_record shards written as rows come, read back with random access.

A split's rows are the records of `rows/{split}-{n:05d}.array_record`, in order; a record is one
row's token ids as raw little-endian integers of the manifest's `dtype` (uint16 when the
vocabulary fits, as Megatron-LM's indexed datasets store them), followed, in a dataset of
conversations (`masked`), by as many loss-mask bytes (1: the token is trained on). A new shard
starts once one holds `shard_bytes`. The row lengths, BERT's sentence lengths and any further
per-row integers (a conversation's source line) go to `index/{split}.npz`, which the samples
read whole (8 bytes a row and column, 4 a sentence): nothing else is kept in memory.
"""

from __future__ import annotations

import array
import os
import zipfile
from pathlib import Path

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

# One record per chunk (random access reads only its row) and no compression: zstd or brotli
# would halve the files and cost 15-50 MB/s of writing on one core.
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_BYTES = 1 << 30


def dtype_for(vocab_size: int) -> str:
    """The narrowest stored integer type for token ids below vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class Writer:
    """Appends rows of one split to its shards and index."""

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        dtype: str,
        shard_bytes: int = SHARD_BYTES,
        masked: bool = False,
    ):
        self.directory, self.split, self.masked = Path(directory), split, masked
        self.dtype, self.shard_bytes = np.dtype(dtype).newbyteorder("<"), shard_bytes
        (self.directory / "rows").mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self._writer, self._bytes = None, 0
        self.row_tokens = array.array("q")  # the index in memory: 8 bytes a row (16 for BERT)
        self.row_sentences = array.array("q")
        self.columns: dict[str, array.array] = {}  # further per-row integers, by name
        # BERT's sentence lengths (4 bytes a sentence, the bulk of the index) go to a file
        (self.directory / "index").mkdir(exist_ok=True)
        self._sentences_path = self.directory / "index" / f".{split}.sentence_lengths"
        self._sentences = None

    def write(
        self,
        tokens: np.ndarray,
        sentence_lengths: np.ndarray | None = None,
        *,
        mask: np.ndarray | None = None,
        **columns: int,
    ) -> None:
        """One row; `mask` (masked writers): a byte per token; `columns`: integers of the row
        kept in the index under their names."""
        if self._writer is None or self._bytes >= self.shard_bytes:
            self._next_shard()
        data = np.asarray(tokens).astype(self.dtype, copy=False).tobytes()
        if self.masked:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("a masked row needs one mask byte per token")
            data += np.asarray(mask, np.uint8).tobytes()
        self._writer.write(data)
        self._bytes += len(data)
        self.row_tokens.append(len(tokens))
        if sentence_lengths is not None:
            if self._sentences is None:
                self._sentences = open(self._sentences_path, "wb")  # noqa: SIM115 (closed in close)
            self._sentences.write(np.asarray(sentence_lengths, "<i4").tobytes())
            self.row_sentences.append(len(sentence_lengths))
        for name, value in columns.items():
            self.columns.setdefault(name, array.array("q")).append(value)

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"{self.split}-{len(self.files):05d}.array_record"
        self._writer = ArrayRecordWriter(str(self.directory / "rows" / name), WRITER_OPTIONS)
        self.files.append(name)
        self._bytes = 0

    def close(self) -> dict:
        """Finish the last shard and write the index; returns the split's manifest entry."""
        if self._writer is not None:
            self._writer.close()
        row_tokens = np.frombuffer(self.row_tokens, np.int64)
        with zipfile.ZipFile(self.directory / "index" / f"{self.split}.npz", "w") as npz:
            _write_npy(npz, "row_tokens", row_tokens)
            if self._sentences is not None:
                self._sentences.close()
                with open(self._sentences_path, "rb") as f:
                    _write_npy(npz, "sentence_lengths", f, dtype="<i4")
                self._sentences_path.unlink()
                _write_npy(npz, "row_sentences", np.frombuffer(self.row_sentences, np.int64))
            for name, values in self.columns.items():
                _write_npy(npz, name, np.frombuffer(values, np.int64))
        return {"rows": len(row_tokens), "tokens": int(row_tokens.sum())}


def _write_npy(npz: zipfile.ZipFile, name: str, data, *, dtype=None) -> None:
    """An array into an .npz archive (as np.savez lays it out), or the raw `dtype` values of an
    open file copied in 4 MB blocks, so that a long index never sits in memory whole."""
    if isinstance(data, np.ndarray):
        dtype, count = data.dtype, len(data)
    else:
        count = os.fstat(data.fileno()).st_size // np.dtype(dtype).itemsize
    with npz.open(f"{name}.npy", "w", force_zip64=True) as out:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (count,)}
        np.lib.format.write_array_header_1_0(out, header)
        if isinstance(data, np.ndarray):
            out.write(data.tobytes())
            return
        while block := data.read(1 << 22):
            out.write(block)


class Rows:
    """Random access to a split written by Writer: rows[i] = {'tokens': (n,) int32} and, for
    BERT, 'sentence_lengths': the row's sentences' lengths in tokens; if `masked`, 'mask':
    (n,) uint8."""

    def __init__(
        self, directory: Path, split: str, *, files: list[str], dtype: str, masked: bool = False
    ):
        directory = Path(directory)
        self._source = ArrayRecordDataSource([str(directory / "rows" / f) for f in files])
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.masked = masked
        with np.load(directory / "index" / f"{split}.npz") as index:
            self._sentences = None
            if "row_sentences" in index:
                lengths = index["sentence_lengths"]
                starts = np.concatenate([[0], np.cumsum(index["row_sentences"])])
                self._sentences = (lengths, starts)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        data = self._source[i]
        if self.masked:  # n ids of dtype, then n mask bytes
            n = len(data) // (self.dtype.itemsize + 1)
            ids = np.frombuffer(data, self.dtype, count=n).astype(np.int32)
            mask = np.frombuffer(data, np.uint8, offset=n * self.dtype.itemsize)
            return {"tokens": ids, "mask": mask}
        row = {"tokens": np.frombuffer(data, self.dtype).astype(np.int32)}
        if self._sentences is not None:
            lengths, starts = self._sentences
            row["sentence_lengths"] = lengths[starts[i] : starts[i + 1]]
        return row
