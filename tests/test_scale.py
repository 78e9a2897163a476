"""Scale features (issue 27) at the UniRef generator's small N: scalar indexes kept by the writing verbs, an update
through them equal to a fresh run, fragments sized for the store, the grouping plan reused on resume."""

from __future__ import annotations

import lance
import numpy as np
import pytest
from helpers import bench_module, make_cfg

from rdscale.io.fasta import ValidationOptions
from rdscale.io.runs import Run
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import plan, run
from rdscale.run.update import update

gen = bench_module("uniref_gen")
N = 160


def content(run_dir):
    out = {}
    for name, cols in (("proteins", ["id", "description", "length", "sequence", "embedding"]),
                       ("residues", ["id", "pos", "aa", "embedding"]), ("rejects", ["id", "reason"])):
        ds = lance.dataset(str(run_dir / f"{name}.lance"))
        keys = [("id", "ascending")] + ([("pos", "ascending")] if "pos" in cols else [])
        out[name] = ds.to_table(columns=cols).sort_by(keys)
    return out


def assert_same(x, y):
    for name in x:
        a, b = x[name], y[name]
        assert a.num_rows == b.num_rows, name
        for col in a.column_names:
            if col == "embedding":
                np.testing.assert_allclose(np.asarray(a[col].combine_chunks().flatten(), np.float32),
                                           np.asarray(b[col].combine_chunks().flatten(), np.float32),
                                           atol=1e-5, rtol=0, err_msg=name)
            else:
                assert a[col].to_pylist() == b[col].to_pylist(), (name, col)


def indexed(run_dir, name):
    """{column: (unindexed fragments)} of the table's BTREE indexes."""
    ds = lance.dataset(str(run_dir / f"{name}.lance"))
    return {d.field_names[0]: ds.stats.index_stats(d.name)["num_unindexed_fragments"]
            for d in ds.describe_indices() if d.type_url.endswith("BTreeIndexDetails")}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    counts = gen.ReleaseCounts()
    a = gen.write_fasta(tmp / "A.fasta", gen.records(N, seed=4, dup_rate=0.05, cap=150))
    b = gen.write_fasta(tmp / "B.fasta", gen.release_b(N, seed=4, dup_rate=0.05, changed=0.05,
                                                             removed=0.03, added=0.05, counts=counts, cap=150))
    assert a["records"] == N and counts.changed and counts.removed and counts.added
    return tmp, counts


def test_update_through_the_scalar_index_equals_a_fresh_run(releases, tiny_family, tmp_path):
    tmp, counts = releases
    cfg = make_cfg(tmp_path, tmp / "A.fasta", tiny_family, "run", **{"input.shard_mb": 0.004})
    run(cfg, LocalExecutor(), progress=False)
    run_dir = tmp_path / "run"
    for name in ("proteins", "residues", "rejects"):
        if lance.dataset(str(run_dir / f"{name}.lance")).count_rows():
            assert indexed(run_dir, name) == {"id": 0, "shard": 0}, name
    # the deletes an update issues are index lookups, not scans
    plan = lance.dataset(str(run_dir / "proteins.lance")).scanner(
        filter="shard < 5 AND id IN ('UniRef50_A0A0000000', 'x')").explain_plan()
    assert "ScalarIndexQuery" in plan and "id_idx" in plan

    report = update(run_dir, [str(tmp / "B.fasta")], "B", overrides=["ray.address=local"], progress=False)
    assert (report.changed, report.removed) == (counts.changed, counts.removed)
    assert report.new == counts.added
    for name in ("proteins", "residues"):
        assert indexed(run_dir, name) == {"id": 0, "shard": 0}, name  # kept current by the update

    fresh = make_cfg(tmp_path, tmp / "B.fasta", tiny_family, "fresh",
                     **{"input.shard_mb": 0.004, "fit.artifact": str(run_dir / "fit")})
    run(fresh, LocalExecutor(), progress=False)
    assert_same(content(run_dir), content(tmp_path / "fresh"))


def test_resume_reuses_the_grouping_plan(releases, tiny_family, tmp_path, monkeypatch):
    """A run with input.dedupe_sequences killed mid-commit, then resumed: the resume takes the grouping kept in the
    run instead of reading the whole input again, and ends with the rows of an uninterrupted run."""
    from helpers import embed_killed_before_ledger

    from rdscale.run import dedupe
    from rdscale.run.pipeline import embed

    tmp, _ = releases
    fasta = tmp_path / "A.fasta"  # a copy: edited below
    fasta.write_bytes((tmp / "A.fasta").read_bytes())
    settings = {"input.shard_mb": 0.004, "input.dedupe_sequences": True}
    whole = make_cfg(tmp_path, fasta, tiny_family[:1], "whole", **settings)
    embed(whole, None, LocalExecutor(), progress=False)
    assert Run(tmp_path / "whole").dedupe_plan.is_file()

    groupings = []
    real = dedupe.plan_duplicates
    monkeypatch.setattr(dedupe, "plan_duplicates", lambda *a, **k: groupings.append(1) or real(*a, **k))
    cfg = make_cfg(tmp_path, fasta, tiny_family[:1], "killed", **settings)
    embed_killed_before_ledger(cfg, commits=2)
    assert groupings == [1]
    summary = embed(cfg, None, LocalExecutor(), progress=False)
    assert groupings == [1]  # the resume did not group again
    assert summary.copies > 0 and summary.shards_skipped == 2
    assert_same(content(tmp_path / "killed"), content(tmp_path / "whole"))

    # the same plan reuses the grouping; an input edited in place (size, mtime) is grouped again
    cache = Run(tmp_path / "killed").dedupe_plan
    shards = plan(cfg)
    _, reused = dedupe.cached_plan(cache, shards, ValidationOptions())
    assert reused and groupings == [1]
    with open(fasta, "a") as f:
        f.write(">UniRef50_EXTRA1 added n=1 Tax=x TaxID=1 RepID=EXTRA1\nMKVLAAGIVG\n")
    _, reused = dedupe.cached_plan(cache, plan(cfg), ValidationOptions())
    assert not reused and groupings == [1, 1]


def test_stub_models_embed_deterministically_without_a_network(releases, tmp_path):
    """`stub:WIDTH` (a benchmarking aid): a chain of stubs runs the whole pipeline (fit included) and gives the
    same finite vectors in every run; a malformed name is refused."""
    from rdscale.model.loading import describe_model
    from rdscale.model.stub import stub_width

    tmp, _ = releases
    out = []
    for name in ("one", "two"):
        cfg = make_cfg(tmp_path, tmp / "A.fasta", ["stub:16", "stub:24"], name, **{"output.residues": "false"})
        run(cfg, LocalExecutor(), progress=False)
        out.append(lance.dataset(str(tmp_path / name / "proteins.lance")).to_table(
            columns=["id", "embedding"]).sort_by("id"))
    a, b = (np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in out)
    assert a.shape == (N, 24) and np.isfinite(a).all() and a.std(axis=0).min() > 0
    np.testing.assert_array_equal(a, b)
    assert describe_model("stub:24")["sha256"] == "stub-v1"
    with pytest.raises(ValueError, match="stub:WIDTH"):
        stub_width("stub:wide")


def test_capacity_plan_labels_every_figure_from_the_committed_bench():
    """docs/capacity.md is generated from bench/results/bench_scale.json: the plan names both databases, says
    which numbers are measured, extrapolated or estimates, and admits that no GPU figure was measured when no
    GPU benchmark file says `cuda`."""
    import json

    from helpers import ROOT

    bench_module("benchkit")
    plan = bench_module("capacity_plan")
    scale = json.loads((ROOT / "bench" / "results" / "bench_scale.json").read_text())
    text = plan.plan(scale, None)
    for word in ("UniRef50", "UniRef100", "**measured**", "**extrapolated**", "**Estimates**", "GPUs"):
        assert word in text, word
    gpu = [d for _, d in plan.gpu_files() if str(d.get("device", "")).startswith("cuda")]
    assert ("No GPU figure was measured" in text) == (not gpu)
    # the bytes of UniRef50's proteins at k_m = 1280 are at least the raw float32 vectors
    per_row = plan.row_costs(scale)["proteins"]["other_per_row"]
    assert 0 < per_row < 2000
    assert text == plan.plan(scale, None)  # deterministic: regenerating changes nothing
