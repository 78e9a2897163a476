"""Benchmark rdscale search against FAISS, side by side, on synthetic clustered protein embeddings.

For each database size: write a proteins table (Gaussian clusters, per-dimension scale decaying along the
embedding like a Matryoshka / PCA-ordered embedding), draw held-out queries from the same law, and time every
method on the same queries in one run: recall@k against exact full-width search, batch q/s (all queries in one
call), one-query latency (queries one call at a time), build time and index bytes.

Methods: rdscale ``Searcher`` exact (resident matrix, blocked GEMM) and the one-shot ``search()``; FAISS
IndexFlatIP (the flat-scan reference); rdscale funnel on a prefix with the FAISS backend (HNSW, IVF_FLAT, IVF_PQ)
and with the Lance backend (IVF_HNSW_SQ); a hand-written FAISS HNSW funnel (index + numpy re-rank, no rdscale) as
the reference the issue's targets name; and the query server (Ray Serve over HTTP) against the in-process
service, for its per-query overhead. Ratios are computed within the run (see "targets" in the JSON).

Prints a table and writes JSON (default bench/results/bench_search.json). Not a test: timings depend on the machine.
Sizes that would not fit the time budget (``--budget-s``, projected from the previous size) are skipped and the
JSON says so, with the reason.

    python bench/bench_search.py --quick    # 1e5 only (what bench/results/bench_search.json holds)
    python bench/bench_search.py            # 1e5 and 1e6 if the budget allows
    python bench/bench_search.py --sizes 20000 --dim 128 --levels 32,64,128 --prefix 32   # shrink
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

import faiss
import lance
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rdscale import search as S  # noqa: E402
from rdscale.search import exact as E  # noqa: E402
from rdscale.search import faiss_index as F  # noqa: E402
from rdscale.search.searcher import Searcher  # noqa: E402


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
    """(result, best seconds) over ``repeats`` runs."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def per_query_ms(fn, queries: np.ndarray, n: int) -> float:
    """Mean milliseconds of ``fn(one query)`` over the first ``n`` queries (after one warm-up call)."""
    fn(queries[:1])
    t0 = time.perf_counter()
    for i in range(n):
        fn(queries[i : i + 1])
    return (time.perf_counter() - t0) / max(n, 1) * 1e3


def interleaved(fns, queries: np.ndarray, n_single: int, rounds: int = 3):
    """Time several methods alternately, so that all see the same machine load: batch calls round-robin
    ``rounds`` times (best of each), then single queries alternating per query (mean of each); who goes first
    rotates, since a query repeated right after another method's call finds the CPU caches warm.
    Returns (results of the last batch call, batch seconds, single-query ms), each a list in ``fns`` order."""
    best = [float("inf")] * len(fns)
    out = [None] * len(fns)
    for r in range(rounds):
        for j in list(range(len(fns)))[r % len(fns):] + list(range(len(fns)))[: r % len(fns)]:
            t0 = time.perf_counter()
            out[j] = fns[j](queries)
            best[j] = min(best[j], time.perf_counter() - t0)
    total = [0.0] * len(fns)
    for fn in fns:
        fn(queries[:1])  # warm
    for i in range(n_single):
        # the same query right after another method's call finds the caches warm: rotate who goes first
        order = list(range(len(fns)))
        order = order[i % len(fns):] + order[: i % len(fns)]
        for j in order:
            t0 = time.perf_counter()
            fns[j](queries[i : i + 1])
            total[j] += time.perf_counter() - t0
    return out, best, [t / max(n_single, 1) * 1e3 for t in total]


def recall_arrays(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """found, truth: (nq, >=k) row positions; mean |top-k overlap| / k."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def positions(result, id_to_pos: dict, nq: int, k: int) -> np.ndarray:
    """rdscale result table -> (nq, k) row positions (-1 padded)."""
    out = np.full((nq, k), -1, np.int64)
    for qv, i, r in zip(*(result.column(c).to_pylist() for c in ("query", "id", "rank"))):
        out[qv, r - 1] = id_to_pos[i]
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_size(n: int, args, workdir: Path) -> tuple[list[dict], dict]:
    dim, k, prefix = args.dim, args.k, args.prefix
    centres = make_centres(dim, args.clusters, seed=0)
    run = workdir / f"n{n}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    t0 = time.perf_counter()
    write_table(run / "proteins.lance", n, centres, args.spread, args.levels, seed=1)
    print(f"[n={n}] wrote {n} x {dim} in {time.perf_counter() - t0:.1f} s", flush=True)
    queries = sample(centres, args.queries, args.spread, np.random.default_rng(2))  # held out, same law
    nq, single = len(queries), args.single
    rows: list[dict] = []

    def record(method, recall, batch_s, single_ms, build_s=None, index_bytes=None, **extra):
        rec = {"n": n, "method": method, "recall_at_k": recall, "batch_qps": nq / batch_s, "batch_s": batch_s,
               "single_ms": single_ms, "build_s": build_s, "index_bytes": index_bytes, **extra}
        rows.append(rec)
        print(f"[n={n}] {method:<44} recall@{k} {recall:.3f}  {rec['batch_qps']:9.1f} q/s batch  "
              f"{single_ms:9.2f} ms/query  build {build_s if build_s is None else round(build_s, 1)} s", flush=True)
        return rec

    # rdscale exact (resident Searcher; load = read + normalise once) against FAISS IndexFlatIP, interleaved -----
    t0 = time.perf_counter()
    searcher = Searcher(run).load(dim, "cosine")
    load_s = time.perf_counter() - t0
    ids = searcher.key_columns()["id"].to_pylist()
    id_to_pos = {v: i for i, v in enumerate(ids)}
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(E.unit_rows(searcher.matrix()))
    flat_build = time.perf_counter() - t0

    def rd_exact(q):
        return searcher.search(q, k=k)

    def flat_exact(q):
        return flat.search(E.unit_rows(q), k)[1]

    (truth_tbl, found), (rd_s, flat_s), (rd_ms, flat_ms) = interleaved(
        [rd_exact, flat_exact], queries, single, rounds=2)
    truth = positions(truth_tbl, id_to_pos, nq, k)
    record("rdscale Searcher exact (resident)", 1.0, rd_s, rd_ms, load_s, width=dim, interleaved_with="FlatIP",
           note="build_s = loading and normalising the matrix once")
    record("FAISS IndexFlatIP full width", recall_arrays(found, truth, k), flat_s, flat_ms, flat_build,
           flat.ntotal * dim * 4, width=dim, interleaved_with="rdscale exact")
    flat.reset()  # free its memory before the indexes are built

    # rdscale one-shot search(): the old public path, reads the table per call ------------------------------------
    res, secs = timed(lambda: S.search(run, queries, k=k))
    record("rdscale search() one-shot exact", recall_arrays(positions(res, id_to_pos, nq, k), truth, k), secs,
           per_query_ms(lambda q: S.search(run, q, k=k), queries, min(single, args.exact_single)), width=dim)

    # rdscale funnels: FAISS backends and Lance's; the HNSW one interleaved with a hand-written FAISS HNSW funnel
    # (index + numpy re-rank, no rdscale), the reference the funnel targets name --------------------------------
    backends = [("faiss", t) for t in args.faiss_types] + ([("lance", S.DEFAULT_INDEX_TYPE)] if args.lance else [])
    for backend, index_type in backends:
        t0 = time.perf_counter()
        info = S.build_index(run, width=prefix, backend=backend, index_type=index_type, rebuild=True)
        build_s = time.perf_counter() - t0
        if backend == "faiss":
            nbytes = F.faiss_path(run, "proteins", prefix, "cosine").stat().st_size
        else:
            nbytes = dir_bytes(run / "proteins.lance" / "_indices")
        searcher.refresh()
        searcher.load(dim, "cosine")
        hand = backend == "faiss" and index_type == "HNSW"
        if hand:
            raw_hnsw = faiss.read_index(str(F.faiss_path(run, "proteins", prefix, "cosine")))
            x_full = E.unit_rows(searcher.matrix())  # (n, dim) unit rows: the hand funnel's re-rank matrix
        for shortlist in args.shortlists:
            kw = dict(k=k, mode="funnel", width=prefix, shortlist=shortlist, backend=backend)

            def rd_funnel(q, kw=kw):
                return searcher.search(q, **kw)

            name = f"rdscale funnel {backend} {index_type} p{prefix} s{shortlist}"
            extra = dict(width=prefix, shortlist=shortlist, backend=backend, index_type=index_type, params=info.params)
            if not hand:
                res, secs = timed(lambda: rd_funnel(queries), 2)
                record(name, recall_arrays(positions(res, id_to_pos, nq, k), truth, k), secs,
                       per_query_ms(rd_funnel, queries, single), build_s, nbytes, **extra)
                continue

            def hand_funnel(q, shortlist=shortlist):
                params = faiss.SearchParametersHNSW()
                params.efSearch = max(64, shortlist)
                _, cand = raw_hnsw.search(E.unit_rows(q[:, :prefix]), shortlist, params=params)
                sims = np.einsum("qsw,qw->qs", x_full[cand], E.unit_rows(q))
                order = np.argsort(-sims, axis=1)[:, :k]
                return np.take_along_axis(cand, order, 1)

            (res, found), (rd_s, hand_s), (rd_ms, hand_ms) = interleaved([rd_funnel, hand_funnel], queries, single)
            record(name, recall_arrays(positions(res, id_to_pos, nq, k), truth, k), rd_s, rd_ms, build_s, nbytes,
                   interleaved_with="hand-written FAISS HNSW funnel", **extra)
            record(f"FAISS HNSW32 funnel by hand p{prefix} s{shortlist}", recall_arrays(found, truth, k), hand_s,
                   hand_ms, width=prefix, shortlist=shortlist, reference=True,
                   interleaved_with="rdscale funnel faiss HNSW")
        if hand:
            del x_full

    context = {"run": run, "queries": queries, "searcher": searcher}
    return rows, context


def write_residues(path: Path, n: int, centres, spread: float, levels, seed: int, chunk: int = 50_000) -> None:
    """A residues table (float16 embeddings, 10 residues per protein id), streamed like ``write_table``."""
    dim = centres.shape[1]
    schema = pa.schema(
        [("id", pa.string()), ("pos", pa.int32()), ("aa", pa.string()),
         ("embedding", pa.list_(pa.float16(), dim)), ("shard", pa.int32())],
        metadata={b"rdscale.levels": json.dumps(list(levels)).encode()},
    )

    def batches():
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = sample(centres, m, spread, rng).astype(np.float16)
            rows = np.arange(start, start + m)
            yield pa.record_batch(
                [pa.array([f"R{i // 10:08d}" for i in rows]), pa.array(rows % 10, pa.int32()), pa.array(["A"] * m),
                 pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                 pa.array(np.full(m, start // chunk), pa.int32())],
                schema=schema,
            )

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(path), schema=schema,
                        max_rows_per_file=250_000)


def residue_pq(n: int, args, workdir: Path) -> list[dict]:
    """Compressed per-residue search: IVF-PQ on a prefix of a float16 residues table, funnel with the exact
    re-rank read from the stored float16 rows (non-resident Searcher), against resident exact search."""
    dim, k, prefix = args.dim, args.k, args.prefix
    centres = make_centres(dim, args.clusters, seed=3)
    run = workdir / f"residues{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    write_residues(run / "residues.lance", n, centres, args.spread, args.levels, seed=4)
    queries = sample(centres, args.queries, args.spread, np.random.default_rng(5))
    t0 = time.perf_counter()
    info = S.build_index(run, table="residues", width=prefix, backend="faiss", index_type="IVF_PQ")
    build_s = time.perf_counter() - t0
    nbytes = F.faiss_path(run, "residues", prefix, "cosine").stat().st_size
    exact = Searcher(run, "residues")
    truth, exact_s = timed(lambda: exact.search(queries, k=k, residue_mode="global"))  # every residue
    stored = n * dim * 2
    rows = [{"n_residues": n, "method": "rdscale residues exact (resident float16)", "recall_at_k": 1.0,
             "batch_qps": len(queries) / exact_s, "resident_bytes": stored}]
    exact.close()  # the compressed searcher below holds only the PQ index
    compressed = Searcher(run, "residues", resident=False)  # only the PQ index in memory
    for shortlist in args.shortlists:
        kw = dict(k=k, mode="funnel", width=prefix, shortlist=shortlist)
        res, secs = timed(lambda: compressed.search(queries, **kw), 2)
        rows.append({
            "n_residues": n, "method": f"rdscale residues funnel faiss IVF_PQ p{prefix} s{shortlist}",
            "recall_at_k": S.recall_at_k(res, truth, k=k), "batch_qps": len(queries) / secs,
            "single_ms": per_query_ms(lambda q: compressed.search(q, **kw), queries, args.single),
            "build_s": build_s, "index_bytes": nbytes, "index_bytes_per_residue": nbytes / n,
            "projected_index_gb_at_1e7": nbytes / n * 1e7 / 2**30, "stored_float16_bytes": stored,
            "params": info.params,
        })
    for r in rows:
        print(f"[residues n={n}] {r['method']:<44} recall@{k} {r['recall_at_k']:.3f} {r['batch_qps']:9.1f} q/s"
              + (f"  index {r['index_bytes'] / 2**20:.1f} MB ({r['index_bytes_per_residue']:.0f} B/residue)"
                 if "index_bytes" in r else ""), flush=True)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return rows


def server_overhead(run: Path, queries: np.ndarray, args) -> dict:
    """Per-query latency of the same funnel request through Ray Serve (HTTP) and through the in-process service."""
    import httpx
    import ray

    from rdscale.cluster import serve as server
    from rdscale.search.service import SearchService

    request = {"k": args.k, "mode": "funnel", "width": args.prefix, "shortlist": args.shortlists[0]}
    service = SearchService(run, ["proteins"])
    n = args.server_queries

    def in_process():
        t0 = time.perf_counter()
        for i in range(n):
            service.search({**request, "vectors": queries[i].tolist()})
        return (time.perf_counter() - t0) / n * 1e3

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        url = server.start(str(run), port=port, num_cpus=0, tables=["proteins"])
        with httpx.Client(timeout=120) as client:
            client.post(f"{url}/search", json={**request, "vectors": queries[0].tolist()})  # warm

            def over_http():
                t0 = time.perf_counter()
                for i in range(n):
                    r = client.post(f"{url}/search", json={**request, "vectors": queries[i].tolist()})
                    assert r.status_code == 200, r.text
                return (time.perf_counter() - t0) / n * 1e3

            floor_url = _serve_floor(url)

            def floor():  # the same requests to a FastAPI deployment on the same Serve that does nothing
                t0 = time.perf_counter()
                for i in range(n):
                    r = client.post(f"{floor_url}/search", json={**request, "vectors": queries[i].tolist()})
                    assert r.status_code == 200, r.text
                return (time.perf_counter() - t0) / n * 1e3

            floor()  # warm
            a1, h1, f1 = in_process(), over_http(), floor()
            a2, h2, f2 = in_process(), over_http(), floor()  # interleaved, so all see the same machine load
        server.stop()
    finally:
        ray.shutdown()
    in_ms, http_ms, floor_ms = min(a1, a2), min(h1, h2), min(f1, f2)
    return {"request": request, "queries": n, "in_process_ms": in_ms, "http_ms": http_ms,
            "overhead_ms": http_ms - in_ms, "serve_floor_ms": floor_ms,
            "overhead_beyond_floor_ms": http_ms - in_ms - floor_ms,
            "note": "serve_floor_ms: the same request bodies answered by an empty FastAPI deployment on the same Ray "
                    "Serve instance (proxy, routing, JSON): what any Serve endpoint costs on this machine",
            "target": "server adds < 2 ms per query", "met": http_ms - in_ms < 2.0}


def _serve_floor(url: str) -> str:
    """An empty FastAPI endpoint on the running Serve instance (route /floor), to measure Serve's own cost."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(name="floor", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Floor:
        @app.post("/search")
        async def search(self, body: dict) -> dict:
            return {"queries": 1, "hits": []}

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    return f"{url}/floor"  # the proxy serves every application on the same address


def targets(rows: list[dict], k: int) -> dict:
    """The issue's targets as ratios measured within this run."""
    out = {}
    for n in sorted({r["n"] for r in rows}):
        at = [r for r in rows if r["n"] == n]
        by = {r["method"]: r for r in at}
        ex, flat = by.get("rdscale Searcher exact (resident)"), by.get("FAISS IndexFlatIP full width")
        t: dict = {}
        if ex and flat:
            t["exact_vs_flatip_batch"] = ex["batch_qps"] / flat["batch_qps"]
            t["exact_vs_flatip_single_latency"] = ex["single_ms"] / flat["single_ms"]
            t["exact_targets"] = "batch >= 0.8x FlatIP, one query within 2x"
            t["exact_met"] = t["exact_vs_flatip_batch"] >= 0.8 and t["exact_vs_flatip_single_latency"] <= 2.0
        good = [r for r in at if r["method"].startswith("rdscale funnel") and r["recall_at_k"] >= 0.95]
        refs = [r for r in at if r.get("reference") and r["recall_at_k"] >= 0.95]
        if good and refs:
            best_b = max(good, key=lambda r: r["batch_qps"])
            best_s = min(good, key=lambda r: r["single_ms"])
            ref_b = max(refs, key=lambda r: r["batch_qps"])
            t["funnel_best_batch"] = best_b["method"]
            t["funnel_vs_faiss_hnsw_funnel_batch"] = best_b["batch_qps"] / ref_b["batch_qps"]
            t["funnel_best_single"] = best_s["method"]
            t["funnel_single_ms"] = best_s["single_ms"]
            t["funnel_targets"] = "recall >= 0.95: batch >= 0.8x the FAISS HNSW funnel, one query < 1 ms at 1e5"
            t["funnel_met"] = t["funnel_vs_faiss_hnsw_funnel_batch"] >= 0.8 and best_s["single_ms"] < 1.0
        pairs = {}
        for r in at:
            if r.get("interleaved_with") == "hand-written FAISS HNSW funnel":
                ref = next(x for x in at if x.get("reference") and x["shortlist"] == r["shortlist"])
                pairs[f"shortlist {r['shortlist']}"] = {
                    "recall": [r["recall_at_k"], ref["recall_at_k"]],
                    "batch_ratio": r["batch_qps"] / ref["batch_qps"],
                    "single_ms": [r["single_ms"], ref["single_ms"]],
                }
        if pairs:
            t["hnsw_funnel_like_for_like"] = {
                "what": "rdscale funnel (faiss HNSW backend) vs the hand-written FAISS HNSW funnel, same index file, "
                        "timed interleaved; batch_ratio > 1: rdscale faster; single_ms: [rdscale, hand]",
                **pairs,
            }
        faiss_f = [r for r in good if r.get("backend") == "faiss"]
        lance_f = [r for r in at if r.get("backend") == "lance"]
        if faiss_f and lance_f:
            bf, bl = max(faiss_f, key=lambda r: r["batch_qps"]), max(lance_f, key=lambda r: r["batch_qps"])
            t["default_backend"] = {
                "faiss_best": {key: bf[key] for key in ("method", "recall_at_k", "batch_qps", "single_ms")},
                "lance_best": {key: bl[key] for key in ("method", "recall_at_k", "batch_qps", "single_ms")},
                "choice": "faiss" if bf["batch_qps"] >= bl["batch_qps"]
                and bf["recall_at_k"] >= bl["recall_at_k"] - 0.01 else "lance",
            }
        out[str(n)] = t
    return out


def format_table(rows: list[dict], k: int) -> str:
    head = (f"{'n':>8}  {'method':<46} {f'recall@{k}':>9} {'q/s batch':>10} {'ms/query':>9} {'build s':>8} "
            f"{'index MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        build = "" if r["build_s"] is None else f"{r['build_s']:.1f}"
        mb = "" if r["index_bytes"] is None else f"{r['index_bytes'] / 2**20:.1f}"
        lines.append(f"{r['n']:>8}  {r['method']:<46} {r['recall_at_k']:>9.3f} {r['batch_qps']:>10.1f} "
                     f"{r['single_ms']:>9.2f} {build:>8} {mb:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[100_000, 1_000_000],
                   help="database sizes, comma separated (default 1e5,1e6)")
    p.add_argument("--quick", action="store_true", help="1e5 vectors only")
    p.add_argument("--dim", type=int, default=1280, help="full stored width")
    p.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[320, 480, 640, 1280],
                   help="chain levels (prefix widths)")
    p.add_argument("--prefix", type=int, default=320, help="the funnel's shortlist width (default 320)")
    p.add_argument("--shortlists", type=lambda s: [int(v) for v in s.split(",")], default=[30, 100],
                   help="funnel shortlist sizes, comma separated (default: 30,100)")
    p.add_argument("--faiss-types", type=lambda s: [v.upper() for v in s.split(",")],
                   default=["IVF_PQ", "IVF_FLAT", "HNSW"],
                   help="FAISS index types, built in this order (one FAISS index per width: each replaces the "
                   "previous; keep HNSW last for the hand-written reference; default IVF_PQ,IVF_FLAT,HNSW)")
    p.add_argument("--no-lance", dest="lance", action="store_false", help="skip the Lance-backend funnel")
    p.add_argument("--no-server", dest="server", action="store_false", help="skip the server overhead")
    p.add_argument("--server-queries", type=int, default=50)
    p.add_argument("--residues", type=int, default=200_000,
                   help="residues in the compressed per-residue (IVF-PQ) measurement (default 2e5; 0: skip)")
    p.add_argument("--single", type=int, default=20, help="queries timed one call at a time (default 20)")
    p.add_argument("--exact-single", type=int, default=3,
                   help="of those, how many for the one-shot search() (each reads the whole table; default 3)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.6, help="within-cluster noise relative to the centre scale")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="FAISS threads (default: the cores this process may use; numpy's BLAS follows "
                   "OMP_NUM_THREADS, so set both alike for a fair comparison)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the tables (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the tables")
    p.add_argument("--budget-s", type=float, default=1500.0,
                   help="skip a size whose projected time (linear in n from the previous size) exceeds what is left")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_search.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [100_000]
    if args.dim not in args.levels:
        args.levels = sorted({*args.levels, args.dim})
    faiss.omp_set_num_threads(args.threads)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rdscale_bench_search_"))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    rows: list[dict] = []
    skipped: list[dict] = [{
        "what": "1e7-residue IVF-PQ index",
        "reason": "a 1e7 x 1280 float16 residues table is 25 GB: more than this shared machine's disk and time "
                  "budget allow; measured at --residues instead (see 'residues': index bytes per residue and the "
                  "projected index size at 1e7)",
    }]
    server = None
    last: tuple[int, float] | None = None
    for n in args.sizes:
        left = args.budget_s - (time.perf_counter() - t0)
        projected = None if last is None else last[1] * n / last[0]
        if projected is not None and projected > left:
            reason = (f"projected {projected:.0f} s (linear in n from n={last[0]}: {last[1]:.0f} s) exceeds the "
                      f"{left:.0f} s left of the {args.budget_s:.0f} s budget on this {os.cpu_count()}-core CPU "
                      "machine shared with other jobs")
            skipped.append({"n": n, "reason": reason})
            print(f"[n={n}] skipped: {reason}", flush=True)
            continue
        started = time.perf_counter()
        size_rows, context = run_size(n, args, workdir)
        rows += size_rows
        if args.server and server is None:
            server = {"n": n, **server_overhead(context["run"], context["queries"], args)}
            print(f"[n={n}] server: {server['http_ms']:.2f} ms/query over HTTP vs {server['in_process_ms']:.2f} ms "
                  f"in process: +{server['overhead_ms']:.2f} ms", flush=True)
        if not args.keep:
            shutil.rmtree(context["run"], ignore_errors=True)
        last = (n, time.perf_counter() - started)
    residue_rows = residue_pq(args.residues, args, workdir) if args.residues else []
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    table = format_table(rows, args.k)
    summary = targets(rows, args.k)
    print("\n" + table + "\n")
    print(json.dumps(summary, indent=1))
    if server:
        print(f"server overhead: {server['overhead_ms']:.2f} ms/query")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "config": config,
        "device": "cpu",
        "gpu": None,
        "caveats": "CPU only. q/s depend on the machine and its load (a shared machine, other jobs running): "
                   "compare ratios within one run, where every method is timed on the same queries.",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "threads": args.threads, "blas_threads": os.environ.get("OMP_NUM_THREADS"),
                    "lance": lance.__version__, "numpy": np.__version__,
                    "faiss": faiss.__version__},
        "total_seconds": time.perf_counter() - t0,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "results": rows,
        "targets": summary,
        "server": server,
        "residues": residue_rows,
        "skipped": skipped,
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
