"""A GPU fleet's concerns on CPU: token budgets per device type (pure function of name and memory, config checks),
provenance and cost in the ledger, and the resubmitting job wrapper."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.config import ConfigError, load_config
from rdscale.model.fast_esm import GIB, device_budget

H100 = ("NVIDIA H100 80GB HBM3", 85_029_158_912)
A10G = ("NVIDIA A10G", 23_609_475_072)
TABLE = {"H100": 32768, "A10G": 8192, "A100": 16384, "A100 80GB": 24576, "cpu": 2048}


def test_one_table_serves_h100_and_a10g_nodes():
    assert device_budget(*H100, 4096, TABLE) == 32768
    assert device_budget(*A10G, 4096, TABLE) == 8192
    assert device_budget("NVIDIA A100-SXM4-40GB", 42_000_000_000, 4096, TABLE) == 16384
    assert device_budget("NVIDIA A100 80GB PCIe", 85_000_000_000, 4096, TABLE) == 24576  # longest key wins
    assert device_budget("cpu", None, 4096, TABLE) == 2048
    assert device_budget("Tesla T4", 16 * GIB, 4096, TABLE) == 4096  # no key: toks_per_batch
    # No key, derived from memory: tokens per GiB left after the chain's weights.
    assert device_budget("Tesla T4", 16 * GIB, 4096, TABLE, toks_per_gib=1000, weight_bytes=6 * GIB) == 10_000
    assert device_budget("cpu", None, 4096, {}, toks_per_gib=1000) == 4096  # memory unknown


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=30), memory=st.one_of(st.none(), st.integers(0, 200 * GIB)),
       base=st.integers(8, 1 << 20), table=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(8, 1 << 20),
                                                           max_size=4),
       per_gib=st.one_of(st.none(), st.integers(1, 1 << 16)), weights=st.integers(0, 100 * GIB))
def test_device_budget_is_a_table_entry_a_memory_share_or_the_default(name, memory, base, table, per_gib, weights):
    got = device_budget(name, memory, base, table, per_gib, weights)
    keys = [k for k in table if k.lower() in name.lower()]
    if keys:
        assert got == table[max(keys, key=len)]
    elif per_gib and memory:
        assert got >= 8 and got == max(8, int(per_gib * max(0.0, (memory - weights) / GIB)))
        # More memory never lowers the budget.
        assert device_budget(name, memory + GIB, base, table, per_gib, weights) >= got
    else:
        assert got == base


def test_config_validates_the_device_table():
    cfg = load_config(None, ["embedding.toks_per_batch_by_device={H100: 32768, A10G: 8192}",
                             "embedding.toks_per_gib=400"])
    assert cfg.embedding.toks_per_batch_by_device == {"H100": 32768, "A10G": 8192}
    for bad, words in (("{H100: 4}", r"token budget in \[8"), ("{H100: big}", "H100"), ("[32768]", "mapping"),
                       ("{H100: true}", "H100")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [f"embedding.toks_per_batch_by_device={bad}"])
    with pytest.raises(ConfigError, match="toks_per_gib"):
        load_config(None, ["embedding.toks_per_gib=0"])
    # The packaged cluster config carries a table for its node types.
    table = load_config("uniref50_cluster").embedding.toks_per_batch_by_device
    assert {"H100", "A10G"} <= set(table)


def test_chain_encoder_takes_its_devices_budget(tiny_family):
    from rdscale.model.encoder import ChainEncoder

    cfg = load_config(None, [f"models={[str(m) for m in tiny_family]}", "embedding.toks_per_batch=4096",
                             "embedding.toks_per_batch_by_device={cpu: 512, H100: 65536}"])
    encoder = ChainEncoder([str(m) for m in tiny_family], cfg)
    assert encoder.device_name == "cpu" and encoder.toks_per_batch == 512
    assert encoder.budgets[-1] == 512 and [e.toks_per_batch for e in encoder.embedders] == encoder.budgets


# ------------------------------------------------------------------------------------------------ provenance, cost

PROVENANCE = ["host", "device", "cuda", "torch", "esm", "rdscale", "dtype", "seconds", "committed_at"]


def _ledger(run_dir):
    import lance

    return lance.dataset(str(run_dir / "shards.lance"))


def test_cost_from_ledger_rows():
    from rdscale.run.provenance import cost, cost_lines

    rows = [{"shard": i, "residues": 1000, "seconds": 2.0, "committed_at": 100.0 + 10 * i, "device": "NVIDIA A10G",
             "dtype": "bfloat16"} for i in range(5)]
    c = cost(rows, planned=9)
    assert c["residues_per_s"] == 500.0 and c["device_hours"] == pytest.approx(10 / 3600)
    assert c["eta_s"] == pytest.approx(4 * 10.0) and c["device_hours_left"] == pytest.approx(8 / 3600)
    text = "\n".join(cost_lines(rows, 9))
    assert "500 residues/s" in text and "ETA 40 s" in text and "NVIDIA A10G (bfloat16)" in text
    assert cost(rows, planned=5)["eta_s"] is None  # complete: nothing left
    assert cost_lines([{"shard": 0, "residues": 5}], 3) == []  # an old run: no timed rows, no lines


def test_ledger_records_provenance_and_a_resume_on_other_software_warns_once(tmp_path, tiny_family, caplog):
    import torch
    from helpers import StopAfter, make_cfg, write_fasta
    from test_pipeline import assert_same_tables

    from rdscale import __version__
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    fasta = write_fasta(tmp_path / "in.fasta", n=30, seed=4)
    run(make_cfg(tmp_path, fasta, tiny_family, "whole"), LocalExecutor(), progress=False)
    rows = _ledger(tmp_path / "whole").to_table().to_pylist()
    assert len(rows) > 3
    for row in [r for r in rows if r["records"]]:  # an empty shard went through no model
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["torch"] == torch.__version__
        assert row["esm"] == "2.0.0" and row["rdscale"] == __version__ and row["host"]
        assert row["seconds"] > 0 and row["committed_at"] > 0
    cfg = make_cfg(tmp_path, fasta, tiny_family, "resumed", **{"fit.artifact": str(tmp_path / "whole" / "fit")})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, StopAfter(3), progress=False)
    _ledger(tmp_path / "resumed").update({"torch": "'1.0.0'", "device": "'NVIDIA A10G'"})
    with caplog.at_level("WARNING", logger="rdscale"):
        run(cfg, LocalExecutor(), progress=False)
    lines = [r.getMessage() for r in caplog.records if "written by another" in r.getMessage()]
    assert len(lines) == 1 and "device NVIDIA A10G -> cpu" in lines[0] and "torch 1.0.0 -> " in lines[0], lines
    assert "\n" not in lines[0]
    assert_same_tables(tmp_path / "resumed", tmp_path / "whole")
    # The same software again: no warning.
    caplog.clear()
    cfg2 = make_cfg(tmp_path, fasta, tiny_family, "again", **{"fit.artifact": str(tmp_path / "whole" / "fit")})
    with pytest.raises(KeyboardInterrupt):
        run(cfg2, StopAfter(3), progress=False)
    with caplog.at_level("WARNING", logger="rdscale"):
        run(cfg2, LocalExecutor(), progress=False)
    assert not [r for r in caplog.records if "written by another" in r.getMessage()]


def test_update_warns_on_a_changed_version_and_old_runs_without_the_columns_still_work(tmp_path, tiny_family,
                                                                                      caplog, capsys):
    import shutil

    from helpers import StopAfter, make_cfg
    from test_update import releases_ab, write_records

    from rdscale.cli.main import main
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run
    from rdscale.run.update import update

    a, b = releases_ab(seed=5, n=16)
    fa, fb = write_records(tmp_path / "A.fasta", a), write_records(tmp_path / "B.fasta", b)
    run(make_cfg(tmp_path, fa, tiny_family, "new"), LocalExecutor(), progress=False)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)

    # A run written with this schema, its recorded software edited: `update` says so in one line.
    _ledger(tmp_path / "new").update({"rdscale": "'0.0.1'"})
    with caplog.at_level("WARNING", logger="rdscale"):
        update(tmp_path / "new", [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    lines = [r.getMessage() for r in caplog.records if "written by another" in r.getMessage()]
    assert len(lines) == 1 and "rdscale 0.0.1 -> " in lines[0], lines

    # A run from before the provenance columns: a ledger without them resumes, verifies, updates and shows info.
    ds = _ledger(old)
    ds.drop_columns(PROVENANCE)
    ds = _ledger(old)
    last = max(ds.to_table(columns=["shard"])["shard"].to_pylist())
    ds.delete(f"shard >= {last - 1}")  # two shards to redo: a resume
    cfg = make_cfg(tmp_path, fa, tiny_family, "old")
    run(cfg, LocalExecutor(), progress=False)
    assert not set(PROVENANCE) & set(_ledger(old).schema.names)
    capsys.readouterr()
    assert main(["verify", str(old)]) == 0
    assert main(["info", str(old)]) == 0
    out = capsys.readouterr().out
    assert "proteins:" in out and "device time" not in out
    with pytest.raises(KeyboardInterrupt):
        update(old, [str(fb)], "B1", overrides=["ray.address=local"], executor=StopAfter(1), progress=False)
    report = update(old, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert report.new == 4 and main(["verify", str(old)]) == 0
    assert main(["info", str(tmp_path / "new")]) == 0
    assert "device time:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ elastic pool


def test_pool_sizes_follow_the_cluster():
    from rdscale.cluster.executor import actor_slots, pool_sizes

    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 16, "GPU": 4}, {"CPU": 2}]  # a CPU-only head and two GPU nodes
    assert actor_slots(nodes, cpus=4, gpus=1) == 1 + 4
    assert actor_slots(nodes, cpus=1, gpus=0) == 8 + 16 + 2
    assert actor_slots(nodes, cpus=4, gpus=0.5) == 2 + 4  # 16 CPUs / 4 on the second node
    assert actor_slots([], cpus=1, gpus=1) == 0
    assert pool_sizes("auto", None, 5) == (1, 5, None)  # grows with the cluster, no cap
    assert pool_sizes("auto", 3, 5) == (1, 3, 3)
    assert pool_sizes("auto", None, 0) == (1, 1, None)  # an autoscaler's first node: start with one
    assert pool_sizes(4, None, 16) == (4, 4, 4)  # fixed, as before
    assert pool_sizes(4, 12, 2) == (4, 4, 12)  # at least 4, up to 12 as nodes join
    with pytest.raises(ConfigError, match="integer or auto"):
        load_config(None, ["ray.num_actors=many"])
    with pytest.raises(ConfigError, match="at least ray.num_actors"):
        load_config(None, ["ray.num_actors=4", "ray.max_actors=2"])


@given(cpus=st.floats(0, 4096), actors=st.one_of(st.none(), st.integers(0, 1024)), shards=st.integers(1, 10**6))
def test_read_tasks_in_flight_are_bounded_by_cpus_actors_and_shards(cpus, actors, shards):
    """Read tasks take no CPU, so nothing but this bound stops Ray starting a worker process per shard."""
    from rdscale.cluster.executor import read_concurrency

    n = read_concurrency(cpus, actors, shards)
    assert 1 <= n <= shards  # more than there are read tasks only makes Ray warn on the user's terminal
    assert n >= min(2, shards)  # a reader ahead of the one being consumed, even on a cluster reporting no CPUs yet
    assert n <= max(2, int(cpus))
    if actors is not None:
        assert n <= max(2, 2 * actors)
        if int(cpus) >= 2 * max(1, actors):
            assert n == min(shards, max(2, 2 * max(1, actors)))  # two per actor where the CPUs allow
    elif cpus >= 2:
        assert n == min(shards, int(cpus))


@pytest.mark.ray
def test_auto_pool_on_the_session_cluster_equals_local(ray_session, tmp_path, tiny_family):
    from helpers import make_cfg, write_fasta
    from test_pipeline import assert_same_tables

    from rdscale.cluster.executor import RayExecutor
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    fasta = write_fasta(tmp_path / "in.fasta", n=12, seed=6)
    run(make_cfg(tmp_path, fasta, tiny_family, "local"), LocalExecutor(), progress=False)
    cfg = make_cfg(tmp_path, fasta, tiny_family, "auto",
                   **{"ray.address": None, "ray.num_actors": "auto", "ray.cpus_per_actor": 1,
                      "fit.artifact": str(tmp_path / "local" / "fit")})
    executor = RayExecutor(cfg)
    assert executor.actors_now(100) == int(ray_session.cluster_resources()["CPU"])  # CPU actors: one per CPU
    run(cfg, executor, progress=False)
    assert_same_tables(tmp_path / "auto", tmp_path / "local")
    # The elastic pool's upscaling threshold was set on its dataset's context, never on the driver's.
    from ray.data.context import DEFAULT_ACTOR_POOL_UTIL_UPSCALING_THRESHOLD, DataContext

    threshold = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    assert threshold == DEFAULT_ACTOR_POOL_UTIL_UPSCALING_THRESHOLD


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_elastic_pool_grows_onto_a_node_added_mid_run(tmp_path, tiny_family):
    """A real two-node Ray cluster (a subprocess: its own Ray; see tests/elastic_child.py): the run starts on node-a
    (one actor), whose actor is held at its first batch until node-b, added mid-run, has committed a shard; so the
    run finishes only if Ray Data grew the pool onto node-b. The ledger's host column (RDSCALE_LEASE_HOST per node)
    says which node embedded each shard, and the tables equal the --local run's."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "elastic_child.py"), str(tmp_path / "w"), "grow",
                           *map(str, tiny_family)], capture_output=True, text=True, env=env, timeout=580, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in report, report["error"]
    grow = report["grow"]
    assert report["actors_at_start"] == 1 and grow["pool_at_start"] == 1, report
    assert grow["committed_before_join"] == 0, grow  # node-a's actor held: nothing done before node-b joined
    assert grow["hosts"].get("node-b", 0) >= 1, grow  # a shard embedded by an actor the pool grew onto node-b
    assert sum(grow["hosts"].values()) == grow["shards"], grow
    assert grow["finished"] and grow["same_as_local"], grow


# ------------------------------------------------------------------------------------------------ resubmitting


def _fake_submit(tmp_path, outcomes: list[tuple[int, str]]):
    """A stand-in for `ray job submit` (a real process): the n-th call prints outcomes[n]'s text and exits with its
    code, as Ray's CLI reports a failed job. Returns the command and the file counting the calls."""
    import json
    import sys

    count = tmp_path / "calls"
    script = tmp_path / "submit.py"
    script.write_text(
        "import json, sys, pathlib\n"
        f"p = pathlib.Path({str(count)!r}); n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1))\n"
        f"code, text = json.loads({json.dumps(json.dumps(outcomes))})[n]\n"
        "print(text); sys.exit(code)\n")
    return [sys.executable, str(script)], count


def _resubmit(argv):
    import importlib.util

    from helpers import ROOT

    path = ROOT / "jobs" / "resubmit.py"
    spec = importlib.util.spec_from_file_location("resubmit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


DIED = "Job 'raysubmit_1' failed\nStatus message: Job entrypoint command failed with exit code -9, last logs: ..."


def test_resubmit_retries_a_lost_driver_and_stops_on_what_a_retry_cannot_fix(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    cmd, calls = _fake_submit(tmp_path / "a", [(1, DIED), (1, DIED), (0, "Job 'raysubmit_3' succeeded")])
    assert _resubmit(["--delay", "0", "--", *cmd]) == 0 and calls.read_text() == "3"
    assert "resubmitting" in capsys.readouterr().err
    # A configuration error: once, with the entrypoint's exit code.
    (tmp_path / "b").mkdir()
    cmd, calls = _fake_submit(tmp_path / "b", [(1, "rdscale run: error: unknown key(s) ray.nm_actors\n"
                                                  "Job entrypoint command failed with exit code 2")] * 3)
    assert _resubmit(["--delay", "0", "--", *cmd]) == 2 and calls.read_text() == "1"
    assert "configuration or usage error" in capsys.readouterr().err
    # The same rdscale error twice in a row: not transient.
    (tmp_path / "c").mkdir()
    same = (1, "rdscale run: error: /out holds the output of a different run\nfailed with exit code 1")
    cmd, calls = _fake_submit(tmp_path / "c", [same] * 4)
    assert _resubmit(["--delay", "0", "--", *cmd]) == 1 and calls.read_text() == "2"
    # Bounded: --retries 1 is two attempts at most.
    (tmp_path / "d").mkdir()
    cmd, calls = _fake_submit(tmp_path / "d", [(1, DIED)] * 5)
    assert _resubmit(["--retries", "1", "--delay", "0", "--", *cmd]) == -9 and calls.read_text() == "2"
    assert "giving up" in capsys.readouterr().err
