"""Search on an object-store run (a local SeaweedFS S3 server, tests/s3.py): Lance's index inside the table vs a
FAISS index stored as an object beside the run (fetched once into the node's cache), both calibrated for recall@10
0.95, against the same run on a local disk. Funnel mode at the calibrated point; resident Searchers (a server
replica's setting), batch q/s and one-query ms on held-out queries of the bench generator.

Every S3 request goes through a small HTTP proxy (``benchkit.Proxy``), in front of the server: it counts the
requests by kind (GET, LIST = a GET with ``list-type`` / ``prefix``, HEAD, other) and can hold each request back
``--latency-ms`` before forwarding it. Rows ``s3`` (no injected delay) and ``s3+Nms`` (the delay) are measured in
the same run as ``local``; each reports the object-store requests per query after a warm-up search (a fresh
Searcher, opened and loaded, one search; the counters are then reset).

    python bench/bench_search_s3.py --n 20000          # writes bench/results/bench_search_s3.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
import bench_search as B  # noqa: E402
from benchkit import Proxy  # noqa: E402
from s3 import S3Server  # noqa: E402

from rdscale import search as S  # noqa: E402
from rdscale.io.location import Location  # noqa: E402
from rdscale.search.searcher import Searcher  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--prefix", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--single", type=int, default=20)
    p.add_argument("--latency-ms", type=float, default=20.0, help="delay the s3+latency rows add to every request")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_search_s3.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rdscale_bench_s3_"))
    server = S3Server(tmp / "s3").start()
    proxy = Proxy(server.port)
    os.environ.update(server.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}"))
    os.environ["RDSCALE_CACHE_DIR"] = str(tmp / "object_cache")
    levels = [args.prefix, args.dim // 2, args.dim]
    centres = B.make_centres(args.dim, 200, seed=0)
    local = tmp / "run"
    local.mkdir()
    B.write_table(local / "proteins.lance", args.n, centres, 0.6, levels, seed=1, chunk=10_000)
    queries = B.sample(centres, args.queries, 0.6, np.random.default_rng(2))
    remote = server.uri("bench", "run")
    for f in sorted(q for q in local.rglob("*") if q.is_file()):
        Location.parse(f"{remote}/{f.relative_to(local).as_posix()}").write_bytes(f.read_bytes())
    rows = []
    try:
        truth = Searcher(local).search(queries, k=10)
        lag = f"s3+{args.latency_ms:g}ms"
        for where, run in (("local", str(local)), ("s3", remote), (lag, remote)):
            for backend in ("faiss", "lance"):
                proxy.delay = 0.0
                t0 = time.perf_counter()
                info = S.build_index(run, width=args.prefix, backend=backend)  # the s3+latency rows: kept as built
                build_s = time.perf_counter() - t0
                proxy.delay = args.latency_ms / 1e3 if where == lag else 0.0
                t0 = time.perf_counter()
                searcher = Searcher(run).load(args.dim)
                open_s = time.perf_counter() - t0

                def fn(q, searcher=searcher, backend=backend):
                    return searcher.search(q, k=10, mode="funnel", backend=backend)

                fn(queries[:1])  # warm-up: what a replica did before its first user query
                proxy.reset()
                res, secs = B.timed(lambda: fn(queries), 2)
                batch_requests = proxy.reset()
                single = B.per_query_ms(fn, queries, args.single)
                single_requests = proxy.reset()
                asked = 2 * len(queries)  # B.timed runs the batch twice
                rec = {"where": where, "backend": backend, "index_type": info.index_type,
                       "params": info.calibration["default"]["funnel"], "recall_at_10": S.recall_at_k(res, truth, 10),
                       "batch_qps": len(queries) / secs, "single_ms": single, "build_s": build_s,
                       "open_and_load_s": open_s,
                       "requests_per_query_batch": {k: v / asked for k, v in sorted(batch_requests.items())},
                       "requests_per_query_single": {k: v / args.single
                                                     for k, v in sorted(single_requests.items())}}
                rows.append(rec)
                print(f"{where:<9} {backend:<5} {info.index_type:<12} recall {rec['recall_at_10']:.3f} "
                      f"{rec['batch_qps']:8.1f} q/s {single:8.2f} ms/query build {build_s:.1f} s "
                      f"requests/query (one at a time) {rec['requests_per_query_single']} {rec['params']}",
                      flush=True)
    finally:
        server.stop()
    by = {(r["where"], r["backend"]): r for r in rows}
    ratios = {}
    for b in ("faiss", "lance"):
        for where in ("s3", lag):
            ratios[f"{where}/local {b}"] = {
                "single_ms": by[(where, b)]["single_ms"] / by[("local", b)]["single_ms"],
                "batch_qps": by[(where, b)]["batch_qps"] / by[("local", b)]["batch_qps"],
                "equal_recall": by[(where, b)]["recall_at_10"] == by[("local", b)]["recall_at_10"]}
    best_local = max(r["batch_qps"] for r in rows if r["where"] == "local")
    best_local_ms = min(r["single_ms"] for r in rows if r["where"] == "local")
    target = {}  # the target: an S3 run within 1.5x of the local path at equal recall (the best of each)
    for where in ("s3", lag):
        here = [r for r in rows if r["where"] == where]
        slow_q = best_local / max(r["batch_qps"] for r in here)
        slow_ms = min(r["single_ms"] for r in here) / best_local_ms
        target[where] = {"batch_slowdown": slow_q, "single_slowdown": slow_ms,
                         "met_within_1_5x": bool(slow_q <= 1.5 and slow_ms <= 1.5)}
    ratios["s3_faiss_over_s3_lance_qps"] = by[("s3", "faiss")]["batch_qps"] / by[("s3", "lance")]["batch_qps"]
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "results": rows, "ratios": ratios,
              "target_1_5x_of_local": target, "load_average": os.getloadavg(),
              "caveats": "SeaweedFS on localhost behind a counting proxy (the s3+latency rows add the delay to every "
                         "request); a shared CPU machine; compare within the run",
              "total_seconds": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"ratios": ratios, "target": target}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
