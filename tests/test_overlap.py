"""Overlapped output writing: the writer thread's contract, and runs through it equal the serial path exactly.

- ChunkWriter: results in submission order, bounded queue (back-pressure), a job's exception re-raised in the
  caller as the same object, later jobs skipped, usable again afterwards.
- Apply pass: `output.overlap_writes` true and false give byte-identical tables; a process killed on the writer
  thread (fragments half written, none returned) resumes to exactly the uninterrupted result.
- The vectorised residues table equals a per-residue reference build.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.io.store import residues_table, run_schemas
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit
from rdscale.run.writer import ChunkWriter
from tests.test_pipeline import make_cfg, snapshot, write_fasta

# ------------------------------------------------------------------------------------------------ ChunkWriter


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 0.002), min_size=0, max_size=12), st.integers(1, 3), st.booleans())
def test_results_come_back_in_submission_order(delays, max_pending, overlap):
    writer = ChunkWriter(overlap=overlap, max_pending=max_pending)

    def job(i, d):
        def run():
            time.sleep(d)
            return i

        return run

    for i, d in enumerate(delays):
        writer.submit(job(i, d))
    assert writer.drain() == list(range(len(delays)))
    writer.close()


def test_queue_is_bounded_so_a_slow_writer_throttles_the_caller():
    writer = ChunkWriter(overlap=True, max_pending=2)
    release = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        release.wait(10)
        return "slow"

    writer.submit(slow)
    started.wait(5)
    writer.submit(lambda: 1)
    writer.submit(lambda: 2)  # the queue (2) is now full behind the running job
    blocked = threading.Thread(target=writer.submit, args=(lambda: 3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a fourth chunk was accepted while two were waiting: memory is not bounded"
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    assert writer.drain() == ["slow", 1, 2, 3]
    writer.close()


class DiskFull(OSError):
    pass


@pytest.mark.parametrize("overlap", [True, False])
def test_a_writer_error_surfaces_in_the_caller_unchanged_and_later_jobs_are_skipped(overlap):
    writer = ChunkWriter(overlap=overlap, max_pending=1)
    error = DiskFull("no space left")
    ran = []

    def bad():
        raise error

    writer.submit(lambda: ran.append("a") or "a")
    with pytest.raises(DiskFull) as caught:
        writer.submit(bad)  # serial: raises here; overlapped: the job runs on the thread
        writer.submit(lambda: ran.append("c") or "c")
        writer.drain()
    assert caught.value is error
    assert "c" not in ran or not overlap  # overlapped: queued after the failure, skipped
    # the writer is clean again: the next shard starts with no stale results or error
    writer.submit(lambda: "next")
    assert writer.drain() == ["next"]
    writer.close()


# ---------------------------------------------------------------------------------------- vectorised residues


def reference_residues(rows, per_residue, shard, schema):
    """The old per-residue Python build, as the reference."""
    out = {"id": [], "pos": [], "aa": [], "embedding": [], "shard": []}
    for r, e in zip(rows, per_residue):
        for p in range(len(e)):
            out["id"].append(r["id"])
            out["pos"].append(p)
            out["aa"].append(r["sequence"][p])
            out["embedding"].append(e[p].tolist())
            out["shard"].append(shard)
    return pa.table(out, schema=schema)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5)), max_size=6), st.sampled_from(["float16", "float32"]))
def test_vectorised_residues_table_equals_the_per_residue_build(shapes, dtype):
    schema = run_schemas(8, 5, {}, residue_dtype=dtype)["residues"]
    rng = np.random.default_rng(len(shapes))
    rows, per_res = [], []
    for i, (n, cut) in enumerate(shapes):
        seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYX"), n)) if n else ""
        stored = max(0, n - cut)  # truncated sequences store fewer rows than letters
        rows.append({"id": f"p'{i}", "sequence": seq})
        per_res.append(rng.standard_normal((stored, 5)).astype(dtype))
    got = residues_table(rows, per_res, 7, schema)
    assert got.equals(reference_residues(rows, per_res, 7, schema))


# ------------------------------------------------------------------------------------------------- apply pass


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_family):
    tmp = tmp_path_factory.mktemp("overlap")
    fasta = write_fasta(tmp / "in.fasta", n=30, seed=3, long_every=7)
    cfg = make_cfg(tmp, fasta, tiny_family, "fit")
    fit_dir = fit(cfg, LocalExecutor(), out=tmp / "fit")
    return tmp, fasta, fit_dir


# ~1.5 kB shards of ~12 records, batches of 8 records, chunks of ~256 tokens: several shards, several batches
# per shard and several chunks per batch, so the writer thread really runs beside the forward.
# fragment_rows 0: the workers write a fragment per chunk and the driver commits a shard at a time (groups sized
# for the store are tests/test_fragments.py's).
SMALL = {"input.shard_mb": 0.0015, "output.records_per_batch": 8, "embedding.toks_per_batch": 128,
         "output.residue_dtype": "float16", "output.fragment_rows": 0}


def run_embed(tmp, fasta, models, fit_dir, out, **overrides):
    cfg = make_cfg(tmp, fasta, models, out, **{**SMALL, **overrides})
    return embed(cfg, fit_dir, LocalExecutor(), progress=False)


def test_overlapped_writes_give_byte_identical_tables(fitted, tiny_family):
    tmp, fasta, fit_dir = fitted
    serial = run_embed(tmp, fasta, tiny_family, fit_dir, "serial", **{"output.overlap_writes": False})
    overlapped = run_embed(tmp, fasta, tiny_family, fit_dir, "overlapped", **{"output.overlap_writes": True})
    assert overlapped.residues == serial.residues > 0 and overlapped.proteins == serial.proteins
    assert snapshot(tmp / "overlapped") == snapshot(tmp / "serial")
    # several fragments per shard were written (the chunks), and nothing was compacted by default
    assert len(lance.dataset(str(tmp / "overlapped" / "residues.lance")).get_fragments()) > serial.shards_total


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")  # the suite's shared helpers
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import embed
    from helpers import make_cfg
    from tests.test_overlap import SMALL
    from pathlib import Path
    tmp, fasta, fit_dir, marker = map(Path, sys.argv[1:5])
    models = sys.argv[5:]
    cfg = make_cfg(tmp, fasta, models, "killed", **{
        **SMALL, "ray.fault_injection": {"exit_in_writer_on_batch": 4, "marker": str(marker)}})
    embed(cfg, fit_dir, LocalExecutor(), progress=False)
""")


def test_a_kill_on_the_writer_thread_resumes_exactly(fitted, tiny_family):
    tmp, fasta, fit_dir = fitted
    marker = tmp / "killed.marker"
    args = [str(tmp), str(fasta), str(fit_dir), str(marker), *map(str, tiny_family)]
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1 and marker.exists(), done.stderr[-2000:]
    ledger = lance.dataset(str(tmp / "killed" / "shards.lance")).count_rows()
    assert ledger >= 1  # some shards were committed before the kill, not all
    resumed = run_embed(tmp, fasta, tiny_family, fit_dir, "killed")
    assert 0 < resumed.shards_skipped == ledger < resumed.shards_total
    full = run_embed(tmp, fasta, tiny_family, fit_dir, "full")
    assert snapshot(tmp / "killed") == snapshot(tmp / "full")
    assert resumed.records == full.records and resumed.residues == full.residues


# ------------------------------------------------------------------------------------------------- compaction


def test_compact_verb_merges_fragments_and_keeps_every_row(fitted, tiny_family, capsys):
    from rdscale.cli.main import main

    tmp, fasta, fit_dir = fitted
    run_embed(tmp, fasta, tiny_family, fit_dir, "to_compact")
    run_dir = tmp / "to_compact"
    before = snapshot(run_dir)
    fragments = len(lance.dataset(str(run_dir / "residues.lance")).get_fragments())
    assert fragments > 1  # output.compact is false by default: the run left its chunk fragments
    assert main(["compact", str(run_dir), "--cleanup"]) == 0
    assert f"residues: {fragments} -> 1 fragments" in capsys.readouterr().out
    assert len(lance.dataset(str(run_dir / "residues.lance")).get_fragments()) == 1
    assert snapshot(run_dir) == before
    # a compacted run still resumes as finished: nothing is embedded again
    again = run_embed(tmp, fasta, tiny_family, fit_dir, "to_compact")
    assert again.shards_skipped == again.shards_total and again.residues_embedded == 0
    assert main(["compact", str(tmp / "nothing_here")]) == 2  # one-line configuration error
