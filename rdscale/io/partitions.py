"""Hash partitions of Arrow rows, spilled to disk when there are many: the one way the driver groups more keys
than fit in memory (duplicate ids across shards, an update's comparison, identical sequences within an input).

Rows are split by a hash of one string column (`key_partition`), so every row of a key lands in the same
partition and each partition is processed on its own. With one partition everything stays in memory; with more,
each partition is an Arrow IPC stream in a scratch folder (deleted on exit) and iteration loads one at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def key_partition(keys: pa.Array, parts: int) -> np.ndarray:
    """Partition index in [0, parts) of every key: a 64-bit polynomial hash of its UTF-8 bytes, vectorised (no
    Python loop per key), then mixed. keys: (n,) string array -> (n,) int64. Equal keys get equal indexes."""
    keys = pc.fill_null(keys, "").cast(pa.large_string())
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    n = len(keys)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset : keys.offset + n + 1]
    data = keys.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)  # (n,)
    first = int(offsets[0])
    byte = data[first : int(offsets[-1])].astype(np.uint64)  # (total bytes,)
    starts = offsets[:-1] - first  # (n,)
    h = np.zeros(n, dtype=np.uint64)
    if byte.size:
        where = np.arange(byte.size, dtype=np.int64) - np.repeat(starts, lengths)  # byte position within its key
        powers = np.cumprod(np.full(int(lengths.max()), 0x100000001B3, dtype=np.uint64))  # wraps mod 2^64
        nonempty = lengths > 0
        with np.errstate(over="ignore"):
            h[nonempty] = np.add.reduceat(byte * powers[where], starts[nonempty])
    with np.errstate(over="ignore"):  # splitmix64 finaliser: spread the bits before the modulo
        h ^= (h >> np.uint64(30)) ^ lengths.astype(np.uint64)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(parts)).astype(np.int64)


def repeated(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct values that occur more than once (within one partition: every occurrence of a key is there)."""
    if len(values) == 0:
        return pa.array([], values.type)
    counts = pc.value_counts(values)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1))


def partitions_for(rows: int, rows_per_partition: int) -> int:
    return max(1, -(-int(rows) // max(1, int(rows_per_partition))))


class HashPartitions:
    """Rows of `schema` split by `key_partition(row[key])`. Use as a context manager; `add` record batches, then
    iterate: one partition's table at a time (each partition is read once, then deleted)."""

    def __init__(self, parts: int, schema: pa.Schema, key: str, scratch: str | Path | None = None):
        self.parts = parts
        self.schema = schema
        self.key = key
        self.scratch = scratch
        self.memory: list[pa.RecordBatch] = []
        self.writers: dict[int, Any] = {}

    def __enter__(self):
        if self.parts > 1:
            self._tmp = tempfile.TemporaryDirectory(prefix="rdscale-partitions-", dir=self.scratch)
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.parts > 1:
            self._tmp.cleanup()

    def _path(self, p: int) -> Path:
        return Path(self._tmp.name) / f"part-{p:05d}.arrow"

    def add(self, rows: pa.RecordBatch) -> None:
        if rows.num_rows == 0:
            return
        if self.parts == 1:
            self.memory.append(rows)
            return
        index = key_partition(rows.column(self.key), self.parts)  # (n,)
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(self.parts + 1))
        ordered = rows.take(pa.array(order))
        for p in range(self.parts):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if hi > lo:
                if p not in self.writers:
                    self.writers[p] = pa.ipc.new_stream(str(self._path(p)), self.schema)
                self.writers[p].write_batch(ordered.slice(lo, hi - lo))

    def __iter__(self) -> Iterator[pa.Table]:
        if self.parts == 1:
            yield pa.Table.from_batches(self.memory, schema=self.schema)
            self.memory = []
            return
        for writer in self.writers.values():
            writer.close()
        done, self.writers = sorted(self.writers), {}
        for p in done:
            with pa.ipc.open_stream(str(self._path(p))) as reader:
                table = reader.read_all()
            self._path(p).unlink()
            yield table
