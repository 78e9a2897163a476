"""Run by tests/test_cluster.py in a subprocess: a real two-node Ray cluster (`ray.cluster_utils.Cluster`, head +
one node, each declaring one "GPU" and one CPU) that must not clash with the test session's own Ray.

    python tests/cluster_child.py WORKDIR MODEL... > result.json

Checks, each reported in the JSON on stdout (the parent test asserts):
- `relative`: a config file with relative paths, run with the current directory elsewhere, through the cluster
  (two actors of half a CPU and one GPU each: every node keeps half a CPU free, no whole CPU anywhere), equals
  the --local run of the same config;
- `node_loss`: the worker node removed mid-run; the same command rerun (after a replacement node joined) ends with
  exactly the rows of the uninterrupted run;
- `extend`: `extend` through the cluster equals the in-process extend;
- `s3_node_loss` (when the parent passes `--s3 s3://bucket/prefix` and the AWS_* variables of a real S3 server):
  what a cloud cluster does, where nodes share no disk. Input, checkpoints and output all on S3, the fit pass on
  the cluster too, a GPU node added and then lost mid-run, the command rerun: the rows equal the --local run's.
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
import yaml
from test_pipeline import assert_same_tables, write_fasta


def main() -> int:
    work = Path(sys.argv[1])
    models = sys.argv[2:]
    s3_prefix = None
    if "--s3" in models:
        at = models.index("--s3")
        s3_prefix = models[at + 1]
        models = models[:at] + models[at + 2:]
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    # The config and its inputs live in conf_dir and are named relative to it.
    conf_dir = work / "project" / "conf"
    conf_dir.mkdir(parents=True)
    (work / "project" / "data").mkdir()
    (work / "project" / "models").mkdir()
    write_fasta(work / "project" / "data" / "in.fasta", n=14, seed=3, long_every=8)
    rel_models = []
    for m in models:
        dst = work / "project" / "models" / Path(m).name
        dst.write_bytes(Path(m).read_bytes())
        rel_models.append(f"../models/{dst.name}")
    settings = {
        "models": rel_models,
        "input": {"paths": ["../data/in.fasta"], "shard_mb": 0.0004},
        "embedding": {"window": 120, "overlap": 30, "toks_per_batch": 1024},
        "fit": {"sample_sequences": 1000},
        # fragment_rows 1: each shard committed as it completes, so the node goes while shards are committed
        "output": {"dir": "../runs/out", "residue_dtype": "float32", "records_per_batch": 4, "fragment_rows": 1},
        "ray": {"num_actors": 2, "cpus_per_actor": 0.5},
    }
    config = conf_dir / "rel.yaml"
    config.write_text(yaml.safe_dump(settings))
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)

    from rdscale.config import load_config
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    local_dir = work / "project" / "runs" / "local"
    local = run(load_config(config, [f"output.dir={local_dir}", "ray.address=local"]), LocalExecutor(), progress=False)
    report["local_proteins"] = local.proteins
    fit_dir = str(local_dir / "fit")

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                            "object_store_memory": 80 << 20})
    worker = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 << 20)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    try:
        # -- relative paths, two nodes, equal to --local -----------------------------------------------------
        from rdscale.cluster.executor import RayExecutor

        cfg = load_config(config)  # relative paths resolved against conf/, not the cwd (elsewhere/)
        executor = RayExecutor(cfg)
        report["gpus_per_actor"] = executor.gpus
        report["resolved_output"] = cfg.output.dir
        t0 = time.time()
        summary = run(cfg, executor, progress=False)
        report["relative_seconds"] = round(time.time() - t0, 1)
        assert_same_tables(Path(cfg.output.dir), local_dir)
        report["relative"] = {"ok": True, "proteins": summary.proteins}

        # -- a worker node removed mid-run, then the same command again ----------------------------------------
        lost_dir = work / "project" / "runs" / "lost"
        cfg = load_config(config, [f"output.dir={lost_dir}", f"fit.artifact={fit_dir}"])
        at_removal, first_error = run_losing_a_node(cluster, worker, cfg, str(lost_dir / "shards.lance"),
                                                    work / "hold-after-commit")
        removed = "committed" in at_removal
        committed_before = lance.dataset(str(lost_dir / "shards.lance")).count_rows()
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 << 20)
        cluster.wait_for_nodes()
        summary = run(cfg, RayExecutor(cfg), progress=False)
        assert_same_tables(lost_dir, local_dir)
        report["node_loss"] = {"ok": removed, "first_error": first_error,
                               "committed_at_removal": at_removal.get("committed"),
                               "committed_before_rerun": committed_before, "skipped_on_rerun": summary.shards_skipped,
                               "shards": summary.shards_total}

        # -- extend through the cluster equals the in-process extend -------------------------------------------
        import shutil

        from rdscale.run.extend import extend

        small = work / "project" / "runs" / "small_local"
        run(load_config(config, [f"output.dir={small}", "ray.address=local", f"models={json.dumps(models[:2])}",
                                 "output.records_per_batch=2", "input.shard_mb=0.0002", "output.compact=false"]),
            LocalExecutor(), progress=False)  # small batches and shards: several fragments per table
        through = work / "project" / "runs" / "small_cluster"
        shutil.copytree(small, through)
        extend(small, models[2], progress=False, local=True)
        t0 = time.time()
        summary = extend(through, models[2], progress=False, local=False)
        report["extend_seconds"] = round(time.time() - t0, 1)
        assert_same_tables(through, small)
        report["extend"] = {"ok": True, "new_width": summary.new_width, "residues": summary.residues,
                            "fragments": len(lance.dataset(str(through / "residues.lance")).get_fragments())}

        if s3_prefix:
            report["s3_node_loss"] = s3_node_loss(cluster, work, s3_prefix, settings, models, local_dir)
    except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
        report["error"] = traceback.format_exc()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(report))
    return 0


def run_losing_a_node(cluster, node, cfg, ledger: str, hold: Path) -> tuple[dict, str | None]:
    """Run `cfg` on the cluster and remove `node` once the first shard is in the ledger; returns ({"committed":
    ledger rows at the removal} or {} when it never happened, the run's error or None). The driver holds after each
    ledger commit while `hold` exists (rdscale.io.store.fault_point): the node goes while shards remain, however
    fast the machine."""
    from rdscale.cluster.executor import RayExecutor
    from rdscale.run.pipeline import run

    at_removal: dict = {}
    hold.touch()
    os.environ["RDSCALE_FAULT_HOLD"] = str(hold)

    def remove_after_first_commit():
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if lance.dataset(ledger).count_rows() >= 1:
                    break
            except (OSError, ValueError):  # the ledger is not written yet
                pass
            time.sleep(0.05)
        at_removal["committed"] = lance.dataset(ledger).count_rows()
        cluster.remove_node(node)
        hold.unlink()

    killer = threading.Thread(target=remove_after_first_commit, daemon=True)
    killer.start()
    first_error = None
    try:
        run(cfg, RayExecutor(cfg), progress=False)
    except Exception as err:  # noqa: BLE001 - the run may fail when its actor's node goes; the rerun must repair it
        first_error = f"{type(err).__name__}: {str(err)[:200]}"
    killer.join(timeout=250)
    hold.unlink(missing_ok=True)
    del os.environ["RDSCALE_FAULT_HOLD"]
    return at_removal, first_error


def s3_node_loss(cluster, work: Path, prefix: str, settings: dict, models: list[str], local_dir: Path) -> dict:
    from rdscale.cluster.executor import RayExecutor
    from rdscale.config import load_config
    from rdscale.io.location import Location
    from rdscale.run.pipeline import run

    def upload(local: Path, *parts: str) -> str:
        uri = "/".join([prefix.rstrip("/"), *parts])
        Location.parse(uri).write_bytes(local.read_bytes())
        return uri

    out = f"{prefix.rstrip('/')}/runs/lost"
    cfg = load_config(None, [
        f"models={json.dumps([upload(Path(m), 'models', Path(m).name) for m in models])}",
        f"input.paths=[{upload(work / 'project' / 'data' / 'in.fasta', 'data', 'in.fasta')}]",
        f"output.dir={out}",
        *(f"{section}.{key}={json.dumps(value)}" for section in ("input", "embedding", "output", "ray")
          for key, value in settings[section].items() if key not in ("paths", "dir")),
    ])
    node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 << 20)
    cluster.wait_for_nodes()
    at_removal, first_error = run_losing_a_node(cluster, node, cfg, f"{out}/shards.lance", work / "hold-s3")
    summary = run(cfg, RayExecutor(cfg), progress=False)
    same = {}
    import numpy as np

    for name, keys in (("proteins", ["id"]), ("residues", ["id", "pos"]), ("rejects", ["id"])):
        a = lance.dataset(str(local_dir / f"{name}.lance")).to_table().sort_by([(k, "ascending") for k in keys])
        b = lance.dataset(f"{out}/{name}.lance").to_table().sort_by([(k, "ascending") for k in keys])
        columns = [c for c in a.column_names if c not in ("shard", "embedding", "source")]
        same[name] = a.num_rows == b.num_rows and all(a[c].to_pylist() == b[c].to_pylist() for c in columns)
        if "embedding" in a.column_names and same[name]:
            x = np.asarray(a["embedding"].combine_chunks().flatten(), np.float32)
            y = np.asarray(b["embedding"].combine_chunks().flatten(), np.float32)
            same[name] = bool(np.abs(x - y).max(initial=0.0) <= 1e-5)
    return {"removed": "committed" in at_removal, "committed_at_removal": at_removal.get("committed"),
            "first_error": first_error, "shards": summary.shards_total, "skipped_on_rerun": summary.shards_skipped,
            "same_as_local": same, "fitted_on_cluster": summary.fit_dir == f"{out}/fit"}


if __name__ == "__main__":
    sys.exit(main())
