"""Prefix-truncated and funnel nearest-neighbour search over the rdscale Lance tables.

The stored embeddings are Matryoshka-nested (DESIGN.md section 2): the first ``w`` numbers of a row, for ``w`` a
chain level, are themselves an embedding. This module searches at any such prefix width, three ways:

- ``mode="exact"``: brute force over the first ``width`` numbers, streamed from the table in batches (numpy, float32
  arithmetic). Needs no index; the ground truth the other modes are measured against.
- ``mode="ann"``: the Lance vector index on the prefix column (``build_index`` makes both).
- ``mode="funnel"`` (adaptive retrieval, Kusupati et al. 2022): shortlist ``shortlist`` candidates per query with
  the index on a short prefix, then re-rank the shortlist by exact distance at ``rerank_width`` (default: the full
  stored width) and keep the top ``k``.

Conventions
-----------
- Tables: ``<run>/proteins.lance`` (key ``id``) and ``<run>/residues.lance`` (key ``id``, ``pos``); see
  docs/architecture.md, "store". ``dataset_path`` is the run directory, or a ``*.lance`` directory itself.
- Widths: a search width must be a chain level (schema metadata ``rdscale.levels``) no larger than the stored
  width, or the stored width itself (residues may be stored narrower than the widest level).
- Prefix columns: Lance ANN indexes are per column, so ``build_index`` materialises the prefix of width ``w`` as
  its own column ``embedding_p{w}`` (same dtype as ``embedding``: float32 for proteins, float16 for residues).
  The values are the raw first ``w`` numbers, *not* normalised: the same column then serves ``cosine`` and ``l2``
  indexes, and Lance normalises internally for cosine. The stored width needs no copy: its index is on
  ``embedding``. ``search`` discovers indexes from Lance's own index list (column -> width, index type, metric);
  ``build_index`` also records its parameters in the schema metadata key ``rdscale.indexes`` (JSON, by column).
- Scores are distances, smaller = closer: ``cosine`` -> ``1 - cos(q, x)`` on the width-``w`` prefixes (each
  prefix normalised on its own), in [0, 2]; ``l2`` -> squared Euclidean distance (Lance's convention). ANN
  scores come from the index and are approximate unless ``refine_factor`` is given; exact and funnel scores are
  exact at the width they were computed at (funnel: ``rerank_width``).
- Queries are ``(q, w)`` vectors with ``w`` >= the width the mode needs; wider queries are truncated (a prefix of
  a full-width query *is* the query at that width). Or query by stored keys (``ids=``), which looks the
  embeddings up; the query row itself is kept in the results (rank 1, distance ~0) unless ``exclude_self=True``.
- Sequence queries: ``embed_sequences`` embeds query sequences the way the run embedded its database (the run's
  models, fit artifact and embedding settings, read from the table's schema metadata and ``<run>/fit``), and
  ``search_sequences`` searches with them; per-residue search makes each residue of a query its own query.
- Command line: ``rdscale index`` / ``rdscale search`` (rdscale/cli_search.py) wrap ``build_index`` and
  ``search`` / ``search_sequences``; errors meant for the user are ``SearchError``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lance
import numpy as np
import pyarrow as pa

from rdscale.errors import RdscaleError
from rdscale.io.location import Location
from rdscale.io.store import reader_filter, sql_in_list

TABLES: dict[str, tuple[str, ...]] = {"proteins": ("id",), "residues": ("id", "pos")}  # table -> key columns
METRICS = ("cosine", "l2")
MODES = ("exact", "ann", "funnel")
INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_HNSW_FLAT", "IVF_FLAT", "IVF_SQ", "IVF_RQ")
DEFAULT_INDEX_TYPE = "IVF_HNSW_SQ"
EMBEDDING = "embedding"
LEVELS_KEY = "rdscale.levels"
INDEXES_KEY = "rdscale.indexes"
_SCAN_ROWS = 32768  # rows per batch of the exact scan: (32768, 1280) float32 is 168 MB


class SearchError(RdscaleError, ValueError):
    """Bad input to indexing or search: the message says what is wrong and what to do instead."""


class MissingIndexError(SearchError):
    """mode="ann"/"funnel" needs a vector index that has not been built (the message names the command)."""


@dataclass(frozen=True)
class IndexInfo:
    """One vector index on one prefix column, as recorded in the schema metadata ``rdscale.indexes``."""

    table: str
    width: int
    column: str
    index_name: str
    index_type: str
    metric: str
    num_rows: int
    params: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# opening tables, widths, columns


def open_table(dataset_path: str | Path, table: str = "proteins") -> lance.LanceDataset:
    """The Lance dataset of ``table`` in run directory ``dataset_path`` (or ``dataset_path`` itself if it is one)."""
    if table not in TABLES:
        raise SearchError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
    from rdscale.io.runs import dataset_exists, open_dataset

    path = Location.parse(dataset_path)  # a local directory or an object-store prefix
    if not path.name.endswith(".lance"):
        path = path / f"{table}.lance"
    if not dataset_exists(path):
        if table == "residues" and dataset_exists(path.parent / "proteins.lance"):
            raise SearchError(f"the run at {path.parent} has no residues table (it was run with output.residues: "
                              "false); search --table proteins instead")
        raise SearchError(f"no Lance dataset at {path} (is {dataset_path} an rdscale run directory?)")
    ds = open_dataset(path)
    missing = [c for c in (*TABLES[table], EMBEDDING) if c not in ds.schema.names]
    if missing:
        raise SearchError(f"{path} lacks column(s) {missing}: is it really the {table!r} table?")
    return ds


def stored_width(ds: lance.LanceDataset) -> int:
    """Width of the stored ``embedding`` column."""
    return ds.schema.field(EMBEDDING).type.list_size


def chain_levels(ds: lance.LanceDataset) -> list[int]:
    """Prefix widths searchable in ``ds``: the chain levels that fit in the stored width, plus the stored width."""
    full = stored_width(ds)
    raw = (ds.schema.metadata or {}).get(LEVELS_KEY.encode())
    levels = json.loads(raw) if raw else []
    return sorted({int(w) for w in levels if int(w) <= full} | {full})


def check_width(ds: lance.LanceDataset, width: int | None) -> int:
    """``width`` validated against the chain levels (None = the stored width)."""
    full = stored_width(ds)
    if width is None:
        return full
    width = int(width)
    if width > full:
        raise SearchError(f"width {width} exceeds the stored embedding width {full}; choose one of {chain_levels(ds)}")
    if width not in chain_levels(ds):
        raise SearchError(
            f"width {width} is not a chain level of this table; choose one of {chain_levels(ds)} "
            f"(schema metadata {LEVELS_KEY!r})"
        )
    return width


def prefix_column(width: int, full_width: int) -> str:
    """Column holding the width-``width`` prefix: the stored column itself at full width."""
    return EMBEDDING if width == full_width else f"{EMBEDDING}_p{width}"


def _field_id(ds: lance.LanceDataset, column: str) -> int:
    return ds.lance_schema.field(column).id()


def _column_is_complete(ds: lance.LanceDataset, column: str) -> bool:
    """True if every fragment has data for ``column``; rows appended after the prefix column was added read null.

    Decided from the fragment metadata (which field ids each data file holds), so it costs no scan.
    """
    if column not in ds.schema.names:
        return False
    fid = _field_id(ds, column)
    return all(any(fid in f.fields for f in frag.metadata.files) for frag in ds.get_fragments())


def _embedding_block(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed_size_list column -> (n, width) numpy array (its dtype), a view where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    full = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return values.reshape(len(column), full)[:, :width]


# ---------------------------------------------------------------------------------------------------------------
# indexing


def materialize_prefix(ds: lance.LanceDataset, width: int) -> str:
    """Add the prefix column for ``width`` (if missing or stale) without rewriting the other columns.

    Returns the column name. Idempotent: a complete prefix column is left alone; one that misses rows appended
    later (they read null) is dropped and re-added (dropping is metadata-only in Lance).
    """
    full = stored_width(ds)
    column = prefix_column(width, full)
    if column == EMBEDDING or _column_is_complete(ds, column):
        return column
    if column in ds.schema.names:
        ds.drop_columns([column])
    value_type = ds.schema.field(EMBEDDING).type.value_type
    out_field = pa.field(column, pa.list_(value_type, width))

    @lance.batch_udf(output_schema=pa.schema([out_field]))
    def take_prefix(batch: pa.RecordBatch) -> pa.RecordBatch:
        block = np.ascontiguousarray(_embedding_block(batch.column(EMBEDDING), width))  # (b, width)
        values = pa.array(block.ravel(), type=value_type)
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(values, width)], schema=pa.schema([out_field]))

    ds.add_columns(take_prefix, read_columns=[EMBEDDING])
    return column


def default_index_params(index_type: str, num_rows: int, width: int) -> dict[str, int]:
    """Index parameters derived from the row count and width (each can be overridden in ``build_index``).

    num_partitions ~ sqrt(n), at least 1 and at most n / 32 so k-means has rows to work with;
    num_sub_vectors (PQ) = width / 8 (8-number sub-vectors), or the nearest divisor of width below it.
    """
    params = {"num_partitions": max(1, min(round(math.sqrt(num_rows)), num_rows // 32))}
    if "PQ" in index_type:
        target = max(1, width // 8)
        params["num_sub_vectors"] = max(m for m in range(1, target + 1) if width % m == 0)
    return params


def _recorded_indexes(ds: lance.LanceDataset) -> dict[str, dict]:
    raw = (ds.schema.metadata or {}).get(INDEXES_KEY.encode())
    return json.loads(raw) if raw else {}


def _lance_vector_indexes(ds: lance.LanceDataset) -> dict[str, dict]:
    """Lance's own vector indexes, by name: column, index type, metric and the fragments they cover."""
    out = {}
    for desc in ds.describe_indices():
        if not desc.type_url.endswith("VectorIndexDetails") or len(desc.field_names) != 1:
            continue
        out[desc.name] = {
            "column": desc.field_names[0],
            "index_type": desc.index_type,
            "metric": _check_metric(str(desc.details.get("metric_type", "l2"))),
            "fragment_ids": {f for seg in desc.segments for f in seg.fragment_ids},
        }
    return out


def _index_covers_all(ds: lance.LanceDataset, lance_index: dict) -> bool:
    return {f.fragment_id for f in ds.get_fragments()} <= lance_index["fragment_ids"]


def build_index(
    dataset_path: str | Path,
    table: str = "proteins",
    width: int | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
    metric: str = "cosine",
    rebuild: bool = False,
    **params: Any,
) -> IndexInfo:
    """Materialise the width-``width`` prefix column of ``table`` and build a vector index on it.

    ``width``: a chain level (None = the stored width). ``index_type``: one of INDEX_TYPES (IVF_HNSW_SQ, the
    default, needs no refine step for good recall; IVF_PQ is smaller on disk and wants ``refine_factor`` at
    search time). ``metric``: "cosine" or "l2"; a search must use the metric its index was built with.
    ``params`` go to ``LanceDataset.create_index`` and override ``default_index_params`` (e.g. num_partitions,
    num_sub_vectors, m, ef_construction, sample_rate).

    Idempotent: an index already built with the same type, metric and parameters that covers every fragment is
    kept (``rebuild=True`` forces a new one). One vector index per prefix column: a different configuration
    replaces the old one.
    """
    index_type = index_type.upper()
    if index_type not in INDEX_TYPES:
        raise SearchError(f"unknown index type {index_type!r}; expected one of {INDEX_TYPES}")
    metric = _check_metric(metric)
    ds = open_table(dataset_path, table)
    reader_filter(ds.uri)  # warns when the run is incomplete (embed drops derived columns when it adds rows)
    num_rows = ds.count_rows()
    if num_rows == 0:
        raise SearchError(f"the {table} table at {ds.uri} is empty: nothing to index")
    width = check_width(ds, width)

    column = materialize_prefix(ds, width)
    ds = _reopen(ds)  # the version with the new column
    resolved = {**default_index_params(index_type, num_rows, width), **params}
    if resolved["num_partitions"] > num_rows:
        raise SearchError(f"num_partitions={resolved['num_partitions']} exceeds the {num_rows} rows of {table}")
    name = f"{column}_idx"
    info = IndexInfo(table, width, column, name, index_type, metric, num_rows, resolved)

    recorded = _recorded_indexes(ds).get(column)
    existing = _lance_vector_indexes(ds)
    if (
        not rebuild
        and name in existing
        and (existing[name]["index_type"], existing[name]["metric"]) == (index_type, metric)
        and _index_covers_all(ds, existing[name])
        and recorded is not None
        and recorded.get("params") == _jsonable(resolved)
    ):
        return IndexInfo(**recorded)

    for other_name, other in existing.items():  # one vector index per column: search must not guess
        if other["column"] == column and other_name != name:
            ds.drop_index(other_name)
    ds.create_index(column, index_type, name=name, metric=metric, replace=True, **resolved)

    ds = _reopen(ds)
    record = {**_recorded_indexes(ds), column: _jsonable(asdict(info))}
    ds.update_schema_metadata({INDEXES_KEY: json.dumps(record, sort_keys=True)})
    return info


def list_indexes(dataset_path: str | Path, table: str = "proteins") -> list[IndexInfo]:
    """Vector indexes on the prefix columns of ``table`` (from Lance's index list), narrowest first."""
    ds = open_table(dataset_path, table)
    return _live_indexes(ds, table)


def _live_indexes(ds: lance.LanceDataset, table: str) -> list[IndexInfo]:
    """Discovered from Lance's index list (so it survives lost schema metadata); parameters from the record."""
    recorded = _recorded_indexes(ds)
    full = stored_width(ds)
    infos = []
    for name, idx in _lance_vector_indexes(ds).items():
        column = idx["column"]
        if column != EMBEDDING and not column.startswith(f"{EMBEDDING}_p"):
            continue
        width = ds.schema.field(column).type.list_size
        if column != prefix_column(width, full):
            continue
        rec = recorded.get(column, {})
        params = rec.get("params", {}) if rec.get("index_name") == name else {}
        num_rows = rec.get("num_rows", 0) if params else 0
        infos.append(IndexInfo(table, width, column, name, idx["index_type"], idx["metric"], num_rows, params))
    return sorted(infos, key=lambda i: (i.width, i.metric))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _reopen(ds: lance.LanceDataset) -> lance.LanceDataset:
    """The latest version of ``ds``, opened with its location's storage options."""
    from rdscale.io.runs import open_dataset

    return open_dataset(ds.uri)


def run_dir_of(dataset_path: str | Path) -> Path | Location:
    """The run directory: ``dataset_path`` itself, or the parent of a ``*.lance`` table (a Location for
    object-store runs)."""
    loc = Location.parse(dataset_path)
    if not loc.is_local:
        return loc.parent if loc.name.endswith(".lance") else loc
    path = Path(dataset_path)
    return path.parent if path.suffix == ".lance" else path


def _index_hint(dataset_path: str | Path, table: str, width: int, metric: str) -> str:
    return f"rdscale index -o {run_dir_of(dataset_path)} --table {table} --width {width} --metric {metric}"


# ---------------------------------------------------------------------------------------------------------------
# distances


def _check_metric(metric: str) -> str:
    metric = metric.lower()
    if metric == "euclidean":
        metric = "l2"
    if metric not in METRICS:
        raise SearchError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return metric


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero (their cosine distance to anything is 1)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def pairwise_distances(queries: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """(q, w) x (n, w) -> (q, n) float32 distances under the module's convention (smaller = closer)."""
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(rows, dtype=np.float32)
    if metric == "cosine":
        return 1.0 - _unit_rows(q) @ _unit_rows(x).T
    # squared L2 via the Gram trick (one GEMM); clipped because cancellation can dip slightly below 0
    sq = (q * q).sum(1)[:, None] - 2.0 * (q @ x.T) + (x * x).sum(1)[None, :]
    return np.maximum(sq, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# search


def search(
    dataset_path: str | Path,
    queries: np.ndarray | None = None,
    *,
    ids: Sequence[str] | Sequence[tuple[str, int]] | None = None,
    table: str = "proteins",
    width: int | None = None,
    k: int = 10,
    mode: str = "exact",
    metric: str = "cosine",
    filter: str | None = None,
    shortlist: int | None = None,
    rerank_width: int | None = None,
    nprobes: int | None = None,
    refine_factor: int | None = None,
    ef: int | None = None,
    exclude_self: bool = False,
) -> pa.Table:
    """k nearest rows of ``table`` for each query, at prefix width ``width``.

    Give either ``queries`` ((q, w) vectors, w >= the width needed) or ``ids`` (stored keys: protein ids, or
    (id, pos) pairs for residues). ``width``: a chain level; None means the stored width for ``exact``, and the
    narrowest indexed width (for ``metric``) for ``ann`` / ``funnel``. ``filter``: a Lance SQL predicate on the
    table's other columns (e.g. ``"length > 100"``), applied before ranking. ``shortlist`` (funnel): candidates
    taken from the index, default max(10 * k, 100). ``rerank_width`` (funnel): default the stored width.
    ``nprobes`` / ``refine_factor`` / ``ef``: passed to the Lance index search (ann and funnel's shortlist).

    Returns a table with columns ``query`` (int32 row of ``queries``, or the query key string for ``ids``; for
    residues ``"id:pos"``), ``id`` (and ``pos`` for residues), ``score`` (float32 distance, smaller = closer;
    see the module docstring), ``rank`` (int32, 1-based), sorted by query then rank. Fewer than ``k`` rows
    per query only if the (filtered) table has fewer.
    """
    if mode not in MODES:
        raise SearchError(f"unknown mode {mode!r}; expected one of {MODES}")
    metric = _check_metric(metric)
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    ds = open_table(dataset_path, table)
    filter = reader_filter(ds.uri, filter)  # only rows of shards in the run's ledger; warns when incomplete
    if ds.count_rows() == 0:
        raise SearchError(f"the {table} table at {ds.uri} is empty: nothing to search")
    full = stored_width(ds)
    keys = TABLES[table]

    index = None
    if mode == "exact":
        width = check_width(ds, width)
    else:
        index = _find_index(ds, dataset_path, table, width, metric)
        width = index.width
    need = width
    if mode == "funnel":
        rerank_width = check_width(ds, rerank_width)
        if rerank_width < width:
            raise SearchError(f"rerank_width {rerank_width} is narrower than the shortlist width {width}")
        need = rerank_width

    if (queries is None) == (ids is None):
        raise SearchError("give exactly one of queries= (vectors) or ids= (stored keys)")
    if ids is not None:
        labels, q, self_keys = _lookup(ds, table, ids)
    else:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] == 0:
            raise SearchError(f"queries must be a non-empty (q, w) array, got shape {np.shape(queries)}")
        labels, self_keys = None, None
    if q.shape[1] < need:
        raise SearchError(
            f"query vectors are {q.shape[1]} wide but {mode} search at this width needs at least {need} numbers"
        )
    q = np.ascontiguousarray(q[:, :need], dtype=np.float32)  # (nq, need)
    k_fetch = k + 1 if (exclude_self and self_keys is not None) else k

    ann = {"nprobes": nprobes, "refine_factor": refine_factor, "ef": ef}
    if mode == "exact":
        qi, rows, score = _exact(ds, q, width, k_fetch, metric, filter, keys)
    elif mode == "ann":
        qi, rows, score = _ann(ds, q, index, k_fetch, filter, keys, ann)
    else:
        n_short = shortlist if shortlist is not None else max(10 * k, 100)
        if n_short < k_fetch:
            raise SearchError(f"shortlist ({n_short}) must be at least k ({k_fetch})")
        qi, rows, score = _funnel(ds, q, index, rerank_width, n_short, k_fetch, metric, filter, keys, ann)

    result = _assemble(qi, rows, score, keys)
    if exclude_self and self_keys is not None:
        result = _drop_self(result, self_keys, keys)
    result = _rank(result, k)
    if labels is not None:
        result = result.set_column(0, "query", pa.array([labels[i] for i in result.column("query").to_pylist()]))
    return result


def _find_index(ds, dataset_path, table: str, width: int | None, metric: str) -> IndexInfo:
    if width is not None:
        width = check_width(ds, width)
    live = [i for i in _live_indexes(ds, table) if i.metric == metric]
    if width is None:
        if not live:
            raise MissingIndexError(
                f"no {metric} vector index on the {table} table; build one first, e.g. "
                f"`{_index_hint(dataset_path, table, chain_levels(ds)[0], metric)}`"
            )
        return live[0]
    for info in live:
        if info.width == width:
            if not _column_is_complete(ds, info.column):
                raise MissingIndexError(
                    f"rows were added to {table} after column {info.column} was built; "
                    f"rerun `{_index_hint(dataset_path, table, width, metric)}`"
                )
            return info
    raise MissingIndexError(
        f"no {metric} vector index at width {width} on the {table} table; "
        f"run `{_index_hint(dataset_path, table, width, metric)}`"
    )


def _lookup(ds, table: str, ids) -> tuple[list[str], np.ndarray, list[tuple]]:
    """Stored embeddings for query keys -> (labels, (nq, full) vectors, key tuples).

    Residue keys are (id, pos) pairs, or a bare protein id meaning every residue of that protein (in pos order).
    """
    if len(ids) == 0:
        raise SearchError("ids= is empty")
    whole = []  # residues: protein ids whose every residue is a query
    if table == "proteins":
        wanted = [(str(i),) for i in ids]
    else:
        try:
            wanted = [(str(i),) if isinstance(i, str) else (str(i[0]), int(i[1])) for i in ids]
        except (TypeError, ValueError, IndexError):
            raise SearchError("residue queries by key need (id, pos) pairs or protein ids") from None
        whole = [w[0] for w in wanted if len(w) == 1]
    id_list = sql_in_list(sorted({w[0] for w in wanted}))
    found = ds.to_table(columns=[*TABLES[table], EMBEDDING], filter=f"id IN ({id_list})")
    key_cols = [found.column(c).to_pylist() for c in TABLES[table]]
    where = {tuple(kv): i for i, kv in enumerate(zip(*key_cols))}
    if whole:
        positions: dict[str, list[int]] = {}
        for pid, pos in where:
            positions.setdefault(pid, []).append(pos)
        expanded = []
        for w in wanted:
            if len(w) == 2:
                expanded.append(w)
            elif w[0] in positions:
                expanded += [(w[0], pos) for pos in sorted(positions[w[0]])]
            else:
                expanded.append(w)  # reported as missing below
        wanted = expanded
    missing = [w for w in wanted if w not in where]
    if missing:
        shown = ", ".join(":".join(map(str, m)) for m in missing[:5])
        raise SearchError(f"{len(missing)} query key(s) not in the {table} table: {shown}")
    block = _embedding_block(found.column(EMBEDDING), stored_width(ds))
    vectors = block[[where[w] for w in wanted]]
    labels = [":".join(map(str, w)) for w in wanted]
    return labels, vectors, wanted


def _exact(ds, q: np.ndarray, width: int, k: int, metric: str, filter, keys) -> tuple:
    """Brute force over a streamed scan, keeping a running top-k per query (memory: O(nq * (k + batch)))."""
    q = q[:, :width]
    column = prefix_column(width, stored_width(ds))
    if not _column_is_complete(ds, column):  # read the narrow prefix column when one is there: less I/O
        column = EMBEDDING
    nq = q.shape[0]
    best = np.full((nq, 0), np.inf, dtype=np.float32)  # (nq, <=k) distances
    best_keys: list[np.ndarray] = [np.empty((nq, 0), dtype=object) for _ in keys]
    scanner = ds.scanner(columns=[*keys, column], filter=filter, batch_size=_SCAN_ROWS)
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        x = _embedding_block(batch.column(column), width)  # (b, width)
        dist = pairwise_distances(q, x, metric)  # (nq, b)
        take = min(k, dist.shape[1])
        part = np.argpartition(dist, take - 1, axis=1)[:, :take]  # (nq, take) batch-local rows
        batch_keys = [np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=object) for c in keys]
        cand = np.concatenate([best, np.take_along_axis(dist, part, 1)], axis=1)
        cand_keys = [np.concatenate([bk, kc[part]], axis=1) for bk, kc in zip(best_keys, batch_keys)]
        keep = np.argsort(cand, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(cand, keep, 1)
        best_keys = [np.take_along_axis(ck, keep, 1) for ck in cand_keys]
    if best.shape[1] == 0:
        return np.empty(0, np.int32), [np.empty(0, object) for _ in keys], np.empty(0, np.float32)
    qi = np.repeat(np.arange(nq, dtype=np.int32), best.shape[1])
    return qi, [bk.ravel() for bk in best_keys], best.ravel()


def _nearest(index: IndexInfo, q: np.ndarray, k: int, ann: dict) -> dict:
    nearest = {"column": index.column, "q": q[:, : index.width], "k": k, "metric": index.metric}
    nearest.update({name: v for name, v in ann.items() if v is not None})
    return nearest


def _ann(ds, q: np.ndarray, index: IndexInfo, k: int, filter, keys, ann: dict) -> tuple:
    found = ds.to_table(
        columns=[*keys, "_distance"],
        nearest=_nearest(index, q, k, ann),
        filter=filter,
        prefilter=True,
        disable_scoring_autoprojection=True,
    )
    qi = found.column("query_index").to_numpy().astype(np.int32)
    rows = [np.asarray(found.column(c).to_numpy(zero_copy_only=False), dtype=object) for c in keys]
    return qi, rows, found.column("_distance").to_numpy().astype(np.float32)


def _funnel(ds, q, index: IndexInfo, rerank_width: int, shortlist: int, k: int, metric, filter, keys, ann) -> tuple:
    """Shortlist with the prefix index, then exact distances at ``rerank_width`` on the shortlisted rows only."""
    found = ds.to_table(
        columns=["_distance"],
        nearest=_nearest(index, q, shortlist, ann),
        filter=filter,
        prefilter=True,
        with_row_id=True,
        disable_scoring_autoprojection=True,
    )
    qi = found.column("query_index").to_numpy().astype(np.int64)
    row_ids = found.column("_rowid").to_numpy()
    if len(row_ids) == 0:
        return np.empty(0, np.int32), [np.empty(0, object) for _ in keys], np.empty(0, np.float32)
    uniq, inverse = np.unique(row_ids, return_inverse=True)  # queries share candidates: read each row once
    column = prefix_column(rerank_width, stored_width(ds))
    if not _column_is_complete(ds, column):
        column = EMBEDDING
    taken = ds._take_rows(uniq.tolist(), columns=[*keys, column])  # order of uniq (checked in tests)
    x = _embedding_block(taken.column(column), rerank_width).astype(np.float32)  # (u, rerank_width)
    q = q[:, :rerank_width]
    if metric == "cosine":
        x, q = _unit_rows(x), _unit_rows(q)
        score = 1.0 - np.einsum("nw,nw->n", x[inverse], q[qi])
    else:
        diff = x[inverse] - q[qi]  # (shortlist rows, rerank_width)
        score = np.einsum("nw,nw->n", diff, diff)
    # top k per query: sort by (query, score), then keep each query's first k
    order = np.lexsort((score, qi))
    qi, score, cand = qi[order], score[order], inverse[order]
    first = np.searchsorted(qi, qi, side="left")
    keep = (np.arange(len(qi)) - first) < k
    key_cols = [np.asarray(taken.column(c).to_numpy(zero_copy_only=False), dtype=object) for c in keys]
    return qi[keep].astype(np.int32), [kc[cand[keep]] for kc in key_cols], score[keep].astype(np.float32)


def _assemble(qi: np.ndarray, rows: list[np.ndarray], score: np.ndarray, keys) -> pa.Table:
    cols = {"query": pa.array(qi, pa.int32())}
    for name, values in zip(keys, rows):
        cols[name] = pa.array(values.tolist(), pa.int32() if name == "pos" else pa.string())
    cols["score"] = pa.array(score, pa.float32())
    return pa.table(cols)


def _drop_self(result: pa.Table, self_keys: list[tuple], keys) -> pa.Table:
    query = result.column("query").to_numpy()
    key_cols = [result.column(c).to_pylist() for c in keys]
    keep = [tuple(kv) != self_keys[qi] for qi, kv in zip(query, zip(*key_cols))]
    return result.filter(pa.array(keep))


def _rank(result: pa.Table, k: int) -> pa.Table:
    """Sort by (query, score), cut each query to k rows, number them 1..k."""
    query = result.column("query").to_numpy()
    score = result.column("score").to_numpy()
    order = np.lexsort((score, query))
    query = query[order]
    rank = np.arange(len(query)) - np.searchsorted(query, query, side="left") + 1
    keep = order[rank <= k]
    out = result.take(pa.array(keep, pa.int64()))
    return out.append_column("rank", pa.array(rank[rank <= k], pa.int32()))


# ---------------------------------------------------------------------------------------------------------------
# queries from sequences


def _run_metadata(ds: lance.LanceDataset, key: str) -> dict:
    raw = (ds.schema.metadata or {}).get(key.encode())
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise SearchError(f"{ds.uri}: schema metadata {key!r} is not valid JSON; the table was not written by rdscale")


def _fit_dir_of(run: Path, manifest: dict, config: dict) -> Path | None:
    """Where the run's fit artifact is (rdscale.io.runs.Run.fit_location: the recorded one, relative to the run,
    else <run>/fit, else the configured fit.artifact); None for a single-model (extract) run, which has no fit."""
    from rdscale.io.runs import Run

    found = Run(run).fit_location(manifest, config)
    if found is not None:
        return Path(found.path) if found.is_local else found
    if len(manifest.get("models", [])) == 1:
        return None
    raise SearchError(
        f"no fit artifact for {run}: neither {Location.parse(run) / 'fit'} nor the run's fit.artifact holds a manifest.json; "
        "sequence queries are embedded through the run's own fitted chain"
    )


def embed_sequences(
    dataset_path: str | Path,
    sequences: Sequence[str],
    *,
    table: str = "proteins",
    names: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    device: str | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Embed query sequences exactly as the run embedded its database.

    The chain's models (``models`` overrides the checkpoint paths / names recorded in the fit manifest), the fit
    artifact (``<run>/fit``), and the embedding settings (layer, window, overlap, long-sequence policy) all come
    from the run, so a sequence that is in the database gets the vector stored for it. Sequences longer than the
    model window are windowed and stitched as in the pipeline (or truncated / refused, per the run's
    ``embedding.long_policy``). ``device``: where to run the models (default: a GPU if there is one).

    Returns for ``table="proteins"`` a (q, k_m) float32 array, the mean over residues of the rd embedding (what
    ``proteins.embedding`` holds); for ``table="residues"`` one (L_i, d) float32 array per sequence, the rd
    embedding cut to the stored width d and rounded to the stored dtype (what ``residues.embedding`` holds).
    """
    import torch

    from rdscale.config import load_config
    from rdscale.fit.artifact import ArtifactError, load_fit
    from rdscale.run.stages import ChainEncoder

    ds = open_table(dataset_path, table)
    run = run_dir_of(dataset_path)
    names = [f"seq{i}" for i in range(len(sequences))] if names is None else list(names)
    if len(sequences) == 0:
        raise SearchError("no query sequences")
    if len(names) != len(sequences):
        raise SearchError(f"{len(names)} names for {len(sequences)} sequences")
    manifest = _run_metadata(ds, "rdscale.fit_manifest")
    config = _run_metadata(ds, "rdscale.config")
    if not manifest.get("models") or not config:
        raise SearchError(f"{ds.uri} has no rdscale.fit_manifest / rdscale.config schema metadata: it was not "
                          "written by `rdscale run` / `embed`, so there is no chain to embed queries with")
    model_names = list(models) if models else [m.get("source") or m.get("name") for m in manifest["models"]]
    if len(model_names) != len(manifest["models"]):
        raise SearchError(f"{len(model_names)} models given for a chain of {len(manifest['models'])}")
    embedding = {**config.get("embedding", {}), "device": device or "auto", "dtype": "auto"}
    cfg = load_config(None, [f"embedding={json.dumps(embedding)}"])

    window, policy = cfg.embedding.window, cfg.embedding.long_policy
    long = [(n, len(q)) for n, q in zip(names, sequences) if len(q) > window]
    if long and policy == "reject":
        shown = ", ".join(f"{n} ({length} residues)" for n, length in long[:5])
        raise SearchError(
            f"query {shown} is longer than the {window}-residue model window, and this run rejected such "
            "sequences (embedding.long_policy=reject), so the database holds nothing comparable"
        )
    fit_dir = _fit_dir_of(run, manifest, config)
    try:
        encoder = ChainEncoder(model_names, cfg)
    except (OSError, ValueError) as err:
        raise SearchError(
            f"cannot load the run's models {model_names}: {err}. Pass models= (--models) with their current paths"
        ) from err
    fit = None
    extended = bool(manifest.get("extensions"))
    if fit_dir is not None:
        try:
            fit, base = load_fit(fit_dir)
            # An extended run's chain is the base fit's models, then one model per `rdscale extend` step.
            load_fit(fit_dir, expect_models=encoder.model_info()[: len(base["models"])])
        except ArtifactError as err:
            raise SearchError(f"the models do not match the run's fit at {fit_dir}: {err}") from err
    if extended:
        from rdscale.run.extend import ExtendError, apply_chain, load_query_chain

        try:
            fits = load_query_chain(run)
        except ExtendError as err:
            raise SearchError(str(err)) from err

    try:
        blocks = encoder.blocks(list(sequences))  # [seq][model] (L, k_i) float32
    except ValueError as err:  # the message names the sequence by position: say which query that is
        where = str(err).split(":", 1)
        head = where[0].split()
        if len(head) == 2 and head[0] == "sequence" and head[1].isdigit():
            raise SearchError(f"query {names[int(head[1])]}: {where[1].strip()}") from err
        raise SearchError(f"cannot embed the queries: {err}") from err
    with torch.no_grad():
        if extended:
            rd = [apply_chain(fits, b).float().cpu() for b in blocks]  # [seq] (L, k_m) of the extended chain
        else:
            rd = [(fit.apply(b) if fit is not None else b[0]).float().cpu() for b in blocks]  # [seq] (L, k_m)
    if table == "proteins":
        return torch.stack([e.mean(dim=0) for e in rd]).numpy()  # (q, k_m), as proteins.embedding
    d = stored_width(ds)
    value_type = ds.schema.field(EMBEDDING).type.value_type
    store_dtype = np.float16 if value_type == pa.float16() else np.float32
    return [e[:, :d].numpy().astype(store_dtype).astype(np.float32) for e in rd]  # [seq] (L, d)


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
    if isinstance(sequences, dict):
        names, seqs = list(sequences), list(sequences.values())
    else:
        seqs = list(sequences)
        names = [f"seq{i}" for i in range(len(seqs))]
    vectors = embed_sequences(dataset_path, seqs, table=table, names=names, models=models, device=device)
    if table == "proteins":
        labels = names
    else:
        labels = [f"{n}:{pos}" for n, v in zip(names, vectors) for pos in range(len(v))]
        vectors = np.concatenate(vectors, axis=0)  # (sum L, d)
    result = search(dataset_path, vectors, table=table, **kwargs)
    return result.set_column(0, "query", pa.array([labels[i] for i in result.column("query").to_pylist()]))


# ---------------------------------------------------------------------------------------------------------------
# evaluation and output


def recall_at_k(found: pa.Table, truth: pa.Table, k: int = 10) -> float:
    """Mean over queries of |found top-k ∩ truth top-k| / k, matching rows by key (id, and pos if present)."""
    keys = [c for c in ("id", "pos") if c in truth.column_names]

    def top(tbl: pa.Table) -> dict[Any, set]:
        out: dict[Any, set] = {}
        cols = [tbl.column(c).to_pylist() for c in ("query", "rank", *keys)]
        for qv, r, *kv in zip(*cols):
            if r <= k:
                out.setdefault(qv, set()).add(tuple(kv))
        return out

    want, got = top(truth), top(found)
    if not want:
        raise SearchError("recall_at_k: the reference table is empty")
    return float(np.mean([len(got.get(qv, set()) & ref) / min(k, len(ref)) for qv, ref in want.items()]))


def format_results(result: pa.Table, max_rows: int | None = 50) -> str:
    """The result table as aligned plain text for a terminal (scores to 4 decimals)."""
    names = result.column_names
    n = result.num_rows if max_rows is None else min(max_rows, result.num_rows)
    columns = [result.column(c).to_pylist()[:n] for c in names]
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in col] for col in columns]
    widths = [max([len(name), *map(len, col)]) for name, col in zip(names, cells)]
    numeric = [pa.types.is_integer(result.schema.field(c).type) or pa.types.is_floating(result.schema.field(c).type)
               for c in names]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(names), line(["-" * w for w in widths])]
    out += [line(row) for row in zip(*cells)]
    if n < result.num_rows:
        out.append(f"... {result.num_rows - n} more rows")
    return "\n".join(out)


def write_results(result: pa.Table, path: str | Path, fmt: str | None = None) -> Path:
    """Write results as ``fmt`` ("arrow", "csv" or "parquet"), by default told by the extension: .arrow / .ipc /
    .feather (Arrow IPC file), .csv, .parquet."""
    path = Path(path)
    suffix = f".{fmt}" if fmt else path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".arrow", ".ipc", ".feather"):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, result.schema) as writer:
            writer.write_table(result)
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(result.column_names)
            writer.writerows(zip(*(result.column(c).to_pylist() for c in result.column_names)))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(result, str(path))
    else:
        raise SearchError(f"cannot tell the format of {path}: use .arrow/.ipc/.feather, .csv or .parquet")
    return path
