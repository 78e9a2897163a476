"""No actor of a Ray run is one that Ray's core worker warns about: "Actor with class name: ... has constructor
arguments in the object store and max_restarts > 0" (an actor restarted after those objects are lost cannot
start). Ray Data always passes its map workers' function through the object store, so rdscale's apply pool runs
with max_restarts=0 and the driver redoes the shards of a lost actor instead (rdscale.cluster.executor); rdscale's
own actors (fit, extend) get their small constructor arguments inline. The notice is gone at its cause: nothing
filters it, and this test reads the driver's raw stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_pipeline import write_fasta

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "constructor arguments in the object store"


def _rdscale(argv: list[str], tmp: Path) -> tuple[int, str]:
    """`python -m rdscale ARGV` on a private Ray; returns (exit code, its stdout + stderr + rdscale's Ray log).
    `tmp`: the child's TMPDIR (where the CLI puts that log, and Ray its session: short, for Ray's socket paths)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": "local", "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    before = set(tmp.glob("rdscale-*.log"))
    done = subprocess.run([sys.executable, "-m", "rdscale", *argv], capture_output=True, text=True, env=env,
                          check=False, timeout=400)
    logs = [p.read_text() for p in sorted(set(tmp.glob("rdscale-*.log")) - before)]  # where Ray's messages went
    assert logs, "the Ray run routed Ray's messages to no log file"
    return done.returncode, "\n".join([done.stdout, done.stderr, *logs])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_no_actor_has_object_store_constructor_arguments_and_restarts(tmp_path, tiny_family):
    """run (fit actors, the apply pool) and extend (extend actors) through Ray: Ray's notice is in none of the
    driver's output nor in the file rdscale routes Ray's messages to."""
    fasta = write_fasta(tmp_path / "in.fasta", n=10, seed=4)
    out = tmp_path / "run"
    common = ["--set", "ray.num_actors=1", "--set", "ray.cpus_per_actor=0.5", "--set", "ray.object_store_mb=100"]
    tmp = Path(tempfile.mkdtemp(prefix="rdn", dir="/tmp"))
    try:
        code, text = _rdscale(["run", "--fasta", str(fasta), "--models", *map(str, tiny_family[:2]), "-o", str(out),
                               "--set", "fit.sample_sequences=100", *common], tmp)
        assert code == 0, text[-4000:]
        assert NOTICE not in text, [ln for ln in text.splitlines() if NOTICE in ln]
        code, text = _rdscale(["extend", str(out), "--model", str(tiny_family[2]), *common], tmp)
        assert code == 0, text[-4000:]
        assert NOTICE not in text, [ln for ln in text.splitlines() if NOTICE in ln]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- the driver's redo of lost actors


def _executor(max_restarts: int, attempts: list):
    """A RayExecutor whose every apply dataset is `attempts.pop(0)`: a list of (shard, total, records) parts to
    yield, then an exception to raise (or None). No Ray needed."""
    from rdscale.cluster.executor import RayExecutor
    from rdscale.config import load_config
    from rdscale.io.store import ShardResult

    executor = object.__new__(RayExecutor)
    cfg = load_config(None, [f"ray.max_restarts={max_restarts}"])
    seen: list[list[int]] = []

    def once(cfg_, models, fit_dir, uris, schemas, shards):
        seen.append([s.index for s in shards])
        parts, error = attempts.pop(0)
        for shard, total, records in parts:
            yield shard, total, ShardResult(shard=shard, fragments={"proteins": [f"{shard}:{len(seen)}"]},
                                            records=records)
        if error is not None:
            raise error

    executor._apply_once = once
    return executor, cfg, seen


def _shards(n: int):
    from rdscale.io.fasta import Shard

    return [Shard(path="x.fasta", file_index=0, index=i, fmt="plain", start=i * 10, end=i * 10 + 10) for i in range(n)]


@pytest.fixture(autouse=True)
def _no_redo_wait(monkeypatch):
    """The redo back-off (seconds) recorded, not slept."""
    import rdscale.cluster.executor as executor_module

    waits: list[float] = []
    monkeypatch.setattr(executor_module, "_pause", waits.append)
    return waits


def test_a_lost_actor_redoes_only_the_shards_not_yielded_whole():
    import ray.exceptions

    lost = ray.exceptions.ActorDiedError()  # a system death (node gone, process killed), not its constructor's
    executor, cfg, seen = _executor(3, [
        ([(0, 2, 1), (1, 1, 1), (0, 2, 1), (2, 2, 1)], lost),  # shards 0, 1 whole; half of shard 2, then lost
        ([(2, 2, 2), (3, 0, 0)], None),
    ])
    got = list(executor.apply(cfg, [], None, {}, {}, _shards(4)))
    assert seen == [[0, 1, 2, 3], [2, 3]]
    # each shard's parts together, once; shard 2's half from the lost dataset never reaches the caller
    assert [(s, part.records, part.fragments["proteins"]) for s, _, part in got] == [
        (1, 1, ["1:1"]), (0, 1, ["0:1"]), (0, 1, ["0:1"]), (2, 2, ["2:2"]), (3, 0, ["3:2"])]


def test_lost_actors_past_max_restarts_stop_with_one_line_and_user_errors_are_not_redone(_no_redo_wait):
    import ray.exceptions

    from rdscale.cluster.executor import ActorLostError, lost_worker, redo_backoff
    from rdscale.errors import FastaFormatError

    lost = ray.exceptions.NodeDiedError("node 10.0.0.7 died")
    executor, cfg, seen = _executor(3, [([(0, 1, 1)], lost), ([], lost), ([], lost), ([], lost)])
    with pytest.raises(ActorLostError):
        list(executor.apply(cfg, [], None, {}, {}, _shards(3)))
    # each redo waits longer (the cluster takes a while to declare a node dead), within a bound; none after the last
    assert _no_redo_wait == [redo_backoff(1), redo_backoff(2), redo_backoff(3)] and 0 < _no_redo_wait[0]
    assert _no_redo_wait == sorted(_no_redo_wait) and redo_backoff(100) <= 60
    executor, cfg, seen = _executor(1, [([(0, 1, 1)], lost), ([], lost)])
    with pytest.raises(ActorLostError) as caught:
        list(executor.apply(cfg, [], None, {}, {}, _shards(3)))
    assert seen == [[0, 1, 2], [1, 2]]
    assert "\n" not in str(caught.value) and "2 shard(s) were not committed" in str(caught.value)
    assert "ray.max_restarts=1" in str(caught.value)
    bad = FastaFormatError("x.fasta", "byte 3", "binary content")
    for error in (bad, ray.exceptions.RayTaskError("read", "tb", bad).as_instanceof_cause(),
                  ray.exceptions.UserCodeException("a bug in a stage"),
                  ray.exceptions.ActorDiedError(ray.exceptions.RayTaskError("__init__", "tb", ValueError("x")))):
        assert lost_worker(error) is None, error
        executor, cfg, seen = _executor(3, [([], error)])
        with pytest.raises(type(error)):
            list(executor.apply(cfg, [], None, {}, {}, _shards(2)))
        assert len(seen) == 1  # not redone
    assert lost_worker(lost) is not None and lost_worker(ray.exceptions.ActorDiedError()).startswith("actor")
