"""The Matryoshka edge, measured fairly: rdscale's calibrated prefix funnel against full-width FAISS indexes tuned
by the same calibrator (rdscale.search.calibrate), read at matched recall; and the latency of one sequence query
per chain level.

For each size: write a proteins table (bench/bench_search.py's generator, or ``--generator hard``: low-rank
centres, overlapping clusters, noise), draw held-out queries from the same law, and for each index

- funnel: FAISS HNSW and IVF_FLAT on the ``--prefix`` columns, re-ranked at full width (what `rdscale index`
  builds by default, and the one alternative);
- full-width baselines: FAISS HNSW and IVF_FLAT at the stored width, searched as ann;

build it with `build_index` and calibrate it (rdscale.search.calibrate: the same grid and cost model for every
method; build time and calibration time reported apart), then search the bench's own queries at the calibrated
point for each recall in ``--recalls``. Every method's searcher is held at once and all are timed side by side
(batch: best of ``--rounds`` round-robin calls; one query: median over ``--single`` queries, alternating), so they
see the same machine load; the keys and float32 re-rank rows are loaded once and shared, as one server holds them.
The funnels re-rank from float32 rows, float16 rows, and (``--store``) from the table.
Columns: recall@10 (measured on the bench queries), batch q/s, one-query ms, build s, calibration s, index bytes,
bytes per protein served (index + the re-rank rows the funnel holds), peak RSS. The edge is the best funnel's q/s
over the best full-width q/s at each recall, per re-rank source.

Memory: the table is written in chunks; ``--sequential`` builds, measures and drops one method at a time (exact
truth streamed from the table), so the peak is one method's; ``--memory-probe`` skips the indexes and measures the
peak RSS of the table write, the streamed truth and of holding the float32 / float16 re-rank rows alone.

Sequence queries: one ``--seq-len``-residue query through ESM-2 architectures with random weights (real shapes:
8M 6x320, 35M 12x480, 150M 30x640, 650M 33x1280 with ``--seq-650m``), per chain level: the chain runs the models
up to that level (rdscale.search.sequences).

    python bench/bench_search_edge.py --store --full-types IVF_FLAT    # bench/results/bench_search_edge.json
    python bench/bench_search_edge.py --store --types IVF_FLAT --generator hard \
        --out bench/results/bench_search_edge_hard.json
    python bench/bench_search_edge.py --sizes 1000000 --memory-probe --sequential \
        --out bench/results/bench_search_edge_1e6_memory.json
    python bench/bench_search_edge.py --sizes 1000000 --sequential     # 1e6, every method (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as B  # noqa: E402
import benchkit  # noqa: E402

from rdscale import search as S  # noqa: E402
from rdscale.search import faiss_index as F  # noqa: E402
from rdscale.search.searcher import Searcher, calibrate  # noqa: E402


def hard_rows(n: int, dim: int, n_clusters: int, rng: np.random.Generator, basis: np.ndarray,
              centres: np.ndarray) -> np.ndarray:
    """(n, dim) float32: low-rank centres, within-cluster spread as large as the gaps (overlap), noise."""
    spec = 1.0 / (1.0 + np.arange(dim) / (dim / 8))
    labels = rng.integers(0, len(centres), n)
    within = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis * 0.7
    return (centres[labels] + within + rng.standard_normal((n, dim), dtype=np.float32) * spec * 0.5).astype(np.float32)


def write_hard(path: Path, n: int, dim: int, levels, seed: int = 0) -> tuple:
    import lance
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    spec = (1.0 / (1.0 + np.arange(dim) / (dim / 8))).astype(np.float32)
    basis = (rng.standard_normal((48, dim)) * spec).astype(np.float32)
    centres = (rng.standard_normal((max(n // 30, 10), 48)) @ basis).astype(np.float32)
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={b"rdscale.levels": json.dumps(list(levels)).encode()})

    def batches():
        for start in range(0, n, 20_000):
            b = min(20_000, n - start)
            x = hard_rows(b, dim, len(centres), rng, basis, centres)
            yield pa.record_batch([pa.array([f"P{i:08d}" for i in range(start, start + b)]),
                                   pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)], schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(path))
    return basis, centres


def write_report(args, rows: list[dict], seq: list[dict], started: float, done: bool,
                 sizes: list[dict] | None = None) -> None:
    """The JSON report, rewritten after every row: a run cut short by a time limit keeps what it measured."""
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "argv": sys.argv[1:], "complete": done,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()},
              "caveats": CAVEATS + (SEQUENTIAL if args.sequential else INTERLEAVED),
              "grid": GRID, "results": rows, "edge": edges(rows), "sizes": sizes or [],
              "sequence_queries": seq, "total_seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))


CAVEATS = ("CPU, a machine shared with other jobs: compare ratios within the run, not absolute q/s. Recall is "
           "measured on the bench's queries, not the calibration rows. build_s excludes calibration_s. "
           "bytes_per_protein_served: the index file's bytes per row plus the re-rank rows the funnel holds "
           "(float32: 4 x width, float16: 2 x width, store: none, read from the table per query); the key columns "
           "every method holds are left out. ")
INTERLEAVED = ("Timing: every method's searcher is held at once and timed side by side (batch calls round-robin, "
               "best of --rounds; single queries alternating), so all see the same load. peak_rss_mb is the "
               "process's peak so far (every index and row copy held at once).")
SEQUENTIAL = ("Timing (--sequential): each method is built, measured and dropped before the next (memory bounded "
              "by one method); timings are not side by side. peak_rss_mb is the process's peak since that method's "
              "build started (VmHWM reset).")
GRID = {"calibrator": "rdscale.search.calibrate (the same for every method): a greedy walk from the cheapest "
                      "corner of the grid, cost = vector numbers read per query (model), a point meets R when its "
                      "one-sided 95 % lower bound does, on 200 held-out rows; the cheapest meeting point is used",
        "ef (HNSW)": list(S.calibrate.EF_GRID), "nprobes (IVF)": "1, 2, 4, ... doubling up to nlist",
        "shortlist (funnel)": list(S.calibrate.SHORTLIST_GRID),
        "index params": "rdscale defaults for every method: HNSW m=32, ef_construction=80; IVF nlist=sqrt(n) "
                        "(the minimum of nlist + n/nlist rows read at nprobe 1, at any width)"}


def _share_rows(src: Searcher, dst: Searcher) -> Searcher:
    """``dst`` uses ``src``'s loaded keys and re-rank rows (what one server process holds once): the bench's
    memory then counts each copy once."""
    src.key_columns()
    dst._key_cols, dst._rowid_sorted = src._key_cols, src._rowid_sorted
    dst._prepared, dst._half = src._prepared, src._half
    return dst


def _peak_mb() -> float:
    return benchkit.status_kb("VmHWM") / 1024


def edge(n: int, args, workdir: Path, progress=lambda rows: None) -> tuple[list[dict], dict]:
    dim, k = args.dim, 10
    run = workdir / f"edge{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    t0 = time.perf_counter()
    if args.generator == "bench":
        centres = B.make_centres(dim, args.clusters, seed=0)
        B.write_table(run / "proteins.lance", n, centres, 0.6, args.levels, seed=1, chunk=20_000)
        queries = B.sample(centres, args.queries, 0.6, np.random.default_rng(2))
    else:
        basis, centres = write_hard(run / "proteins.lance", n, dim, args.levels)
        queries = hard_rows(args.queries, dim, len(centres), np.random.default_rng(2), basis, centres)
    size = {"n": n, "generator": args.generator, "write_s": time.perf_counter() - t0,
            "peak_rss_mb_after_write": _peak_mb()}
    # truth: exact full-width search; resident (the float32 rows the float32 funnels share) unless --sequential
    truth_searcher = Searcher(run, resident=not args.sequential).load(dim, "cosine")
    truth = truth_searcher.search(queries, k=k)
    ids = truth_searcher.key_columns()["id"].to_pylist()
    id_to_pos = {v: i for i, v in enumerate(ids)}
    del ids
    truth_pos = B.positions(truth, id_to_pos, len(queries), k)
    size["peak_rss_mb_after_truth"] = _peak_mb()
    if args.memory_probe:  # what serving holds beside an index, each loaded alone (VmHWM reset before each)
        size["rerank_rows"] = {}
        for rerank in ("float32", "float16"):
            gc.collect()
            benchkit.reset_peak()
            before = benchkit.status_kb("VmRSS") / 1024
            one = Searcher(run, rerank_rows=rerank).load(dim, "cosine")
            if rerank == "float16":
                one._half_rows(dim, "cosine")
            got = one.search(queries, k=k)  # float32: exact from the resident rows; float16: exact streams
            size["rerank_rows"][rerank] = {"rss_before_mb": before, "peak_rss_mb": _peak_mb(),
                                           "held_mb": (_peak_mb() - before), "bytes_per_row": (4 if rerank ==
                                           "float32" else 2) * dim, "exact_ids_equal_truth":
                                           got.column("id").to_pylist() == truth.column("id").to_pylist()}
            one.close()
            del one, got
        size["peak_rss_mb"] = _peak_mb()
        truth_searcher.close()
        shutil.rmtree(run, ignore_errors=True)
        return [], size
    rows: list[dict] = []
    held: list[dict] = []  # the methods timed side by side (not --sequential)
    configs = [("funnel", args.prefix, t) for t in args.types] + [("ann", dim, t) for t in args.full_types]
    for mode, width, index_type in configs:
        if args.sequential:
            gc.collect()
            benchkit.reset_peak()
        t0 = time.perf_counter()
        info = S.build_index(run, width=width, backend="faiss", index_type=index_type, rebuild=True, recall=None)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = calibrate(run, info)
        cal_s = time.perf_counter() - t0
        nbytes = F.faiss_path(run, "proteins", width, "cosine").stat().st_size
        reranks = (["float32", "float16"] + (["store"] if args.store else [])) if mode == "funnel" else ["float32"]
        for rerank in reranks:
            if rerank == "float32":
                one = Searcher(run, resident=True)
                if not args.sequential:
                    _share_rows(truth_searcher, one)
            else:
                one = Searcher(run, rerank_rows=rerank)
                f16 = next((m["searcher"] for m in held if m["rerank"] == rerank), None)
                if f16 is not None:
                    _share_rows(f16, one)
            method = f"{mode} faiss {index_type} w{width}" + ("" if mode == "ann" else f" rerank {rerank}")
            per_row = {"float32": 4 * dim, "float16": 2 * dim, "store": 0}[rerank] if mode == "funnel" else 0
            grid = S.calibrate.axes(info, mode, k)
            m = {"method": method, "mode": mode, "width": width, "index_type": index_type, "rerank": rerank,
                 "searcher": one, "info": info, "common": {
                     "n": n, "generator": args.generator, "method": method, "mode": mode, "rerank_rows": rerank,
                     "width": width, "index_type": index_type, "index_params": info.params, "grid": grid,
                     "curve": [{kk: p[kk] for kk in ("params", "recall", "recall_low", "cost")}
                               for p in info.calibration.get(mode, [])],
                     "build_s": build_s, "calibration_s": cal_s, "index_bytes": nbytes,
                     "rerank_bytes_per_row": per_row, "bytes_per_protein_served": nbytes / n + per_row}}
            warm = [r for r in args.recalls if _params(m, r, k) is not None]
            if warm:  # loads the index and its calibrated info now: the next build overwrites the file
                one.search(queries[:2], k=k, mode=mode, width=width, backend="faiss", recall=warm[0])
            if args.sequential:
                rows += measure([m], queries, id_to_pos, truth_pos, args, k)
                for r in rows[-len(args.recalls):]:
                    r["peak_rss_mb"] = _peak_mb()
                progress(rows)
                m["searcher"].close()
                del m, one
                gc.collect()
            else:
                held.append(m)
        print(f"[n={n}] built {mode} {index_type} w{width}: {build_s:.1f} s + calibration {cal_s:.1f} s, "
              f"{nbytes / 1e6:.1f} MB", flush=True)
    if held:
        rows += measure(held, queries, id_to_pos, truth_pos, args, k)
        peak = _peak_mb()
        for r in rows:
            r["peak_rss_mb"] = peak
        progress(rows)
    size["peak_rss_mb"] = _peak_mb()
    for m in held:
        m["searcher"].close()
    truth_searcher.close()
    shutil.rmtree(run, ignore_errors=True)
    return rows, size


def _params(m: dict, recall: float, k: int) -> dict | None:
    try:
        return S.calibrate.search_params(m["info"], m["mode"], k, recall)
    except S.SearchError:
        return None


def measure(methods: list[dict], queries, id_to_pos, truth_pos, args, k: int) -> list[dict]:
    """Rows for each method at each asked recall; the methods of one recall timed side by side."""
    out = []
    for recall in args.recalls:
        live, fns = [], []
        for m in methods:
            params = _params(m, recall, k)
            if params is None:
                out.append({**m["common"], "recall_asked": recall,
                            "error": f"no calibrated point meets recall {recall}"})
                continue
            kw = dict(k=k, mode=m["mode"], width=m["width"], backend="faiss", recall=recall)
            live.append((m, params))
            fns.append(lambda q, kw=kw, one=m["searcher"]: one.search(q, **kw))
        if not fns:
            continue
        res, batch_s, single_ms = interleaved(fns, queries, args.single, args.rounds)
        for (m, params), r, secs, ms in zip(live, res, batch_s, single_ms):
            got = B.recall_arrays(B.positions(r, id_to_pos, len(queries), k), truth_pos, k)
            point = S.calibrate.choose(m["info"].calibration[m["mode"]], recall)
            rec = {**m["common"], "recall_asked": recall, "params": params, "recall_at_10": round(got, 4),
                   "calibrated_recall": point["recall"] if point else None,
                   "batch_qps": len(queries) / secs, "single_ms": ms}
            out.append(rec)
            print(f"[n={rec['n']}] {rec['method']:<34} asked {recall}: recall@10 {got:.3f} "
                  f"{rec['batch_qps']:8.1f} q/s {ms:7.2f} ms  {rec['bytes_per_protein_served']:7.0f} B/protein  "
                  f"{params}", flush=True)
    return out


def interleaved(fns, queries: np.ndarray, n_single: int, rounds: int):
    """Time the methods side by side: ``rounds`` batch calls each, round-robin (best of them: on a shared machine
    the least disturbed), then ``n_single`` one-query calls each, alternating per query, who goes first rotating
    (median ms: robust to another job's burst). Returns (last batch results, batch seconds, single ms)."""
    best, out = [float("inf")] * len(fns), [None] * len(fns)
    order = list(range(len(fns)))
    for r in range(rounds):
        for j in order[r % len(fns):] + order[: r % len(fns)]:
            t0 = time.perf_counter()
            out[j] = fns[j](queries)
            best[j] = min(best[j], time.perf_counter() - t0)
    single: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn(queries[:1])
    for i in range(n_single):
        q = queries[i % len(queries) : i % len(queries) + 1]
        for j in order[i % len(fns):] + order[: i % len(fns)]:
            t0 = time.perf_counter()
            fns[j](q)
            single[j].append((time.perf_counter() - t0) * 1e3)
    return out, best, [float(np.median(t)) for t in single]


def edges(rows: list[dict]) -> list[dict]:
    """Funnel q/s over the best full-width q/s at each asked recall (both measured on the same queries, side by
    side), for each funnel re-rank source."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        for recall in sorted({r["recall_asked"] for r in rows if r["n"] == n}):
            at = [r for r in rows if r["n"] == n and r["recall_asked"] == recall and "error" not in r]
            full = [r for r in at if r["mode"] == "ann"]
            for rerank in ("float32", "float16", "store"):
                fun = [r for r in at if r["mode"] == "funnel" and r.get("rerank_rows") == rerank]
                if not (fun and full):
                    continue
                bf = max(fun, key=lambda r: r["batch_qps"])
                bw = max(full, key=lambda r: r["batch_qps"])
                sw = min(full, key=lambda r: r["single_ms"])
                out.append({"n": n, "recall": recall, "rerank_rows": rerank, "funnel": bf["method"],
                            "full_width": bw["method"], "qps_ratio": bf["batch_qps"] / bw["batch_qps"],
                            "single_ms_ratio": sw["single_ms"] / min(r["single_ms"] for r in fun),
                            "single_full_width": sw["method"],
                            "index_bytes_ratio": bf["index_bytes"] / bw["index_bytes"],
                            "served_bytes_ratio": bf["bytes_per_protein_served"] / bw["bytes_per_protein_served"],
                            "recall_funnel": bf["recall_at_10"], "recall_full_width": bw["recall_at_10"]})
    return out


ARCHS = {"8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20)}


def sequence_latency(args) -> list[dict]:
    """One query of ``seq_len`` residues through random-weight ESM-2 models of real shapes, per chain level."""
    import esm
    import torch
    from esm.model.esm2 import ESM2

    torch.manual_seed(0)
    names = ["8M", "35M", "150M"] + (["650M"] if args.seq_650m else [])
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    seq = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), args.seq_len))
    _, _, tokens = alphabet.get_batch_converter()([("q", seq)])
    out, cumulative = [], 0.0
    for name in names:
        layers, width, heads = ARCHS[name]
        model = ESM2(num_layers=layers, embed_dim=width, attention_heads=heads, alphabet=alphabet).eval()
        with torch.no_grad():
            model(tokens, repr_layers=[layers])  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.seq_repeats):
                model(tokens, repr_layers=[layers])
            ms = (time.perf_counter() - t0) / args.seq_repeats * 1e3
        cumulative += ms
        out.append({"level": len(out) + 1, "model": f"esm2 {name} ({layers}x{width}, random weights)",
                    "model_ms": ms, "query_ms_at_level": cumulative, "residues": args.seq_len,
                    "threads": torch.get_num_threads()})
        print(f"sequence query, {args.seq_len} residues, level {len(out)} ({name}): {ms:.0f} ms for this model, "
              f"{cumulative:.0f} ms up to this level", flush=True)
        del model
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[100_000])
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[320, 480, 640, 1280])
    p.add_argument("--prefix", type=int, default=320)
    p.add_argument("--types", type=lambda s: [v.upper() for v in s.split(",")], default=["HNSW", "IVF_FLAT"])
    p.add_argument("--full-types", type=lambda s: [v.upper() for v in s.split(",")], default=None,
                   help="the full-width baselines (default: --types)")
    p.add_argument("--recalls", type=lambda s: [float(v) for v in s.split(",")], default=[0.95, 0.99])
    p.add_argument("--generator", choices=["bench", "hard"], default="bench")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--single", type=int, default=100)
    p.add_argument("--rounds", type=int, default=15, help="batch calls per method (best of)")
    p.add_argument("--store", action="store_true", help="also the funnel re-ranking from the table (slow)")
    p.add_argument("--memory-probe", action="store_true",
                   help="no indexes: write the table, exact truth (streamed), then the peak RSS of holding the "
                        "float32 and the float16 re-rank rows, one at a time")
    p.add_argument("--sequential", action="store_true",
                   help="build, measure and drop one method at a time (memory: one method's; for 1e6)")
    p.add_argument("--seq-len", type=int, default=500)
    p.add_argument("--seq-repeats", type=int, default=2)
    p.add_argument("--seq-650m", action="store_true", help="also the 650M architecture (GBs of memory)")
    p.add_argument("--no-seq", dest="seq", action="store_false")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_search_edge.json")
    args = p.parse_args(argv)
    args.full_types = args.types if args.full_types is None else args.full_types
    if args.dim not in args.levels:
        args.levels = sorted({*args.levels, args.dim})
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="rdscale_bench_edge_"))
    rows: list[dict] = []
    seq: list[dict] = []
    if args.seq:  # first: seconds, where the index builds take minutes
        seq = sequence_latency(args)
        write_report(args, rows, seq, t0, False)
    sizes: list[dict] = []
    for n in args.sizes:
        got, size = edge(n, args, workdir,
                         progress=lambda so_far: write_report(args, rows + so_far, seq, t0, False, sizes))
        rows += got
        sizes.append(size)
    shutil.rmtree(workdir, ignore_errors=True)
    write_report(args, rows, seq, t0, True, sizes)
    print(json.dumps(edges(rows), indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
