"""Driver memory at the end of a run (dedupe of ids across shards) and in the fit pass (moments merge), before and
after bounding it.

- dedupe, before: the previous `RunStore.dedupe_across_shards`, which reads every protein id and every reject id
  (with shard, source and reason) into the driver and groups them there: memory O(proteins).
- dedupe, after: the current one, which streams (id, shard) from Lance into hash partitions of at most
  `rows_per_partition` rows (spilled to a scratch folder) and deduplicates one partition at a time: memory
  O(rows_per_partition + duplicates).
- moments, before: the driver `ray.get`s every actor's (K, K) accumulator at once and merges them (what the fit pass
  did): memory ~ actors x 8 K^2 bytes.
- moments, after: `rdscale.cluster.executor.tree_merge`: actors absorb each other's accumulators (object store,
  actor to actor) and the driver receives the one merged accumulator: memory ~ 8 K^2 bytes, whatever the actors.

The dedupe input is synthetic (no embedding: width 1, no residues table): n ids over 64 shards, 0.1% of them
repeated in a later shard (a quarter of those a third time), 0.05% repeated among the rejects (benchkit.py's
synthetic_store, which tests/test_cluster.py checks dedupe against). Each measurement runs in its own subprocess; driver
peak = that process's peak RSS (VmHWM, reset through /proc/self/clear_refs once the store is opened / the actors
hold their accumulators) minus its RSS just before the step. Prints a table, writes bench/results/bench_driver.json.

    python bench/bench_driver.py                        # 1e5, 1e6, 1e7 ids; K = 144, 2720; 4 actors
    python bench/bench_driver.py --ids 1e5 1e6 --ks 144 # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchkit import MB, ROOT, measure, open_synthetic_store, synthetic_store


def dedupe_collect_all(store) -> int:
    """The previous RunStore.dedupe_across_shards, verbatim but for names: every id on the driver at once."""
    import lance
    import pyarrow as pa
    import pyarrow.compute as pc

    from rdscale.io.store import PROTEINS, REJECTS, RESIDUES, sql_in_list

    proteins = store.dataset(PROTEINS).to_table(columns=["id", "shard", "source"])
    rejects = store.dataset(REJECTS).to_table(columns=["id", "shard", "reason"])
    if proteins.num_rows == 0:
        return 0
    seen = pa.concat_tables([proteins.select(["id", "shard"]), rejects.select(["id", "shard"])])
    first = seen.group_by("id").aggregate([("shard", "min"), ("shard", "count")])
    first = first.filter(pc.greater(first["shard_count"], 1))
    if first.num_rows == 0:
        return 0
    joined = proteins.join(first, "id").filter(pc.greater(pc.field("shard"), pc.field("shard_min")))
    if joined.num_rows == 0:
        return 0
    already = {(r["id"], r["shard"], r["reason"]) for r in rejects.to_pylist()}
    new_rejects = []
    for r in joined.to_pylist():
        reason = f"duplicate_id: first seen in shard {r['shard_min']}"
        if (r["id"], r["shard"], reason) not in already:
            new_rejects.append({"id": r["id"], "source": r["source"], "reason": reason, "shard": r["shard"]})
    if new_rejects:
        table = pa.Table.from_pylist(new_rejects, schema=store.schemas[REJECTS])
        lance.write_dataset(table, store.uri(REJECTS), mode="append")
    by_shard: dict[int, list[str]] = {}
    for r in joined.to_pylist():
        by_shard.setdefault(r["shard"], []).append(r["id"])
    for shard, ids in by_shard.items():
        predicate = f"shard = {shard} AND id IN ({sql_in_list(ids)})"
        if RESIDUES in store.schemas:
            store.dataset(RESIDUES).delete(predicate)
        store.dataset(PROTEINS).delete(predicate)
    return joined.num_rows


# -- child processes ------------------------------------------------------------------------------------------------


def build_store(root: Path, n: int) -> dict:
    """The synthetic store (benchkit.synthetic_store, 64 shards); its table sizes."""
    store, _, _ = synthetic_store(root, n, shards=64, expected=False)
    return {name: store.dataset(name).count_rows() for name in ("proteins", "rejects")}


def child_dedupe(path: str, method: str) -> dict:
    store = open_synthetic_store(path)
    fn = (lambda: dedupe_collect_all(store)) if method == "before" else store.dedupe_across_shards
    moved, seconds, peak = measure(fn)
    return {"moved": moved, "seconds": seconds, "driver_peak_mb": peak}


def child_moments(k: int, method: str, actors: int) -> dict:
    import ray

    from rdscale.cluster.executor import tree_merge
    from rdscale.fit.moments import Moments

    ray.init(address="local", num_cpus=actors, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=max(200 * MB, 3 * actors * 8 * k * k))

    @ray.remote(num_cpus=1)
    class Acc:
        def __init__(self, k: int, seed: int):
            import torch

            g = torch.Generator().manual_seed(seed)
            self.m = Moments(k)
            self.m.update(torch.randn(256, k, generator=g, dtype=torch.float64))

        def export(self):
            return self.m.to_arrays()

        def absorb(self, arrays):
            self.m = self.m.merge(Moments.from_arrays(arrays))

    workers = [Acc.remote(k, i) for i in range(actors)]
    ray.get([w.export.remote() for w in workers[:1]])  # all started (the first export also warms the path)
    ray.get([w.__ray_ready__.remote() for w in workers])

    def before():
        parts = ray.get([w.export.remote() for w in workers])  # every accumulator in the driver at once
        merged = Moments.from_arrays(parts[0])
        for part in parts[1:]:
            merged = merged.merge(Moments.from_arrays(part))
        return merged.count

    def after():
        return Moments.from_arrays(tree_merge(workers)).count

    count, seconds, peak = measure(before if method == "before" else after)
    ray.shutdown()
    return {"count": count, "seconds": seconds, "driver_peak_mb": peak, "accumulator_mb": 8 * k * k / MB}


def _run_child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    p.add_argument("--ks", nargs="+", type=int, default=[144, 2720])
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "driver"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_driver.json"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            result = build_store(Path(rest[0]), int(rest[1]))
        elif kind == "dedupe":
            result = child_dedupe(rest[0], rest[1])
        else:
            result = child_moments(int(rest[0]), rest[1], int(rest[2]))
        print("RESULT " + json.dumps(result))
        return 0

    work = Path(args.work)
    rows = []
    for n in map(int, args.ids):
        base = work / f"ids_{n}"
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        built = _run_child(["build", str(base / "template"), str(n)])
        build_s = time.perf_counter() - t0
        for method in ("before", "after"):
            copy = base / method
            shutil.copytree(base / "template", copy)
            r = _run_child(["dedupe", str(copy), method])
            rows.append({"step": "dedupe", "ids": n, "proteins": built["proteins"], "rejects": built["rejects"],
                         "method": method, "build_seconds": round(build_s, 1), **r})
            print(f"dedupe   ids={n:>10,}  {method:6s}  moved={r['moved']:>7,}  {r['seconds']:7.1f} s  "
                  f"driver peak +{r['driver_peak_mb']:8.1f} MB", flush=True)
            shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    for k in args.ks:
        for method in ("before", "after"):
            r = _run_child(["moments", str(k), method, str(args.actors)])
            rows.append({"step": "moments_merge", "K": k, "actors": args.actors, "method": method, **r})
            print(f"moments  K={k:>6}  actors={args.actors}  {method:6s}  {r['seconds']:7.2f} s  driver peak "
                  f"+{r['driver_peak_mb']:8.1f} MB  (one accumulator {r['accumulator_mb']:.1f} MB)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "rows_per_partition": 1_000_000, "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
