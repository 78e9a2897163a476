"""Object storage against local disk, and plain gzip split by a seek-point index against one sequential reader.

Measured side by side in one process, against a real S3 server (SeaweedFS `weed mini` on this machine, started
here as the tests do):

- the apply pass (`rdscale embed`, LocalExecutor, the same fit) writing to local disk vs to S3 with the FASTA and
  the checkpoints on S3 too: residues/s and their ratio (target: S3 within 15% of local). Best of `--repeats`
  alternating runs, so a noisy neighbour hits both sides. Two input sizes (`--records` and `--scale` times as
  many): the difference gives each side's marginal rate (what a database-sized run sees) and its fixed cost per
  run (table creation, recovery, dedupe, compaction: a handful of requests on S3);
- the Lance fragment (data file) sizes the S3 run leaves behind;
- plain gzip: seek-point index build time (one sequential pass), then reading every record with one sequential
  reader (the unsplit file) vs the indexed shards read by `--workers` processes: records/s and the ratio.

Writes a table to stdout and JSON to bench/results/bench_storage.json.

    python bench/bench_storage.py [--records N] [--gzip-mb MB] [--workers W] [--repeats R]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from rdscale.config import load_config
from rdscale.io.fasta import Record, plan_shards, read_fasta, read_shard
from rdscale.io.location import Location
from rdscale.model.loading import build_tiny_family
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit


def _cfg(fasta: str, models, out: str, **extra):
    items = [f"input.paths={json.dumps([fasta])}", f"models={json.dumps([str(m) for m in models])}",
             f"output.dir={json.dumps(out)}", "ray.address=local", "input.shard_mb=0.05"]
    items += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, items)


def _synthetic_fasta(target_bytes: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    out, size, i = [], 0, 0
    while size < target_bytes:
        seq = "".join(rng.choices(letters, k=rng.randint(50, 600)))
        rec = f">UniRef50_B{i:07d} Cluster: protein {i} n=1 Tax=synthetic TaxID=0 RepID=B{i:07d}\n" + \
            "\n".join(seq[j:j + 60] for j in range(0, len(seq), 60)) + "\n"
        out.append(rec)
        size += len(rec)
        i += 1
    return "".join(out).encode()


def _count_shard(shard) -> tuple[int, float]:
    cpu0 = time.process_time()
    n = sum(1 for _ in read_shard(shard))
    return n, time.process_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fasta", default=str(ROOT / "examples" / "example.fasta"))
    ap.add_argument("--records", type=int, default=120, help="first N accepted records of the FASTA")
    ap.add_argument("--gzip-mb", type=float, default=48.0, help="decompressed size of the synthetic plain gzip")
    ap.add_argument("--shard-mb", type=float, default=4.0, help="gzip shard size (decompressed MiB)")
    ap.add_argument("--workers", type=int, default=2, help="parallel gzip shard readers (processes)")
    ap.add_argument("--scale", type=int, default=4, help="the larger input is this many copies of the records")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_storage.json"))
    args = ap.parse_args()

    from s3 import S3Server

    tmp = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    server = S3Server(tmp / "weed").start()
    os.environ.update(server.env())
    os.environ["RDSCALE_CACHE_DIR"] = str(tmp / "cache")
    try:
        result = run(args, tmp, server)
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def run(args, tmp: Path, server) -> dict:
    items = [r for r in read_fasta([args.fasta]) if isinstance(r, Record)][: args.records]
    sizes = {}
    for label, copies in (("small", 1), ("large", args.scale)):
        fasta = tmp / f"in_{label}.fasta"
        fasta.write_text("".join(f">{r.id}_{c} {r.description}\n{r.sequence}\n" for c in range(copies) for r in items))
        uri = server.uri("in", fasta.name)
        Location.parse(uri).write_bytes(fasta.read_bytes())
        sizes[label] = (fasta, uri, copies * sum(len(r.sequence) for r in items))
    fasta = sizes["small"][0]
    models = build_tiny_family(tmp / "models")
    models_s3 = []
    for m in models:
        models_s3.append(server.uri("models", m.name))
        Location.parse(models_s3[-1]).write_bytes(m.read_bytes())
    fit_dir = fit(_cfg(str(fasta), models, str(tmp / "fit_run"), **{"fit.sample_sequences": 100}),
                  LocalExecutor(), out=tmp / "fit")

    times = {(side, label): [] for side in ("local", "s3") for label in sizes}
    s3_out = None
    for rep in range(args.repeats):
        for label, (path, uri, residues) in sizes.items():
            for side in ("local", "s3"):
                if side == "local":
                    cfg = _cfg(str(path), models, str(tmp / f"local_{label}_{rep}"))
                else:
                    s3_out = server.uri("runs", f"s3_{label}_{rep}")
                    cfg = _cfg(uri, models_s3, s3_out)
                started = time.perf_counter()
                summary = embed(cfg, fit_dir=str(fit_dir), executor=LocalExecutor(), progress=False)
                times[side, label].append(time.perf_counter() - started)
                assert summary.residues == residues, (summary.residues, residues)
    best_t = {k: min(v) for k, v in times.items()}
    res_small, res_large = sizes["small"][2], sizes["large"][2]
    rates = {f"{side}_{label}": sizes[label][2] / best_t[side, label] for side, label in best_t}
    marginal = {side: (res_large - res_small) / max(1e-9, best_t[side, "large"] - best_t[side, "small"])
                for side in ("local", "s3")}
    fixed = {side: best_t[side, "small"] - res_small / marginal[side] for side in ("local", "s3")}
    best = {"local": rates["local_large"], "s3": rates["s3_large"]}
    ratio = best["s3"] / best["local"]
    residues = res_large

    frag_sizes = {}
    for table in ("proteins", "residues", "rejects"):
        files = [f for f in Location.parse(s3_out).join(f"{table}.lance", "data").walk()]
        sizes = [f.size() for f in files]
        frag_sizes[table] = {"files": len(sizes), "bytes_total": sum(sizes),
                             "bytes_min": min(sizes, default=0), "bytes_max": max(sizes, default=0)}

    # plain gzip: index, then sequential vs parallel
    raw = _synthetic_fasta(int(args.gzip_mb * (1 << 20)))
    gz = tmp / "uniref_like.fasta.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=6))
    n_records = raw.count(b">")
    shard_bytes = int(args.shard_mb * (1 << 20))
    started = time.perf_counter()
    shards = plan_shards([str(gz)], shard_bytes, index_dir=tmp / "gzip_index")
    build_s = time.perf_counter() - started
    index_bytes = sum(p.stat().st_size for p in (tmp / "gzip_index").glob("*.gzidx"))
    started, cpu0 = time.perf_counter(), time.process_time()
    seq = sum(1 for _ in read_fasta([str(gz)], shard_bytes=1 << 62))  # the unsplit file: one reader
    seq_s, seq_cpu = time.perf_counter() - started, time.process_time() - cpu0
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(abs, range(args.workers)))  # workers started before the clock
        started = time.perf_counter()
        par, par_cpu = 0, 0.0
        for n, cpu in pool.map(_count_shard, shards):
            par, par_cpu = par + n, par_cpu + cpu
        par_s = time.perf_counter() - started
    assert seq == par == n_records, (seq, par, n_records)

    result = {
        "platform": platform.platform(), "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": os.getloadavg(),  # other jobs on the machine make every rate noisy
        "s3_server": "SeaweedFS weed mini on localhost",
        "apply_pass": {"records": {"small": len(items), "large": len(items) * args.scale},
                       "residues": {"small": res_small, "large": res_large}, "repeats": args.repeats,
                       "seconds": {f"{side}_{label}": v for (side, label), v in times.items()},
                       "residues_per_s_best": rates, "s3_over_local_large": ratio,
                       "s3_over_local_small": rates["s3_small"] / rates["local_small"],
                       "marginal_residues_per_s": marginal,
                       "s3_over_local_marginal": marginal["s3"] / marginal["local"],
                       "fixed_seconds_per_run": fixed, "target": ">= 0.85"},
        "lance_data_files_s3_run": frag_sizes,
        "gzip": {"decompressed_bytes": len(raw), "compressed_bytes": gz.stat().st_size, "records": n_records,
                 "shards": len(shards), "shard_mb": args.shard_mb, "index_build_s": build_s,
                 "index_bytes": index_bytes, "sequential_s": seq_s, "parallel_s": par_s, "workers": args.workers,
                 "sequential_records_per_s": seq / seq_s, "parallel_records_per_s": par / par_s,
                 "parallel_over_sequential": seq_s / par_s,
                 # CPU per record: equal means W free cores read W times faster (the wall ratio needs idle cores)
                 "sequential_cpu_s": seq_cpu, "parallel_cpu_s_total": par_cpu,
                 "cpu_per_record_indexed_over_sequential": par_cpu / max(seq_cpu, 1e-9)},
    }
    print(f"apply pass, tiny 32/48/64 chain, best of {args.repeats} alternating runs (residues/s):")
    print(f"  {'':<28} {f'{res_small} res':>12} {f'{res_large} res':>12} {'marginal':>12} {'fixed s/run':>12}")
    for side, name in (("local", "local disk"), ("s3", "S3 (FASTA, models, output)")):
        print(f"  {name:<28} {rates[side + '_small']:>12,.0f} {rates[side + '_large']:>12,.0f} "
              f"{marginal[side]:>12,.0f} {fixed[side]:>12.2f}")
    print(f"  S3 / local: small {rates['s3_small'] / rates['local_small']:.2f}, large {ratio:.2f}, marginal "
          f"{marginal['s3'] / marginal['local']:.2f} (target >= 0.85)")
    print("Lance data files of the S3 run:")
    for table, f in frag_sizes.items():
        print(f"  {table:<9} {f['files']:>3} files, {f['bytes_total']:>10,} bytes (min {f['bytes_min']:,}, "
              f"max {f['bytes_max']:,})")
    g = result["gzip"]
    print(f"plain gzip, {g['decompressed_bytes'] / 2**20:.0f} MiB decompressed, {n_records} records:")
    print(f"  index build (one pass)   {build_s:8.2f} s   {len(shards)} shards, index {index_bytes:,} bytes")
    print(f"  one sequential reader    {seq_s:8.2f} s   {g['sequential_records_per_s']:>10,.0f} records/s")
    print(f"  {args.workers} shard readers         {par_s:8.2f} s   {g['parallel_records_per_s']:>10,.0f} records/s"
          f"   x{g['parallel_over_sequential']:.2f} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  CPU seconds: sequential {seq_cpu:.2f}, shard readers together {par_cpu:.2f} "
          f"(x{g['cpu_per_record_indexed_over_sequential']:.2f} per record)")
    return result


if __name__ == "__main__":
    main()
