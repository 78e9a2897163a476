"""Lance's own vector indexes on prefix columns (the ``lance`` backend of ``rdscale index``).

Lance ANN indexes are per column, so ``build_index`` materialises the prefix of width ``w`` as its own column
``embedding_p{w}`` (same dtype as ``embedding``: float32 for proteins, float16 for residues). The values are the
raw first ``w`` numbers, *not* normalised: the same column then serves ``cosine`` and ``l2`` indexes, and Lance
normalises internally for cosine. The stored width needs no copy: its index is on ``embedding``. Searches discover
indexes from Lance's own index list (column -> width, index type, metric); ``build_index`` also records its
parameters in the schema metadata key ``rdscale.indexes`` (JSON, by column).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa

from rdscale.io.runs import Run
from rdscale.io.store import reader_filter
from rdscale.progress import Progress
from rdscale.search.calibrate import sample_positions
from rdscale.search.tables import (
    DEFAULT_INDEX_TYPE,
    EMBEDDING,
    INDEX_TYPES,
    INDEXES_KEY,
    IndexInfo,
    SearchError,
    _check_metric,
    _column_is_complete,
    _embedding_block,
    _jsonable,
    check_width,
    open_table,
    prefix_column,
    reopen,
    stored_width,
)

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


_INTEGER_PARAMS = {"num_partitions", "num_sub_vectors", "num_bits", "m", "ef_construction", "max_iterations",
                   "sample_rate"}
# what --param may name: create_index passes unknown keywords on to Lance, which ignores them silently
LANCE_PARAMS = _INTEGER_PARAMS | {"target_partition_size", "shuffle_partition_batches",
                                  "shuffle_partition_concurrency", "accelerator"}


class _StageProgress:
    """Lance's index-build events (lance.progress.IndexProgress: start / progress / complete per stage) as one
    rdscale Progress per stage. kwargs() is empty where this pylance has no progress_callback."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled = desc, enabled
        self.bar: Progress | None = None

    def __enter__(self) -> _StageProgress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, *exc)
            self.bar = None

    def kwargs(self) -> dict[str, Any]:
        import inspect

        if not self.enabled or "progress_callback" not in inspect.signature(lance.LanceDataset.create_index).parameters:
            return {}
        return {"progress_callback": self}

    def __call__(self, event) -> None:
        if event.event == "start" or self.bar is None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if not event.total:  # a stage of unknown size: nothing to count
                return
            unit = event.unit[:-1] if event.unit.endswith("s") else event.unit or "step"  # Progress adds the "s"
            self.bar = Progress(total=event.total, unit=unit, desc=f"{self.desc}: {event.stage}")
        if event.completed is not None and event.completed > self.bar.done:
            self.bar.update(event.completed - self.bar.done)
        if event.event == "complete":
            self.bar.close()
            self.bar = None


def build_lance_index(
    dataset_path: str | Path | Run,
    table: str = "proteins",
    width: int | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
    metric: str = "cosine",
    rebuild: bool = False,
    progress: bool = False,
    *,
    ivf_centroids: np.ndarray | None = None,
    **params: Any,
) -> IndexInfo:
    """Materialise the width-``width`` prefix column of ``table`` and build a vector index on it (``progress``: a
    bar per stage of Lance's build, where this pylance reports them).

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

    unknown = sorted(set(params) - LANCE_PARAMS)
    if unknown:
        raise SearchError(f"unknown Lance index parameter(s) {unknown}; expected some of {sorted(LANCE_PARAMS)}")
    resolved = {**default_index_params(index_type, num_rows, width), **params}
    for key in _INTEGER_PARAMS & set(resolved):  # --param values are YAML: "abc" or 2.5 (ranges: Lance says)
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise SearchError(f"{index_type} parameter {key}={value!r} must be an integer")
        if not 0 <= value < 1 << 32:  # Lance's are unsigned (u32 or usize): refused before the prefix is written
            raise SearchError(f"{index_type} parameter {key}={value!r} must be an integer in [0, {(1 << 32) - 1:,}]")
    if resolved["num_partitions"] > num_rows:
        raise SearchError(f"num_partitions={resolved['num_partitions']} exceeds the {num_rows} rows of {table}")
    column = materialize_prefix(ds, width)
    ds = reopen(ds)  # the version with the new column
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

    if ivf_centroids is None and resolved["num_partitions"] > 1:
        ivf_centroids = _train_centroids(ds, column, info, resolved)
    for other_name, other in existing.items():  # one vector index per column: search must not guess
        if other["column"] == column and other_name != name:
            ds.drop_index(other_name)
    try:
        with _StageProgress(f"indexing {table} (width {width}, {index_type})", progress) as stages:
            extra = {} if ivf_centroids is None else {"ivf_centroids": ivf_centroids}
            ds.create_index(column, index_type, name=name, metric=metric, replace=True, **resolved, **extra,
                            **stages.kwargs())
    except (ValueError, TypeError, OSError, RuntimeError, OverflowError) as err:  # Lance's answer to a bad --param
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OverflowError):  # a negative or huge value for one of Lance's unsigned integers
            text = f"a parameter is out of range ({text})"
        head, sep, tail = text.rpartition(", /")  # drop the Rust source location Lance appends
        raise SearchError(f"cannot build the Lance {index_type} index on {column} with {resolved}: "
                          f"{head if sep and '.rs:' in tail else text}") from None

    ds = reopen(ds)
    record = {**_recorded_indexes(ds), column: _jsonable(asdict(info))}
    ds.update_schema_metadata({INDEXES_KEY: json.dumps(record, sort_keys=True)})
    return info


_SAMPLE_PER_PARTITION = 256  # Lance's own k-means sample rate


def _train_centroids(ds: lance.LanceDataset, column: str, info: IndexInfo, params: dict) -> np.ndarray:
    """(num_partitions, width) float32 IVF centroids trained (Lance's k-means) on a fixed-seed sample of the rows
    that leaves out the calibration rows (rdscale.search.calibrate.sample_positions). Lance trains on every row
    it samples, calibration rows included: a held-out query then sits in a partition fitted to it, and recall
    measured on those rows reads high (0.996 where fresh queries read 0.987 at the same nprobes)."""
    n = info.num_rows
    held = sample_positions(n)
    rest = np.setdiff1d(np.arange(n), held)  # (n - m,) positions k-means may see
    want = int(params.get("sample_rate", _SAMPLE_PER_PARTITION)) * int(params["num_partitions"])
    rng = np.random.default_rng(len(rest))
    rows = np.sort(rng.choice(rest, size=min(want, len(rest)), replace=False))
    block = _embedding_block(ds.take(rows, columns=[column]).column(column), info.width)  # (s, width)
    block = np.array(block, np.float32)  # (s, width) a writable copy
    if info.metric == "cosine":  # Lance's KMeans refuses cosine; its cosine index normalises, then clusters by l2
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-30)
    from lance.util import KMeans

    kmeans = KMeans(int(params["num_partitions"]), metric_type="l2", max_iters=int(params.get("max_iterations", 50)))
    kmeans.fit(block)
    return np.stack(kmeans.centroids.to_numpy(zero_copy_only=False)).astype(np.float32)


def store_calibration(dataset_path: str | Path | Run, info: IndexInfo, calibration: dict) -> None:
    """Record ``calibration`` (rdscale.search.calibrate) beside the index's parameters in ``rdscale.indexes``."""
    ds = open_table(dataset_path, info.table)
    record = _recorded_indexes(ds)
    record[info.column] = {**_jsonable(asdict(info)), "calibration": _jsonable(calibration)}
    ds.update_schema_metadata({INDEXES_KEY: json.dumps(record, sort_keys=True)})


def index_centroids(dataset_path: str | Path | Run, info: IndexInfo) -> np.ndarray | None:
    """(num_partitions, width) float32 IVF centroids of ``info``'s Lance index (None when this pylance does not
    report them): a calibration twin built with them has the served index's partitions (Lance's k-means takes
    no seed, so a twin that trains its own gets others, and its recall curve does not transfer)."""
    import os

    ds = open_table(dataset_path, info.table)
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "true")  # this pylance warns without it; later ones need it
    stats = ds.stats.index_stats(info.index_name)
    parts = [p.get("centroids") for p in stats.get("indices", [])]
    if len(parts) != 1 or parts[0] is None:  # a single segment's centroids (a distributed build has several)
        return None
    centroids = np.asarray(parts[0], np.float32)  # (num_partitions, width)
    return centroids if centroids.ndim == 2 and centroids.shape[1] == info.width else None


def list_lance_indexes(dataset_path: str | Path | Run, table: str = "proteins") -> list[IndexInfo]:
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
        calibration = rec.get("calibration") or {} if params else {}
        infos.append(IndexInfo(table, width, column, name, idx["index_type"], idx["metric"], num_rows, params,
                               calibration=calibration))
    return sorted(infos, key=lambda i: (i.width, i.metric))


def _index_hint(dataset_path: str | Path | Run, table: str, width: int, metric: str) -> str:
    return f"rdscale index {Run.of(dataset_path)} --table {table} --width {width} --metric {metric}"


