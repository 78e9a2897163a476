"""Sequence-query throughput of the query service (rdscale.search.service.SearchService, what each `rdscale serve`
replica holds) with and without batching of concurrent requests, side by side in one run.

Clients: `--clients` threads at once, each sending one-sequence requests (distinct sequences of `--length`
residues, so the service's embedding cache never answers) until `--queries` have been answered. Variants, run
interleaved (the order alternates every repetition, so drift in machine load hits both alike):

- ``one by one`` (the baseline): ``max_batch=1``: every request runs its own encoder forward, as before batching;
- ``batched``: ``max_batch=16, batch_wait_ms=5`` (the `rdscale serve` defaults): concurrent requests at one chain
  level share a forward.

The chain: two randomly initialised ESM-2 models of the 8M and 35M shapes (6 layers x 320, 12 layers x 480, 20
heads; rdscale.model.loading.build_tiny_family), fitted on a small run of random proteins; searches at full width
(both models run). CPU here: the JSON records the device, the thread count and the load average. Reported: q/s
(median over repetitions), forwards per variant, and the batched / one-by-one ratio.

    python bench/bench_serve_batch.py                      # 8 clients, 64 queries of 200 residues, 3 repetitions
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchkit import ROOT, cfg_for, torch_machine, write_results  # noqa: E402

from rdscale.model.loading import build_tiny_family  # noqa: E402
from rdscale.run.executor import LocalExecutor  # noqa: E402
from rdscale.run.pipeline import run  # noqa: E402
from rdscale.search.service import SearchService  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"
VARIANTS = {"one by one": {"max_batch": 1}, "batched": {"max_batch": 16, "batch_wait_ms": 5.0}}


def random_fasta(path: Path, n: int, rng) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f">P{i:05d}\n{''.join(rng.choice(list(AA), size=int(rng.integers(60, 200))))}\n")
    return path


def throughput(service: SearchService, sequences: list[str], clients: int) -> float:
    """Queries per second of `clients` threads sending one-sequence requests."""
    start = threading.Barrier(clients)
    share = [sequences[i::clients] for i in range(clients)]

    def client(mine):
        start.wait()
        for i, s in enumerate(mine):
            service.search({"sequences": {f"q{i}": s}, "k": 10})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, share))
    return len(sequences) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_serve_batch.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = build_tiny_family(tmp / "models", widths=(320, 480), layers=(6, 12), heads=20, seed=0)
        fasta = random_fasta(tmp / "db.fasta", 300, rng)
        run(cfg_for(tmp, fasta, models, "run", **{"fit.regression": "pcr"}), LocalExecutor(), progress=False)
        services = {name: SearchService(tmp / "run", ["proteins"], **kw) for name, kw in VARIANTS.items()}
        warm = "".join(rng.choice(list(AA), size=args.length))
        for service in services.values():  # models loaded before timing
            service.search({"sequences": {"warm": warm}, "k": 10})
        qps: dict[str, list[float]] = {name: [] for name in VARIANTS}
        forwards = {name: 0 for name in VARIANTS}
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                sequences = ["".join(rng.choice(list(AA), size=args.length)) for _ in range(args.queries)]
                before = services[name].batcher.forwards
                qps[name].append(throughput(services[name], sequences, args.clients))
                forwards[name] += services[name].batcher.forwards - before
                print(f"rep {rep} {name:>10}: {qps[name][-1]:.2f} q/s", flush=True)
    rows = {name: {"qps_median": median(v), "qps": v, "forwards": forwards[name],
                   "queries": args.queries * args.reps} for name, v in qps.items()}
    ratio = rows["batched"]["qps_median"] / rows["one by one"]["qps_median"]
    print(f"{'variant':>12} {'q/s':>8} {'forwards':>9}")
    for name, r in rows.items():
        print(f"{name:>12} {r['qps_median']:8.2f} {r['forwards']:9d}")
    print(f"batched / one by one: {ratio:.2f}x")
    write_results(args.out, {
        "what": "sequence-query throughput of SearchService, concurrent clients, batching vs one forward per request",
        "clients": args.clients, "queries_per_rep": args.queries, "length": args.length, "reps": args.reps,
        "chain": {"layers": [6, 12], "widths": [320, 480], "heads": 20, "weights": "random (build_tiny_family)"},
        "variants": VARIANTS, "results": rows, "ratio_batched_over_one_by_one": ratio,
        "machine": torch_machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
