"""The query service behind ``rdscale serve``: JSON-shaped requests in, JSON-shaped answers out, over long-lived
Searchers (one per table, loaded once). Plain Python, no Ray and no HTTP: rdscale.cluster.serve puts it behind
Ray Serve and FastAPI; tests and the benchmark call it in-process.

A request is a dict with exactly one of ``ids`` (protein ids; for residues ``"ID:POS"`` or a bare ``"ID"``),
``sequences`` ({name: sequence}, embedded through the run's chain) or ``vectors`` (a list of equal-length lists
of numbers), plus any of the ``search`` options: table, k, mode, width, metric, filter, shortlist, rerank_width,
nprobes, refine_factor, ef, exclude_self, backend, aggregate, residue_hits, recall. The answer lists the hits as rows,
exactly the rows ``rdscale search`` prints and writes: ``{"queries": n, "hits": [{"query", "id", ["pos"],
"score", "rank", ["hits"]}, ...]}``. Bad requests raise ``SearchError`` (``KeyNotFoundError`` for unknown keys).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from rdscale.search.searcher import Searcher, num_queries
from rdscale.search.tables import TABLES, KeyNotFoundError, SearchError, open_table  # noqa: F401

OPTIONS = ("k", "mode", "width", "metric", "filter", "shortlist", "rerank_width", "nprobes", "refine_factor", "ef",
           "exclude_self", "backend", "aggregate", "residue_hits", "recall")
QUERY_KINDS = ("ids", "sequences", "vectors")


def _tables_of(run: str | Path) -> list[str]:
    """The tables the run holds, on a local disk or an object store (a Path test would find none on s3://)."""
    from rdscale.io.runs import Run

    return [t for t in TABLES if Run(run).has_table(t)]


def run_name(run: str | Path) -> str:
    """The run's last path component (``s3://bucket/runs/x`` -> ``x``), never its bucket or credentials."""
    from rdscale.io.location import Location

    return Location.parse(run).name


def parse_key(text: str, table: str):
    """``ID:POS`` -> (ID, POS) for residues; anything else is the key itself."""
    if table == "residues":
        head, sep, tail = text.rpartition(":")
        if sep and head and tail.isdigit():
            return head, int(tail)
    return text


class SearchService:
    """Searchers over the tables of one run, kept for the life of the service (a server replica)."""

    def __init__(self, run: str | Path, tables: list[str] | None = None, preload: bool = True,
                 models: list[str] | None = None, device: str | None = None):
        self.run = str(run)
        wanted = tables or _tables_of(run)
        if not wanted:
            open_table(run, "proteins")  # raises the usual "no Lance dataset" error
        self.searchers = {t: Searcher(run, t, models=models, device=device) for t in wanted}
        self._lock = threading.Lock()
        if preload:  # pay the loading once, before the first request, not inside it
            for s in self.searchers.values():
                s.load()

    def info(self) -> dict[str, Any]:
        for s in self.searchers.values():
            s.recheck_indexes()
        return {
            "run": run_name(self.run),
            "tables": {
                t: {
                    "rows": s.num_rows,
                    "width": s.full_width,
                    "levels": s.levels,
                    "indexes": [{"width": i.width, "metric": i.metric, "backend": i.backend,
                                 "index_type": i.index_type, "recall": recall_info(i)} for i in s.indexes()],
                }
                for t, s in self.searchers.items()
            },
        }

    def search(self, request: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise SearchError("the request must be a JSON object")
        unknown = set(request) - {*OPTIONS, *QUERY_KINDS, "table"}
        if unknown:
            raise SearchError(f"unknown request field(s) {sorted(unknown)}; expected some of "
                              f"{['table', *QUERY_KINDS, *OPTIONS]}")
        table = request.get("table") or "proteins"
        if table not in self.searchers:
            raise SearchError(f"unknown table {table!r}; this server holds {sorted(self.searchers)}")
        searcher = self.searchers[table]
        given = [kind for kind in QUERY_KINDS if request.get(kind) is not None]
        if len(given) != 1:
            raise SearchError(f"give exactly one of {list(QUERY_KINDS)}, got {given or 'none'}")
        options = {name: request[name] for name in OPTIONS if request.get(name) is not None}
        kind = given[0]
        value = request[kind]
        if kind == "ids":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise SearchError("ids must be a non-empty list of strings")
            result = searcher.search(ids=[parse_key(v, table) for v in value], **options)
        elif kind == "sequences":
            if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
                raise SearchError("sequences must be a non-empty object {name: sequence}")
            result = searcher.search_sequences(value, **options)
        else:
            result = searcher.search(vectors_of(value), **options)
        rows = result.to_pylist()
        for row in rows:  # float32 -> the nearest float64 repr a client reads back exactly
            row["score"] = float(np.float32(row["score"]))
        return {"queries": num_queries(result), "hits": rows}


def recall_info(info) -> dict[str, Any] | None:
    """An index's calibration for clients: k, target, the default point per mode and the measured curves (each
    point: params, recall, recall_low (one-sided 95 % bound), cost); None for an uncalibrated index."""
    cal = info.calibration or {}
    if not cal:
        return None
    return {"k": cal.get("k"), "target": cal.get("target"), "queries": cal.get("queries"),
            "default": cal.get("default", {}), "reached": cal.get("reached", {}),
            "curves": {mode: cal.get(mode, []) for mode in ("ann", "funnel")}}


def vectors_of(value: Any) -> np.ndarray:
    """(q, w) float32 from a JSON list of equal-length lists of finite numbers (or one list: one query)."""
    if not isinstance(value, list) or not value:
        raise SearchError("vectors must be a non-empty list of lists of numbers")
    rows = value if isinstance(value[0], list) else [value]
    widths = {len(r) if isinstance(r, list) else -1 for r in rows}
    if len(widths) != 1 or -1 in widths or 0 in widths:
        raise SearchError(f"vectors must be lists of numbers of one length, got lengths {sorted(widths)}")
    try:
        q = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise SearchError("vectors must hold numbers only") from None
    if not np.isfinite(q).all() or np.abs(q).max() > math.ldexp(1.0, 127):
        raise SearchError("vectors hold NaN, inf or numbers beyond float32")
    return q.astype(np.float32)
