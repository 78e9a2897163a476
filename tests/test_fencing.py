"""Fenced commits (issue 25): a writer that freezes inside a commit and loses its lease never damages the run.

Two writers of one run, each believing itself on another host (so no pid check can help), the second judging the
first's lease stale at once (stale_after=0): only the commit gate (rdscale.io.lease) keeps the run whole. A
cooperative scheduler runs them turn by turn, each turn lasting until the running writer reaches its next pause
point: every step's "checked" moment (between its lease check and its write), every step's "done" moment, and the
store's own fault points between a shard's table commits. Hypothesis draws the turns. Whatever the interleaving, the
tables end equal to an uninterrupted run's (or, when no writer finished, a clean rerun makes them so); no table
references a missing data file; no shard is in the ledger twice; a writer that lost its lease stops with a
LeaseError and commits nothing after it.

Then the same with real processes: `rdscale embed` stopped with SIGSTOP inside a commit past a short staleness
window, a second `rdscale embed` as another host, SIGCONT; on local disk and on the SeaweedFS S3 server (after a
canary that the server enforces conditional writes under concurrency). And the other writers: a Ray driver, an
`update`, a `compact`, each losing its lease to another host mid-way.
"""

from __future__ import annotations

import threading
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.io import lease as lease_mod
from rdscale.io import store as store_mod
from rdscale.io.lease import LeaseError, WriterLease, read_lease
from rdscale.io.store import (
    LEDGER,
    PROTEINS,
    REJECTS,
    RESIDUES,
    RunStore,
    ShardResult,
    missing_data_files,
    proteins_table,
    rejects_table,
    residues_table,
    run_schemas,
    schema_metadata,
)

SHARDS = 3
KEY = "fence-test"
SCHEMAS = run_schemas(4, None, schema_metadata([4], {}, {}, KEY), residues=True, residue_dtype="float32")


def shard_tables(s: int) -> tuple[ShardResult, dict[str, pa.Table]]:
    """Deterministic rows of shard s: two proteins (their residues) and one reject."""
    rng = np.random.default_rng(s)
    rows = [{"id": f"p{s}_{i}", "description": "", "sequence": "ACDEFG"[: 3 + i], "source": f"in@{s}:{i}"}
            for i in range(2)]
    per_residue = [rng.normal(size=(len(r["sequence"]), 4)).astype(np.float32) for r in rows]
    tables = {
        PROTEINS: proteins_table(rows, np.stack([e.mean(0) for e in per_residue]), s, SCHEMAS[PROTEINS]),
        RESIDUES: residues_table(rows, per_residue, s, SCHEMAS[RESIDUES]),
        REJECTS: rejects_table([{"id": f"r{s}", "source": f"in@{s}:9", "reason": "empty"}], s, SCHEMAS[REJECTS]),
    }
    result = ShardResult(shard=s, fragments={}, records=3, proteins=2, rejects=1,
                         residues=sum(len(r["sequence"]) for r in rows))
    return result, tables


def write_run(root: Path, lease: WriterLease) -> None:
    """What `embed` does to the tables, without models: recover, then every missing shard (workers' fragments
    written first, then the commit), then remove orphan files."""
    store = RunStore(str(root), SCHEMAS, KEY, lease=lease)
    store.recover()
    done = store.committed()
    for s in range(SHARDS):
        if s not in done:
            result, tables = shard_tables(s)
            store.write_and_commit(result, tables, key=f"shard-{s}")
    store.cleanup_orphans()


def snapshot(root: Path) -> dict[str, list]:
    out = {}
    for name in (PROTEINS, RESIDUES, REJECTS, LEDGER):
        table = lance.dataset(str(root / f"{name}.lance")).to_table()
        cols = [c for c in table.column_names if c != "embedding"]
        rows = table.select(cols).to_pylist()
        if "embedding" in table.column_names:
            for row, emb in zip(rows, table["embedding"].to_pylist()):
                row["embedding"] = [round(x, 6) for x in emb]
        out[name] = sorted(rows, key=repr)
    return out


def damage(root: Path) -> list[str]:
    """What `verify` would call damaged: missing data files, a shard twice in the ledger, a committed shard whose
    rows do not match its ledger counts."""
    problems = []
    for name in (PROTEINS, RESIDUES, REJECTS, LEDGER):
        missing = missing_data_files(root / f"{name}.lance")
        if missing:
            problems.append(f"{name}: {len(missing)} missing data files")
    ledger = lance.dataset(str(root / f"{LEDGER}.lance")).to_table().to_pylist()
    shards = [r["shard"] for r in ledger]
    if len(shards) != len(set(shards)):
        problems.append(f"ledger lists a shard twice: {sorted(shards)}")
    for row in ledger:
        for name, column in ((PROTEINS, "proteins"), (REJECTS, "rejects"), (RESIDUES, "residues")):
            n = lance.dataset(str(root / f"{name}.lance")).count_rows(filter=f"shard = {row['shard']}")
            if n != row[column]:
                problems.append(f"shard {row['shard']}: {n} {name} rows, ledger says {row[column]}")
    return problems


def gate_is_free(root) -> bool:
    """Nobody holds the run's commit gate (on a filesystem its file stays; only its flock comes and goes)."""
    backend = lease_mod.LocalLeaseBackend()
    handle = backend.lock(str(Path(root) / lease_mod.GATE_NAME), b"")
    if handle is None:
        return False
    backend.unlock("", handle)
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("fence_ref") / "run"
    with WriterLease(root, renew_every=0) as lease:
        write_run(root, lease)
    return snapshot(root)


class Scheduler:
    """Runs writers in threads, one at a time: a writer runs until its next pause point, then waits for its turn."""

    def __init__(self):
        self.cv = threading.Condition()
        self.turn: str | None = None
        self.parked: set[str] = set()
        self.points: dict[str, list[str]] = {}
        self.log: list[tuple[str, str]] = []  # (writer, point) in the order they happened

    def pause(self, point: str) -> None:
        name = threading.current_thread().name
        if name not in self.points:
            return  # not one of ours (the main thread's reference run)
        self.points[name].append(point)
        self.log.append((name, point))
        with self.cv:
            self.turn = None
            self.parked.add(name)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == name)
            self.parked.discard(name)

    def start(self, name: str, fn) -> threading.Thread:
        self.points[name] = []
        outcome: dict = {}

        def body():
            with self.cv:
                self.cv.wait_for(lambda: self.turn == name)
            try:
                fn()
                outcome["ok"] = True
            except LeaseError as err:
                outcome["lease_error"] = str(err)
            finally:
                with self.cv:
                    self.turn = None
                    self.parked.add(name)  # finished: never scheduled again
                    self.cv.notify_all()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.outcome = outcome
        thread.start()
        return thread

    def run_turn(self, name: str) -> None:
        with self.cv:
            self.parked.discard(name)
            self.turn = name
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: self.turn is None, timeout=120), f"{name} did not reach a pause point"


@settings(max_examples=25, deadline=None)
@given(second_at=st.integers(0, 40), turns=st.lists(st.sampled_from("ab"), max_size=60))
def test_two_writers_any_interleaving_never_damage_the_run(tmp_path_factory, reference, second_at, turns):
    root = tmp_path_factory.mktemp("fence") / "run"
    sched = Scheduler()
    hooks = {p: (lambda p=p: sched.pause(p)) for p in ("before_tables", "between_tables", "before_ledger",
                                                        "after_ledger")}
    old_hooks = dict(store_mod.FAULT_HOOKS)
    lease_mod.STEP_HOOK = sched.pause
    store_mod.FAULT_HOOKS.update(hooks)
    threads = {}
    try:
        def writer(host):
            def fn():
                lease = WriterLease(root, renew_every=0, stale_after=0, host=host, gate_wait=0)
                lease.acquire()
                sched.pause("acquired")
                try:
                    write_run(root, lease)
                finally:
                    lease.release()
            return fn

        threads["a"] = sched.start("a", writer("host-a"))
        # writer a runs `second_at` turns alone, then the scheduler alternates as drawn, then drains both
        order = ["a"] * second_at + ["b-start"] + list(turns)
        for step in order:
            if step == "b-start":
                threads["b"] = sched.start("b", writer("host-b"))
                step = "b"
            if step in threads and threads[step].is_alive():
                sched.run_turn(step)
        for name in ("a", "b"):
            while threads[name].is_alive():
                sched.run_turn(name)
            threads[name].join(timeout=60)
    finally:
        lease_mod.STEP_HOOK = None
        store_mod.FAULT_HOOKS.clear()
        store_mod.FAULT_HOOKS.update(old_hooks)

    outcomes = {name: t.outcome for name, t in threads.items()}
    assert all(o for o in outcomes.values()), outcomes  # each writer finished or stopped with a LeaseError
    assert damage(root) == [], (outcomes, sched.points)
    if any(o.get("ok") for o in outcomes.values()):
        assert snapshot(root) == reference, (outcomes, sched.points)
    for o in outcomes.values():  # a stopped writer says why in one line
        assert "\n" not in o.get("lease_error", ""), o
    # once a writer took the lease, no write of an earlier holder completes
    for i, (name, point) in enumerate(sched.log):
        if point == "acquired":
            earlier = {n for n, p in sched.log[:i] if p == "acquired"} - {name}
            late = [(n, p) for n, p in sched.log[i + 1:] if n in earlier and p.endswith(":done")]
            assert not late, (late, sched.log)
    assert read_lease(root) is None  # released by whoever held it last
    assert gate_is_free(root)
    # whatever happened, a clean rerun finishes the run into exactly the uninterrupted one
    with WriterLease(root, renew_every=0) as lease:
        write_run(root, lease)
    assert snapshot(root) == reference and damage(root) == []


def test_a_lost_writer_stops_at_its_next_step(tmp_path):
    """The reported case, spelled out: a writer frozen after its proteins append loses its lease to another host;
    the successor removes its uncommitted rows and files; the first wakes up and is refused at its residues
    append, so no table references a removed file and the ledger lists each shard once."""
    root = tmp_path / "run"
    first = WriterLease(root, renew_every=0, host="host-a", gate_wait=0).acquire()
    store = RunStore(str(root), SCHEMAS, KEY, lease=first)
    result, tables = shard_tables(0)
    for name, table in tables.items():
        result.fragments[name] = store_mod.write_table_fragments(store.uri(name), table)

    def successor():
        store_mod.FAULT_HOOKS.pop("between_tables")
        with WriterLease(root, renew_every=0, stale_after=0, host="host-b") as second:
            write_run(root, second)

    store_mod.FAULT_HOOKS["between_tables"] = successor
    try:
        with pytest.raises(LeaseError, match="lost its writer lease"):
            store.commit_shard(result, "shard-0")
        with pytest.raises(LeaseError, match="lost its writer lease"):  # and stays stopped
            store.commit_shard(result, "shard-0")
    finally:
        store_mod.FAULT_HOOKS.pop("between_tables", None)
    first.release()
    assert damage(root) == []
    assert lance.dataset(str(root / f"{LEDGER}.lance")).count_rows() == SHARDS


def test_a_live_owner_on_this_host_is_never_taken_over(tmp_path):
    """However long ago it renewed (a stopped process renews nothing), an owner alive on this host keeps its
    lease; only a dead pid, a reused pid or a reboot make it stale."""
    root = tmp_path / "run"
    with WriterLease(root, renew_every=0):
        with pytest.raises(LeaseError, match="being written by another rdscale process"):
            WriterLease(root, stale_after=0).acquire()
    info = lease_mod.LeaseInfo("x", lease_mod.this_host(), 1, None, 0.0, 0.0, boot="another-boot")
    if lease_mod._boot_id():  # pid 1 is alive, but it was recorded before a reboot: gone
        assert "restarted" in info.gone()


# ------------------------------------------------------------------------------ real writers, SIGSTOP, SIGCONT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frozen_base(tmp_path_factory, tiny_family):
    """An input, a fit of the tiny family on it, and the tables of an uninterrupted run (for comparison)."""
    from helpers import make_cfg, write_fasta

    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import embed, fit

    tmp = tmp_path_factory.mktemp("frozen_base")
    fasta = write_fasta(tmp / "in.fasta", n=16, seed=5)
    fit_dir = fit(make_cfg(tmp, fasta, tiny_family, "unused"), LocalExecutor(), out=tmp / "fit")
    embed(make_cfg(tmp, fasta, tiny_family, "ref", **{"fit.artifact": str(fit_dir)}), None, LocalExecutor(),
          progress=False)
    return fasta, fit_dir, tables_of(tmp / "ref")


def tables_of(run) -> dict[str, tuple[int, str]]:
    """Row count and content hash of each data table, local or on S3 (rows in a canonical order)."""
    from test_pipeline import checksum

    from rdscale.io.runs import Run

    out = {}
    for name in (PROTEINS, RESIDUES, REJECTS):
        t = Run(str(run)).dataset(name).to_table()
        t = t.sort_by([("id", "ascending")] + ([("pos", "ascending")] if "pos" in t.column_names else []))
        out[name] = (t.num_rows, checksum(t))
    return out


def _writer(config: Path, env: dict[str, str]):
    import subprocess
    import sys

    full = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "rdscale", "-q", "embed", "-c", str(config), "--local"],
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_stopped(proc, timeout: float = 240.0) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited ({proc.returncode}) before its stop point: "
                                 f"{proc.stderr.read()[-2000:]}")
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "?"
        if state == "T":
            return
        time.sleep(0.1)
    raise AssertionError("the writer never reached its stop point")


def _config(tmp: Path, fasta, models, fit_dir, out: str) -> Path:
    import json

    cfg = {
        "models": [str(m) for m in models],
        "input": {"paths": [str(fasta)], "shard_mb": 0.0004},
        "embedding": {"window": 120, "overlap": 30, "toks_per_batch": 1024},
        "fit": {"artifact": str(fit_dir)},
        "output": {"dir": out, "residue_dtype": "float32", "records_per_batch": 8},
    }
    path = tmp / "writer.yaml"
    path.write_text(json.dumps(cfg))
    return path


STALE_S = 1.0


def frozen_writer_case(tmp: Path, out: str, frozen_base, tiny_family, stop_at: str, env: dict[str, str]):
    """Writer 1 stops itself (SIGSTOP) at `stop_at` inside a shard's commit; once its lease is stale, writer 2
    starts as another host (RDSCALE_LEASE_HOST), so no pid check can help; then writer 1 gets SIGCONT. Returns
    (writer 1's exit code and stderr, writer 2's)."""
    import signal
    import time

    fasta, fit_dir, _ = frozen_base
    config = _config(tmp, fasta, tiny_family, fit_dir, out)
    common = {**env, "RDSCALE_LEASE_STALE_S": str(STALE_S), "RDSCALE_LEASE_RENEW_S": "0.2",
              "RDSCALE_LEASE_GATE_WAIT_S": "5"}
    first = _writer(config, {**common, "RDSCALE_FAULT_STOP": stop_at})
    try:
        _wait_stopped(first)
        time.sleep(STALE_S + 1.0)  # past the staleness window: the lease was last renewed before the stop
        second = _writer(config, {**common, "RDSCALE_LEASE_HOST": "another-host"})
        second_rc = second.wait(timeout=300)
        second_err = second.stderr.read()
    finally:
        first.send_signal(signal.SIGCONT)
    first_rc = first.wait(timeout=300)
    return (first_rc, first.stderr.read()), (second_rc, second_err)


def assert_frozen_outcomes(out: str, frozen_base, stop_at: str, first, second) -> None:
    from rdscale.run.verify import verify

    (first_rc, first_err), (second_rc, second_err) = first, second
    if stop_at.endswith(":checked"):
        # frozen between its lease check and its write, holding the gate: the second writer is refused, the
        # first finishes its commit and its run
        assert second_rc == 1, second_err
        lines = second_err.strip().splitlines()
        assert len(lines) == 1 and "inside a commit step" in lines[0], second_err
        assert first_rc == 0, first_err
    else:
        # frozen between two table commits: the second writer takes over and finishes; the first wakes up,
        # finds its lease gone at its next step and stops with one line, writing nothing more
        assert second_rc == 0, second_err
        assert first_rc == 1, first_err
        lines = first_err.strip().splitlines()
        assert len(lines) == 1 and "lost its writer lease" in lines[0], first_err
    assert tables_of(out) == frozen_base[2]
    assert verify(out) == []
    assert read_lease(out) is None


@pytest.mark.parametrize("stop_at", ["between_tables", "append residues:checked"])
def test_writer_frozen_inside_a_commit_local(tmp_path, frozen_base, tiny_family, stop_at):
    out = str(tmp_path / "run")
    first, second = frozen_writer_case(tmp_path, out, frozen_base, tiny_family, stop_at, {})
    assert_frozen_outcomes(out, frozen_base, stop_at, first, second)
    assert [p.name for p in Path(out).glob("_writer.*")] == ["_writer.gate"] and gate_is_free(out)  # no marker


_CANARY: list[bool] = []  # passed once in this session


def test_s3_enforces_conditional_writes_under_concurrency(s3):
    """Canary for the S3 fencing tests (which call it first): three concurrent put-if-absent of one key, exactly one
    wins. Some SeaweedFS versions did not enforce conditional writes under concurrency; the lease and the gate rely
    on them."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from rdscale.io.lease import S3LeaseBackend

    if _CANARY:
        return
    for attempt in range(3):
        key = s3.uri("canary", f"key-{uuid.uuid4().hex}")  # a fresh key each time (one server per session)
        backends = [S3LeaseBackend() for _ in range(3)]  # one client each, as three processes would have
        barrier = threading.Barrier(3)

        def put(i):
            barrier.wait()
            return backends[i].create_exclusive(key, f"writer {i}".encode())

        with ThreadPoolExecutor(3) as pool:
            wins = list(pool.map(put, range(3)))
        assert sum(wins) == 1, (f"the S3 server let {sum(wins)} of 3 concurrent If-None-Match PUTs of one key "
                                "succeed: it does not enforce conditional writes, so no lease or fence is safe on it")
        assert backends[0].read(key) == f"writer {wins.index(True)}".encode()
    _CANARY.append(True)


@pytest.mark.parametrize("stop_at", ["between_tables", "append residues:checked"])
def test_writer_frozen_inside_a_commit_s3(tmp_path, s3, frozen_base, tiny_family, stop_at):
    test_s3_enforces_conditional_writes_under_concurrency(s3)  # fail loudly first if the server cannot fence
    out = s3.uri("frozen", stop_at.replace(" ", "_").replace(":", "_"))
    first, second = frozen_writer_case(tmp_path, out, frozen_base, tiny_family, stop_at, s3.env())
    assert_frozen_outcomes(out, frozen_base, stop_at, first, second)


def test_ray_driver_that_loses_its_lease_stops_at_its_next_step(tmp_path, ray_session, frozen_base, tiny_family):
    """On a Ray cluster the driver makes the commits (workers only write data files): a driver whose lease is
    taken over by another host between two table commits of a shard stops at its next step, and the successor's
    run is whole."""
    from helpers import make_cfg

    from rdscale.cluster.executor import RayExecutor
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import embed
    from rdscale.run.verify import verify

    fasta, fit_dir, reference = frozen_base
    cfg = make_cfg(tmp_path, fasta, tiny_family, "run", **{"fit.artifact": str(fit_dir)})
    out = tmp_path / "run"
    took_over = []

    def successor():
        store_mod.FAULT_HOOKS.pop("between_tables")
        with WriterLease(out, renew_every=0, stale_after=0, host="host-b") as lease:
            embed(cfg, None, LocalExecutor(), progress=False, lease=lease)
        took_over.append(True)

    store_mod.FAULT_HOOKS["between_tables"] = successor
    try:
        with pytest.raises(LeaseError, match="lost its writer lease"):
            embed(cfg, None, RayExecutor(cfg), progress=False)
    finally:
        store_mod.FAULT_HOOKS.pop("between_tables", None)
    assert took_over and tables_of(out) == reference and verify(out) == [] and read_lease(out) is None


def test_s3_gate_of_a_dead_process_is_removed_and_a_remote_one_is_not(s3):
    """On S3 the gate is an object naming its holder: one left by a process that died on this host is removed by
    the next step; one held by a process on another host (perhaps frozen inside its write) never is."""
    import subprocess
    import sys
    import time

    from rdscale.io.lease import LeaseInfo, S3LeaseBackend

    test_s3_enforces_conditional_writes_under_concurrency(s3)
    root = s3.uri("gates", "run")
    backend = S3LeaseBackend()
    gate = root + "/" + lease_mod.GATE_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    with WriterLease(root, renew_every=0, gate_wait=0) as lease:
        backend.write(gate, LeaseInfo("dead", lease_mod.this_host(), int(dead.stdout), None, now, now,
                                      lease_mod._boot_id()).encode())
        with lease.step("after a dead holder"):
            assert LeaseInfo.parse(backend.read(gate)).run_id == lease.run_id
        assert backend.read(gate) is None
        backend.write(gate, LeaseInfo("frozen", "another-host", 1, None, now, now).encode())
        with pytest.raises(LeaseError, match="commit gate .* is held by pid 1 on another-host"):
            with lease.step("behind a remote holder"):
                pass
        backend.delete(gate)


@pytest.fixture(scope="module")
def update_world(tmp_path_factory, tiny_family):
    """test_update's releases A and B: a run of A, and a fresh run of B with A's fit (what an update must equal)."""
    from helpers import make_cfg
    from test_update import releases_ab, write_records

    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    tmp = tmp_path_factory.mktemp("fence_update")
    a, b = releases_ab()
    fa, fb = write_records(tmp / "A.fasta", a), write_records(tmp / "B.fasta", b)
    run(make_cfg(tmp, fa, tiny_family, "fresh_a"), LocalExecutor(), progress=False)
    run(make_cfg(tmp, fb, tiny_family, "fresh_b", **{"fit.artifact": str(tmp / "fresh_a" / "fit")}),
        LocalExecutor(), progress=False)
    return fb, tmp / "fresh_a", tmp / "fresh_b"


def test_update_that_loses_its_lease_stops_and_the_successor_finishes_it(tmp_path, monkeypatch, update_world):
    """`rdscale update` frozen between two table commits of a shard: another host takes the lease over and finishes
    the same update; the first stops at its next step. The run then equals a fresh run on the new release, with
    the release recorded once, and `verify` finds nothing wrong."""
    from test_update import assert_equal_content, content, copy_run

    from rdscale.run.update import releases, update
    from rdscale.run.verify import verify

    fb, fresh_a, fresh_b = update_world
    run_dir = copy_run(fresh_a, tmp_path / "run")

    def successor():
        store_mod.FAULT_HOOKS.pop("between_tables")
        with monkeypatch.context() as m:
            m.setenv("RDSCALE_LEASE_HOST", "host-b")
            m.setattr(lease_mod, "STALE_SECONDS", 0.0)
            took_over.append(update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False))

    took_over = []
    store_mod.FAULT_HOOKS["between_tables"] = successor
    try:
        with pytest.raises(LeaseError, match="lost its writer lease"):
            update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    finally:
        store_mod.FAULT_HOOKS.pop("between_tables", None)
    assert len(took_over) == 1 and took_over[0].new > 0
    assert_equal_content(content(run_dir), content(fresh_b))
    assert [(r["name"], r["status"]) for r in releases(run_dir)] == [("initial", "done"), ("B1", "done")]
    assert verify(run_dir) == [] and read_lease(run_dir) is None


def test_compact_of_a_writer_that_lost_its_lease_writes_nothing(tmp_path):
    """`rdscale compact` writes under the caller's lease (found by location): once another host has taken the
    lease over, compaction stops before its first rewrite."""
    import time

    from rdscale.run.compact import compact_run

    root = tmp_path / "run"
    with WriterLease(root, renew_every=0, host="host-a") as first:
        write_run(root, first)
        versions = {t: lance.dataset(str(root / f"{t}.lance")).version for t in (PROTEINS, RESIDUES, REJECTS)}
        # what a successor's takeover does (under the gate, which is free between steps)
        backend = lease_mod.LocalLeaseBackend()
        handle = backend.lock(first.gate, b"")
        backend.delete(first.path)
        now = time.time()
        assert backend.create_exclusive(first.path, lease_mod.LeaseInfo("next", "host-b", 1, None, now, now).encode())
        backend.unlock(first.gate, handle)
        with pytest.raises(LeaseError, match="lost its writer lease"):
            compact_run(str(root))
    assert {t: lance.dataset(str(root / f"{t}.lance")).version for t in versions} == versions
    assert read_lease(root).run_id == "next"  # the successor's lease is left alone
