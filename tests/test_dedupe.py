"""Identical sequences within one input are embedded once (input.dedupe_sequences): the tables equal those of a
run without it, row for row, while each distinct eligible sequence goes through the models once."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import AA, make_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdscale.io.fasta import Record, ValidationOptions, read_shard
from rdscale.io.store import FAULT_HOOKS
from rdscale.run import dedupe
from rdscale.run.integrity import InputChangedError
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, plan, run


def write_records(path, records):
    with open(path, "w") as f:
        for ident, seq in records:
            f.write(f">{ident} protein {ident}\n")
            f.writelines(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60))
    return path


def input_with_repeats(rng: random.Random, n: int, pool: int, dup_ids: int = 2, bad: int = 1, long: int = 1):
    """n records drawing their sequences from `pool` distinct ones (so many repeat), some ids used twice, some
    invalid records, and some sequences longer than the test window (120)."""
    seqs = ["".join(rng.choice(AA) for _ in range(rng.randint(15, 70))) for _ in range(pool)]
    seqs += ["".join(rng.choice(AA) for _ in range(150)) for _ in range(long)]
    records = [(f"R{i:04d}", rng.choice(seqs)) for i in range(n)]
    for _ in range(dup_ids):  # an id used again, with a repeated sequence or another one
        records.insert(rng.randrange(len(records) + 1), (rng.choice(records)[0], rng.choice(seqs)))
    for k in range(bad):
        records.insert(rng.randrange(len(records) + 1), (f"BAD{k}", "MKV12"))
    return records


def content(run_dir):
    from rdscale.io.runs import Run

    out = {}
    for name, cols in (("proteins", ["id", "description", "length", "sequence", "source", "embedding"]),
                       ("residues", ["id", "pos", "aa", "embedding"]), ("rejects", ["id", "source", "reason"])):
        run = Run(str(run_dir))
        if not run.has_table(name):
            continue
        t = run.dataset(name).to_table(columns=cols)
        keys = [("id", "ascending")] + ([("pos", "ascending")] if "pos" in cols else [("source", "ascending")])
        out[name] = t.sort_by(keys)
    return out


def assert_same(x, y):
    assert x.keys() == y.keys()
    for name in x:
        a, b = x[name], y[name]
        assert a.num_rows == b.num_rows, name
        for col in a.column_names:
            if col == "embedding":  # the same forward on the same sequence: bit-identical, whatever the batch
                u = np.asarray(a[col].combine_chunks().flatten(), dtype=np.float32)
                v = np.asarray(b[col].combine_chunks().flatten(), dtype=np.float32)
                np.testing.assert_allclose(u, v, atol=2e-6, rtol=0, err_msg=name)
            else:
                assert a[col].to_pylist() == b[col].to_pylist(), (name, col)


class Counting(LocalExecutor):
    """The local executor, counting the residues that go through the models."""

    def __init__(self):
        self.forwarded = 0

    def apply(self, cfg, models, fit_dir, uris, schemas, shards):
        from rdscale.run import stages

        original = stages.ChainEncoder.blocks

        def blocks(encoder, sequences):
            self.forwarded += sum(map(len, sequences))
            return original(encoder, sequences)

        stages.ChainEncoder.blocks = blocks
        try:
            yield from super().apply(cfg, models, fit_dir, uris, schemas, shards)
        finally:
            stages.ChainEncoder.blocks = original


def extract(tmp_path, fasta, model, out, **settings_):
    cfg = make_cfg(tmp_path, fasta, [model], out, **settings_)
    executor = Counting()
    summary = embed(cfg, executor=executor, progress=False)
    return summary, executor.forwarded


def distinct_residues(fasta, cfg):
    """Residues of the input's distinct accepted sequences, counting a sequence once per id that occurs twice
    (those keep the duplicate-id handling and are embedded as usual) and sequences the window rejects not at all."""
    options = ValidationOptions(remove_gaps=False)
    records = [r for s in plan(cfg) for r in read_shard(s, options)]
    ids = [r.id for r in records if r.id]
    once = {i for i in ids if ids.count(i) == 1}
    seen, total = set(), 0
    for r in records:
        if isinstance(r, Record):
            if r.id in once and r.sequence in seen:
                continue
            if r.id in once:
                seen.add(r.sequence)
            total += len(r.sequence)
    return total


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n=st.integers(8, 40), pool=st.integers(2, 12),
       shard_mb=st.sampled_from([0.0003, 0.001, 1.0]), residues=st.booleans(),
       policy=st.sampled_from(["window", "reject"]))
def test_deduplicated_run_equals_plain_run(tmp_path_factory, tiny_family, seed, n, pool, shard_mb, residues, policy):
    tmp = tmp_path_factory.mktemp("dedupe")
    fasta = write_records(tmp / "in.fasta", input_with_repeats(random.Random(seed), n, pool))
    common = {"input.shard_mb": shard_mb, "output.residues": residues, "embedding.long_policy": policy}
    plain, plain_forwarded = extract(tmp, fasta, tiny_family[0], "plain", **common,
                                     **{"input.dedupe_sequences": "false"})
    once, once_forwarded = extract(tmp, fasta, tiny_family[0], "once", **common,
                                   **{"input.dedupe_sequences": "true"})
    assert_same(content(tmp / "plain"), content(tmp / "once"))
    assert (once.records, once.proteins, once.rejects) == (plain.records, plain.proteins, plain.rejects)
    cfg = make_cfg(tmp, fasta, [tiny_family[0]], "x", **common)
    if policy == "window":
        assert once_forwarded == distinct_residues(fasta, cfg)
        assert plain_forwarded - once_forwarded == once.residues_saved
    assert once_forwarded <= plain_forwarded
    assert once.copies > 0


def test_plan_assigns_every_copy_to_the_first_occurrence(tmp_path):
    rng = random.Random(5)
    records = input_with_repeats(rng, 60, 7, dup_ids=3)
    fasta = write_records(tmp_path / "in.fasta", records)
    cfg = make_cfg(tmp_path, fasta, ["8M"], "run", **{"input.shard_mb": 0.0005})
    shards = plan(cfg)
    assert len(shards) > 4
    options = ValidationOptions()
    found = dedupe.plan_duplicates(shards, options, rows_per_partition=7)  # spilled: many partitions
    same = dedupe.plan_duplicates(shards, options)  # in memory
    assert [getattr(s, "copies", ()) for s in found.shards] == [getattr(s, "copies", ()) for s in same.shards]
    items = [(s.index, r) for s in shards for r in read_shard(s, options)]
    ids = [r.id for _, r in items]
    first_of: dict[str, tuple[int, str]] = {}
    expected_copies = {}
    for shard, r in items:
        if not isinstance(r, Record) or ids.count(r.id) > 1:
            continue
        if r.sequence in first_of:
            expected_copies[r.id] = first_of[r.sequence]
        else:
            first_of[r.sequence] = (shard, r.id)
    got = {}
    skipped = set()
    for s in found.shards:
        skipped |= set(getattr(s, "skip", ()))
        for canonical, ident, description, source in getattr(s, "copies", ()):
            got[ident] = (s.index, canonical)
            assert description == f"protein {ident}" and source.startswith(str(fasta))
    assert got == expected_copies
    assert skipped == set(expected_copies)
    assert found.copies == len(expected_copies) > 0
    assert found.ambiguous_ids == 3


def test_default_is_on_for_per_protein_output_only(tmp_path):
    fasta = write_records(tmp_path / "in.fasta", [("A", "MKV"), ("B", "MKV")])
    assert dedupe.enabled(make_cfg(tmp_path, fasta, ["8M"], **{"output.residues": "false"}))
    assert not dedupe.enabled(make_cfg(tmp_path, fasta, ["8M"]))
    assert dedupe.enabled(make_cfg(tmp_path, fasta, ["8M"], **{"input.dedupe_sequences": "true"}))


def test_interrupted_deduplicated_run_resumes_to_the_same_tables(tmp_path, tiny_family, monkeypatch):
    fasta = write_records(tmp_path / "in.fasta", input_with_repeats(random.Random(1), 40, 6))
    chain = {"output.residues": "false", "input.shard_mb": 0.0004}
    whole = make_cfg(tmp_path, fasta, tiny_family, "whole", **chain)
    run(whole, LocalExecutor(), progress=False)
    fit = str(tmp_path / "whole" / "fit")
    # fragment_rows 1: each shard committed as it completes, so the third ledger commit is the third shard
    cut = make_cfg(tmp_path, fasta, tiny_family, "cut", **chain, **{"fit.artifact": fit, "output.fragment_rows": 1})
    commits = {"n": 0}

    def die():
        commits["n"] += 1
        if commits["n"] == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setitem(FAULT_HOOKS, "after_ledger", die)
    with pytest.raises(KeyboardInterrupt):
        embed(cut, progress=False)
    monkeypatch.delitem(FAULT_HOOKS, "after_ledger")
    summary = embed(cut, progress=False)
    assert summary.shards_skipped == 3 and summary.copies > 0
    assert_same(content(tmp_path / "whole"), content(tmp_path / "cut"))


def test_changed_grouping_is_refused_or_redone(tmp_path, tiny_family):
    """Editing one file changes which records of another file are copies: those shards are changed too."""
    rng = random.Random(2)
    shared = ["".join(rng.choice(AA) for _ in range(40)) for _ in range(4)]
    a = write_records(tmp_path / "a.fasta", [(f"A{i}", shared[i % 4]) for i in range(8)])
    b = write_records(tmp_path / "b.fasta", [(f"B{i}", shared[i % 4]) for i in range(8)])
    settings_ = {"output.residues": "false"}
    cfg = make_cfg(tmp_path, [a, b], [tiny_family[0]], "run", **settings_)
    first = embed(cfg, progress=False)
    assert first.copies == 12
    write_records(a, [(f"A{i}", shared[i % 4]) for i in range(8) if i != 1])  # B1's sequence now first in b
    with pytest.raises(InputChangedError, match="changed"):
        embed(cfg, progress=False)
    again = embed(cfg, progress=False, redo_changed=True)
    assert again.copies == 11
    fresh = embed(make_cfg(tmp_path, [a, b], [tiny_family[0]], "fresh", **settings_), progress=False)
    assert fresh.copies == 11
    assert_same(content(tmp_path / "fresh"), content(tmp_path / "run"))


def test_ray_executor_writes_the_same_copies(ray_session, tmp_path, tiny_family):
    fasta = write_records(tmp_path / "in.fasta", input_with_repeats(random.Random(4), 30, 5))
    settings_ = {"output.residues": "true", "input.dedupe_sequences": "true", "ray.address": "auto"}
    local = make_cfg(tmp_path, fasta, [tiny_family[0]], "local", **{**settings_, "ray.address": "local"})
    embed(local, progress=False)
    distributed = make_cfg(tmp_path, fasta, [tiny_family[0]], "ray", **settings_)
    summary = embed(distributed, progress=False)
    assert summary.copies > 0
    assert_same(content(tmp_path / "local"), content(tmp_path / "ray"))


def test_a_shard_of_copies_only_keeps_its_digest_and_verifies(tmp_path, tiny_family):
    """A shard whose records are all copies written by an earlier shard commits no row of its own; its ledger row
    still holds the digest of what it read, so a touched (unchanged) input resumes and `verify` passes."""
    import os

    from rdscale.run.verify import verify

    seq = "MKVLAAGIVGLLLAAQPAMA"
    fasta = write_records(tmp_path / "in.fasta", [(f"P{i}", seq) for i in range(30)])
    cfg = make_cfg(tmp_path, fasta, [tiny_family[0]], "run", **{"output.residues": "false"})
    first = embed(cfg, progress=False)
    assert first.copies == 29 and first.shards_total > 2
    assert verify(tmp_path / "run") == []
    stat = os.stat(fasta)
    os.utime(fasta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime: digests compared
    again = embed(cfg, progress=False)
    assert again.shards_skipped == again.shards_total
    assert verify(tmp_path / "run") == []


def test_update_embeds_identical_new_sequences_once(tmp_path, tiny_family):
    from rdscale.run.update import update

    rng = random.Random(9)
    seqs = ["".join(rng.choice(AA) for _ in range(rng.randint(20, 60))) for _ in range(12)]
    a = [(f"A{i:03d}", seqs[i]) for i in range(8)]
    fresh_pool = seqs[8:]  # new sequences, each several times in B
    b = a[:6] + [(f"N{i:03d}", fresh_pool[i % 4]) for i in range(10)] + [("N999", seqs[0])]
    fa = write_records(tmp_path / "A.fasta", a)
    fb = write_records(tmp_path / "B.fasta", b)
    per_protein = {"output.residues": "false"}
    run(make_cfg(tmp_path, fa, tiny_family, "run", **per_protein), LocalExecutor(), progress=False)
    fit = str(tmp_path / "run" / "fit")
    fresh = embed(make_cfg(tmp_path, fb, tiny_family, "fresh", **per_protein, **{"fit.artifact": fit}),
                  progress=False)
    assert fresh.copies == 7  # 10 new records over 4 sequences, and N999 = A000's sequence
    report = update(tmp_path / "run", [str(fb)], "B", overrides=["ray.address=local"], progress=False)
    assert (report.new, report.removed, report.unchanged) == (11, 2, 6)
    assert report.copies == 6  # among the new records; N999's sequence is in the run, but not in the update's work
    assert report.residues_embedded == sum(len(s) for s in fresh_pool) + len(seqs[0])
    updated, fresh_tables = content(tmp_path / "run"), content(tmp_path / "fresh")
    for tables in (updated, fresh_tables):  # unchanged rows keep the source they were embedded from (A.fasta)
        tables["proteins"] = tables["proteins"].drop_columns(["source"])
    assert_same(fresh_tables, updated)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(kills=st.lists(st.tuples(st.sampled_from(["before_tables", "between_tables", "before_ledger",
                                                 "after_ledger"]), st.integers(1, 4)), min_size=1, max_size=3))
def test_kills_and_reruns_of_a_deduplicated_run_end_with_the_same_tables(tmp_path_factory, tiny_family, kills):
    """Random interleavings of interrupts at every step of the commit protocol, each followed by a rerun: a run
    whose shards write each other's copies ends with exactly the rows of an uninterrupted one."""
    tmp = tmp_path_factory.mktemp("kills")
    fasta = write_records(tmp / "in.fasta", input_with_repeats(random.Random(11), 30, 5))
    settings_ = {"output.residues": "true", "input.dedupe_sequences": "true", "input.shard_mb": 0.0003}
    embed(make_cfg(tmp, fasta, [tiny_family[0]], "whole", **settings_), progress=False)
    cfg = make_cfg(tmp, fasta, [tiny_family[0]], "cut", **settings_)
    for point, nth in kills:
        seen = {"n": 0}

        def die(point=point, nth=nth, seen=seen):
            seen["n"] += 1
            if seen["n"] == nth:
                raise KeyboardInterrupt(point)

        FAULT_HOOKS[point] = die
        try:
            embed(cfg, progress=False)
        except KeyboardInterrupt:
            pass
        finally:
            FAULT_HOOKS.pop(point, None)
    summary = embed(cfg, progress=False)
    assert summary.copies > 0
    assert_same(content(tmp / "whole"), content(tmp / "cut"))
    from rdscale.run.verify import verify

    assert verify(tmp / "cut") == []
