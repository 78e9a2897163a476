"""The Matryoshka edge, measured fairly: rdscale's calibrated prefix funnel against full-width FAISS indexes tuned
by the same calibrator (rdscale.search.calibrate), read at matched recall; and the latency of one sequence query
per chain level.

For each size: write a proteins table (bench/bench_search.py's generator, or ``--generator hard``: low-rank
centres, overlapping clusters, noise), draw held-out queries from the same law, and for each index

- funnel: FAISS HNSW and IVF_FLAT on the ``--prefix`` columns, re-ranked at full width (what `rdscale index`
  builds by default, and the one alternative);
- full-width baselines: FAISS HNSW and IVF_FLAT at the stored width, searched as ann;

build it with `build_index` (calibrated for recall@10 0.95 on held-out rows; build time includes calibration,
reported apart), then search the bench's own queries at the calibrated point for each recall in ``--recalls``.
Columns: recall@10 (measured on the bench queries), batch q/s, one-query ms, build s, calibration s, index bytes,
bytes per protein served (index + the float32 rows the funnel re-ranks from when resident), peak RSS. The edge is
funnel q/s over the best full-width q/s at each recall.

Sequence queries: one ``--seq-len``-residue query through ESM-2 architectures with random weights (real shapes:
8M 6x320, 35M 12x480, 150M 30x640, 650M 33x1280 with ``--seq-650m``), per chain level: the chain runs the models
up to that level (rdscale.search.sequences).

    python bench/bench_search_edge.py                        # 1e5 (what bench/results/bench_search_edge.json holds)
    python bench/bench_search_edge.py --sizes 1000000        # 1e6 (long; for a machine of its own)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as B  # noqa: E402

from rdscale import search as S  # noqa: E402
from rdscale.search import faiss_index as F  # noqa: E402
from rdscale.search.searcher import Searcher, calibrate  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def write_report(args, rows: list[dict], seq: list[dict], started: float, done: bool) -> None:
    """The JSON report, rewritten after every row: a run cut short by a time limit keeps what it measured."""
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "argv": sys.argv[1:], "complete": done,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()},
              "caveats": "CPU, a machine shared with other jobs: compare ratios within the run. Recall is measured "
                         "on the bench's queries, not the calibration rows. build_s excludes calibration_s.",
              "results": rows, "edge": edges(rows), "sequence_queries": seq,
              "total_seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))


def edge(n: int, args, workdir: Path, progress=lambda rows: None) -> list[dict]:
    dim, k = args.dim, 10
    run = workdir / f"edge{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if args.generator == "bench":
        centres = B.make_centres(dim, args.clusters, seed=0)
        B.write_table(run / "proteins.lance", n, centres, 0.6, args.levels, seed=1)
        queries = B.sample(centres, args.queries, 0.6, np.random.default_rng(2))
    else:
        basis, centres = write_hard(run / "proteins.lance", n, dim, args.levels)
        queries = hard_rows(args.queries, dim, len(centres), np.random.default_rng(2), basis, centres)
    searcher = Searcher(run).load(dim, "cosine")
    truth = searcher.search(queries, k=k)
    ids = searcher.key_columns()["id"].to_pylist()
    id_to_pos = {v: i for i, v in enumerate(ids)}
    truth_pos = B.positions(truth, id_to_pos, len(queries), k)
    row_bytes = dim * 4  # a resident float32 full-width row: what the funnel re-ranks from
    rows = []
    configs = [("funnel", args.prefix, t) for t in args.types] + [("ann", dim, t) for t in args.types]
    for mode, width, index_type in configs:
        t0 = time.perf_counter()
        info = S.build_index(run, width=width, backend="faiss", index_type=index_type, rebuild=True, recall=None)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = calibrate(run, info)
        cal_s = time.perf_counter() - t0
        nbytes = F.faiss_path(run, "proteins", width, "cosine").stat().st_size
        searcher.refresh()
        searcher.load(dim, "cosine")
        variants = [(searcher, "float32", row_bytes)]
        if mode == "funnel":  # the same funnel re-ranking from float16 rows: half the memory of the rows
            variants.append((Searcher(run, rerank_rows="float16").load(dim, "cosine"), "float16", dim * 2))
        for (one, rerank, rerank_bytes), recall in ((v, r) for v in variants for r in args.recalls):
            kw = dict(k=k, mode=mode, width=width, backend="faiss", recall=recall)
            try:
                params = S.calibrate.search_params(info, mode, k, recall)
            except S.SearchError as err:
                rows.append({"n": n, "mode": mode, "width": width, "index_type": index_type, "recall_asked": recall,
                             "error": str(err)})
                print(f"[n={n}] {mode} {index_type} w{width} recall {recall}: {err}", flush=True)
                continue

            def fn(q, kw=kw, one=one):
                return one.search(q, **kw)

            res, secs = B.timed(lambda: fn(queries), 2)
            single = B.per_query_ms(fn, queries, args.single)
            got = B.recall_arrays(B.positions(res, id_to_pos, len(queries), k), truth_pos, k)
            served = nbytes / n + (rerank_bytes if mode == "funnel" else 0)
            method = f"{mode} faiss {index_type} w{width}" + (" rerank f16" if rerank == "float16" else "")
            rec = {"n": n, "generator": args.generator, "method": method, "mode": mode, "rerank_rows": rerank,
                   "width": width, "index_type": index_type, "recall_asked": recall, "params": params,
                   "recall_at_10": round(got, 4), "batch_qps": len(queries) / secs, "single_ms": single,
                   "build_s": build_s, "calibration_s": cal_s, "index_bytes": nbytes,
                   "bytes_per_protein_served": served, "peak_rss_mb": peak_rss_mb(),
                   "calibrated_recall": S.calibrate.choose(info.calibration[mode], recall)["recall"]
                   if S.calibrate.choose(info.calibration[mode], recall) else None}
            rows.append(rec)
            progress(rows)
            print(f"[n={n}] {rec['method']:<28} asked {recall}: recall@10 {got:.3f} {rec['batch_qps']:8.1f} q/s "
                  f"{single:7.2f} ms  build {build_s:.1f}+{cal_s:.1f} s  {nbytes / 1e6:.1f} MB  {params}", flush=True)
    shutil.rmtree(run, ignore_errors=True)
    return rows


def edges(rows: list[dict]) -> list[dict]:
    """Funnel q/s over the best full-width q/s at each asked recall (both measured on the same queries)."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        for recall in sorted({r["recall_asked"] for r in rows if r["n"] == n}):
            at = [r for r in rows if r["n"] == n and r["recall_asked"] == recall and "error" not in r]
            fun = [r for r in at if r["mode"] == "funnel" and r.get("rerank_rows") == "float32"]
            full = [r for r in at if r["mode"] == "ann"]
            if fun and full:
                bf = max(fun, key=lambda r: r["batch_qps"])
                bw = max(full, key=lambda r: r["batch_qps"])
                out.append({"n": n, "recall": recall, "funnel": bf["method"], "full_width": bw["method"],
                            "qps_ratio": bf["batch_qps"] / bw["batch_qps"],
                            "single_ms_ratio": bw["single_ms"] / bf["single_ms"],
                            "index_bytes_ratio": bf["index_bytes"] / bw["index_bytes"],
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
    p.add_argument("--recalls", type=lambda s: [float(v) for v in s.split(",")], default=[0.95, 0.99])
    p.add_argument("--generator", choices=["bench", "hard"], default="bench")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--single", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=500)
    p.add_argument("--seq-repeats", type=int, default=2)
    p.add_argument("--seq-650m", action="store_true", help="also the 650M architecture (GBs of memory)")
    p.add_argument("--no-seq", dest="seq", action="store_false")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_search_edge.json")
    args = p.parse_args(argv)
    if args.dim not in args.levels:
        args.levels = sorted({*args.levels, args.dim})
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="rdscale_bench_edge_"))
    rows: list[dict] = []
    seq: list[dict] = []
    if args.seq:  # first: seconds, where the index builds take minutes
        seq = sequence_latency(args)
        write_report(args, rows, seq, t0, False)
    for n in args.sizes:
        rows += edge(n, args, workdir, progress=lambda so_far: write_report(args, rows + so_far, seq, t0, False))
    shutil.rmtree(workdir, ignore_errors=True)
    write_report(args, rows, seq, t0, True)
    print(json.dumps(edges(rows), indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
