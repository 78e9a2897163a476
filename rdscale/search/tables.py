"""Opening an rdscale run's tables for search: table names and keys, widths (chain levels), prefix columns, the
errors search raises, and reading a fixed-size-list embedding column as a numpy block.

Conventions (shared by every module of rdscale.search):

- Tables: ``<run>/proteins.lance`` (key ``id``) and ``<run>/residues.lance`` (key ``id``, ``pos``); see
  docs/architecture.md, "store". ``dataset_path`` is a `rdscale.io.runs.Run`, a run directory (path or URI), or a
  ``*.lance`` directory itself; `Run.of` turns each into the run.
- Widths: a search width must be a chain level (schema metadata ``rdscale.levels``) no larger than the stored
  width, or the stored width itself (residues may be stored narrower than the widest level).
- Scores are distances, smaller = closer: ``cosine`` -> ``1 - cos(q, x)`` on the width-``w`` prefixes (each
  prefix normalised on its own), in [0, 2]; ``l2`` -> squared Euclidean distance (Lance's convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa

from rdscale.errors import RdscaleError
from rdscale.io.runs import INDEX_DIR, PROTEINS, RESIDUES, Run, dataset_exists, open_dataset, table_location
from rdscale.search.names import (  # noqa: F401 - re-exported
    BACKENDS,
    DEFAULT_INDEX_TYPE,
    INDEX_TYPES,
    METRICS,
    MODES,
    TABLES,
)

EMBEDDING = "embedding"
LEVELS_KEY = "rdscale.levels"
INDEXES_KEY = "rdscale.indexes"
_SCAN_ROWS = 32768  # rows per batch of the exact scan: (32768, 1280) float32 is 168 MB


class SearchError(RdscaleError, ValueError):
    """Bad input to indexing or search: the message says what is wrong and what to do instead."""


class KeyNotFoundError(SearchError):
    """A query key (protein id, or id:pos) that the table does not hold."""


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
    backend: str = "lance"  # "lance" (Lance's index on the prefix column) or "faiss" (<run>/indexes/<index_name>)
    # recall curves measured when it was built (rdscale.search.calibrate): {"k", "target", "ann": [...], ...}
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def where(self) -> str:
        """Where the index is, for a reader: its file relative to the run (faiss), or its column (lance)."""
        return f"{INDEX_DIR}/{self.index_name}" if self.backend == "faiss" else self.column


# ---------------------------------------------------------------------------------------------------------------
# opening tables, widths, columns


def open_table(dataset_path: str | Path | Run, table: str = PROTEINS,
               version: int | str | None = None) -> lance.LanceDataset:
    """The Lance dataset of ``table`` in the run ``dataset_path`` (or ``dataset_path`` itself if it is a table);
    ``version``: an earlier table version or tag (a release of `rdscale update`), default the latest."""
    if table not in TABLES:
        raise SearchError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
    path = dataset_path.table(table) if isinstance(dataset_path, Run) else table_location(dataset_path, table)
    if not dataset_exists(path):
        if table == RESIDUES and Run.of(path).has_table(PROTEINS):
            raise SearchError(f"the run at {path.parent} has no residues table (it was run with output.residues: "
                              "false); search --table proteins instead")
        raise SearchError(f"no Lance dataset at {path} (is {dataset_path} an rdscale run directory?)")
    try:
        ds = open_dataset(path, version=version)
    except (ValueError, OSError) as err:
        if version is None:
            raise
        raise SearchError(f"{path} has no version or release {version!r} ({str(err).splitlines()[0][:200]}); "
                          "`rdscale info` lists the releases") from None
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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def reopen(ds: lance.LanceDataset) -> lance.LanceDataset:
    """The latest version of ``ds``, opened with its location's storage options."""
    return open_dataset(ds.uri)


# ---------------------------------------------------------------------------------------------------------------
# distances


def _check_metric(metric: str) -> str:
    metric = metric.lower()
    if metric == "euclidean":
        metric = "l2"
    if metric not in METRICS:
        raise SearchError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return metric




def run_metadata(ds: lance.LanceDataset, key: str) -> dict:
    raw = (ds.schema.metadata or {}).get(key.encode())
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise SearchError(f"{ds.uri}: schema metadata {key!r} is not valid JSON; the table was not written by rdscale")
