"""Benchmark prefix, ANN and funnel search (rdscale.search) on synthetic clustered protein embeddings.

For each database size: write a proteins table (clustered vectors, per-dimension scale decaying along the
embedding like a Matryoshka / PCA-ordered embedding), then measure, for a batch of held-out queries,
recall@k against exact full-width search and queries per second of

- exact search at the full width (brute force, the reference),
- ANN with the index on each chain level (the prefix alone),
- funnel: shortlist with the index on each narrower level, re-rank at the full width.

Prints a table and writes JSON (default bench/results/bench_search.json). Not a test: timings depend on the machine.
Sizes that would not fit the time budget (``--budget-s``, projected from the previous size) are skipped and the
JSON says so, with the reason. Runs on CPU; rdscale.search does no GPU work (Lance's CPU index is what it drives).

    python bench/bench_search.py            # 1e5 and 1e6 vectors, width 1280, levels 320/480/640/1280
    python bench/bench_search.py --quick    # 1e5 only
    python bench/bench_search.py --sizes 20000 --dim 128 --levels 32,64,128   # shrink
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rdscale import search as S  # noqa: E402


def decay(dim: int) -> np.ndarray:
    """(dim,) per-dimension scale: later numbers carry less signal, as in a chained rd embedding."""
    return (1.0 / np.sqrt(1.0 + np.arange(dim) / 64.0)).astype(np.float32)


def make_centres(dim: int, n_clusters: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n_clusters, dim)) * decay(dim)).astype(np.float32)


def sample(centres: np.ndarray, n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 points: a random centre plus isotropic-in-scaled-space noise."""
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    noise *= spread * decay(dim)
    noise += centres[labels]
    return noise


def write_table(path: Path, n: int, centres, spread: float, levels, seed: int, chunk: int = 50_000) -> None:
    """Stream the proteins table in chunks so memory stays O(chunk * dim)."""
    dim = centres.shape[1]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("description", pa.string()),
            ("length", pa.int32()),
            ("sequence", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("shard", pa.int32()),
        ],
        metadata={b"rdscale.levels": json.dumps(list(levels)).encode()},
    )

    def batches():
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = sample(centres, m, spread, rng)
            yield pa.record_batch(
                [
                    pa.array([f"S{i:08d}" for i in range(start, start + m)]),
                    pa.array([""] * m),
                    pa.array(rng.integers(50, 1000, m), pa.int32()),
                    pa.array([""] * m),
                    pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                    pa.array(np.full(m, start // chunk), pa.int32()),
                ],
                schema=schema,
            )

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    lance.write_dataset(reader, str(path), schema=schema, max_rows_per_file=250_000)


def timed(fn, repeats: int = 1):
    """(result, best seconds) over ``repeats`` runs (the first warms the page cache and index cache)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_size(n: int, args, workdir: Path) -> list[dict]:
    """All methods on one database size. Each is timed two ways on the same queries, side by side:
    ``qps``: the whole query batch in one call (exact search amortises its scan over the batch), and
    ``single_qps``: queries one call at a time (the interactive case; the first ``--single`` queries)."""
    dim, levels, k = args.dim, args.levels, args.k
    centres = make_centres(dim, args.clusters, seed=0)
    run = workdir / f"n{n}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    t0 = time.perf_counter()
    write_table(run / "proteins.lance", n, centres, args.spread, levels, seed=1)
    print(f"[n={n}] wrote {n} x {dim} in {time.perf_counter() - t0:.1f} s", flush=True)
    queries = sample(centres, args.queries, args.spread, np.random.default_rng(2))  # held out, same law
    rows: list[dict] = []

    def measure(method, width, build_s=None, n_single=args.single, **kw):
        def one_call():
            return S.search(run, queries, width=width, k=k, mode=method, **kw)

        result, secs = timed(one_call, args.exact_repeats if method == "exact" else 2)
        t0 = time.perf_counter()
        for i in range(n_single):
            S.search(run, queries[i : i + 1], width=width, k=k, mode=method, **kw)
        single_s = (time.perf_counter() - t0) / max(n_single, 1)
        rec = {
            "n": n,
            "method": method,
            "width": width,
            "recall_at_k": S.recall_at_k(result, truth, k=k) if method != "exact" else 1.0,
            "qps": args.queries / secs,
            "seconds": secs,
            "single_qps": 1.0 / single_s if n_single else None,
            "single_queries": n_single,
            "index_build_s": build_s,
            **{key: v for key, v in kw.items() if key != "rerank_width"},
        }
        if method == "funnel":
            rec["rerank_width"] = dim
        rows.append(rec)
        print(f"[n={n}] {method:<7} width {width:>5}  recall@{k} {rec['recall_at_k']:.3f}  {rec['qps']:8.1f} q/s "
              f"batch  {rec['single_qps'] or 0:8.1f} q/s single  {kw}", flush=True)
        return result

    truth = measure("exact", dim, n_single=min(args.single, args.exact_single))

    build: dict[int, float] = {}
    for w in args.index_levels:
        t0 = time.perf_counter()
        S.build_index(run, width=w, index_type=args.index_type, metric="cosine")
        build[w] = time.perf_counter() - t0
        print(f"[n={n}] {args.index_type} index width {w}: {build[w]:.1f} s", flush=True)
        for nprobes in args.nprobes:
            measure("ann", w, build[w], nprobes=nprobes)

    for w in args.index_levels:
        if w >= dim:
            continue
        for nprobes in args.nprobes:
            for shortlist in args.shortlists:
                measure("funnel", w, build[w], nprobes=nprobes, shortlist=shortlist)
    if not args.keep:
        shutil.rmtree(run)
    return rows


def format_table(rows: list[dict], k: int) -> str:
    exact = {r["n"]: r for r in rows if r["method"] == "exact"}
    head = (f"{'n':>9}  {'method':<7} {'width':>5} {'nprobes':>7} {'shortlist':>9}  {f'recall@{k}':>9} "
            f"{'q/s batch':>10} {'x exact':>8} {'q/s single':>11} {'x exact':>8} {'index s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        build = "" if r["index_build_s"] is None else f"{r['index_build_s']:.1f}"
        single = r["single_qps"] or float("nan")
        lines.append(
            f"{r['n']:>9}  {r['method']:<7} {r['width']:>5} {str(r.get('nprobes') or ''):>7} "
            f"{str(r.get('shortlist') or ''):>9}  {r['recall_at_k']:>9.3f} {r['qps']:>10.1f} "
            f"{r['qps'] / exact[r['n']]['qps']:>8.1f} {single:>11.1f} "
            f"{single / (exact[r['n']]['single_qps'] or float('nan')):>8.1f} {build:>8}"
        )
    return "\n".join(lines)


def funnel_summary(rows: list[dict], k: int, target_recall: float = 0.95, target_speedup: float = 10.0) -> dict:
    """Per size and timing mode: the fastest funnel configuration with recall@k >= target_recall, and its
    speedup over exact full-width search timed the same way."""
    by_n, lines = {}, []
    for n in sorted({r["n"] for r in rows}):
        exact = next(r for r in rows if r["n"] == n and r["method"] == "exact")
        good = [r for r in rows if r["n"] == n and r["method"] == "funnel" and r["recall_at_k"] >= target_recall]
        by_n[str(n)] = {"target": f"recall@{k} >= {target_recall} at >= {target_speedup}x exact q/s"}
        for mode, key in (("batch", "qps"), ("single", "single_qps")):
            if not exact[key]:
                continue
            best = max((r for r in good if r[key]), key=lambda r: r[key], default=None)
            speedup = best[key] / exact[key] if best else None
            by_n[str(n)][mode] = {
                "exact_qps": exact[key],
                "best_funnel": best,
                "speedup": speedup,
                "target_met": bool(best and speedup >= target_speedup),
            }
            lines.append(
                f"n={n}, {mode:<6} ({'one call for all queries' if mode == 'batch' else 'one query per call'}): "
                + (f"best funnel with recall@{k} >= {target_recall}: width {best['width']}, nprobes "
                   f"{best['nprobes']}, shortlist {best['shortlist']}: recall {best['recall_at_k']:.3f}, "
                   f"{best[key]:.1f} q/s = {speedup:.1f}x exact (target {target_speedup}x: "
                   f"{'met' if speedup >= target_speedup else 'NOT met'})"
                   if best else f"no funnel configuration reached recall@{k} >= {target_recall}")
            )
    return {"by_n": by_n, "lines": lines}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[100_000, 1_000_000],
                   help="database sizes, comma separated (default 1e5,1e6)")
    p.add_argument("--quick", action="store_true", help="1e5 vectors only")
    p.add_argument("--dim", type=int, default=1280, help="full stored width")
    p.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[320, 480, 640, 1280],
                   help="chain levels (prefix widths)")
    p.add_argument("--index-levels", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="levels to index (default: all levels)")
    p.add_argument("--index-type", default=S.DEFAULT_INDEX_TYPE)
    p.add_argument("--nprobes", type=lambda s: [int(v) or None for v in s.split(",")], default=[None, 2, 5],
                   help="IVF partitions probed, comma separated; 0 = Lance's default (default: 0,2,5)")
    p.add_argument("--shortlists", type=lambda s: [int(v) for v in s.split(",")], default=[20, 30, 100],
                   help="funnel shortlist sizes, comma separated (default: 20,30,100)")
    p.add_argument("--single", type=int, default=20,
                   help="queries also timed one call at a time (default 20; 0: skip)")
    p.add_argument("--exact-single", type=int, default=5,
                   help="of those, how many for exact search (each scans the whole table; default 5)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.6, help="within-cluster noise relative to the centre scale")
    p.add_argument("--exact-repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="where to write the tables (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the tables")
    p.add_argument("--budget-s", type=float, default=900.0,
                   help="skip a size whose projected time (linear in n from the previous size) exceeds what is left")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_search.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [100_000]
    if args.dim not in args.levels:
        args.levels = sorted({*args.levels, args.dim})
    args.index_levels = args.index_levels or args.levels

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rdscale_bench_search_"))
    t0 = time.perf_counter()
    rows: list[dict] = []
    skipped: list[dict] = []
    last: tuple[int, float] | None = None  # (n, seconds) of the last size measured
    for n in args.sizes:
        left = args.budget_s - (time.perf_counter() - t0)
        projected = None if last is None else last[1] * n / last[0]
        if projected is not None and projected > left:
            reason = (f"projected {projected:.0f} s (linear in n from n={last[0]}: {last[1]:.0f} s) exceeds the "
                      f"{left:.0f} s left of the {args.budget_s:.0f} s budget on this {os.cpu_count()}-core CPU machine")
            skipped.append({"n": n, "reason": reason})
            print(f"[n={n}] skipped: {reason}", flush=True)
            continue
        started = time.perf_counter()
        rows += run_size(n, args, workdir)
        last = (n, time.perf_counter() - started)
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    table = format_table(rows, args.k)
    summary = funnel_summary(rows, args.k)
    print("\n" + table + "\n")
    print("\n".join(summary["lines"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "config": config,
        "device": "cpu",
        "gpu": None,
        "caveats": "CPU only (no GPU on the benchmark machine). q/s depend on the machine and its load: on a "
                   "shared 2-core box they vary run to run by up to 2x, so compare ratios within one run, "
                   "where every method is timed side by side on the same queries.",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "lance": lance.__version__, "numpy": np.__version__},
        "total_seconds": time.perf_counter() - t0,
        "results": rows,
        "funnel_vs_exact": summary["by_n"],
        "skipped": skipped,
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
