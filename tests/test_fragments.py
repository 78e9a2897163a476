"""Fragments sized for the store (issue 27): the driver commits finished shards in groups whose rows make one
fragment per table of `output.fragment_rows` rows or `output.fragment_mb` MiB (rdscale.io.store.ShardCommitter).
Grouped runs equal ungrouped ones row for row, kills at any commit point resume exactly, an update through the
scalar index equals a fresh run, and Ray equals local."""

from __future__ import annotations

import socket
import time

import lance
import pytest
from helpers import StopAfter, bench_module, make_cfg
from test_exactly_once import _dead_pid, orphan_files
from test_pipeline import snapshot
from test_scale import assert_same, content

from rdscale.io import store as store_mod
from rdscale.io.lease import LEASE_NAME, LeaseInfo
from rdscale.io.runs import Run
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit, run
from rdscale.run.update import update
from rdscale.run.verify import verify

gen = bench_module("uniref_gen")
N = 60
SETTINGS = {"input.shard_mb": 0.002}  # ~2 KB shards: about eight shards of ~8 records, a batch of 8 records


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_family):
    """A UniRef-shaped input (a few identical sequences, some rejects), its fit, and an ungrouped run of it."""
    tmp = tmp_path_factory.mktemp("frag")
    gen.write_fasta(tmp / "A.fasta", gen.records(N, seed=7, dup_rate=0.05, cap=120))
    with open(tmp / "A.fasta", "a") as f:  # a reject in the last shard
        f.write(">UniRef50_BAD1 bad\nMK1LV\n")
    fit_dir = fit(make_cfg(tmp, tmp / "A.fasta", tiny_family, "unused", **SETTINGS), LocalExecutor(),
                  out=tmp / "fit")
    ungrouped = embed(cfg(tmp, tiny_family, fit_dir, "ungrouped", 0), None, LocalExecutor(), progress=False)
    assert ungrouped.rejects >= 1 and ungrouped.shards_total >= 6
    return tmp, fit_dir, snapshot(tmp / "ungrouped")


def cfg(tmp, models, fit_dir, out, rows, **kw):
    return make_cfg(tmp, tmp / "A.fasta", models, out, **{**SETTINGS, "fit.artifact": str(fit_dir),
                                                          "output.fragment_rows": rows, **kw})


def fragment_rows(run_dir, name):
    return [f.count_rows() for f in lance.dataset(str(run_dir / f"{name}.lance")).get_fragments()]


def ledger_fragments(run_dir):
    return len(lance.dataset(str(run_dir / "shards.lance")).get_fragments())


@pytest.mark.parametrize("rows", [40, 1_000_000])
def test_grouped_runs_equal_the_ungrouped_run(case, tiny_family, tmp_path, rows):
    """fragment_rows 40: groups of a few shards; the default: one group. Each equals the run whose workers write
    a fragment per batch (fragment_rows 0), row for row. (fragment_rows 1, a commit per batch: tests/helpers.py's
    embed_killed_before_ledger, under the exactly-once tests.)"""
    tmp, fit_dir, reference = case
    out = tmp_path / "run"
    summary = embed(cfg(tmp, tiny_family, fit_dir, out, rows), None, LocalExecutor(), progress=False)
    assert snapshot(out) == reference
    assert verify(out) == []
    residues = fragment_rows(out, "residues")
    if rows == 1_000_000:  # one group: a fragment per table, a ledger append for every shard at once
        assert len(residues) == 1 and len(fragment_rows(out, "proteins")) == 1
        assert ledger_fragments(out) == 1 and summary.shards_total > 1
    elif rows == 40:  # a group is flushed once some table holds >= 40 rows: the residues, after every batch
        assert len(residues) > 1 and all(n >= 40 for n in residues[:-1])


def test_fragment_counts_follow_the_target(case, tiny_family, tmp_path):
    """Per-protein output, target R rows: every proteins fragment but the last holds R .. R + a batch - 1 rows
    (a group is flushed as soon as it reaches the target, mid-shard too); a byte target cuts earlier."""
    tmp, fit_dir, _ = case
    per_protein = {"output.residues": False}
    ungrouped = embed(cfg(tmp, tiny_family, fit_dir, tmp_path / "u", 0, **per_protein), None, LocalExecutor(),
                      progress=False)
    R = 16
    embed(cfg(tmp, tiny_family, fit_dir, tmp_path / "g", R, **per_protein), None, LocalExecutor(), progress=False)
    sizes = fragment_rows(tmp_path / "g", "proteins")
    assert sum(sizes) == ungrouped.proteins
    assert len(sizes) > 1 and all(R <= n < R + 8 for n in sizes[:-1]) and 0 < sizes[-1] < R + 8
    assert len(fragment_rows(tmp_path / "u", "proteins")) > len(sizes)  # a fragment per batch without groups
    # a byte target well under R rows' bytes (a protein row: 64 float32 + its sequence, ~0.3-0.6 KB)
    embed(cfg(tmp, tiny_family, fit_dir, tmp_path / "b", 1_000_000, **per_protein, **{"output.fragment_mb": 0.002}),
          None, LocalExecutor(), progress=False)
    by_bytes = fragment_rows(tmp_path / "b", "proteins")
    assert sum(by_bytes) == ungrouped.proteins and 1 < len(by_bytes) and max(by_bytes) < ungrouped.proteins


@pytest.mark.parametrize("seconds", [0.0, 1e-6])
def test_a_time_target_commits_finished_shards_before_the_size_target(case, tiny_family, tmp_path, seconds):
    """output.fragment_seconds: a group holding a finished shard is committed once that long passed since the
    last commit, well before the (here unreachable) size target; 0 leaves only the size targets (one group)."""
    tmp, fit_dir, reference = case
    out = tmp_path / "run"
    summary = embed(cfg(tmp, tiny_family, fit_dir, out, 1_000_000, **{"output.fragment_seconds": seconds}), None,
                    LocalExecutor(), progress=False)
    assert snapshot(out) == reference and verify(out) == []
    if seconds == 0:
        assert ledger_fragments(out) == 1 and len(fragment_rows(out, "proteins")) == 1
    else:  # every finished shard found the clock past the target: a commit (a ledger append) per shard
        assert ledger_fragments(out) == summary.shards_total > 1
        assert len(fragment_rows(out, "proteins")) > 1


class Killed(BaseException):
    """A kill -9 stand-in (no flush on the way out), raised by a fault hook inside a commit."""


POINTS = ("before_tables", "between_tables", "before_ledger", "after_ledger")


def test_kills_at_any_commit_point_resume_exactly(case, tiny_family, tmp_path_factory):
    """Grouped commits (a group of a few shards) killed at random points of the protocol (a clean interrupt, a
    kill -9 that leaves its lease behind, the executor failing after n batches: the finished shards are flushed),
    then rerun: always the rows of an uninterrupted run, no record doubled or lost, no orphan file, verify clean."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tmp, fit_dir, reference = case
    counter = iter(range(1000))
    step = st.one_of(st.tuples(st.sampled_from(["kill", "hard_kill"]), st.sampled_from(POINTS), st.integers(1, 3)),
                     st.tuples(st.just("stop"), st.just(""), st.integers(1, 6)))

    @hypothesis.settings(max_examples=4, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(step, min_size=1, max_size=2))
    def check(steps):
        out = tmp_path_factory.mktemp("kill") / f"k{next(counter)}"
        config = cfg(tmp, tiny_family, fit_dir, out, 40)
        for kind, point, n in steps:
            hits = []

            def hook(kind=kind, n=n):
                hits.append(1)
                if len(hits) == n:
                    raise KeyboardInterrupt if kind == "kill" else Killed

            if point:
                store_mod.FAULT_HOOKS[point] = hook
            try:
                embed(config, None, StopAfter(n) if kind == "stop" else LocalExecutor(), progress=False)
            except KeyboardInterrupt:
                pass
            except Killed:
                now = time.time()
                (out / LEASE_NAME).write_bytes(
                    LeaseInfo("killed", socket.gethostname(), _dead_pid(), None, now, now).encode())
            finally:
                store_mod.FAULT_HOOKS.clear()
        embed(config, None, LocalExecutor(), progress=False)
        assert snapshot(out) == reference
        assert verify(out) == [] and orphan_files(out) == 0

    check()


def test_a_failing_pass_commits_its_finished_shards(case, tiny_family, tmp_path):
    """One group for the whole run, the executor failing after 5 batches: the shards it finished are committed
    on the way out (finished work is not lost), the rest are left to the rerun, which ends exact."""
    tmp, fit_dir, reference = case
    config = cfg(tmp, tiny_family, fit_dir, tmp_path / "run", 1_000_000)
    with pytest.raises(KeyboardInterrupt):
        embed(config, None, StopAfter(5), progress=False)
    committed = Run(tmp_path / "run").status()["committed"]
    assert committed and committed == list(range(len(committed)))
    summary = embed(config, None, LocalExecutor(), progress=False)
    assert summary.shards_skipped == len(committed) and snapshot(tmp_path / "run") == reference


def test_update_of_a_grouped_run_equals_a_fresh_run(tmp_path, tiny_family):
    """A grouped run (several groups) updated to release B through the scalar indexes equals a fresh grouped run
    of B, and stays grouped: the update's rows are a group's fragments, not one per batch."""
    counts = gen.ReleaseCounts()
    gen.write_fasta(tmp_path / "A.fasta", gen.records(N, seed=9, dup_rate=0.05, cap=120))
    gen.write_fasta(tmp_path / "B.fasta", gen.release_b(N, seed=9, dup_rate=0.05, changed=0.1, removed=0.05,
                                                        added=0.1, counts=counts, cap=120))
    grouped = {**SETTINGS, "output.fragment_rows": 200}
    run_dir = tmp_path / "run"
    run(make_cfg(tmp_path, tmp_path / "A.fasta", tiny_family, "run", **grouped), LocalExecutor(), progress=False)
    old = max(f.fragment_id for f in lance.dataset(str(run_dir / "residues.lance")).get_fragments())
    report = update(run_dir, [str(tmp_path / "B.fasta")], "B", overrides=["ray.address=local"], progress=False)
    assert (report.changed, report.removed, report.new) == (counts.changed, counts.removed, counts.added)
    new = [f.count_rows() for f in lance.dataset(str(run_dir / "residues.lance")).get_fragments()
           if f.fragment_id > old]
    assert new and all(n >= 200 for n in new[:-1])  # the update's rows in groups too
    fresh = make_cfg(tmp_path, tmp_path / "B.fasta", tiny_family, "fresh",
                     **{**grouped, "fit.artifact": str(run_dir / "fit")})
    run(fresh, LocalExecutor(), progress=False)
    assert_same(content(run_dir), content(tmp_path / "fresh"))
    assert verify(run_dir) == []


@pytest.mark.ray
def test_ray_equals_local_on_a_grouped_run(ray_session, case, tiny_family, tmp_path):
    """The rows travel from the Ray actors to the driver, which writes the groups: same rows as local."""
    from rdscale.cluster.executor import RayExecutor

    tmp, fit_dir, reference = case
    config = cfg(tmp, tiny_family, fit_dir, tmp_path / "ray", 40)
    embed(config, None, RayExecutor(config), progress=False)
    assert snapshot(tmp_path / "ray") == reference
    assert verify(tmp_path / "ray") == []
    assert all(n >= 40 for n in fragment_rows(tmp_path / "ray", "residues")[:-1])
