"""Search on an object-store run (a local SeaweedFS S3 server, tests/s3.py): Lance's index inside the table vs a
FAISS index stored as an object beside the run (fetched once into the node's cache), both calibrated for recall@10
0.95, against the same run on a local disk. Funnel mode at the calibrated point; resident Searchers (a server
replica's setting), batch q/s and one-query ms on held-out queries of the bench generator.

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
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_search_s3.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rdscale_bench_s3_"))
    server = S3Server(tmp / "s3").start()
    os.environ.update(server.env())
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
        for where, run in (("local", str(local)), ("s3", remote)):
            for backend in ("faiss", "lance"):
                t0 = time.perf_counter()
                info = S.build_index(run, width=args.prefix, backend=backend)
                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                searcher = Searcher(run).load(args.dim)
                open_s = time.perf_counter() - t0

                def fn(q, searcher=searcher, backend=backend):
                    return searcher.search(q, k=10, mode="funnel", backend=backend)

                res, secs = B.timed(lambda: fn(queries), 2)
                single = B.per_query_ms(fn, queries, args.single)
                rec = {"where": where, "backend": backend, "index_type": info.index_type,
                       "params": info.calibration["default"]["funnel"], "recall_at_10": S.recall_at_k(res, truth, 10),
                       "batch_qps": len(queries) / secs, "single_ms": single, "build_s": build_s,
                       "open_and_load_s": open_s}
                rows.append(rec)
                print(f"{where:<5} {backend:<5} {info.index_type:<12} recall {rec['recall_at_10']:.3f} "
                      f"{rec['batch_qps']:8.1f} q/s {single:7.2f} ms/query build {build_s:.1f} s "
                      f"{rec['params']}", flush=True)
    finally:
        server.stop()
    by = {(r["where"], r["backend"]): r for r in rows}
    ratios = {b: {"s3_over_local_single_ms": by[("s3", b)]["single_ms"] / by[("local", b)]["single_ms"],
                  "s3_over_local_qps": by[("s3", b)]["batch_qps"] / by[("local", b)]["batch_qps"]}
              for b in ("faiss", "lance")}
    ratios["s3_faiss_over_s3_lance_qps"] = by[("s3", "faiss")]["batch_qps"] / by[("s3", "lance")]["batch_qps"]
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "results": rows, "ratios": ratios,
              "caveats": "SeaweedFS on localhost (no network latency); a shared CPU machine; compare within the run",
              "total_seconds": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
