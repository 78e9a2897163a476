"""Search at scale (issue 26): a Ray-built FAISS IVF_PQ index on 2 local Ray nodes, two-stage residue search, and
the bytes per protein and per residue a served index costs.

Synthetic run with the structure of a real one: families of homologous proteins share a template of per-residue
vectors (a family-wide part plus a per-position part; per-dimension scale decaying as in a Matryoshka embedding),
a residue is its family's template at its position plus noise, and a protein's embedding is the mean of its
stored (float16) residues, as the pipeline writes it.

Measures, in one run:
- index build: single process vs `rdscale.cluster.index` on a `ray.cluster_utils.Cluster` of 2 nodes (seconds;
  the driver's peak numpy allocations under tracemalloc; each worker process's peak RSS, ru_maxrss);
- bytes: stored bytes per protein (float32 and float16) and per residue, index bytes per protein, and the resident
  bytes per protein of a served Searcher (a fresh process's RSS growth once loaded and answering) with re-rank
  rows from the store, in float16 and in float32;
- proteins: funnel q/s and recall@10 against exact at the index's calibrated default point (recall 0.95 on
  held-out rows; the Ray build is calibrated in a Ray task), for float32 and float16 stored proteins;
- residues: two-stage (default) vs global exact, per query protein: seconds and recall@10 aggregated to proteins.

Prints a table and writes JSON (default bench/results/bench_search_scale.json). Not a test.

    python bench/bench_search_scale.py                                   # small: 20000 proteins, ~1.8e5 residues
    python bench/bench_search_scale.py --proteins 1000000 --dim 1280 --prefix 320      # UniRef-like (hours)
    python bench/bench_search_scale.py --proteins 1000000 --residues-per-protein 10    # >= 1e7 residues
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdscale import search as S  # noqa: E402
from rdscale.search import faiss_index as F  # noqa: E402
from rdscale.search.searcher import Searcher  # noqa: E402


def fsl(x: np.ndarray, value_type) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).ravel(), value_type), x.shape[1])


def write_run(out: Path, n_prot: int, per_protein: int, dim: int, levels: list[int], seed: int = 0,
              noise: float = 0.8, family: int = 10, chunk: int = 20000) -> dict:
    """proteins.lance (float32), proteins16 run (float16 proteins), residues.lance (float16), written in chunks
    (never the whole table in memory)."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(1.0 + np.arange(dim) / 8.0)).astype(np.float32)
    meta = {b"rdscale.levels": json.dumps(levels).encode()}
    writers = {}

    def append(name: str, table: pa.Table, path: Path):
        mode = "append" if name in writers else "create"
        lance.write_dataset(table, str(path), mode=mode, max_rows_per_file=max(chunk, 1 << 16))
        writers[name] = True

    n_res = 0
    for start in range(0, n_prot, chunk):
        ids, res_rows, owners, means = [], [], [], []
        for i in range(start, min(start + chunk, n_prot)):
            if i % family == 0:
                fam = (rng.standard_normal(dim) + 0.7 * rng.standard_normal((per_protein, dim))) * scale
            shift = rng.standard_normal(dim) * scale * 0.3
            r = (fam + shift + noise * rng.standard_normal((per_protein, dim)) * scale).astype(np.float16)
            res_rows.append(r)
            means.append(r.astype(np.float32).mean(axis=0))
            ids.append(f"P{i:07d}")
            owners += [f"P{i:07d}"] * per_protein
        res = np.concatenate(res_rows)
        prot = np.stack(means).astype(np.float32)
        n = len(ids)
        for name, dtype, vt in (("proteins", np.float32, pa.float32()), ("proteins16", np.float16, pa.float16())):
            t = pa.table({"id": ids, "description": [""] * n, "length": pa.array([per_protein] * n, pa.int32()),
                          "sequence": ["M"] * n, "embedding": fsl(prot.astype(dtype), vt),
                          "shard": pa.array(np.zeros(n), pa.int32())}).replace_schema_metadata(meta)
            append(name, t, out / ("run16" if name == "proteins16" else "run") / "proteins.lance")
        t = pa.table({"id": owners, "pos": pa.array(np.tile(np.arange(per_protein), n), pa.int32()),
                      "aa": ["A"] * len(owners), "embedding": fsl(res, pa.float16()),
                      "shard": pa.array(np.zeros(len(owners)), pa.int32())}).replace_schema_metadata(meta)
        append("residues", t, out / "run" / "residues.lance")
        n_res += len(owners)
    return {"proteins": n_prot, "residues": n_res}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_SERVED = """
import json, sys
import numpy as np
from rdscale.search.searcher import Searcher

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

run, mode, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = np.random.default_rng(0).standard_normal((20, width)).astype(np.float32)
Searcher(run, rerank_rows=mode).close()  # imports and first-use allocations, not the served rows
before = rss()
searcher = Searcher(run, rerank_rows=mode)
searcher.load()
searcher.search(q, k=10, mode="funnel")
print(json.dumps({"rss_bytes": rss() - before}))
"""


def served_bytes(run: Path, mode: str, full_width: int) -> int:
    """Resident bytes a Searcher serving ``run`` holds once loaded and answering funnel queries (the index, the keys,
    and the re-rank rows of ``mode``: none for "store"), measured as a fresh process's RSS growth."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _SERVED, str(run), mode, str(full_width)], capture_output=True,
                          text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]))
    return int(json.loads(done.stdout.strip().splitlines()[-1])["rss_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proteins", type=int, default=20000)
    ap.add_argument("--residues-per-protein", type=int, default=9)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=32, help="index width (a level)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--residue-queries", type=int, default=20, help="query proteins for residue search")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_search_scale.json"))
    args = ap.parse_args()
    levels = sorted({args.prefix, args.dim // 2, args.dim} - {0})
    result: dict = {"machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
                    "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="rdscale-bench-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        result["sizes"] = write_run(tmp, args.proteins, args.residues_per_protein, args.dim, levels)
        result["write_s"] = time.perf_counter() - t0
        run, run16 = tmp / "run", tmp / "run16"

        # ---- index builds: single process, then 2 local Ray nodes
        t0 = time.perf_counter()
        S.build_index(run, width=args.prefix, backend="faiss", index_type="IVF_PQ", recall=None, rebuild=True)
        single_s = time.perf_counter() - t0
        S.build_index(run, width=args.prefix, backend="faiss", index_type="IVF_PQ")  # calibrated (not timed)
        import ray
        from ray.cluster_utils import Cluster

        from rdscale.cluster.index import build_index_on_ray

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        tracemalloc.start()
        t0 = time.perf_counter()
        info = build_index_on_ray(run16, width=args.prefix, index_type="IVF_PQ", rebuild=True)
        ray_s = time.perf_counter() - t0
        _, driver_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        @ray.remote(num_cpus=1)
        def worker_peak() -> float:
            return rss_mb()

        peaks = ray.get([worker_peak.remote() for _ in range(4 * args.nodes)])
        ray.shutdown()
        cluster.shutdown()
        S.build_index(run16, width=args.prefix, backend="faiss", index_type="IVF_PQ", recall=None, rebuild=False)
        index_bytes = F.faiss_path(run16, "proteins", args.prefix, "cosine").stat().st_size
        result["build"] = {
            "index": f"IVF_PQ {info.params}", "width": args.prefix, "single_process_s": single_s,
            "ray_s": ray_s, "ray_nodes": args.nodes, "driver_peak_numpy_mb": driver_peak / 2**20,
            "worker_peak_rss_mb_max": max(peaks), "index_bytes": index_bytes,
            "index_bytes_per_protein": index_bytes / args.proteins,
        }

        # ---- proteins: funnel (PQ shortlist, exact re-rank at the full width) vs exact, float32 and float16
        x = lance.dataset(str(run / "proteins.lance")).to_table(columns=["embedding"]).column("embedding")
        rng = np.random.default_rng(1)
        pick = rng.choice(args.proteins, args.queries, replace=False)
        q = np.stack(x.take(pa.array(pick)).to_numpy(zero_copy_only=False)).astype(np.float32)
        q += 0.05 * rng.standard_normal(q.shape).astype(np.float32) * q.std()
        truth = Searcher(run).search(q, k=10)
        prot = {}
        for name, path in (("float32", run), ("float16", run16)):
            s = Searcher(path, rerank_rows="float16") if name == "float16" else Searcher(path)
            s.load()
            # the calibrated default point (recall@10 0.95 on held-out rows), as `rdscale search` would use it
            (cal,) = [i.calibration for i in S.list_indexes(path) if i.width == args.prefix]
            s.search(q[:5], k=10, mode="funnel")
            t0 = time.perf_counter()
            got = s.search(q, k=10, mode="funnel")
            dt = time.perf_counter() - t0
            exact16 = s.search(q, k=10, mode="exact") if name == "float16" else None
            prot[name] = {"funnel_qps": args.queries / dt, "funnel_recall@10": S.recall_at_k(got, truth, k=10),
                          "funnel_params": cal["default"]["funnel"]}
            if exact16 is not None:
                prot[name]["exact_recall@10_vs_float32"] = S.recall_at_k(exact16, truth, k=10)
        result["proteins"] = prot
        result["bytes"] = {
            "protein_float32": 4 * args.dim, "protein_float16": 2 * args.dim, "residue_float16": 2 * args.dim,
            "index_per_protein": index_bytes / args.proteins,
        }
        # what a served searcher holds in memory per protein (fresh process, RSS growth): re-rank rows from the
        # store (none resident), as float16 rows, as float32 rows
        for mode in ("store", "float16", "float32"):
            result["bytes"][f"served_{mode}_per_protein"] = served_bytes(run, mode, args.dim) / args.proteins

        # ---- residues: two-stage vs global exact, aggregated to proteins
        res = Searcher(run, "residues")
        res.load()
        ids = [f"P{i:07d}" for i in rng.choice(args.proteins, args.residue_queries, replace=False)]
        res.search(ids=ids[:1], k=10, aggregate="proteins")
        t0 = time.perf_counter()
        two = res.search(ids=ids, k=10, aggregate="proteins")
        two_s = (time.perf_counter() - t0) / len(ids)
        t0 = time.perf_counter()
        glob = res.search(ids=ids, k=10, aggregate="proteins", residue_mode="global")
        glob_s = (time.perf_counter() - t0) / len(ids)
        result["residues"] = {"two_stage_s_per_query_protein": two_s, "global_exact_s_per_query_protein": glob_s,
                              "two_stage_recall@10_aggregated": S.recall_at_k(two, glob, k=10),
                              "protein_shortlist": max(20 * 10, 200)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"{result['sizes']['proteins']} proteins, {result['sizes']['residues']} residues, dim {args.dim}")
    for section in ("build", "bytes", "proteins", "residues"):
        for key, value in result[section].items():
            print(f"  {section:9s} {key:38s} {value:.4g}" if isinstance(value, float) else
                  f"  {section:9s} {key:38s} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
