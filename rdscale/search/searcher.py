"""A long-lived searcher over one table of a run: opens the table and its indexes once, keeps the keys and the
embedding matrix resident, and answers exact, ANN and funnel queries from memory.

``Searcher(run)`` is what a query loop, the query server (``rdscale serve``) and sharded search actors hold;
``rdscale.search.search(...)`` is the one-shot form (it opens a non-resident Searcher, which streams the table for
exact search instead of holding it, and closes it).

- Exact search: a blocked GEMM over the resident matrix (rows normalised once per prefix width for cosine, squared
  norms kept for l2) with a top-k merge across blocks (rdscale.search.exact). Non-resident: the same blocks, read
  from the Lance table as it is scanned.
- ANN: the vector index at the width (FAISS, rdscale.search.faiss_index, or Lance's own index on the prefix
  column, rdscale.search.lance_index), kept open so its cache stays warm.
- Funnel (adaptive retrieval, Kusupati et al. 2022): a shortlist from the index on a short prefix, re-ranked by
  exact distance at ``rerank_width`` (default: the full stored width) from the resident matrix.

Row positions: the resident arrays are in the table's scan order (fragment by fragment); FAISS labels and filter
results are mapped onto those positions, so every path ends in the same (distances, positions) form and one
function turns that into the result table. A Searcher sees the table version it opened; ``refresh()`` reopens it.
Thread-safe for concurrent queries (lazy loads are locked; numpy and FAISS release the GIL while they compute).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rdscale.io.runs import Run
from rdscale.io.store import reader_filter, unfinished_writes
from rdscale.progress import log as progress_log
from rdscale.search import calibrate as C
from rdscale.search import exact as E
from rdscale.search import faiss_index as F
from rdscale.search import lance_index as L
from rdscale.search.names import RESIDUE_MODES
from rdscale.search.request import SearchRequest
from rdscale.search.sequences import QueryEmbedder, sequence_queries, stack_queries
from rdscale.search.tables import (
    BACKENDS,
    EMBEDDING,
    TABLES,
    IndexInfo,
    KeyNotFoundError,
    MissingIndexError,
    SearchError,
    _check_metric,
    _column_is_complete,
    _embedding_block,
    chain_levels,
    check_width,
    open_table,
    prefix_column,
    reopen,
    stored_width,
)

_SCAN_ROWS = 32768  # rows per streamed batch (non-resident exact search)
RERANK_ROWS = ("float32", "float16", "store")
_RERANK_BYTES = 1 << 19  # gathered candidate rows per re-rank block (float32 bytes): what stays in cache
_FILTER_CACHE = 16
_FEW_ROWS = 1024  # ann / funnel with a filter keeping at most this many rows (or 4 k) scan them exactly
NUM_QUERIES_KEY = "rdscale.num_queries"  # result-table schema metadata: the number of queries asked


def num_queries(result: pa.Table) -> int:
    """Queries asked for ``result`` (from its metadata; else the distinct values of its query column)."""
    raw = (result.schema.metadata or {}).get(NUM_QUERIES_KEY.encode())
    return int(raw) if raw else len(set(result.column("query").to_pylist()))


def _lance_message(err: BaseException) -> str:
    """Lance's error text without the Rust source location it appends."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    head, sep, tail = text.rpartition(", /")
    return head if sep and ".rs:" in tail else text


_FEW_KEYS = 4096  # wanted keys up to which key_positions hashes them rather than the table's keys


def key_positions(keys: pa.Array, wanted: Sequence[str], few: int = _FEW_KEYS) -> np.ndarray:
    """(len(wanted),) int64: the first position of each wanted key in `keys` (n,), -1 where it is absent.

    A few wanted keys (queries by id) probe the table's keys against a hash set of them: hashing all n keys
    instead (index_in with the table as value set) cost 0.5 s a call at 1e6 rows, and more per row as n grew.
    Many wanted keys (calibration samples) hash the table's keys once."""
    if len(wanted) > few:
        at = pc.index_in(pa.array(list(wanted), pa.string()), value_set=keys)
        return at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.flatnonzero(pc.is_in(keys, value_set=pa.array(sorted(set(wanted)), pa.string()))
                          .to_numpy(zero_copy_only=False))
    first: dict[str, int] = {}
    for row, key in zip(rows.tolist(), keys.take(pa.array(rows, pa.int64())).to_pylist()):
        first.setdefault(key, row)
    return np.array([first.get(w, -1) for w in wanted], np.int64)


def stored_as(keys: pa.Array, missing: Sequence[str]) -> str:
    """A hint for ids not found: the stored ids that hold one of them as an accession, as UniProt's FASTA headers
    do (``sp|P12345|NAME_HUMAN``, ``UniRef50_P12345``). An id is the header's first word, whole; "" when none
    does (one scan of the id column per missing id, on the error path only)."""
    found = []
    for key in dict.fromkeys(missing):
        if not key or "|" in key:
            continue
        hit = pc.or_(pc.match_substring(keys, f"|{key}|"),
                     pc.or_(pc.ends_with(keys, f"|{key}"), pc.ends_with(keys, f"_{key}")))
        ids = pc.unique(pc.filter(keys, hit.fill_null(False))).to_pylist()  # residues: one per protein
        if ids:
            found.append(f"{key} is in {ids[0]}" + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""))
    return f" ({'; '.join(found)}: an id is the header's whole first word)" if found else ""


def widen(half: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 rows -> float32 into `out` (same shape), exactly. torch converts with the CPU's vector
    instructions; numpy's astype converts one value at a time, ~10-30x slower, and cost the float16 funnel half
    of its batch time."""
    torch.from_numpy(out).copy_(torch.from_numpy(half))
    return out


@dataclass(frozen=True)
class _Plan:
    """A ``SearchRequest`` resolved against one table (``Searcher._plan``): what the search then runs."""

    request: SearchRequest
    mode: str  # exact when a recall target meets a table too small to calibrate
    filter: str | None  # the request's, with the committed-rows filter of a run being written
    k: int  # hits fetched per query (clamped to the rows; residue hits when aggregating)
    k_out: int  # hits returned per query
    index: IndexInfo | None  # ann / funnel
    width: int  # the searched prefix width
    need: int  # numbers of a query read: the width, or funnel's rerank width
    rerank_width: int | None
    shortlist: int | None
    nprobes: int | None
    ef: int | None
    refine_factor: int | None
    residue_mode: str | None


class Searcher:
    """Nearest-neighbour search over ``table`` of the run at ``dataset_path``, with state kept between queries.

    ``resident``: hold the embedding matrix in memory (default; fast repeated queries), or stream the table for
    exact search and read rows on demand (one-shot use, tables larger than memory). ``models`` / ``device``: for
    sequence queries (``search_sequences``), as in ``embed_sequences``; the chain is loaded on first use.
    """

    def __init__(self, dataset_path: str | Path, table: str = "proteins", *, resident: bool = True,
                 models: Sequence[str] | None = None, device: str | None = None,
                 fragments: Sequence[int] | None = None, build: Sequence[dict] = (),
                 version: int | str | None = None, rerank_rows: str = "float32"):
        if rerank_rows not in RERANK_ROWS:
            raise SearchError(f"rerank_rows must be one of {RERANK_ROWS}, got {rerank_rows!r}")
        # where the funnel's re-rank reads rows from: the resident float32 matrix (with resident=True), a float16
        # copy of the rows at the rerank width (half the memory; distances to ~1e-3), or the table ("store":
        # only each query's candidates are read, nothing held)
        self.rerank_rows = rerank_rows if resident else "store"
        if fragments is not None and self.rerank_rows != "float32":
            raise SearchError("a partition searcher (fragments=) holds its rows as float32")
        self.dataset_path = dataset_path
        self.version = version  # an earlier table version or release tag (rdscale update); None: the latest
        self.table = table
        # the float32 matrix is held only with rerank_rows="float32"; otherwise exact search streams the table
        self.resident = (resident and rerank_rows == "float32") or fragments is not None
        self.fragment_ids = None if fragments is None else [int(f) for f in fragments]
        self._build = list(build)
        self._models, self._device = models, device
        self._lock = threading.RLock()
        self._proteins: Searcher | None = None  # residues: the proteins searcher of two-stage search's stage 1
        self._open()

    def _open(self) -> None:
        self.ds = open_table(self.dataset_path, self.table, version=self.version)
        # Only rows of shards in the run's ledger (a partial run warns); raises for a damaged run.
        self._committed = reader_filter(self.ds.uri)
        # a partition (sharded search): these fragments only, in this order; its indexes are built in memory
        self._frags = None
        if self.fragment_ids is not None:
            known = {f.fragment_id: f for f in self.ds.get_fragments()}
            missing = [f for f in self.fragment_ids if f not in known]
            if missing:
                raise SearchError(f"{self.ds.uri} has no fragment(s) {missing}")
            self._frags = [known[f] for f in self.fragment_ids]
        self.num_rows = self.ds.count_rows() if self._frags is None else sum(f.count_rows() for f in self._frags)
        if self.num_rows == 0:
            raise SearchError(f"the {self.table} table at {self.ds.uri} is empty: nothing to search")
        self.full_width = stored_width(self.ds)
        self.levels = chain_levels(self.ds)
        self._found_index: dict[tuple, IndexInfo] = {}  # (width, metric, backend) -> index, for this version
        self.keys = TABLES[self.table]
        self._key_cols: dict[str, pa.Array] | None = None  # key column -> (n,) array in scan order
        self._rowid_sorted: tuple[np.ndarray, np.ndarray] | None = None  # (sorted row ids, their positions)
        self._raw: np.ndarray | None = None  # (n, full_width) stored dtype, scan order
        self._prepared: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
        self._half: dict[tuple[int, str], np.ndarray] = {}  # (width, metric) -> (n, width) float16 re-rank rows
        self._filters: dict[str, np.ndarray] = {}
        self._faiss: dict[str, Any] = {}
        self._indexes: list[IndexInfo] | None = None
        self._protein_codes: tuple[np.ndarray, pa.Array] | None = None  # residues: (n,) protein code, names
        self._residue_runs: tuple[np.ndarray, np.ndarray] | None = None  # (n,) positions by protein, (p+1,) offsets
        self._embedder = None
        self._memory_indexes: list[IndexInfo] = []
        for spec in self._build:
            self.build_memory_index(**spec)

    def build_memory_index(self, width: int | None = None, index_type: str = F.DEFAULT_FAISS_INDEX_TYPE,
                           metric: str = "cosine", **params: Any) -> IndexInfo:
        """A FAISS index over this searcher's rows (its partition, or the table), held in memory only."""
        metric = _check_metric(metric)
        width = self.width(width)
        index_type = index_type.upper()
        if index_type not in F.FAISS_INDEX_TYPES:
            raise SearchError(f"unknown faiss index type {index_type!r}; expected one of {F.FAISS_INDEX_TYPES}")
        resolved = {**F.default_faiss_params(index_type, self.num_rows, width), **params}
        index = F.build_in_memory(self.ds, width, index_type, metric, resolved, self.table,
                                  fragments=self._frags)
        name = f"memory:{self.table}.p{width}.{metric}"
        info = IndexInfo(self.table, width, prefix_column(width, self.full_width), name, index_type, metric,
                         self.num_rows, resolved, backend="faiss")
        with self._lock:
            self._faiss[name] = index
            self._memory_indexes = [i for i in self._memory_indexes if i.index_name != name] + [info]
            self._indexes = None
            self._found_index.clear()
        return info

    def refresh(self) -> None:
        """Reopen the table at its latest version (drops everything cached)."""
        with self._lock:
            self._open()

    def close(self) -> None:
        self._raw = None
        self._prepared.clear()
        self._half.clear()
        self._faiss.clear()

    def __enter__(self) -> Searcher:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------------------
    # state, loaded on first use

    def key_columns(self) -> dict[str, pa.Array]:
        with self._lock:
            if self._key_cols is None:
                tbl = self.ds.scanner(columns=list(self.keys), with_row_id=True, fragments=self._frags).to_table()
                self._key_cols = {c: tbl.column(c).combine_chunks() for c in self.keys}
                rowids = tbl.column("_rowid").to_numpy()
                order = np.argsort(rowids, kind="stable")
                self._rowid_sorted = (rowids[order], order.astype(np.int64))
                if len(rowids) != self.num_rows:
                    raise SearchError(f"{self.ds.uri} changed while it was opened; retry")
            return self._key_cols

    def matrix(self) -> np.ndarray:
        """(n, full_width) stored embeddings in scan order (float32 proteins, float16 residues), loaded once."""
        with self._lock:
            if self._raw is None:
                out = None
                start = 0
                scan = self.ds.scanner(columns=[EMBEDDING], batch_size=_SCAN_ROWS, fragments=self._frags)
                for batch in scan.to_batches():
                    block = _embedding_block(batch.column(EMBEDDING), self.full_width)
                    if out is None:
                        out = np.empty((self.num_rows, self.full_width), dtype=block.dtype)
                    out[start : start + len(block)] = block
                    start += len(block)
                if start != self.num_rows:
                    raise SearchError(f"{self.ds.uri} changed while it was loaded; retry")
                self._raw = out
            return self._raw

    def _prepared_rows(self, width: int, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            key = (width, metric)
            if key not in self._prepared:
                if self._raw is not None:
                    self._prepared[key] = E.prepare_rows(self._raw[:, :width], metric)
                else:  # streamed into place: the stored matrix is not also held (1e6 x 1280 float32 is 5 GB)
                    self._prepared[key] = self._streamed_rows(width, metric)
            return self._prepared[key]

    def _streamed_rows(self, width: int, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``E.prepare_rows`` of the (n, width) prefix, block by block as the table is scanned (the same values:
        both are row by row)."""
        out = np.empty((self.num_rows, width), np.float32)
        sq = None if metric == "cosine" else np.empty(self.num_rows, np.float32)
        for start, block in self._scan_blocks(width):
            x, x_sq = E.prepare_rows(block, metric)
            out[start : start + len(block)] = x
            if sq is not None:
                sq[start : start + len(block)] = x_sq
        return out, sq

    def _scan_blocks(self, width: int):
        """(start position, (b, width) float32 block) over the whole table in scan order; a table whose row count
        changed meanwhile is refused at the end (the arrays filled from it would not line up with the keys)."""
        start = 0
        for block in F._stream(self.ds, width, fragments=self._frags):
            yield start, block
            start += len(block)
        if start != self.num_rows:
            raise SearchError(f"{self.ds.uri} changed while it was loaded; retry")

    def _half_rows(self, width: int, metric: str) -> np.ndarray:
        """(n, width) float16 re-rank rows (cosine: unit rows), streamed from the table: the float32 matrix is
        never held."""
        with self._lock:
            key = (width, metric)
            if key not in self._half:
                out = np.empty((self.num_rows, width), np.float16)
                for start, block in self._scan_blocks(width):
                    out[start : start + len(block)] = E.unit_rows(block) if metric == "cosine" else block
                self._half[key] = out
            return self._half[key]

    def load(self, width: int | None = None, metric: str = "cosine") -> Searcher:
        """Load now what exact search at ``width`` needs (else it loads on the first query)."""
        self.key_columns()
        if self.resident:
            self._prepared_rows(self.width(width), _check_metric(metric))
        elif self.rerank_rows == "float16":
            self._half_rows(self.width(width), _check_metric(metric))
        return self

    def positions_of_rowids(self, rowids: np.ndarray) -> np.ndarray:
        self.key_columns()
        sorted_ids, positions = self._rowid_sorted
        at = np.searchsorted(sorted_ids, rowids)
        at = np.minimum(at, len(sorted_ids) - 1)
        if len(rowids) and not np.array_equal(sorted_ids[at], rowids):
            raise SearchError(f"{self.ds.uri} changed since this searcher opened it; refresh it")
        return positions[at]

    def vectors(self, positions: np.ndarray, width: int) -> np.ndarray:
        """(len(positions), width) float32 stored rows at scan positions."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.resident and (self._raw is not None or self._frags is not None):
            return self.matrix()[positions, :width].astype(np.float32)
        # a resident searcher holds prepared (normalised) rows, not the stored ones: a few rows are read, not a
        # second copy of the matrix loaded
        if len(positions) == 0:
            return np.empty((0, width), np.float32)
        uniq, inverse = np.unique(positions, return_inverse=True)
        column = prefix_column(width, self.full_width)
        if not _column_is_complete(self.ds, column):
            column = EMBEDDING
        taken = self.ds.take(uniq.tolist(), columns=[column])
        return _embedding_block(taken.column(column), width).astype(np.float32)[inverse]

    def filter_rows(self, filter: str | None) -> np.ndarray | None:
        """Sorted scan positions of the rows passing the Lance SQL predicate ``filter`` (None: no filter)."""
        if filter is None:
            return None
        if not isinstance(filter, str) or not filter.strip():
            raise SearchError(f"filter must be a non-empty SQL predicate, got {filter!r}")
        with self._lock:
            if filter not in self._filters:
                try:
                    scan = self.ds.scanner(columns=[], filter=filter, with_row_id=True, fragments=self._frags)
                    found = scan.to_table()
                except Exception as err:  # noqa: BLE001 - Lance raises ValueError/OSError/RuntimeError for bad SQL
                    raise SearchError(f"bad filter {filter!r}: {_lance_message(err)}") from None
                rows = np.sort(self.positions_of_rowids(found.column("_rowid").to_numpy()))
                if len(self._filters) >= _FILTER_CACHE:
                    self._filters.pop(next(iter(self._filters)))
                self._filters[filter] = rows
            return self._filters[filter]

    def indexes(self) -> list[IndexInfo]:
        """Vector indexes of the table, both backends, narrowest first (FAISS before Lance at equal width)."""
        with self._lock:
            if self._indexes is None:
                infos = list(self._memory_indexes)
                if self._frags is None:  # on-disk indexes label rows of the whole table
                    infos += L._live_indexes(self.ds, self.table) + F.list_faiss_indexes(self.ds, self.table)
                self._indexes = sorted(infos, key=lambda i: (i.width, i.metric, i.backend != "faiss"))
            return self._indexes

    def _faiss_index(self, info: IndexInfo):
        with self._lock:
            if info.index_name.startswith("memory:"):
                return self._faiss[info.index_name]
            if info.index_name not in self._faiss:
                self._faiss[info.index_name] = F.load_faiss_index(self.ds, info)
            return self._faiss[info.index_name]

    def width(self, width: int | None) -> int:
        """``width`` validated against the chain levels (None = the stored width); cached per searcher."""
        if width is None:
            return self.full_width
        if isinstance(width, (int, np.integer)) and not isinstance(width, bool) and int(width) in self.levels:
            return int(width)
        return check_width(self.ds, width)  # raises the error that says what is wrong

    def find_index(self, width: int | None, metric: str, backend: str | None = None) -> IndexInfo:
        key = (width, metric, backend)
        found = self._found_index.get(key)
        if found is None:
            try:
                found = self._find_index(width, metric, backend)
            except MissingIndexError as err:
                # an index built after this searcher opened the table (a new table version, a new FAISS file)
                if not self._adopt_new_indexes():
                    if self._table_changed():
                        raise MissingIndexError(f"{err} (the table changed since this searcher opened it: call "
                                                "Searcher.refresh(), or restart the server)") from None
                    raise
                found = self._find_index(width, metric, backend)
            with self._lock:
                self._found_index[key] = found
        return found

    def _table_changed(self) -> bool:
        if self.version is not None or self._frags is not None:
            return False
        latest = reopen(self.ds)
        return F.table_layout(latest) != F.table_layout(self.ds)

    def recheck_indexes(self) -> None:
        """Pick up indexes built since this searcher opened the table, when its rows are unchanged (the server's
        /info calls it, so a page lists an index built while the server runs)."""
        self._adopt_new_indexes()

    def _adopt_new_indexes(self) -> bool:
        """Re-read the index lists (the latest table version for Lance's, the index folder for FAISS's) when the
        table's rows are unchanged, so the resident state stays valid; True if that was possible."""
        if self.version is not None or self._frags is not None:
            return False
        latest = reopen(self.ds)
        if F.table_layout(latest) != F.table_layout(self.ds):
            return False  # rows added or rewritten: positions would shift; refresh() reloads everything
        with self._lock:
            self.ds = latest
            self._indexes = None
            self._found_index.clear()
        return True

    def _find_index(self, width: int | None, metric: str, backend: str | None = None) -> IndexInfo:
        if backend is not None and backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if width is not None:
            width = self.width(width)
        live = [i for i in self.indexes() if i.metric == metric and backend in (None, i.backend)]
        what = f"{backend + ' ' if backend else ''}{metric} vector index"
        hint = f"rdscale index {Run.of(self.dataset_path)} --table {self.table} --width {{}} --metric " + metric
        if backend:
            hint += f" --backend {backend}"
        if width is None:
            if not live:
                raise MissingIndexError(f"no {what} on the {self.table} table; build one first, e.g. "
                                        f"`{hint.format(self.levels[0])}`")
            width = live[0].width
        for info in live:
            if info.width != width:
                continue
            if info.index_name.startswith("memory:"):
                return info
            if index_is_fresh(self.ds, info):
                return info
            if backend is None and any(o.width == width and o is not info for o in live):
                continue  # the other backend's index at this width may still be fresh
            raise MissingIndexError(f"rows were added to {self.table} (or its rows were rewritten: a resumed run, "
                                    f"update or compact) after its {info.backend} index at width {width} was built; "
                                    f"rerun `{hint.format(width)}`")
        raise MissingIndexError(f"no {what} at width {width} on the {self.table} table; run `{hint.format(width)}`")

    # -----------------------------------------------------------------------------------------------------------
    # queries

    def lookup(self, ids) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Stored keys -> (labels, (nq, full) float32 vectors, (nq,) scan positions).

        Residue keys are (id, pos) pairs, or a bare protein id meaning every residue of that protein (pos order).
        """
        if ids is None or len(ids) == 0:
            raise SearchError("ids= is empty")
        cols = self.key_columns()
        if self.table == "proteins":
            wanted = [str(i) for i in ids]
            positions = key_positions(cols["id"], wanted)
            missing = [w for w, at in zip(wanted, positions.tolist()) if at < 0]
            if missing:
                shown = ", ".join(missing[:5])
                raise KeyNotFoundError(f"{len(missing)} query key(s) not in the proteins table: {shown}"
                                       f"{stored_as(cols['id'], missing[:5])}")
            labels = wanted
        else:
            try:
                wanted = [(str(i),) if isinstance(i, str) else (str(i[0]), int(i[1])) for i in ids]
            except (TypeError, ValueError, IndexError):
                raise SearchError("residue queries by key need (id, pos) pairs or protein ids") from None
            pids = pa.array(sorted({w[0] for w in wanted}), pa.string())
            near = np.flatnonzero(pc.is_in(cols["id"], value_set=pids).to_numpy(zero_copy_only=False))
            where = dict(zip(zip(cols["id"].take(near).to_pylist(), cols["pos"].take(near).to_pylist()),
                             near.tolist()))
            per_protein: dict[str, list[int]] = {}
            for pid, pos in sorted(where):
                per_protein.setdefault(pid, []).append(pos)
            expanded = []
            for w in wanted:
                if len(w) == 1 and w[0] in per_protein:
                    expanded += [(w[0], pos) for pos in per_protein[w[0]]]
                else:
                    expanded.append(w)
            missing = [w for w in expanded if w not in where]
            if missing:
                shown = ", ".join(":".join(map(str, m)) for m in missing[:5])
                raise KeyNotFoundError(f"{len(missing)} query key(s) not in the residues table: {shown}"
                                       f"{stored_as(cols['id'], [m[0] for m in missing[:5]])}")
            positions = np.array([where[w] for w in expanded], dtype=np.int64)
            labels = [":".join(map(str, w)) for w in expanded]
        return labels, self.vectors(positions, self.full_width), positions

    def search(self, queries: np.ndarray | None = None, *, ids: Sequence[str] | Sequence[tuple[str, int]] | None = None,
               labels: Sequence[str] | None = None, request: SearchRequest | None = None, **options: Any) -> pa.Table:
        """As ``rdscale.search.search`` (see there), on this searcher's table; the options are a ``SearchRequest``
        (``request=``) or its fields as keywords (``k=``, ``mode=``, ``width=``, ...). ``backend``: "faiss" or
        "lance" to pick the index for ann / funnel (default: the narrowest index for the metric, FAISS first at
        equal width). ``labels``: names for the rows of ``queries`` (the ``query`` column then holds them).
        ``aggregate="proteins"`` (residues table only): take ``residue_hits`` residue hits per query residue
        (default max(10 k, 100)) and aggregate them per query protein to protein hits (see ``_aggregate``)."""
        plan = self._plan(SearchRequest.of(request, **options))
        labels, q, self_pos = self._query_vectors(plan, queries, ids, labels)
        return self._answer(plan, q, labels, self_pos)

    def _plan(self, req: SearchRequest) -> _Plan:
        """What a search runs on this table: the request's options resolved against it (k clamped to its rows,
        the index and width, the calibrated parameters for a recall target, the residue mode)."""
        mode = req.mode
        if self.version is not None and mode != "exact":  # an index covers the latest version's rows only
            raise SearchError(f"an earlier release ({self.version}) is searched in exact mode only (indexes "
                              f"belong to the latest version); drop --mode {mode}")
        filter = req.filter
        if self._committed:
            filter = self._committed if not filter else f"({self._committed}) AND ({filter})"
        n = self.num_rows
        k = min(req.k, n)  # a table holds no more neighbours than rows: never ask an index for more
        shortlist, nprobes, refine_factor = req.shortlist, req.nprobes, req.refine_factor
        ef = None if req.ef is None else min(req.ef, n)  # a search breadth beyond the row count buys nothing
        residue_mode = self._residue_mode(req.residue_mode, mode)
        if req.protein_shortlist is not None and residue_mode != "two-stage":
            raise SearchError("protein_shortlist applies to two-stage residue search")
        k_out = k
        if req.aggregate is not None:
            if self.table != "residues":
                raise SearchError("aggregate='proteins' applies to residue search (table residues)")
            k = min(req.residue_hits or max(10 * k, 100), n)
        index, width, rerank_width = None, req.width, req.rerank_width
        if mode == "exact":  # exact search has recall 1 whatever recall asks
            width = self.width(width)
        else:
            index = self.find_index(width, req.metric, req.backend)
            width = index.width
            if req.recall is not None and not (index.calibration or {}).get(mode) and index.num_rows < C.MIN_ROWS:
                # a table too small to calibrate (rdscale index leaves it): exact search meets any recall target
                width = self.width(rerank_width) if mode == "funnel" else width
                mode, index = "exact", None
            elif shortlist is None and nprobes is None and ef is None and refine_factor is None:
                # the calibrated point: the cheapest measured parameters meeting recall (default: the index's target)
                tuned = C.search_params(index, mode, k, req.recall)
                shortlist, nprobes = tuned.get("shortlist"), tuned.get("nprobes")
                if shortlist is not None:  # exclude_self fetches k + 1: never a shortlist shorter than that
                    shortlist = max(shortlist, min(k + 1, n))
                ef, refine_factor = tuned.get("ef"), tuned.get("refine_factor")
                ef = None if ef is None else min(ef, n)
        need = width
        if mode == "funnel":
            rerank_width = self.width(rerank_width)
            if rerank_width < width:
                raise SearchError(f"rerank_width {rerank_width} is narrower than the shortlist width {width}")
            need = rerank_width
        return _Plan(req, mode, filter, k, k_out, index, width, need, rerank_width, shortlist, nprobes, ef,
                     refine_factor, residue_mode)

    def _query_vectors(self, plan: _Plan, queries, ids, labels):
        """(labels, (nq, need) float32 queries, (nq,) positions of ids queries or None), checked."""
        if (queries is None) == (ids is None):
            raise SearchError("give exactly one of queries= (vectors) or ids= (stored keys)")
        if isinstance(ids, str):  # one key, not a sequence of one-letter keys
            ids = [ids]
        if plan.request.exclude_self and ids is None:
            raise SearchError("exclude_self applies to ids= queries (a stored row to leave out)")
        self_pos = None
        if ids is not None:
            labels, q, self_pos = self.lookup(ids)
        else:
            q = np.asarray(queries)
            if q.ndim == 1:
                q = q[None, :]
            if q.ndim != 2 or q.shape[0] == 0:
                raise SearchError(f"queries must be a non-empty (q, w) array, got shape {np.shape(queries)}")
            if not np.issubdtype(q.dtype, np.number) or np.issubdtype(q.dtype, np.complexfloating):
                raise SearchError(f"queries must be numbers, got {q.dtype}")
            if labels is not None and len(labels) != len(q):
                raise SearchError(f"{len(labels)} labels for {len(q)} queries")
        need, width = plan.need, plan.width
        if q.shape[1] < need:
            raise SearchError(
                f"query vectors are {q.shape[1]} wide but {plan.mode} search at this width needs at least {need} "
                "numbers"
            )
        q = np.ascontiguousarray(q[:, :need], dtype=np.float32)  # (nq, need)
        if not np.isfinite(q).all():
            raise SearchError(f"query {int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])} holds NaN or inf")
        if plan.request.metric == "cosine" and not q[:, :width].any(axis=1).all():  # no direction: distance 1
            zero = int(np.flatnonzero(~q[:, :width].any(axis=1))[0])
            raise SearchError(f"query {labels[zero] if labels is not None else zero} is all zeros in its first "
                              f"{width} numbers: its cosine distance is undefined (use metric l2)")
        return labels, q, self_pos

    def _answer(self, plan: _Plan, q: np.ndarray, labels, self_pos) -> pa.Table:
        """The hits table of the planned search for (nq, need) queries ``q``."""
        req, k, mode, metric = plan.request, plan.k, plan.mode, plan.request.metric
        excluded = self_pos if req.exclude_self else None
        k_fetch = min(k + 1, self.num_rows) if excluded is not None else k
        if plan.residue_mode == "two-stage":
            dist, pos = self._two_stage(q, plan.width, k_fetch, metric, plan.filter, labels, req.protein_shortlist,
                                        plan.k_out)
        else:
            rows = self.filter_rows(plan.filter)
            search = (plan.nprobes, plan.ef, plan.refine_factor)
            if mode == "exact":
                dist, pos = self._exact(q, plan.width, k_fetch, metric, rows)
            elif mode == "ann":
                dist, pos = self._ann(q, plan.index, k_fetch, plan.filter, rows, *search)
            else:
                n_short = min(plan.shortlist if plan.shortlist is not None else max(10 * k, 100), self.num_rows)
                if n_short < k_fetch:
                    extra = ", k + 1 with exclude_self" if k_fetch > k else ""
                    raise SearchError(f"shortlist ({n_short}) must be at least k ({k_fetch}{extra})")
                dist, pos = self._ann(q, plan.index, n_short, plan.filter, rows, *search)
                dist, pos = self._rerank(q[:, :plan.rerank_width], pos, metric, k_fetch)
        if req.aggregate is not None:
            return self._aggregate(dist, pos, k, plan.k_out, labels, excluded)
        return self._table(dist, pos, k, labels, excluded)

    # -----------------------------------------------------------------------------------------------------------
    # residue search in two stages (PLMSearch / pLM-BLAST style): proteins shortlisted by their per-protein
    # embedding (the mean of their residues' embeddings), then only the shortlisted proteins' residues searched

    def _residue_mode(self, residue_mode: str | None, mode: str) -> str | None:
        """The residue search to run (None for the proteins table): two-stage by default for exact search;
        ann / funnel name the residues table's own (global) index."""
        if self.table != "residues":
            if residue_mode is not None:
                raise SearchError("residue_mode applies to residue search (table residues)")
            return None
        if residue_mode is None:
            # a partition searcher (sharded search) holds some of the residues: each searches its own exactly
            return "two-stage" if mode == "exact" and self._frags is None else "global"
        if residue_mode not in RESIDUE_MODES:
            raise SearchError(f"unknown residue_mode {residue_mode!r}; expected one of {RESIDUE_MODES}")
        if residue_mode == "two-stage" and mode != "exact":
            raise SearchError(f"two-stage residue search searches the shortlisted proteins' residues exactly; mode "
                              f"{mode} searches the residues table's own index: use residue_mode global")
        if residue_mode == "two-stage" and self._frags is not None:
            raise SearchError("a partition searcher (fragments=) searches its residues globally")
        return residue_mode

    def use_proteins(self, proteins: Searcher) -> None:
        """Stage 1 of two-stage residue search uses ``proteins`` (a searcher over the same run's proteins table,
        e.g. the server's) instead of opening its own."""
        if proteins.table != "proteins":
            raise SearchError(f"use_proteins needs a proteins searcher, got {proteins.table}")
        with self._lock:
            self._proteins = proteins

    def proteins_searcher(self) -> Searcher | None:
        """The proteins searcher of stage 1 (opened on first use, as resident as this one); None when the run
        has no proteins table."""
        with self._lock:
            if self._proteins is None:
                try:
                    self._proteins = Searcher(self.dataset_path, "proteins", resident=self.resident,
                                              version=self.version)
                except SearchError:
                    return None
            return self._proteins

    def _residue_groups(self) -> tuple[np.ndarray, np.ndarray, pa.Array]:
        """((n,) residue positions grouped by protein, (p + 1,) offsets into it, (p,) protein ids): protein j's
        residues are positions[offsets[j]:offsets[j + 1]], in scan order."""
        with self._lock:
            if self._protein_codes is None:
                enc = pc.dictionary_encode(self.key_columns()["id"])
                self._protein_codes = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary)
            codes, names = self._protein_codes
            if self._residue_runs is None:
                order = np.argsort(codes, kind="stable")
                offsets = np.searchsorted(codes[order], np.arange(len(names) + 1))
                self._residue_runs = (order.astype(np.int64), offsets)
            return (*self._residue_runs, names)

    def _shortlist(self, means: np.ndarray, metric: str, n_short: int) -> list[list[str]] | None:
        """Stage 1: for each (g, w) mean query vector, the ids of its ``n_short`` nearest proteins: with the
        proteins table's index (funnel: the index's shortlist re-ranked exactly at the widest proteins level the
        query covers) when it has a fresh one for ``metric``, else exact. None: no stage 1 is possible (no proteins
        table, or none of its levels fits the query's width) - every residue is searched."""
        proteins = self.proteins_searcher()
        if proteins is None:
            return None
        w1 = max((w for w in proteins.levels if w <= means.shape[1]), default=None)
        if w1 is None:
            return None
        options: dict[str, Any] = {"mode": "exact", "width": w1}
        try:
            index = proteins.find_index(None, metric)
        except MissingIndexError:
            index = None
        if index is not None and index.width <= w1:
            options = {"mode": "funnel", "width": index.width, "rerank_width": w1}
        labels = [str(i) for i in range(len(means))]
        found = proteins.search(means[:, :w1], k=n_short, metric=metric, labels=labels, **options)
        query = np.asarray(found.column("query").to_pylist(), dtype=np.int64)
        ids = found.column("id").to_pylist()
        out: list[list[str]] = [[] for _ in range(len(means))]
        for g, pid in zip(query, ids):
            out[g].append(pid)
        return out

    def _two_stage(self, q, width: int, k: int, metric: str, filter: str | None, labels, protein_shortlist,
                   k_out: int):
        """((nq, m) distances, (nq, m) positions) of the residue queries ``q`` (nq, >= width), each searched
        exactly over the residues of the proteins its query protein shortlists (stage 1).

        Query proteins: labels ``name:pos`` group by ``name``; unlabelled vectors are all one protein's residues.
        A query protein's stage-1 vector is the mean of its residue vectors: a protein's stored embedding is the
        mean over its residues (the chain is affine per residue), so for a sequence query this is its
        per-protein embedding. ``protein_shortlist`` proteins per query protein (default max(20 k, 200)); when
        the residues table holds no more proteins than that, every residue is searched (the result is exact)."""
        order, offsets, names = self._residue_groups()
        n_short = protein_shortlist or max(20 * k_out, 200)
        if labels is None:
            group = np.zeros(len(q), np.int64)
        else:
            heads = [str(lbl).rpartition(":")[0] or str(lbl) for lbl in labels]
            where: dict[str, int] = {}
            group = np.array([where.setdefault(h, len(where)) for h in heads], np.int64)
        n_groups = int(group.max()) + 1
        lists = None
        if len(names) > n_short:
            means = np.zeros((n_groups, q.shape[1]), np.float64)  # (g, w) mean residue vector per query protein
            np.add.at(means, group, q)
            means /= np.bincount(group, minlength=n_groups)[:, None]
            lists = self._shortlist(means.astype(np.float32), metric, n_short)
        if lists is None:  # every protein is shortlisted: one exact search over the table
            return self._exact(q, width, k, metric, self.filter_rows(filter))
        code_of = {name: i for i, name in enumerate(names.to_pylist())}
        dist = np.full((len(q), k), np.inf, np.float32)
        pos = np.full((len(q), k), -1, np.int64)
        for g in range(n_groups):
            members = np.flatnonzero(group == g)
            codes = [code_of[p] for p in lists[g] if p in code_of]  # proteins without residues hold none
            d, p = self._search_proteins(q[members, :width], names, codes, order, offsets, width, k, metric,
                                         filter)
            dist[members, : d.shape[1]], pos[members, : p.shape[1]] = d, p
        return dist, pos

    def _search_proteins(self, q, names: pa.Array, codes: list[int], order, offsets, width: int, k: int,
                         metric: str, filter: str | None):
        """Stage 2: exact top-k of ``q`` (nq, width) over the residues of proteins ``codes`` (and ``filter``).
        Resident: their rows of the held matrix. Otherwise they are read from the table by ``id IN (...)`` (a
        scalar index on ``id`` makes that a lookup; without one Lance scans the id column)."""
        if not codes:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if self.resident:
            rows = np.sort(np.concatenate([order[offsets[c] : offsets[c + 1]] for c in codes]))
            kept = self.filter_rows(filter)
            if kept is not None:
                rows = rows[np.isin(rows, kept, assume_unique=True)]
            if len(rows) == 0:
                return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
            x, x_sq = self._prepared_rows(width, metric)
            return E.topk(q, x, x_sq, k, rows=rows)
        ids = ", ".join("'" + str(names[c].as_py()).replace("'", "''") + "'" for c in codes)
        predicate = f"id IN ({ids})" if not filter else f"(id IN ({ids})) AND ({filter})"
        column = prefix_column(width, self.full_width)
        if not _column_is_complete(self.ds, column):
            column = EMBEDDING
        try:
            found = self.ds.scanner(columns=[column], filter=predicate, with_row_id=True).to_table()
        except Exception as err:  # noqa: BLE001 - Lance raises ValueError/OSError/RuntimeError for bad SQL
            raise SearchError(f"bad filter {filter!r}: {_lance_message(err)}") from None
        if found.num_rows == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        positions = self.positions_of_rowids(found.column("_rowid").to_numpy())
        x, x_sq = E.prepare_rows(_embedding_block(found.column(column), width), metric)  # (m, width)
        d, i = E.topk(q, x, x_sq, min(k, len(positions)))
        return d, np.where(i >= 0, positions[np.maximum(i, 0)], -1)

    def query_width(self, request: SearchRequest | None = None, **options: Any) -> int:
        """How many numbers of a query vector a search with this request (or these options) reads: the search
        width (ann: the index's), the rerank width for funnel. Sequence queries run the chain only that far."""
        req = SearchRequest.of(request, **options)
        if req.mode == "funnel":
            return self.width(req.rerank_width)
        if req.mode == "ann":
            return self.find_index(req.width, req.metric, req.backend).width
        return self.width(req.width)

    def search_sequences(self, sequences: Sequence[str] | dict[str, str], request: SearchRequest | None = None,
                         **options: Any) -> pa.Table:
        """``search`` with query sequences embedded through the run's chain (loaded once per searcher)."""
        req = SearchRequest.of(request, **options)
        names, seqs = sequence_queries(sequences)
        if not seqs:
            raise SearchError("no query sequences")
        vectors = self.embedder().embed(seqs, names, width=self.query_width(req))
        labels, q = stack_queries(names, vectors, self.table)
        return self.search(q, labels=labels, request=req)

    def embedder(self):
        """The run's chain as a ``QueryEmbedder`` stage for this table (set up on first use, then kept; its
        models load as the queries' widths need them)."""
        with self._lock:
            if self._embedder is None:
                stage = QueryEmbedder(self.dataset_path, self.table, self._models, self._device)
                stage.setup()
                self._embedder = stage
            return self._embedder

    def positions_of_keys(self, ids: Sequence[str]) -> np.ndarray:
        """(n,) scan positions of protein ids in this (proteins) table, -1 for an id it does not hold."""
        return key_positions(self.key_columns()["id"], [str(i) for i in ids])

    def exact_positions(self, q: np.ndarray, width: int, k: int, metric: str = "cosine"):
        """((nq, k) distances, (nq, k) scan positions) of exact search at ``width`` (no filter, no self drop)."""
        return self._exact(np.ascontiguousarray(q, dtype=np.float32), width, min(k, self.num_rows), metric, None)

    def index_positions(self, q: np.ndarray, index: IndexInfo, k: int, mode: str = "ann", *,
                        shortlist: int | None = None, rerank_width: int | None = None, nprobes: int | None = None,
                        ef: int | None = None, refine_factor: int | None = None):
        """((nq, k) distances, (nq, k) scan positions) of an ann or funnel search with ``index`` and exactly these
        parameters (no calibrated defaults, no filter): what the calibrator measures."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if mode == "ann":
            return self._ann(q, index, k, None, None, nprobes, ef, refine_factor)
        rerank_width = self.width(rerank_width)
        _, pos = self._ann(q, index, min(shortlist or max(10 * k, 100), self.num_rows), None, None, nprobes, ef,
                           refine_factor)
        return self._rerank(q[:, :rerank_width], pos, index.metric, k)

    # -----------------------------------------------------------------------------------------------------------
    # the three modes: each returns ((nq, m) float32 distances sorted per row, (nq, m) int64 positions, -1 = none)

    def _exact(self, q, width: int, k: int, metric: str, rows: np.ndarray | None):
        if rows is not None and len(rows) == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if self.resident:
            x, x_sq = self._prepared_rows(width, metric)
            return E.topk(q[:, :width], x, x_sq, k, rows=rows)
        # non-resident: the same blocks, straight from the scan (the narrow prefix column when there is one)
        column = prefix_column(width, self.full_width)
        if not _column_is_complete(self.ds, column):
            column = EMBEDDING
        keep = None
        if rows is not None:
            keep = np.zeros(self.num_rows, bool)
            keep[rows] = True
        best_d = np.empty((len(q), 0), np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        start = 0
        for batch in self.ds.to_batches(columns=[column], batch_size=_SCAN_ROWS):
            b = batch.num_rows
            if b == 0:
                continue
            x, x_sq = E.prepare_rows(_embedding_block(batch.column(column), width), metric)
            local = None if keep is None else np.flatnonzero(keep[start : start + b])
            if local is None or len(local):
                d, i = E.topk(q[:, :width], x, x_sq, k, rows=local)
                best_d, best_i = E.merge_topk(best_d, best_i, d, i + start, k)
            start += b
        return best_d, best_i

    def _ann(self, q, index: IndexInfo, k: int, filter, rows, nprobes, ef, refine_factor):
        if rows is not None and len(rows) == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if rows is not None and len(rows) <= max(4 * k, _FEW_ROWS):
            # a filter that keeps few rows: a graph or list search could miss them; exact over them is cheap
            x, x_sq = E.prepare_rows(self.vectors(rows, index.width), index.metric)
            d, i = E.topk(q[:, : index.width], x, x_sq, k)
            return d, rows[i]
        d, p = self._index_search(q, index, k, filter, rows, nprobes, ef, refine_factor)
        return self._fill_short(q, index, k, filter, rows, d, p, nprobes, ef, refine_factor)

    def _index_search(self, q, index: IndexInfo, k: int, filter, rows, nprobes, ef, refine_factor):
        if index.backend == "faiss":
            return F.faiss_search(self._faiss_index(index), index, q, k, nprobes=nprobes, ef=ef, rows=rows,
                                  n_total=self.num_rows)
        params = index.params or {}
        nearest = {"column": index.column, "q": q[:, : index.width], "k": k, "metric": index.metric}
        if nprobes is not None:
            nearest["nprobes"] = min(nprobes, int(params.get("num_partitions", nprobes)))
        if refine_factor is not None:
            nearest["refine_factor"] = max(1, min(refine_factor, self.num_rows // max(k, 1)))
        if ef is not None:  # Lance walks its graph for refine_factor * k candidates, and wants ef >= that
            nearest["ef"] = max(ef, k * nearest.get("refine_factor", 1))
        found = self.ds.to_table(columns=["_distance"], nearest=nearest, filter=filter, prefilter=True,
                                 with_row_id=True, disable_scoring_autoprojection=True)
        qi = found.column("query_index").to_numpy().astype(np.int64)
        pos = self.positions_of_rowids(found.column("_rowid").to_numpy())
        return _pad(qi, pos, found.column("_distance").to_numpy().astype(np.float32), len(q))

    def _fill_short(self, q, index: IndexInfo, k: int, filter, rows, dist: np.ndarray, pos: np.ndarray, nprobes,
                    ef, refine_factor):
        """Queries an index search left with fewer than k hits although the (filtered) table holds k rows get
        them: an IVF search probes a few lists, and a filter may leave fewer than k rows in them (an HNSW walk
        with a filter likewise). Searched again wider (FAISS: 8x the lists and breadth; Lance: every partition),
        then exactly over the rows for any still short."""
        want = min(k, self.num_rows if rows is None else len(rows))
        short = np.flatnonzero((pos >= 0).sum(axis=1) < want)
        if len(short) == 0:
            return dist, pos
        params = index.params or {}
        if index.backend == "faiss":
            wider_nprobes = 8 * int(nprobes or params.get("nprobe", 1))
        else:
            wider_nprobes = int(params.get("num_partitions", 8 * (nprobes or 1)))
        wider_ef = min(8 * max(int(ef or 64), k), self.num_rows)
        d2, p2 = self._index_search(q[short], index, k, filter, rows, wider_nprobes, wider_ef, refine_factor)
        width = max(dist.shape[1], d2.shape[1], want)
        d2 = np.pad(d2, ((0, 0), (0, width - d2.shape[1])), constant_values=np.inf)
        p2 = np.pad(p2, ((0, 0), (0, width - p2.shape[1])), constant_values=-1)
        still = np.flatnonzero((p2 >= 0).sum(axis=1) < want)
        if len(still):
            d3, p3 = self._exact(q[short[still]], index.width, k, index.metric, rows)
            d2[still], p2[still] = np.inf, -1
            d2[still, : d3.shape[1]], p2[still, : p3.shape[1]] = d3, p3
        dist = np.pad(dist, ((0, 0), (0, width - dist.shape[1])), constant_values=np.inf)
        pos = np.pad(pos, ((0, 0), (0, width - pos.shape[1])), constant_values=-1)
        dist[short], pos[short] = d2, p2
        return dist, pos

    def _rerank(self, q, cand: np.ndarray, metric: str, k: int):
        """Exact distances at q's width to each query's candidates; the best k of them per query."""
        width = q.shape[1]
        nq = len(q)
        dist = np.empty(cand.shape, np.float32)
        valid = cand >= 0
        safe = np.where(valid, cand, 0)  # (nq, s) row positions; -1 slots read row 0, then count as inf
        # queries per block: their gathered (b, s, width) candidate rows stay in the CPU cache (~512 kB) for the
        # product that reads them (blocks of 64 queries gathered ~6 MB and read it back from memory: half the
        # funnel's batch time went there); the per-row arithmetic is the same, so are the distances
        step = max(1, _RERANK_BYTES // max(1, cand.shape[1] * width * 4))
        if self.rerank_rows != "store":
            if self.rerank_rows == "float16":
                x = self._half_rows(width, metric)  # (n, width) float16
            else:
                x, _ = self._prepared_rows(width, metric)  # cosine: unit rows, normalised once, not per query
            qp = E.unit_rows(q) if metric == "cosine" else q
            wide = np.empty((min(step, nq), cand.shape[1], width), np.float32) if x.dtype == np.float16 else None
            for s in range(0, nq, step):
                rows = x[safe[s : s + step]]  # (b, shortlist, width)
                if wide is not None:
                    rows = widen(rows, wide[: len(rows)])
                if metric == "cosine":
                    np.einsum("qsw,qw->qs", rows, qp[s : s + step], out=dist[s : s + step])
                else:
                    dist[s : s + step] = E.rerank(q[s : s + step], rows, metric)
            if metric == "cosine":
                np.subtract(1.0, dist, out=dist)
        else:
            flat = np.unique(cand[valid])
            block = self.vectors(flat, width)  # (u, width): each candidate read once
            where = np.searchsorted(flat, np.where(valid, cand, flat[0] if len(flat) else 0))
            for s in range(0, nq, step):
                rows = block[where[s : s + step]]
                dist[s : s + step] = E.rerank(q[s : s + step], rows, metric)
        dist[~valid] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # ties in shortlist order
        return np.take_along_axis(dist, order, 1), np.take_along_axis(cand, order, 1)

    # -----------------------------------------------------------------------------------------------------------

    def _table(self, dist: np.ndarray, pos: np.ndarray, k: int, labels, self_pos) -> pa.Table:
        """(nq, m) distances / positions (sorted per row, -1 = none) -> the result table, top k per query."""
        valid = (pos >= 0) & np.isfinite(dist)
        if self_pos is not None:
            valid &= pos != np.asarray(self_pos)[:, None]
        rank = np.cumsum(valid, axis=1)
        valid &= rank <= k
        qi, col = np.nonzero(valid)  # row-major: by query, then by distance
        at = pos[qi, col]
        cols = self.key_columns()
        take = pa.array(at, pa.int64())
        query = pa.array(qi.astype(np.int32), pa.int32()) if labels is None else \
            pa.array(list(labels), pa.string()).take(pa.array(qi, pa.int64()))
        out = {"query": query}
        for c in self.keys:
            out[c] = cols[c].take(take)
        # a distance is >= 0: 1 - cos of a row with itself rounds to -6e-8 (printed "-0.0000")
        out["score"] = pa.array(np.maximum(dist[qi, col], 0).astype(np.float32), pa.float32())
        out["rank"] = pa.array(rank[qi, col].astype(np.int32), pa.int32())
        # how many queries were asked, also when a filter leaves some (or all) of them without a hit
        return pa.table(out).replace_schema_metadata({NUM_QUERIES_KEY: str(len(dist))})

    def _aggregate(self, dist, pos, k_res: int, k: int, labels, self_pos) -> pa.Table:
        """Residue hits -> protein hits, per query protein (labels ``name:pos`` group by ``name``; unlabelled
        vector queries are each their own group): ``score`` = the best (smallest) residue distance to any residue
        of the protein, ``hits`` = how many (query residue, protein residue) pairs among each query residue's
        ``k_res`` nearest fell on it; top ``k`` proteins per group by score, then by hits."""
        valid = (pos >= 0) & np.isfinite(dist)
        if self_pos is not None:
            valid &= pos != np.asarray(self_pos)[:, None]
        valid &= np.cumsum(valid, axis=1) <= k_res
        if labels is None:
            group_names = [str(i) for i in range(len(dist))]
            group = np.arange(len(dist))
        else:
            heads = [str(lbl).rpartition(":")[0] or str(lbl) for lbl in labels]
            group_names = list(dict.fromkeys(heads))
            where = {g: i for i, g in enumerate(group_names)}
            group = np.array([where[h] for h in heads])
        with self._lock:
            if self._protein_codes is None:
                enc = pc.dictionary_encode(self.key_columns()["id"])
                self._protein_codes = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary)
        codes, names = self._protein_codes
        qi, col = np.nonzero(valid)
        g, prot, d = group[qi], codes[pos[qi, col]], dist[qi, col]
        pair = g * (len(names) + 1) + prot
        uniq, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
        best = np.full(len(uniq), np.inf)
        np.minimum.at(best, inverse, d)
        ug, up = uniq // (len(names) + 1), uniq % (len(names) + 1)
        order = np.lexsort((-counts, best, ug))
        ug, up, best, counts = ug[order], up[order], best[order], counts[order]
        rank = np.arange(len(ug)) - np.searchsorted(ug, ug, side="left") + 1
        keep = rank <= k
        table = pa.table({
            "query": pa.array(group_names, pa.string()).take(pa.array(ug[keep], pa.int64())),
            "id": names.take(pa.array(up[keep], pa.int64())),
            "score": pa.array(np.maximum(best[keep], 0).astype(np.float32), pa.float32()),
            "hits": pa.array(counts[keep].astype(np.int32), pa.int32()),
            "rank": pa.array(rank[keep].astype(np.int32), pa.int32()),
        })
        return table.replace_schema_metadata({NUM_QUERIES_KEY: str(len(group_names))})


def _pad(qi: np.ndarray, pos: np.ndarray, dist: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (query, position, distance) hits -> (nq, m) arrays sorted by distance per query, padded with inf / -1."""
    order = np.lexsort((dist, qi))
    qi, pos, dist = qi[order], pos[order], dist[order]
    slot = np.arange(len(qi)) - np.searchsorted(qi, qi, side="left")
    m = int(slot.max()) + 1 if len(slot) else 0
    out_d = np.full((nq, m), np.inf, np.float32)
    out_p = np.full((nq, m), -1, np.int64)
    out_d[qi, slot] = dist
    out_p[qi, slot] = pos
    return out_d, out_p


def search(
    dataset_path: str | Path,
    queries: np.ndarray | None = None,
    *,
    ids: Sequence[str] | Sequence[tuple[str, int]] | None = None,
    table: str = "proteins",
    version: int | str | None = None,
    request: SearchRequest | None = None,
    **options: Any,
) -> pa.Table:
    """k nearest rows of ``table`` for each query, at prefix width ``width`` (one-shot: for many queries over
    time, keep a ``Searcher``).

    Give either ``queries`` ((q, w) vectors, w >= the width needed) or ``ids`` (stored keys: protein ids, or
    (id, pos) pairs for residues), and the options as a ``SearchRequest`` (``request=``) or its fields as
    keywords (rdscale.search.request). ``width``: a chain level; None means the stored width for ``exact``, and the
    narrowest indexed width (for ``metric``) for ``ann`` / ``funnel``. ``filter``: a Lance SQL predicate on the
    table's other columns (e.g. ``"length > 100"``), applied before ranking. ``shortlist`` (funnel): candidates
    taken from the index, default max(10 * k, 100). ``rerank_width`` (funnel): default the stored width.
    ``nprobes`` / ``refine_factor`` / ``ef``: passed to the index search (ann and funnel's shortlist); ``k``,
    ``shortlist``, ``ef``, ``nprobes`` and ``refine_factor`` are clamped to what the table holds. ``backend``:
    "faiss" or "lance" to choose the index (default: the narrowest for the metric, FAISS first at equal width).
    ``version``: search an earlier table version or release tag (`rdscale update`; exact mode), default the latest.
    ``aggregate="proteins"`` / ``residue_hits`` (residues): protein hits from residue hits, as ``Searcher.search``.
    ``recall`` (ann / funnel): the recall@k the index's calibration curve must meet; the search then uses its
    cheapest point that does (rdscale.search.calibrate). Without it, and without explicit ``shortlist`` /
    ``nprobes`` / ``ef`` / ``refine_factor``, the point calibrated for the index's target (default 0.95) is used.
    ``residue_mode`` (residues): "two-stage" (the default for exact mode) shortlists ``protein_shortlist`` proteins
    (default max(20 k, 200)) per query protein by its mean residue vector in the proteins table (with its index
    when it has one), then searches exactly those proteins' residues; "global" (the default for ann / funnel)
    searches the whole residues table (exactly, or with its own index).

    Returns a table with columns ``query`` (int32 row of ``queries``, or the query key string for ``ids``; for
    residues ``"id:pos"``), ``id`` (and ``pos`` for residues), ``score`` (float32 distance, smaller = closer;
    see rdscale.search.tables), ``rank`` (int32, 1-based), sorted by query then rank. Fewer than ``k`` rows
    per query only if the (filtered) table has fewer.
    """
    req = SearchRequest.of(request, **options)  # a bad option is refused before the table is opened
    searcher = Searcher(dataset_path, table, resident=False, version=version)
    return searcher.search(queries, ids=ids, request=req)


def default_backend(dataset_path: str | Path) -> str:
    """faiss, for a run on a local disk and on an object store alike (there its index is an object beside the run,
    fetched once per node): on SeaweedFS it answered 16x the q/s of Lance's index at equal recall
    (bench/results/bench_search_s3.json)."""
    return "faiss"


def build_index(
    dataset_path: str | Path,
    table: str = "proteins",
    width: int | None = None,
    index_type: str | None = None,
    metric: str = "cosine",
    rebuild: bool = False,
    backend: str | None = None,
    progress: bool = False,
    recall: float | None = C.DEFAULT_RECALL,
    builder=None,
    **params: Any,
) -> IndexInfo:
    """A vector index on the width-``width`` prefix of ``table`` (None = the stored width), calibrated for
    ``recall``.

    ``backend=None`` (the default, as ``rdscale index``): faiss (``default_backend``), also for an object-store run.
    ``backend="lance"``: Lance's index on a materialised prefix column (``index_type`` one of
    ``tables.INDEX_TYPES``, default IVF_HNSW_SQ; ``params`` go to ``LanceDataset.create_index``).
    ``backend="faiss"``: a FAISS index stored in ``<run>/indexes`` (``index_type`` HNSW (default), IVF_FLAT or
    IVF_PQ; ``params`` as in ``faiss_index.default_faiss_params``). ``metric``: "cosine" or "l2"; a search uses
    the metric its index was built with. Idempotent: an identical index that covers every row is kept
    (``rebuild=True`` forces a new one). ``progress``: a bar of the rows added (FAISS) or per build stage (Lance).
    ``recall``: the recall@10 target the index is calibrated for on held-out rows (rdscale.search.calibrate; the
    curve is stored with the index and ``search`` uses its cheapest point meeting the target); None skips it.
    ``builder`` (faiss): builds and writes the index instead of this process; its ``calibrate(dataset_path, info,
    recall)``, when it has one, measures the curve in its stead (rdscale.cluster.index.RayIndexBuilder: both in
    Ray tasks, so the driver never holds the table).
    """
    if backend is None:
        backend = default_backend(dataset_path)
    if backend not in BACKENDS:
        raise SearchError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    unfinished = unfinished_writes(open_table(dataset_path, table).uri)
    if unfinished:  # an index covers every row of the table, uncommitted or about to be replaced ones too
        raise SearchError(f"not indexing {table}: {unfinished}")
    if recall is not None:
        recall = C.check_recall(recall)
    if backend == "lance":
        info = L.build_lance_index(dataset_path, table, width, index_type or L.DEFAULT_INDEX_TYPE, metric,
                                   rebuild, progress, **params)
    else:
        metric = _check_metric(metric)
        ds = open_table(dataset_path, table)
        reader_filter(ds.uri)  # warns when the run is incomplete (embed drops derived columns when it adds rows)
        if ds.count_rows() == 0:
            raise SearchError(f"the {table} table at {ds.uri} is empty: nothing to index")
        width = check_width(ds, width)
        info = F.build_faiss_index(ds, table, width, index_type or F.DEFAULT_FAISS_INDEX_TYPE, metric, rebuild,
                                   progress, builder=builder, **params)
    if recall is None or info.num_rows < C.MIN_ROWS or (info.calibration and info.calibration.get("target") == recall
                                                        and info.calibration.get("k") == C.DEFAULT_K):
        return info
    if builder is not None and hasattr(builder, "calibrate"):
        return builder.calibrate(dataset_path, info, recall)
    return calibrate(dataset_path, info, recall, progress=progress)


PROGRESS_EVERY_S = 10.0  # a calibration logs where its walk is at most this often
_RESIDENT_BYTES = 2 << 30  # calibration holds its twin tables in memory up to this size in all; larger: streamed


def _write_twin(ds: lance.LanceDataset, table: str, held: np.ndarray, path: Path) -> np.ndarray:
    """Write ``table`` without the rows at scan positions ``held`` (keys and embedding only, same schema
    metadata) to ``path``; returns the held rows' (m, full) float32 embeddings."""
    columns = [*TABLES[table], EMBEDDING]
    schema = pa.schema([ds.schema.field(c) for c in columns], metadata=ds.schema.metadata)
    full = stored_width(ds)
    queries = np.empty((len(held), full), np.float32)

    def batches():
        start = 0
        for batch in ds.scanner(columns=columns, batch_size=_SCAN_ROWS).to_batches():
            b = batch.num_rows
            lo, hi = np.searchsorted(held, [start, start + b])
            local = held[lo:hi] - start
            if len(local):
                queries[lo:hi] = _embedding_block(batch.column(EMBEDDING).take(pa.array(local)), full)
            keep = np.ones(b, bool)
            keep[local] = False
            start += b
            if keep.any():
                yield pa.RecordBatch.from_arrays([batch.column(c).filter(pa.array(keep)) for c in columns],
                                                 schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(path))
    return queries


def _link_or_copy(src: str, dst: str) -> None:
    """A second twin's files: hard links where the file system has them (Lance never rewrites a file in place,
    so the copy is independent of the first twin), else copies."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def calibrate(dataset_path: str | Path, info: IndexInfo, recall: float = C.DEFAULT_RECALL,
              progress: bool = False) -> IndexInfo:
    """Measure ``info``'s recall curves on held-out rows and store them with the index; returns it with its
    calibration. The curves come from a twin index (same type and parameters) built in a temporary folder over
    the table without the calibration rows (rdscale.search.calibrate says why). ``progress``: log lines as it
    goes (a twin build and dozens of searches: a minute at 2e4 rows, more as the table grows)."""
    import tempfile

    ds = open_table(dataset_path, info.table)
    held = C.sample_positions(ds.count_rows())
    what = f"calibrating the {info.table} index (width {info.width})"
    if progress:
        twins = "a twin" if info.backend == "faiss" else "two twin builds"
        progress_log.info("%s for recall@%d %s: %d held-out rows, %s of the index over the other rows", what,
                          C.DEFAULT_K, recall, len(held), twins)
    last = [time.monotonic()]

    def measured(mode: str, point: dict[str, int], got: float) -> None:
        if progress and time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            shown = " ".join(f"{k}={v}" for k, v in sorted(point.items()))
            progress_log.info("%s: %s recall %.3f at %s", what, mode, got, shown)
    with tempfile.TemporaryDirectory(prefix="rdscale-calibrate-") as tmp:
        one, two = Path(tmp) / "twin", Path(tmp) / "again"
        queries = _write_twin(ds, info.table, held, Path(Run(one).table(info.table)))
        builds = 1 if info.backend == "faiss" else 2  # Lance builds are not reproducible (calibrate says why)
        if info.backend == "faiss":
            twin_ds = open_table(one, info.table)
            twin = F.build_faiss_index(twin_ds, info.table, info.width, info.index_type, info.metric, **info.params)
        else:
            centroids = L.index_centroids(dataset_path, info)
            twin = L.build_lance_index(one, info.table, info.width, info.index_type, info.metric,
                                       ivf_centroids=centroids, **info.params)
        size = len(queries) and (ds.count_rows() * queries.shape[1] * queries.itemsize)
        resident = size * builds <= _RESIDENT_BYTES  # each build's searcher holds its own copy of the rows
        searcher = Searcher(one, info.table, resident=resident)
        second = None
        if builds == 2:
            shutil.copytree(one, two, copy_function=_link_or_copy)
            twin2 = L.build_lance_index(two, info.table, info.width, info.index_type, info.metric, rebuild=True,
                                        ivf_centroids=centroids, **info.params)
            second = (Searcher(two, info.table, resident=resident), twin2)
        try:
            record = C.calibrate_index(searcher, twin, queries, target=recall, second=second, measured=measured)
        finally:
            searcher.close()
            if second is not None:
                second[0].close()
    if info.backend == "faiss":
        F.store_calibration(ds, info, record)
    else:
        L.store_calibration(dataset_path, info, record)
    return replace(info, calibration=record)


def index_is_fresh(ds: lance.LanceDataset, info: IndexInfo) -> bool:
    """Whether the index still covers ``ds`` as it is: a FAISS index built on the table's current fragment layout,
    a Lance index whose prefix column is complete (rows added or rewritten since make both stale)."""
    return F.is_fresh(ds, info) if info.backend == "faiss" else _column_is_complete(ds, info.column)


def list_indexes(dataset_path: str | Path, table: str = "proteins") -> list[IndexInfo]:
    """Vector indexes of ``table`` (Lance's and FAISS), narrowest first."""
    ds = open_table(dataset_path, table)
    infos = L._live_indexes(ds, table) + F.list_faiss_indexes(ds, table)
    return sorted(infos, key=lambda i: (i.width, i.metric, i.backend != "faiss"))


def search_sequences(
    dataset_path: str | Path,
    sequences: Sequence[str] | dict[str, str],
    *,
    table: str = "proteins",
    models: Sequence[str] | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> pa.Table:
    """``search`` with query sequences, embedded by ``embed_sequences``; ``kwargs`` as for ``search``.

    ``sequences``: {name: sequence} or a list (named seq0, seq1, ...). The ``query`` column holds the name, or
    ``"name:pos"`` (0-based residue) for per-residue search, where every residue of a query is its own query.
    """
    names, seqs = sequence_queries(sequences)
    if not seqs:
        raise SearchError("no query sequences")
    with Searcher(dataset_path, table=table, models=models, device=device) as searcher:
        return searcher.search_sequences(dict(zip(names, seqs)), **kwargs)
