"""Run by tests/test_fleet.py and tests/test_cluster.py in a subprocess: the apply pass's elastic actor pool
(`ray.num_actors: auto`) on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`, nodes of one "GPU" and one
CPU each, told apart by RDSCALE_LEASE_HOST, which the ledger's host column records).

    python tests/elastic_child.py WORKDIR [grow|shrink] MODEL...   (no mode: both)

Reports on stdout, as `RESULT {json}` (the parent test asserts):
- `grow`: the run starts on node-a alone (one actor), whose actor is held at its first batch (a gate file) until
  node-b, added mid-run, has committed a shard: so the run can only go on if Ray Data grew the pool onto node-b.
  `hosts` counts the ledger's rows per host; the tables equal the --local run's;
- `shrink`: the run starts on two nodes (two actors), one node is removed after the first commit; the run finishes
  with the actor left (or, when Ray Data waits for the lost actor's restart, within the time given, stops and the
  same command finishes it), and the tables equal the --local run's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lance
from test_pipeline import assert_same_tables, write_fasta

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 << 20}


def node(name: str) -> dict:
    """A node's arguments; its workers (and so its actors' ledger rows) carry `name` as their host."""
    return {**NODE, "env_vars": {"RDSCALE_LEASE_HOST": name}}


def held_stage(gate: Path):
    """ApplyStage whose actors on node-a wait at each batch while `gate` exists (defined here, in __main__, so
    that Ray pickles it by value to the actors)."""
    from rdscale.run.stages import ApplyStage

    class HeldOnNodeA(ApplyStage):
        path = str(gate)

        def __call__(self, batch):
            while os.environ.get("RDSCALE_LEASE_HOST") == "node-a" and os.path.exists(self.path):
                time.sleep(0.05)
            return super().__call__(batch)

    return HeldOnNodeA


def ledger_hosts(out: Path) -> dict[str, int]:
    try:
        hosts = lance.dataset(str(out / "shards.lance")).to_table(columns=["host"])["host"].to_pylist()
    except (OSError, ValueError):  # not written yet
        return {}
    counts: dict[str, int] = {}
    for host in hosts:
        counts[str(host)] = counts.get(str(host), 0) + 1
    return counts


def ledger_rows(out: Path) -> int:
    try:
        return lance.dataset(str(out / "shards.lance")).count_rows()
    except (OSError, ValueError):  # not written yet
        return 0


def pool_nodes() -> set[str]:
    """Node ids of the apply pass's actors (Ray Data's MapWorker actors) alive now."""
    import ray._private.state as state

    return {a["Address"]["NodeID"] for a in state.actors().values()
            if "MapWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"}


def run_with(cfg, during, hold: Path, timeout: float) -> dict:
    """Run cfg on the cluster in a thread; `during()` is called once the first shard is committed, while the
    driver holds after that commit (rdscale.io.store.fault_point). Returns what happened."""
    from rdscale.cluster.executor import RayExecutor
    from rdscale.run.pipeline import run

    out = Path(cfg.output.dir)
    hold.touch()
    os.environ["RDSCALE_FAULT_HOLD"] = str(hold)
    state: dict = {}

    def target():
        try:
            state["summary"] = run(cfg, RayExecutor(cfg), progress=False)
        except Exception as err:  # noqa: BLE001 - reported; the rerun repairs it
            state["error"] = f"{type(err).__name__}: {str(err)[:300]}"

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    deadline = time.time() + 240
    while ledger_rows(out) < 1 and time.time() < deadline and worker.is_alive():
        time.sleep(0.05)
    state["committed_at_change"] = ledger_rows(out)
    try:
        state.update(during())
    finally:
        hold.unlink(missing_ok=True)
        del os.environ["RDSCALE_FAULT_HOLD"]
    changed = time.time()
    worker.join(timeout=timeout)
    state["seconds_after_change"] = round(time.time() - changed, 1)
    state["finished"] = not worker.is_alive() and "summary" in state
    state["hung"] = worker.is_alive()
    if state["hung"]:  # where the run waits, for the parent test's message
        import faulthandler

        faulthandler.dump_traceback(sys.stderr, all_threads=True)
    if "summary" in state:
        state["shards"] = state.pop("summary").shards_total
    return state


def grow(cluster, cfg, work: Path) -> dict:
    """node-a's actor held at its first batch, node-b added: the run goes on only on an actor Ray Data added on
    node-b; the gate opens once node-b committed a shard (or after a deadline, which the parent test reports)."""
    import rdscale.cluster.executor as executor_module
    from rdscale.cluster.executor import RayExecutor
    from rdscale.run.pipeline import run

    out, gate = Path(cfg.output.dir), work / "gate"
    gate.touch()
    state: dict = {}
    real = executor_module.ApplyStage
    executor_module.ApplyStage = held_stage(gate)

    def target():
        try:
            state["summary"] = run(cfg, RayExecutor(cfg), progress=False)
        except Exception as err:  # noqa: BLE001 - reported
            state["error"] = f"{type(err).__name__}: {str(err)[:300]}"

    worker = threading.Thread(target=target, daemon=True)
    try:
        worker.start()
        deadline = time.time() + 120
        while not pool_nodes() and time.time() < deadline and worker.is_alive():
            time.sleep(0.1)
        state["pool_at_start"] = len(pool_nodes())
        state["committed_before_join"] = ledger_rows(out)
        cluster.add_node(**node("node-b"))
        cluster.wait_for_nodes()
        deadline = time.time() + 120
        while "node-b" not in ledger_hosts(out) and time.time() < deadline and worker.is_alive():
            time.sleep(0.1)
        state["committed_while_held"] = ledger_rows(out)
    finally:
        gate.unlink(missing_ok=True)
        executor_module.ApplyStage = real
    worker.join(timeout=120)
    state["finished"] = not worker.is_alive() and "summary" in state
    state["hung"] = worker.is_alive()
    state["hosts"] = ledger_hosts(out)
    if "summary" in state:
        state["shards"] = state.pop("summary").shards_total
    return state


def main() -> int:
    work = Path(sys.argv[1])
    modes = {"grow", "shrink"} & {sys.argv[2]} if len(sys.argv) > 2 else set()
    models = sys.argv[2 + bool(modes):]
    modes = modes or {"grow", "shrink"}
    work.mkdir(parents=True, exist_ok=True)
    fasta = write_fasta(work / "in.fasta", n=40 if "shrink" in modes else 16, seed=11)
    from rdscale.config import load_config
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    base = [f"models={json.dumps(models)}", f"input.paths=[{fasta}]", "input.shard_mb=0.0003",
            "embedding.window=120", "embedding.overlap=30", "embedding.toks_per_batch=512",
            "output.residue_dtype=float32", "output.records_per_batch=2",
            "output.fragment_rows=1"]  # each shard committed as it completes: the pool changes between commits
    local_dir = work / "local"
    run(load_config(None, [*base, f"output.dir={local_dir}", "ray.address=local"]), LocalExecutor(), progress=False)
    elastic = [*base, f"fit.artifact={local_dir / 'fit'}", "ray.num_actors=auto", "ray.cpus_per_actor=0.5",
               "ray.gpus_per_actor=1"]

    import ray
    from ray.cluster_utils import Cluster

    report: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args=node("node-a"))
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    hung = False
    try:
        from rdscale.cluster.executor import RayExecutor

        # -- grow: one node at the start, a second joins mid-run and must take work ---------------------------------
        cfg = load_config(None, [*elastic, f"output.dir={work / 'grow'}"])
        report["actors_at_start"] = RayExecutor(cfg).actors_now(10**6)
        if "grow" in modes:
            report["grow"] = grow(cluster, cfg, work)
            hung = report["grow"]["hung"]
            if report["grow"]["finished"]:
                assert_same_tables(work / "grow", local_dir)
                report["grow"]["same_as_local"] = True
        if "shrink" in modes and not hung:
            # -- shrink: two nodes at the start, one removed mid-run ------------------------------------------------
            added = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
            added = added[0] if added else cluster.add_node(**node("node-b"))
            cluster.wait_for_nodes()
            cfg = load_config(None, [*elastic, f"output.dir={work / 'shrink'}"])
            report["actors_before_shrink"] = RayExecutor(cfg).actors_now(10**6)

            def remove_a_node() -> dict:
                time.sleep(2)  # both actors busy
                cluster.remove_node(added)
                return {"removed": True}

            report["shrink"] = run_with(cfg, remove_a_node, work / "hold-shrink", timeout=300)
            hung = report["shrink"]["hung"]
            if not hung:
                if not report["shrink"]["finished"]:  # the same command again finishes it, on the node left
                    summary = run(cfg, RayExecutor(cfg), progress=False)
                    report["shrink"]["skipped_on_rerun"] = summary.shards_skipped
                    report["shrink"]["shards"] = summary.shards_total
                assert_same_tables(work / "shrink", local_dir)
                report["shrink"]["same_as_local"] = True
    except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
        report["error"] = traceback.format_exc()
    print("RESULT " + json.dumps(report), flush=True)
    if hung:  # a run thread still waits inside Ray: leave without joining it
        os._exit(0)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
