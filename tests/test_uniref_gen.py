"""bench/uniref_gen.py: UniRef-shaped databases (the scale bench's input) have the shape they claim, read back
through rdscale's own FASTA readers in every format, and a release pair's diff has the counts it reports."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import bench_module

from rdscale.io.fasta import Record, ValidationOptions, plan_shards, read_shard

gen = bench_module("uniref_gen")


def test_length_distribution_ids_and_duplicates():
    recs = list(gen.records(20_000, seed=5, dup_rate=0.02))
    lengths = np.array([len(r.sequence) for r in recs])
    assert 240 <= np.median(lengths) <= 300  # UniRef50: median ~270
    assert 0.02 <= (lengths > 1022).mean() <= 0.06  # past ESM-2's window: a few percent
    assert lengths.min() >= gen.MIN_LEN and lengths.max() <= gen.MAX_LEN
    ids = [r.id for r in recs]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(("UniRef50_A0A", "UniRef50_UPI")) for i in ids)
    assert all(" n=" in r.description and " TaxID=" in r.description and " RepID=" in r.description for r in recs)
    shared = len(recs) - len({r.sequence for r in recs})
    assert 0.01 * len(recs) <= shared <= 0.03 * len(recs)  # identical sequences under other ids
    # deterministic, and a record does not depend on N
    assert [r.id for r in gen.records(300, seed=5, dup_rate=0.02)] == ids[:300]
    assert list(gen.records(300, seed=6))[0] != recs[0]


def test_long_tail_reaches_titin_lengths():
    rng = np.random.default_rng(0)
    lengths = gen.lengths(rng, 400_000)
    assert lengths.max() >= 20_000


def test_release_pair_counts_match_the_diff():
    n = 20_000
    a = {r.id: r.sequence for r in gen.records(n, seed=2)}
    counts = gen.ReleaseCounts()
    b = {r.id: r.sequence for r in gen.release_b(n, seed=2, changed=0.02, removed=0.01, added=0.015, counts=counts)}
    assert len(b) == counts.unchanged + counts.changed + counts.added
    assert len(a.keys() - b.keys()) == counts.removed
    assert len(b.keys() - a.keys()) == counts.added
    assert sum(a[i] != b[i] for i in a.keys() & b.keys()) == counts.changed
    assert 0.015 * n < counts.changed < 0.025 * n and 0.006 * n < counts.removed < 0.014 * n
    assert 0.01 * n < counts.added < 0.02 * n


@pytest.mark.parametrize("fmt,suffix", [("plain", ".fasta"), ("gzip", ".fasta.gz"), ("bgzf", ".fasta.gz")])
def test_every_format_reads_back_through_rdscale(tmp_path, fmt, suffix):
    recs = list(gen.records(3000, seed=9))
    path = tmp_path / f"db{suffix}"
    info = gen.write_fasta(path, recs, fmt)
    assert info["records"] == 3000
    shards = plan_shards([str(path)], shard_bytes=64 << 10, index_dir=tmp_path / "idx")
    if fmt != "gzip":  # plain and BGZF split into byte ranges; plain gzip is one shard
        assert len(shards) > 1
    got = [item for s in shards for item in read_shard(s, ValidationOptions())]
    assert all(isinstance(g, Record) for g in got)
    assert [(g.id, g.sequence) for g in got] == [(r.id, r.sequence) for r in recs]
    assert got[0].description == recs[0].description
