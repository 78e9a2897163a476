"""FAISS vector indexes on a chain-level prefix (the ``faiss`` backend of ``rdscale index``; extra ``rdscale[faiss]``).

An index is built by streaming the prefix of the ``embedding`` column out of the Lance table in batches (the
prefix column ``embedding_p<w>`` when it exists) and lives inside the run directory (on an object store: objects
under the run's prefix, fetched once per node into rdscale's object cache by searchers), so the run stays
relocatable: ``<run>/indexes/<table>.p<width>.<metric>.faiss`` plus a JSON sidecar (same name, ``.json``) with
the index type, parameters, the metric and the table layout it was built from (row count and fragments, to tell
a stale index). The sidecar holds no paths. FAISS labels are row positions in the table's scan order (fragment
by fragment), the same positions a ``Searcher`` keeps its resident matrix in.

Index types: ``HNSW`` (IndexHNSWFlat; graph search, no training; the default), ``IVF_FLAT`` (inverted lists
over exact vectors) and ``IVF_PQ`` (inverted lists over product-quantised codes: compact, for large tables and
residues). Cosine indexes hold unit-normalised prefixes and search by inner product (distance ``1 - ip``); l2
indexes hold the raw prefixes (distance: squared Euclidean).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import lance
import numpy as np

from rdscale.io.location import Location
from rdscale.io.runs import Run
from rdscale.progress import Progress
from rdscale.search.exact import unit_rows
from rdscale.search.names import DEFAULT_FAISS_INDEX_TYPE, FAISS_INDEX_TYPES  # noqa: F401
from rdscale.search.tables import (
    EMBEDDING,
    IndexInfo,
    SearchError,
    _column_is_complete,
    _embedding_block,
    _jsonable,
    prefix_column,
    stored_width,
)

_BUILD_ROWS = 16384  # rows streamed per add() batch


_FAISS = None  # the faiss module, once imported


def import_faiss():
    global _FAISS
    if _FAISS is not None:  # every search calls this: setLevel clears every logger's cache (0.1 ms a query)
        return _FAISS
    import logging

    if not logging.getLogger("rdscale").isEnabledFor(logging.DEBUG):
        # faiss logs each CPU-specific library it fails to find (AVX512, AVX2) at INFO: noise on a user's terminal
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise SearchError("the faiss backend needs faiss-cpu: pip install 'rdscale[faiss]' (or use --backend lance)")
    _FAISS = faiss
    return faiss


def faiss_name(table: str, width: int, metric: str) -> str:
    """The file name of the FAISS index of ``table`` at ``width`` (in the run's `Run.index_dir`)."""
    return f"{table}.p{width}.{metric}.faiss"


def faiss_path(run: str | Path | Run, table: str, width: int, metric: str) -> Path:
    """The index file of a local run."""
    return _local_or_remote(Run(run).index_dir.join(faiss_name(table, width, metric)))


def _local_or_remote(where: Location) -> Path | Location:
    """A Path for a local file (written through Python's file and renamed into place), else the Location."""
    return Path(where.uri) if where.is_local else where


def table_layout(ds: lance.LanceDataset) -> list[list[int]]:
    """[[fragment id, rows], ...] in scan order: what the FAISS labels (row positions) refer to."""
    return [[f.fragment_id, f.count_rows()] for f in ds.get_fragments()]


def default_faiss_params(index_type: str, num_rows: int, width: int) -> dict[str, int]:
    """HNSW: m=32 links, ef_construction=80. IVF: nlist ~ sqrt(n) (at most n / 39, the rows FAISS wants per
    centroid to train), nprobe = max(1, nlist / 16). PQ: m = width / 8 sub-quantisers (a divisor of width), 8 bits."""
    if index_type == "HNSW":
        return {"m": 32, "ef_construction": 80}
    nlist = max(1, min(round(math.sqrt(num_rows)), num_rows // 39))
    params = {"nlist": nlist, "nprobe": max(1, nlist // 16)}
    if index_type == "IVF_PQ":
        target = max(1, width // 8)
        params["pq_m"] = max(m for m in range(1, target + 1) if width % m == 0)
        params["pq_bits"] = 8 if num_rows >= 39 * 256 else 4
    return params


def _stream(ds: lance.LanceDataset, width: int, batch_rows: int = _BUILD_ROWS, fragments: list | None = None):
    """(b, width) float32 blocks of the prefix, in scan order."""
    column = prefix_column(width, stored_width(ds))
    if not _column_is_complete(ds, column):
        column = EMBEDDING
    for batch in ds.scanner(columns=[column], batch_size=batch_rows, fragments=fragments).to_batches():
        if batch.num_rows:
            yield np.ascontiguousarray(_embedding_block(batch.column(column), width), dtype=np.float32)


def _sample(ds: lance.LanceDataset, width: int, n: int, num_rows: int, seed: int = 0,
            fragments: list | None = None) -> np.ndarray:
    """(n, width) float32 training rows drawn uniformly from the table (or from ``fragments``)."""
    rows = np.sort(np.random.default_rng(seed).choice(num_rows, size=min(n, num_rows), replace=False))
    if fragments is not None:  # a partition: read it (training sets are small next to what indexing streams)
        col = ds.scanner(columns=[EMBEDDING], fragments=fragments).to_table().column(EMBEDDING)
        return np.ascontiguousarray(_embedding_block(col, width)[rows], dtype=np.float32)
    taken = ds.take(rows.tolist(), columns=[EMBEDDING])
    return np.ascontiguousarray(_embedding_block(taken.column(EMBEDDING), width), dtype=np.float32)


def build_faiss_index(
    ds: lance.LanceDataset,
    table: str,
    width: int,
    index_type: str = DEFAULT_FAISS_INDEX_TYPE,
    metric: str = "cosine",
    rebuild: bool = False,
    progress: bool = False,
    builder=None,
    **params: Any,
) -> IndexInfo:
    """Build (or keep, if an identical fresh one exists) the FAISS index of ``table`` at prefix ``width``
    (``progress``: a bar of the rows added, which is most of an HNSW build's time). ``builder(ds, table, width,
    index_type, metric, params)``: builds and writes the index file instead (a distributed build)."""
    import_faiss()  # the one-line error when faiss-cpu is missing, before any work
    index_type = index_type.upper()
    if index_type not in FAISS_INDEX_TYPES:
        raise SearchError(f"unknown faiss index type {index_type!r}; expected one of {FAISS_INDEX_TYPES}")
    num_rows = ds.count_rows()
    resolved = {**default_faiss_params(index_type, num_rows, width), **params}
    unknown = set(resolved) - set(default_faiss_params(index_type, max(num_rows, 10_000), width))
    if unknown:
        raise SearchError(f"unknown {index_type} parameter(s) {sorted(unknown)}; expected "
                          f"{sorted(default_faiss_params(index_type, 10_000, width))}")
    name = faiss_name(table, width, metric)
    info = IndexInfo(table, width, prefix_column(width, stored_width(ds)), name, index_type, metric, num_rows,
                     _jsonable(resolved), backend="faiss")
    old = _read_sidecar(ds, name)
    if not rebuild and old is not None and _exists(ds, name):
        if (old.get("index_type"), old.get("params"), old.get("layout")) == (index_type, info.params,
                                                                            table_layout(ds)):
            return replace(info, calibration=old.get("calibration") or {})

    if builder is None:
        index = build_in_memory(ds, width, index_type, metric, resolved, table=table, progress=progress)
        write_index(ds, table, width, metric, index)
    else:  # e.g. rdscale.cluster.index: built and written by Ray tasks, the driver holding the training rows only
        builder(ds, table, width, index_type, metric, resolved)
    record = {"table": table, "width": width, "metric": metric, "index_type": index_type, "params": info.params,
              "num_rows": num_rows, "layout": table_layout(ds), "file": name}
    try:
        _write_sidecar(ds, name, record)  # last: an index without its sidecar is rebuilt, never trusted
    except (RuntimeError, OSError) as err:
        raise SearchError(f"cannot write the faiss index {_index_location(ds, name)}: {_write_error(err)}") from None
    return info


def write_index(ds: lance.LanceDataset, table: str, width: int, metric: str, index) -> None:
    """Write ``index`` as the FAISS index file of ``table`` at ``width`` (the sidecar is written after)."""
    faiss = import_faiss()
    name = faiss_name(table, width, metric)
    where = _index_location(ds, name)
    try:
        if isinstance(where, Path):
            where.parent.mkdir(parents=True, exist_ok=True)
            _write_file(faiss, index, where)
        else:  # an object beside the run (<run>/indexes/...): searchers fetch it once into their node's cache
            with tempfile.TemporaryDirectory(prefix="rdscale-faiss-") as tmp:
                _write_file(faiss, index, Path(tmp) / name)
                where.write_bytes((Path(tmp) / name).read_bytes())
    except (RuntimeError, OSError) as err:  # FAISS passes the writer's error on as a RuntimeError with its text
        raise SearchError(f"cannot write the faiss index {where}: {_write_error(err)}") from None


def _write_file(faiss, index, path: Path) -> None:
    """Write through Python's file, then rename into place: FAISS's own writer leaves a short file on a full disk
    without a word (fclose's error is not checked), Python raises the OSError, and fsync surfaces what the page
    cache still held. Nothing is left behind on failure."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


_WRITE_ERRORS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


def _write_error(err: BaseException) -> str:
    """What a failed index write needs to tell: the OS's reason when FAISS's message or the OSError carries one."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    text = str(err)
    found = next((reason for reason in _WRITE_ERRORS if reason.lower() in text.lower()), None)
    if found:
        return found.lower()
    if "write error" in text or "ret == " in text:  # FAISS's check after fwrite: a short write is a full disk
        return "write failed (no space left on device?)"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _index_location(ds: lance.LanceDataset, name: str):
    """``<run>/indexes/<name>`` (`Run.index_dir`): a Path for a local run, a Location on an object store."""
    return _local_or_remote(Run.of(ds.uri).index_dir.join(name))


def _exists(ds: lance.LanceDataset, name: str) -> bool:
    where = _index_location(ds, name)
    return where.is_file() if isinstance(where, Path) else where.exists()


def _sidecar_name(name: str) -> str:
    return name[: -len(".faiss")] + ".json" if name.endswith(".faiss") else name + ".json"


def _read_sidecar(ds: lance.LanceDataset, name: str) -> dict | None:
    where = _index_location(ds, _sidecar_name(name))
    try:
        return json.loads(where.read_text())
    except (OSError, ValueError):  # missing (a LocationError is an OSError or ValueError too) or not JSON
        return None


def _write_sidecar(ds: lance.LanceDataset, name: str, record: dict) -> None:
    where = _index_location(ds, _sidecar_name(name))
    if isinstance(where, Path):
        tmp = where.with_name(where.name + f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, where)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    else:
        where.write_text(json.dumps(record, indent=1))


_LOWEST = {"m": 2, "pq_bits": 1}  # HNSW needs two links per node; every other parameter at least 1
_HIGHEST = {"pq_bits": 16}  # FAISS's product quantiser codes are at most 16 bits
_INT_MAX = 2**31 - 1  # FAISS's parameters are C ints: a larger value ends in a SWIG TypeError


def _check_values(index_type: str, params: dict[str, Any]) -> None:
    """Every FAISS parameter is an integer in its range (a bad --param is one line, not FAISS's abort or a
    ZeroDivisionError)."""
    for key, value in params.items():
        low, high = _LOWEST.get(key, 1), _HIGHEST.get(key, _INT_MAX)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
                high is not None and value > high):
            too_big = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > high
            bounds = f"between {low} and {high}" if high != _INT_MAX else (
                f"between {low} and {high:,} (FAISS takes C ints)" if too_big else f"at least {low}")
            raise SearchError(f"{index_type} parameter {key}={value!r} must be an integer {bounds}")


def build_in_memory(ds: lance.LanceDataset, width: int, index_type: str, metric: str, params: dict[str, Any],
                    table: str = "table", fragments: list | None = None, progress: bool = False):
    """A FAISS index over the width-``width`` prefix of ``ds`` (or of its ``fragments`` only, in that order),
    streamed in batches; labels are row positions in that scan order."""
    index = trained_empty(ds, width, index_type, metric, params, table, fragments)
    return add_rows(index, ds, width, metric, table, fragments, progress)


def trained_empty(ds: lance.LanceDataset, width: int, index_type: str, metric: str, params: dict[str, Any],
                  table: str = "table", fragments: list | None = None):
    """An empty FAISS index (IVF: trained on a uniform sample of max(64 nlist, 16384) rows of ``ds`` or its
    ``fragments``; that sample is all of the table it holds in memory)."""
    _check_values(index_type, params)  # --param values are YAML: "abc", 0, -1 or 2.5 would reach FAISS
    faiss = import_faiss()
    frags = fragments if fragments is not None else ds.get_fragments()
    num_rows = sum(f.count_rows() for f in frags)
    ip = metric == "cosine"
    faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    if index_type == "HNSW":
        index = faiss.IndexHNSWFlat(width, int(params["m"]), faiss_metric)
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        nlist = int(params["nlist"])
        if nlist < 1 or nlist > num_rows:
            raise SearchError(f"nlist={nlist} must be between 1 and the {num_rows} rows of {table}")
        quantizer = faiss.IndexFlat(width, faiss_metric)
        if index_type == "IVF_FLAT":
            index = faiss.IndexIVFFlat(quantizer, width, nlist, faiss_metric)
        else:
            pq_m = int(params["pq_m"])
            if width % pq_m:
                raise SearchError(f"pq_m={pq_m} must divide the width {width}")
            index = faiss.IndexIVFPQ(quantizer, width, nlist, pq_m, int(params["pq_bits"]), faiss_metric)
        train = _sample(ds, width, max(64 * nlist, 256 * 64), num_rows, fragments=fragments)
        index.train(unit_rows(train) if ip else train)
        index.nprobe = int(params["nprobe"])
    return index


# FAISS classes -> the index types users name (`--index-type`), for progress lines
_TYPE_NAMES = {"IndexHNSWFlat": "HNSW", "IndexIVFFlat": "IVF_FLAT", "IndexIVFPQ": "IVF_PQ"}


def add_rows(index, ds: lance.LanceDataset, width: int, metric: str, table: str = "table",
             fragments: list | None = None, progress: bool = False):
    """``index`` with the width-``width`` prefixes of ``ds`` (or of its ``fragments``, in that order) added,
    streamed in batches; labels are row positions in that scan order (from 0)."""
    ip = metric == "cosine"
    frags = fragments if fragments is not None else ds.get_fragments()
    num_rows = sum(f.count_rows() for f in frags)
    added = 0
    kind = _TYPE_NAMES.get(type(index).__name__, type(index).__name__)
    with Progress(total=num_rows, unit="row", desc=f"indexing {table} (width {width}, {kind})",
                  enabled=progress) as bar:
        for block in _stream(ds, width, fragments=fragments):
            index.add(unit_rows(block) if ip else block)
            added += len(block)
            bar.update(len(block))
    if added != num_rows:  # the table changed under us: do not keep an index whose labels are off
        raise SearchError(f"{table} changed while indexing ({added} rows read, {num_rows} expected); rerun")
    return index


def list_faiss_indexes(ds: lance.LanceDataset, table: str) -> list[IndexInfo]:
    """FAISS indexes of ``table`` in its run directory (fresh or stale; see ``is_fresh``)."""
    out = []
    folder = _local_or_remote(Run.of(ds.uri).index_dir)
    if isinstance(folder, Path):
        names = [p.name for p in folder.glob(f"{table}.p*.json")] if folder.is_dir() else []
    else:  # an object-store run: the objects beside it
        try:
            names = [loc.name for loc in folder.list()]
        except (OSError, ValueError):
            names = []
    present = set(names) if not isinstance(folder, Path) else None
    full = stored_width(ds)
    for sidecar in sorted(n for n in names if n.startswith(f"{table}.p") and n.endswith(".json")):
        try:
            rec = json.loads((folder / sidecar).read_text())
        except (OSError, ValueError):
            continue
        have = (folder / str(rec.get("file"))).is_file() if present is None else str(rec.get("file")) in present
        if rec.get("table") != table or not have:
            continue
        width = int(rec["width"])
        out.append(IndexInfo(table, width, prefix_column(width, full), rec["file"], rec["index_type"],
                             rec["metric"], int(rec["num_rows"]), rec.get("params", {}), backend="faiss",
                             calibration=rec.get("calibration") or {}))
    return sorted(out, key=lambda i: (i.width, i.metric))


def is_fresh(ds: lance.LanceDataset, info: IndexInfo) -> bool:
    """True if the table still has the layout the index was built from (its labels still mean the same rows)."""
    record = _read_sidecar(ds, info.index_name)
    return record is not None and record.get("layout") == table_layout(ds)


def store_calibration(ds: lance.LanceDataset, info: IndexInfo, calibration: dict) -> None:
    """Record ``calibration`` (rdscale.search.calibrate) in the index's sidecar."""
    record = _read_sidecar(ds, info.index_name)
    if record is None:
        raise SearchError(f"the sidecar of {info.index_name} vanished while it was calibrated; rebuild the index")
    record["calibration"] = calibration
    _write_sidecar(ds, info.index_name, record)


def load_faiss_index(ds: lance.LanceDataset, info: IndexInfo):
    faiss = import_faiss()
    path = _index_location(ds, info.index_name)
    if not isinstance(path, Path):  # an object beside an object-store run: fetched once into the node's cache
        path = path.local_copy()
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise SearchError(f"cannot read the faiss index {path}: {str(err).splitlines()[0]}; rebuild it") from err


def faiss_search(index, info: IndexInfo, q: np.ndarray, k: int, nprobes: int | None = None, ef: int | None = None,
                 rows: np.ndarray | None = None, n_total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((nq, k) distances, (nq, k) row positions, -1 where fewer were found) of raw queries ``q`` (nq, width).

    ``rows``: restrict to these positions (a filter; FAISS skips the others while searching). ``ef`` (HNSW search
    breadth, default max(64, k)) and ``nprobes`` (IVF lists probed, default the index's) are per call."""
    faiss = import_faiss()
    q = np.ascontiguousarray(q[:, : info.width], dtype=np.float32)
    if info.metric == "cosine":
        q = unit_rows(q)
    sel = None
    if rows is not None:
        bitmap = np.zeros(int(n_total), dtype=bool)
        bitmap[rows] = True
        packed = np.packbits(bitmap, bitorder="little")
        sel = faiss.IDSelectorBitmap(int(n_total), faiss.swig_ptr(packed))
    if info.index_type == "HNSW":
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(max(ef or 64, k))
    else:
        params = faiss.SearchParametersIVF()
        ivf = faiss.extract_index_ivf(index)
        params.nprobe = int(min(nprobes or ivf.nprobe, ivf.nlist))
    if sel is not None:
        params.sel = sel
    dist, labels = index.search(q, int(k), params=params)
    if info.metric == "cosine":
        dist = 1.0 - dist
    return dist.astype(np.float32), labels.astype(np.int64)
