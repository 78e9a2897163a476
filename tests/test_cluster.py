"""Ray on a real cluster: paths resolved on the driver, resources placed by the cluster, nothing starves, a node
lost mid-run, `ray job submit`, and the driver's memory bounded (dedupe, moments merge).

Separate clusters (`ray.cluster_utils.Cluster`, `ray start --head`) run in subprocesses so that they never clash
with the test session's own Ray (`ray_session`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import bench_module
from test_pipeline import assert_same_tables, make_cfg, write_fasta

from rdscale.config import load_config

ROOT = Path(__file__).resolve().parents[1]
benchkit = bench_module("benchkit")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RAY_ADDRESS", None)
    return env


# ------------------------------------------------------------------------------------------------ config paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    conf = tmp_path / "project" / "conf"
    conf.mkdir(parents=True)
    path = conf / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": ["../models/a.pt", "sub/b.pt", "esm2_t6_8M_UR50D", "650M", "/abs/c.pt"],
        "input": {"paths": ["../data/x.fasta", "/abs/y.fasta", "s3://bucket/z.fasta"]},
        "fit": {"artifact": "../fits/f"},
        "output": {"dir": "../runs/out"},
    }))
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    cfg = load_config(path)
    project = tmp_path / "project"
    assert cfg.models == [str(project / "models/a.pt"), str(conf / "sub/b.pt"), "esm2_t6_8M_UR50D", "650M",
                          "/abs/c.pt"]
    assert cfg.input.paths == [str(project / "data/x.fasta"), "/abs/y.fasta", "s3://bucket/z.fasta"]
    assert cfg.fit.artifact == str(project / "fits/f")
    assert cfg.output.dir == str(project / "runs/out")
    # Paths from the command line are relative to the current directory; the default output.dir too.
    cfg = load_config(path, ["output.dir=here", "input.paths=[a.fasta]"])
    assert cfg.output.dir == str(tmp_path / "here") and cfg.input.paths == [str(tmp_path / "a.fasta")]
    assert load_config(None, []).output.dir == str(tmp_path / "runs/rdscale")


def test_packaged_demo_config_paths_are_relative_to_its_own_file(tmp_path, monkeypatch):
    # A shipped config (`-c demo`, the package rdscale.conf: the repository's conf/) follows the rule of every config
    # file: its relative paths resolve against its own folder, never the current directory.
    from rdscale.config import packaged_config_dir

    shipped = packaged_config_dir()
    assert (shipped / "demo.yaml").is_file()
    for where in (ROOT, tmp_path):
        monkeypatch.chdir(where)
        cfg = load_config("demo")
        assert cfg.input.paths == [str(shipped.parent / "examples" / "example.fasta")]
        assert cfg.models[0] == str(shipped.parent / "models" / "tiny" / "esm2_t2_32_tiny.pt")
        assert cfg.output.dir == str(shipped.parent / "runs" / "demo")
    cfg = load_config(ROOT / "conf" / "demo.yaml")  # the checkout's file, by its real path
    assert cfg.input.paths == [str(ROOT / "examples" / "example.fasta")]
    assert cfg.output.dir == str(ROOT / "runs" / "demo")


# ------------------------------------------------------------------------------------------------ resources


@pytest.fixture(scope="module")
def small_fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("cl_fa") / "small.fasta", n=12, seed=5)


@pytest.fixture(scope="module")
def local_small(tmp_path_factory, small_fasta, tiny_family):
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    tmp = tmp_path_factory.mktemp("cl_local")
    cfg = make_cfg(tmp, small_fasta, tiny_family)
    run(cfg, LocalExecutor(), progress=False)
    return tmp / "run"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_actors_taking_every_cpu_do_not_starve_the_readers(ray_session, tmp_path, small_fasta, tiny_family,
                                                           local_small):
    from rdscale.run.pipeline import run

    cpus = int(ray_session.cluster_resources()["CPU"])
    cfg = make_cfg(tmp_path, small_fasta, tiny_family, "all_cpus",
                   **{"ray.address": None, "ray.num_actors": cpus, "ray.cpus_per_actor": 1,
                      "fit.artifact": str(local_small / "fit")})
    summary = run(cfg, progress=False)
    assert summary.shards_total > cpus  # more read tasks than CPUs: they must not wait for a free CPU
    assert_same_tables(tmp_path / "all_cpus", local_small)


@pytest.mark.ray
def test_gpus_come_from_the_cluster_and_impossible_requests_are_refused(ray_session, tmp_path, tiny_family,
                                                                        small_fasta, capsys):
    from rdscale.cli.main import main
    from rdscale.cluster.executor import RayExecutor, ResourceError

    cfg = make_cfg(tmp_path, small_fasta, tiny_family, **{"ray.address": None})
    # The session cluster has no GPU: actors are CPU actors whatever the driver's CUDA says.
    assert RayExecutor(cfg).gpus == 0.0
    for key, value in (("ray.gpus_per_actor", 2), ("ray.cpus_per_actor", 64)):
        cfg = make_cfg(tmp_path, small_fasta, tiny_family, **{"ray.address": None, key: value})
        with pytest.raises(ResourceError, match="no node of the Ray cluster can hold one actor"):
            RayExecutor(cfg)
    code = main(["embed", "--fasta", str(small_fasta), "--models", str(tiny_family[0]), "-o", str(tmp_path / "o"),
                 "--set", "ray.gpus_per_actor=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "ray.gpus_per_actor=2" in err[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_relative_paths_node_loss_and_extend(tmp_path, tiny_family, s3):
    """Head + one node, one "GPU" and one CPU each (a subprocess: its own Ray), then everything on S3 with a node
    lost mid-run. See tests/cluster_child.py."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_child.py"), str(tmp_path / "w"),
                           *map(str, tiny_family), "--s3", s3.uri("cluster")], capture_output=True, text=True,
                          env=_child_env(), timeout=580, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in report, report["error"]
    assert report["gpus_per_actor"] == 1.0  # from the cluster's nodes, not the driver's (absent) CUDA
    assert report["resolved_output"] == str(tmp_path / "w" / "project" / "runs" / "out")
    assert report["relative"]["ok"] and report["relative"]["proteins"] == report["local_proteins"] == 14
    node_loss = report["node_loss"]
    assert node_loss["ok"], "the worker node was not removed"
    assert node_loss["committed_at_removal"] < node_loss["shards"], "the node went after the run, not during it"
    # The rerun ends with exactly the uninterrupted run's rows (checked in the child: assert_same_tables).
    assert node_loss["skipped_on_rerun"] == node_loss["committed_before_rerun"]
    # extend through the cluster's actors equals the in-process extend (assert_same_tables in the child).
    assert report["extend"]["ok"] and report["extend"]["new_width"] == 64 and report["extend"]["residues"] > 0
    lost = report["s3_node_loss"]
    assert lost["removed"] and lost["committed_at_removal"] < lost["shards"], lost
    assert lost["fitted_on_cluster"] and lost["skipped_on_rerun"] >= lost["committed_at_removal"], lost
    assert lost["same_as_local"] == {"proteins": True, "residues": True, "rejects": True}, lost


# ------------------------------------------------------------------------------------------------ ray job submit


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets are held open together while the OS picks, since a port picked and
    released can be handed out again by the next pick (the head once got one port for gcs and the dashboard)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@contextlib.contextmanager
def job_server():
    """`ray start --head` (job server on free ports, token authentication) for this test only; yields (the job
    server's address, the environment to submit with). Stopped with SIGTERM, as `ray stop` does, limited to the
    processes this test started."""
    import secrets
    import shutil
    import signal
    import tempfile
    import time
    import urllib.error
    import urllib.request

    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="rdj", dir="/tmp"))  # short: Ray's socket paths live under it
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _child_env()
    # Token authentication, with a token file of this test's own (never ~/.ray/auth_token).
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    # Every port Ray would otherwise take at a fixed default (client server 10001, dashboard agent 52365) is a free
    # one, so that this head never collides with another Ray on the machine.
    gcs, dash, client, agent = _free_ports(4)
    head_log = open(temp / "head.log", "w")  # noqa: SIM115 - open for the head's whole life, closed below
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--num-gpus=0",
         f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # an answer (401 without the token) is an up server
                break
            except OSError:
                pass
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's job server did not come up"
            time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a submit command, again while the job server answers before the head's agent can take jobs."""
    import time

    for _ in range(30):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480, check=False)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_demo_command(tmp_path, tiny_family, small_fasta):
    """`ray start --head`, then the README's submit command on the demo config with the checkpoints and the
    output as absolute paths; the job's tables must be complete."""
    import lance

    out = tmp_path / "job_out"
    with job_server() as (address, env):
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "jobs/rdscale_job.py", "run", "-c", "demo", "--fasta", str(small_fasta),
               "--models", *map(str, tiny_family), "-o", str(out)]
        proc = submit(cmd, env)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
        job_log = log[log.index("Running entrypoint"):]
        print(job_log)  # shown with pytest -s
        assert "records: 12 (proteins 12 + rejects 0)" in job_log
        assert "embedding: " in job_log  # rdscale's own progress line
        for notice in ("streaming_executor", "Progress bars disabled", "Execution plan"):
            assert notice not in job_log, f"Ray notice {notice!r} in the job log:\n{job_log}"
        proteins = lance.dataset(str(out / "proteins.lance")).to_table()
        residues = lance.dataset(str(out / "residues.lance")).count_rows()
        assert proteins.num_rows == 12 and residues == sum(proteins["length"].to_pylist())
        assert (out / "fit" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_whose_driver_dies_is_resubmitted_and_resumed(tmp_path, tiny_family, small_fasta, local_small):
    """jobs/resubmit.py around `ray job submit`: the job's driver is killed (SIGKILL) once a shard is committed; the
    wrapper resubmits the same command, the new driver takes over the dead one's lease and resumes, and the rows
    equal the uninterrupted run's."""
    import json as _json
    import signal
    import threading
    import time

    import lance
    from test_pipeline import assert_same_tables

    out, hold = tmp_path / "job_out", tmp_path / "hold"
    hold.touch()  # the first driver holds after its first ledger commit, until it is killed
    killed: dict = {}

    def kill_the_driver():
        deadline = time.time() + 400
        lease = out / "_writer.lease"
        while time.time() < deadline:
            try:
                if lance.dataset(str(out / "shards.lance")).count_rows() >= 1 and lease.exists():
                    break
            except (OSError, ValueError):  # not written yet
                pass
            time.sleep(0.2)
        else:
            return
        pid = int(_json.loads(lease.read_text())["pid"])  # the driver: the lease's owner
        killed["committed"] = lance.dataset(str(out / "shards.lance")).count_rows()
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid
        hold.unlink()

    with job_server() as (address, env):
        ray_bin = str(Path(sys.executable).parent / "ray")
        runtime = _json.dumps({"env_vars": {"RDSCALE_FAULT_HOLD": str(hold)}})
        cmd = [sys.executable, "jobs/resubmit.py", "--retries", "2", "--delay", "1", "--",
               ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime,
               "--", "python", "jobs/rdscale_job.py", "run", "-c", "conf/demo.yaml", "--fasta", str(small_fasta),
               "--models", *map(str, tiny_family), "-o", str(out), "--set", "input.shard_mb=0.0004",
               "--set", "embedding.window=120", "--set", "embedding.overlap=30",
               "--set", "embedding.toks_per_batch=1024", "--set", "output.residue_dtype=float32",
               "--set", "output.records_per_batch=8", "--set", f"fit.artifact={local_small / 'fit'}",
               "--set", "output.fragment_rows=1"]  # each shard committed as it completes: the driver dies between
        killer = threading.Thread(target=kill_the_driver, daemon=True)
        killer.start()
        proc = submit(cmd, env)
        killer.join(timeout=10)
    log = proc.stdout + proc.stderr
    assert "pid" in killed, f"the driver was never killed:\n{log[-4000:]}"
    assert proc.returncode == 0 and "resubmitting" in proc.stderr, log[-4000:]
    shards = lance.dataset(str(out / "shards.lance")).to_table().to_pylist()
    assert killed["committed"] < len(shards)  # killed mid-run
    assert_same_tables(out, local_small)


# ------------------------------------------------------------------------------------------------ driver memory


# A run store of n ids with known cross-shard duplicates, and the expected answer (shared with bench_driver.py).
synthetic_store = benchkit.synthetic_store


@pytest.mark.timeout(300)
def test_dedupe_of_a_million_ids_is_exact_with_bounded_driver_memory(tmp_path):
    import lance

    store, moved, first = synthetic_store(tmp_path / "run", 1_000_000)
    before_rejects = lance.dataset(store.uri("rejects")).count_rows()
    before_proteins = lance.dataset(store.uri("proteins")).count_rows()
    benchkit.reset_peak()  # VmHWM (peak RSS) := the RSS now
    base = benchkit.status_kb("VmRSS") * 1024
    n = store.dedupe_across_shards(rows_per_partition=100_000)  # ~11 partitions spilled to disk
    peak = [benchkit.status_kb("VmHWM") * 1024]
    peak_mb = (peak[0] - base) / 2**20
    print(f"\ndedupe of {before_proteins:,} protein ids: driver peak +{peak_mb:.0f} MB over {base / 2**20:.0f} MB")
    assert n == len(moved) > 1000
    proteins = lance.dataset(store.uri("proteins")).to_table(columns=["id", "shard"])
    left = set(zip(proteins["id"].to_pylist(), proteins["shard"].to_pylist()))
    assert len(left) == proteins.num_rows == before_proteins - len(moved)
    assert not (left & moved)
    rejects = lance.dataset(store.uri("rejects")).to_table()
    added = rejects.filter(pa_compute().starts_with(rejects["reason"], "duplicate_id"))
    got = {(i, s, r) for i, s, r in zip(added["id"].to_pylist(), added["shard"].to_pylist(),
                                        added["reason"].to_pylist())}
    assert got == {(i, s, f"duplicate_id: first seen in shard {first[i]}") for i, s in moved}
    assert rejects.num_rows == before_rejects + len(moved)
    # Collecting every id would take far more: 1e6 ids alone are ~60 MB as Python strings; partitions keep it low.
    assert peak_mb < 150, f"driver peak +{peak_mb:.0f} MB"
    # Idempotent: a second pass finds nothing to move and writes nothing.
    assert store.dedupe_across_shards(rows_per_partition=100_000) == 0
    assert lance.dataset(store.uri("rejects")).count_rows() == rejects.num_rows


def pa_compute():
    import pyarrow.compute as pc

    return pc


def test_dedupe_partitions_agree_with_one_partition_and_survive_a_kill(tmp_path):
    """Same result for 1 and many partitions; a pass killed after writing its rejects is completed by a rerun."""
    import lance

    results = []
    for parts_rows in (10**9, 700):
        store, moved, _ = synthetic_store(tmp_path / f"r{parts_rows}", 20_000, seed=1)
        assert store.dedupe_across_shards(rows_per_partition=parts_rows) == len(moved)
        t = lance.dataset(store.uri("rejects")).to_table().sort_by([("id", "ascending"), ("shard", "ascending"),
                                                                    ("reason", "ascending")])
        results.append(t.to_pylist())
    assert results[0] == results[1]
    # Killed between the two steps: the rejects are written but the proteins not deleted.
    store, moved, _ = synthetic_store(tmp_path / "killed", 20_000, seed=1)
    store.dedupe_across_shards(rows_per_partition=700)
    done = lance.dataset(store.uri("rejects")).to_table()
    store2, _, _ = synthetic_store(tmp_path / "killed2", 20_000, seed=1)
    lance.write_dataset(done.filter(pa_compute().starts_with(done["reason"], "duplicate_id")),
                        store2.uri("rejects"), mode="append")
    assert store2.dedupe_across_shards(rows_per_partition=700) == len(moved)
    again = lance.dataset(store2.uri("rejects")).to_table()
    assert sorted(again.to_pylist(), key=str) == sorted(done.to_pylist(), key=str)


def test_job_entry_point_refuses_paths_inside_the_upload(tmp_path, monkeypatch, tiny_family):
    """In a `--working-dir` upload, an output directory there (deleted after the job) or a checkpoint that did
    not travel (git-ignored models/) is one line, not a failure deep in an actor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rdscale_job", ROOT / "jobs" / "rdscale_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    upload = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    (upload / "conf").mkdir(parents=True)
    (upload / "conf" / "demo.yaml").write_text(yaml.safe_dump(
        {"models": ["../models/tiny/a.pt"], "input": {"paths": ["../examples/e.fasta"]},
         "output": {"dir": "../runs/demo"}}))
    monkeypatch.chdir(upload)
    problem = job.check_paths(["run", "-c", "conf/demo.yaml"])
    assert problem.startswith("output.dir ") and "inside the job's uploaded working directory" in problem
    problem = job.check_paths(["run", "-c", "conf/demo.yaml", "-o", str(tmp_path / "shared" / "out")])
    assert problem.startswith("checkpoint ") and "was not uploaded" in problem
    assert job.check_paths(["run", "-c", "conf/demo.yaml", "-o", str(tmp_path / "out"),
                            "--models", *map(str, tiny_family)]) is None
    monkeypatch.chdir(tmp_path)  # not in an upload: nothing to say
    assert job.check_paths(["run", "-c", str(upload / "conf" / "demo.yaml")]) is None


# ------------------------------------------------------------------------------------------------ elastic pool


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_elastic_pool_follows_the_nodes_and_finishes_when_one_goes(tmp_path, tiny_family):
    """`ray.num_actors: auto` on a real multi-node cluster (a subprocess: its own Ray; see tests/elastic_child.py):
    the pool is sized from the nodes there are, a node removed mid-run leaves the run to the actor left (no rerun),
    and the tables equal the --local run's. (A node added mid-run: tests/test_fleet.py.)"""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "elastic_child.py"), str(tmp_path / "w"), "shrink",
                           *map(str, tiny_family)], capture_output=True, text=True, env=_child_env(), timeout=580,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in report, report["error"]
    assert report["actors_at_start"] == 1 and report["actors_before_shrink"] == 2  # follows the nodes
    shrink = report["shrink"]
    print("shrink:", json.dumps(shrink))  # seen with -s: how long the run took after the node left
    assert not shrink["hung"], f"the run did not end after the node left: {shrink}\n{proc.stderr[-6000:]}"
    assert shrink["removed"] and shrink["committed_at_change"] < shrink["shards"], shrink
    assert shrink["same_as_local"], shrink
    if not shrink["finished"]:
        # On a loaded 2-core machine the node's loss can outlast the executor's redo budget (ray.max_restarts):
        # the run then stops naming the lost worker, and the same command finishes it, skipping what
        # was committed. Seen in 1 of 2 CI runs here; the usual path is no rerun at all.
        assert shrink.get("error") and shrink["skipped_on_rerun"] > 0, shrink
