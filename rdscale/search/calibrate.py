"""Recall as a setting: calibrate a vector index at build time, pick search parameters for a recall at query time.

``rdscale index`` measures each index it builds on held-out calibration queries and stores the curve with it
(the FAISS sidecar JSON, or Lance's ``rdscale.indexes`` schema record); ``search`` then uses the cheapest measured
point that meets the recall asked for (``recall=``), by default the index's calibration target (0.95 at k = 10).

Calibration queries: ``NUM_QUERIES`` rows of the table drawn with a fixed seed (``CALIBRATION_SEED``), held out:
the curve is measured on a twin of the index (same type and parameters) built over the table without them, so
that a query is not a node of the graph it searches (an HNSW walk reaches an indexed row's own neighbours far more
easily than a new query's: measured on the index itself, recall reads ~1 % high). A Lance index's IVF centroids
are trained without them too, and its twin reuses them (rdscale.search.lance_index: Lance's k-means is unseeded,
and a partition fitted to a query row reads high). A query's exact duplicates
(rows storing the same vector) are left out of both the truth and the answers. Truth: exact top-k at the index
width (``ann``) and at the stored width (``funnel``: the shortlist re-ranked at full width, the default rerank
width).

The grid (``axes``): HNSW search breadth ``ef`` (FAISS and Lance's IVF_HNSW_*), IVF lists probed ``nprobe`` /
``nprobes`` (doubling up to the number of lists), Lance's ``refine_factor`` for quantised indexes in ann mode,
and the funnel ``shortlist``. It is walked greedily from the cheapest corner: each step raises one axis by one
notch, the one with the largest recall gain per unit of cost, until the measured recall reaches ``STOP_RECALL``
(and its bound ``STOP_LOW``) on both halves of the queries, or the grid ends. Each step is a point of the curve.
The walk steers by half of the queries; every point's recall is then read on the other half (a point picked among
noisy ones reads high on the queries that picked it). Cost is a model of the work per query (vector numbers
read, see ``cost``), not a timing: the machine a run is indexed on is not the one it is served on, and a model
picks the same point each time. Measured milliseconds per query are stored beside it, for information.

A point "meets" recall R when its lower confidence bound (mean per-query recall minus 2.326 standard errors,
one-sided 99 %) is at least R: the calibration queries are a sample, and the queries a user asks are others.
A backend whose builds take no seed (Lance: its SQ bounds and HNSW graphs differ from one build to the next) is
read on two twin builds, and each point keeps the lower of the two readings: the bound then covers how far the
served build may fall from a twin, which one twin alone cannot show.

The math (``choose``, ``walk``, ``cost``, ``recall_rows``) does no I/O; ``calibrate_index`` runs the searches
through a ``Searcher``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rdscale.search.tables import IndexInfo, SearchError

DEFAULT_RECALL = 0.95
DEFAULT_K = 10
NUM_QUERIES = 500
MIN_ROWS = 100  # smaller tables are not calibrated: ten neighbours out of a few dozen rows measure nothing
CALIBRATION_SEED = 2_000_003  # rows drawn for calibration; tests and benches query with their own generators
STOP_RECALL = 0.997  # the walk stops once a point measures this mean recall ...
STOP_LOW = 0.99  # ... and this lower bound (so that every target up to 0.99 is on the curve)
MAX_STEPS = 40
Z_ONE_SIDED_99 = 2.326
_EXTRA = 16  # neighbours fetched beyond k to drop a query's own row and its duplicates

EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SHORTLIST_GRID = (10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1200)
REFINE_GRID = (1, 2, 4, 8, 16)
MODES = ("ann", "funnel")


def _doubling(top: int) -> list[int]:
    out, v = [], 1
    while v < top:
        out.append(v)
        v *= 2
    return [*out, int(top)]


def axes(info: IndexInfo, mode: str, k: int) -> dict[str, list[int]]:
    """The search parameters calibrated for ``info`` in ``mode``, each with its grid (cheapest first)."""
    params = info.params or {}
    out: dict[str, list[int]] = {}
    hnsw = info.index_type == "HNSW" or "HNSW" in info.index_type
    if info.backend == "faiss":
        if hnsw:
            out["ef"] = [e for e in EF_GRID if e >= k] or [k]
        else:
            out["nprobes"] = _doubling(int(params.get("nlist", 1)))
    else:
        out["nprobes"] = _doubling(int(params.get("num_partitions", 1)))
        if hnsw:
            out["ef"] = [e for e in EF_GRID if e >= k] or [k]
        quantised = any(t in info.index_type for t in ("PQ", "SQ", "RQ"))
        if quantised and mode == "ann":
            out["refine_factor"] = list(REFINE_GRID)
    if mode == "funnel":
        out["shortlist"] = [s for s in SHORTLIST_GRID if s >= k] or [k]
    return out


def cost(info: IndexInfo, point: dict[str, int], k: int, full_width: int) -> float:
    """Work per query, in vector numbers read: a model that orders points, not a timing.

    HNSW: ~max(ef, fetched) nodes expanded, each comparing m neighbours at the index width. IVF: the nlist
    centroids, then nprobe lists of n / nlist rows (PQ: pq_m code bytes per row instead of width). Lance's
    IVF_HNSW: an HNSW walk in each probed partition. refine_factor: refine * k rows re-read at the width. Funnel:
    shortlist rows re-ranked at the stored width."""
    p = info.params or {}
    w, n = info.width, max(info.num_rows, 1)
    fetch = point.get("shortlist", k)
    per_row = int(p.get("pq_m", w)) if info.index_type == "IVF_PQ" and info.backend == "faiss" else w
    if info.backend == "faiss":
        if info.index_type == "HNSW":
            work = max(point.get("ef", 64), fetch) * int(p.get("m", 32)) * w
        else:
            nlist = int(p.get("nlist", 1))
            work = nlist * w + point["nprobes"] * (n / nlist) * per_row
    else:
        parts = int(p.get("num_partitions", 1))
        probes = point.get("nprobes", 1)
        if "HNSW" in info.index_type:
            work = parts * w + probes * max(point.get("ef", 64), fetch) * int(p.get("m", 20)) * w
        else:
            work = parts * w + probes * (n / parts) * w
    work += point.get("refine_factor", 0) * k * w
    if "shortlist" in point:
        work += point["shortlist"] * full_width
    return float(work)


def recall_rows(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(nq,) per-query recall@k: |found top-k ∩ truth top-k| / |truth top-k| ((nq, >=k) positions, -1 = none)."""
    out = np.empty(len(truth))
    for i, (f, t) in enumerate(zip(found, truth)):
        want = {int(x) for x in t[:k] if x >= 0}
        out[i] = len(want & {int(x) for x in f[:k] if x >= 0}) / max(len(want), 1)
    return out


def summarise(per_query: np.ndarray) -> tuple[float, float]:
    """(mean recall, its one-sided 99 % lower confidence bound)."""
    mean = float(per_query.mean())
    se = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, max(0.0, mean - Z_ONE_SIDED_99 * se)


def walk(grid: dict[str, list[int]], measure: Callable[[dict[str, int]], tuple[float, float]],
         price: Callable[[dict[str, int]], float], stop: float = STOP_RECALL, stop_low: float = 0.0,
         max_steps: int = MAX_STEPS, confirmed: Callable[[dict[str, int]], bool] | None = None
         ) -> list[dict[str, Any]]:
    """The greedy path through ``grid`` from its cheapest corner: each step raises the one axis whose next notch
    buys the most recall per unit of cost (the cheapest notch where none gains). ``measure(point)`` -> (recall,
    lower bound); ``price(point)`` -> cost. The walk stops at a point that measures ``stop`` and ``stop_low``
    and, when given, is ``confirmed(point)`` (calibrate_index: the held-out half agrees). Returns the points
    visited, in order: {params, recall, recall_low, cost}."""
    at = {name: 0 for name in grid}
    seen: dict[tuple, tuple[float, float]] = {}

    def point_of(idx: dict[str, int]) -> dict[str, int]:
        return {name: int(grid[name][i]) for name, i in idx.items()}

    def evaluate(idx: dict[str, int]) -> tuple[float, float]:
        key = tuple(sorted(idx.items()))
        if key not in seen:
            seen[key] = measure(point_of(idx))
        return seen[key]

    curve = []
    for _ in range(max_steps):
        recall, low = evaluate(at)
        here = point_of(at)
        curve.append({"params": here, "recall": round(recall, 4), "recall_low": round(low, 4),
                      "cost": price(here)})
        if recall >= stop and low >= stop_low and (confirmed is None or confirmed(here)):
            break
        steps = []
        for name in grid:
            if at[name] + 1 < len(grid[name]):
                nxt = {**at, name: at[name] + 1}
                gain = evaluate(nxt)[0] - recall
                extra = max(price(point_of(nxt)) - price(here), 1e-9)
                steps.append((gain / extra if gain > 0 else -extra, nxt))
        if not steps:
            break
        at = max(steps, key=lambda s: s[0])[1]
    return curve


def choose(curve: list[dict[str, Any]], recall: float) -> dict[str, Any] | None:
    """The cheapest point of ``curve`` whose lower bound meets ``recall``; None when none does."""
    meeting = [p for p in curve if p["recall_low"] >= recall]
    return min(meeting, key=lambda p: p["cost"]) if meeting else None


def check_recall(recall: Any) -> float:
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < float(recall) <= 1:
        raise SearchError(f"recall must be a number in (0, 1], got {recall!r}")
    return float(recall)


def search_params(info: IndexInfo, mode: str, k: int, recall: float | None) -> dict[str, int]:
    """The calibrated parameters for ``mode`` at ``recall`` (None: the index's target), scaled to ``k``.

    Raises SearchError when the index holds no calibration, or when no measured point meets ``recall``
    (the message gives the best recall measured). Without ``recall``, an index whose target was not reached
    uses its best point (``rdscale index`` warned when it was built)."""
    cal = info.calibration or {}
    curve = cal.get(mode)
    hint = f"`rdscale index --width {info.width} --backend {info.backend} --rebuild`"
    if not curve:
        if recall is None:
            return {}
        raise SearchError(f"the {info.backend} index at width {info.width} holds no recall calibration (built "
                          f"before rdscale calibrated indexes, or with --recall 0); rebuild it with {hint}")
    target = float(cal.get("target", DEFAULT_RECALL)) if recall is None else recall
    point = choose(curve, target)
    if point is None:
        best = max(curve, key=lambda p: (p["recall_low"], -p["cost"]))
        if recall is not None:
            raise SearchError(f"recall {recall} is beyond what the {info.backend} {info.index_type} index at width "
                              f"{info.width} reaches in {mode} mode (at best {best['recall_low']:.3f} measured, "
                              f"lower bound); use mode exact, or rebuild it with larger parameters ({hint} --param "
                              "...)")
        point = best
    params = dict(point["params"])
    scale = k / int(cal.get("k", DEFAULT_K))
    if scale > 1:  # calibrated at k_cal neighbours: a larger k needs a proportionally wider search
        for name in ("ef", "shortlist"):
            if name in params:
                params[name] = int(math.ceil(params[name] * scale))
    return params


def sample_positions(num_rows: int, num_queries: int = NUM_QUERIES) -> np.ndarray:
    """(m,) sorted scan positions of the calibration rows (a fixed seed: the same rows on every build). At most a
    tenth of a table of 500+ rows: the twin index is built without them, and a twin much smaller than the served
    index has other partition sizes (a shortlist that fills a twin's partition need not fill the served one's), so
    its curve would not transfer. Small tables keep up to 50 (or half the table) so the bound means something."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    size = min(num_queries, max(num_rows // 10, min(num_rows // 2, 50), 1))
    return np.sort(rng.choice(num_rows, size=size, replace=False))


def calibrate_index(searcher, info: IndexInfo, queries: np.ndarray, target: float = DEFAULT_RECALL,
                    k: int = DEFAULT_K, second: tuple[Any, IndexInfo] | None = None,
                    measured: Callable[[str, dict[str, int], float], None] | None = None) -> dict[str, Any]:
    """Measure ``info``'s recall curves (ann at its width, funnel re-ranked at the stored width) for ``queries``
    ((m, full) float32, rows held out of ``searcher``'s table and of ``info``, its index); returns the record
    stored with the index. Rows storing exactly a query's vector are left out of its truth and answers.

    ``second``: (searcher, index) of another build of the same twin, for a backend whose builds are not
    reproducible. Every point is then read on both builds and keeps the lower reading: the served index is one
    more draw of that build, and one twin's curve said nothing about how far another draw falls from it (the
    served Lance index read 0.989 at a point its one twin bounded at 0.99).

    ``measured(mode, point, recall)``: called after each point is searched (progress for long calibrations)."""
    target = check_recall(target)
    n = searcher.num_rows
    k = min(k, n)
    full = searcher.full_width
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (nq, full)
    deep = min(k + _EXTRA, n)
    _, near = searcher.exact_positions(q, full, deep, info.metric)  # (nq, deep)
    near_rows = searcher.vectors(np.where(near >= 0, near, 0).ravel(), full).reshape(len(q), deep, full)
    dup = (near_rows == q[:, None, :]).all(axis=2) & (near >= 0)  # (nq, deep): exact duplicates of the query
    keep = dup.sum(axis=1) <= deep - k
    if not keep.any():
        raise SearchError("every calibration row has more exact duplicates than can be left out; deduplicate the "
                          "table")
    q, dup, near = q[keep], dup[keep], near[keep]
    dup_sets = [set(near[i][dup[i]].tolist()) for i in range(len(q))]
    # answers are fetched k + (most duplicates of any query) deep, so that k remain once they are dropped
    fetch = min(k + max(len(d) for d in dup_sets), n)

    def drop_dups(pos: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(pos), k) answers without each query's duplicates; ``pos`` answers the queries ``rows`` (a mask
        over the calibration queries; all of them by default)."""
        which = np.arange(len(pos)) if rows is None else np.flatnonzero(rows)  # (len(pos),) query numbers
        out = np.full((len(pos), k), -1, np.int64)
        for j, (i, row) in enumerate(zip(which, pos)):
            kept = [int(p) for p in row if p >= 0 and int(p) not in dup_sets[i]][:k]
            out[j, : len(kept)] = kept
        return out

    truth = {"ann": drop_dups(searcher.exact_positions(q, info.width, fetch, info.metric)[1]),
             "funnel": drop_dups(near)}
    record: dict[str, Any] = {"k": k, "target": target, "queries": int(len(q)), "seed": CALIBRATION_SEED,
                              "cost": "vector numbers read per query (model, see rdscale.search.calibrate.cost)",
                              "twins": 1 if second is None else 2}
    # the walk picks its steps on one half of the queries and every point is then read on the other half: the
    # cheapest point whose measured bound meets a target was chosen among noisy points, and read on the queries
    # that chose it, its recall is biased high (a miss of ~0.005 at 0.99 was seen)
    picks = np.arange(len(q)) % 2 == 0  # (nq,) the half that steers the walk; the rest is read
    for mode in MODES:
        grid = axes(info, mode, k)
        timings: dict[tuple, float] = {}
        read: dict[tuple, tuple[float, float]] = {}  # the held-out half's reading on the twin
        folded: dict[tuple, tuple[float, float]] = {}  # ... and the lower of it and the second build's
        held = ~picks if (~picks).any() else np.ones(len(q), bool)  # (nq,) the queries each point is read on

        def search_kw(point: dict[str, int], mode=mode) -> dict[str, int]:
            kw = dict(point)
            if mode == "funnel":
                kw["shortlist"] = max(kw["shortlist"], fetch)
            return kw

        def measure(point: dict[str, int], mode=mode, timings=timings, read=read) -> tuple[float, float]:
            started = time.perf_counter()
            _, found = searcher.index_positions(q, info, fetch, mode, **search_kw(point))
            key = tuple(sorted(point.items()))
            timings[key] = (time.perf_counter() - started) * 1e3 / len(q)
            per_query = recall_rows(drop_dups(found), truth[mode], k)  # (nq,)
            read[key] = summarise(per_query[held])
            steer = summarise(per_query[picks])
            if measured is not None:
                measured(mode, point, steer[0])
            return steer

        def reading(point: dict[str, int], mode=mode, read=read, folded=folded) -> tuple[float, float]:
            # the second build is searched only for the points the walk visits (not the notches it looks at)
            key = tuple(sorted(point.items()))
            if key not in folded:
                folded[key] = read[key]
                if second is not None:
                    _, again = second[0].index_positions(q[held], second[1], fetch, mode, **search_kw(point))
                    other = summarise(recall_rows(drop_dups(again, held), truth[mode][held], k))
                    folded[key] = (min(read[key][0], other[0]), min(read[key][1], other[1]))
            return folded[key]

        def confirmed(point: dict[str, int], reading=reading) -> bool:
            # the steering half alone can stop the walk at a point whose held-out reading falls short of
            # STOP_LOW (0.987 against 0.990 was seen): 0.99 would then be off the curve though the grid goes on
            mean, low = reading(point)
            return mean >= STOP_RECALL and low >= STOP_LOW

        curve = walk(grid, measure, lambda p: cost(info, p, k, full), stop_low=STOP_LOW, confirmed=confirmed)
        for p in curve:
            key = tuple(sorted(p["params"].items()))
            p["recall_walk"] = p["recall"]
            p["recall"], p["recall_low"] = (round(v, 4) for v in reading(p["params"]))
            p["ms_per_query"] = round(timings.get(key, float("nan")), 4)
        record[mode] = curve
        record["grid_" + mode] = grid
        chosen = choose(curve, target)
        record.setdefault("default", {})[mode] = (chosen or max(curve, key=lambda p: p["recall_low"]))["params"]
        record.setdefault("reached", {})[mode] = chosen is not None
    return record


def describe(cal: dict[str, Any] | None, mode: str = "funnel") -> str:
    """One line: the default point of ``mode`` and its measured recall (for `index` and `index --list`)."""
    if not cal or not cal.get(mode):
        return "not calibrated"
    point = choose(cal[mode], float(cal["target"])) or max(cal[mode], key=lambda p: p["recall_low"])
    shown = " ".join(f"{k}={v}" for k, v in sorted(point["params"].items()))
    top = max(p["recall"] for p in cal[mode])
    missed = "" if cal.get("reached", {}).get(mode, True) else f" (target {cal['target']} NOT reached)"
    return (f"{mode} recall@{cal['k']} {point['recall']:.3f} at {shown}{missed}; curve up to {top:.3f} "
            f"over {len(cal[mode])} points")
