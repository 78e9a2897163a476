"""`rdscale update`: a run follows its database from release A to release B by embedding only what changed."""

from __future__ import annotations

import random

import lance
import numpy as np
import pytest
from helpers import AA, StopAfter, make_cfg

from rdscale.errors import RdscaleError
from rdscale.io.lease import WriterLease
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import run
from rdscale.run.update import UpdateError, releases, update


def write_records(path, records):
    with open(path, "w") as f:
        for ident, desc, seq in records:
            f.write(f">{ident} {desc}\n")
            f.writelines(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60))
    return path


def _seq(rng, lo=15, hi=90):
    return "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi)))


def releases_ab(seed=3, n=30):
    """A, and B = A with sequences changed, records removed, records added and ids reassigned to another
    record's sequence; both hold one invalid record (a reject)."""
    rng = random.Random(seed)
    a = [(f"UR{i:04d}", f"protein {i}", _seq(rng)) for i in range(n)]
    a.insert(7, ("BAD1", "invalid", "MKV1234"))
    b = []
    for ident, desc, seq in a:
        i = int(ident[2:]) if ident.startswith("UR") else -1
        if i in (3, 11, 20):  # changed: one substitution
            seq = seq[:5] + ("W" if seq[5] != "W" else "Y") + seq[6:]
        if i == 13:  # the same sequence under a new description: not embedded again
            desc = "protein 13, renamed"
        if i in (5, 17):  # removed
            continue
        if i == 8:  # reassigned: UR0008 now points at UR0009's sequence (and UR0009 at a new one)
            seq = a[a.index(next(r for r in a if r[0] == "UR0009"))][2]
        if i == 9:
            seq = _seq(rng)
        b.append((ident, desc, seq))
    b += [(f"UR{i:04d}", f"protein {i}", _seq(rng)) for i in range(n, n + 4)]  # new
    b.insert(2, b.pop(-1))  # a new record early in the file: shards of B differ from A's
    return a, b


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_family):
    tmp = tmp_path_factory.mktemp("update")
    a, b = releases_ab()
    fa = write_records(tmp / "A.fasta", a)
    fb = write_records(tmp / "B.fasta", b)
    cfg = make_cfg(tmp, fa, tiny_family, "fresh_a")
    run(cfg, LocalExecutor(), progress=False)
    fit = tmp / "fresh_a" / "fit"
    cfg_b = make_cfg(tmp, fb, tiny_family, "fresh_b", **{"fit.artifact": str(fit)})
    run(cfg_b, LocalExecutor(), progress=False)
    return tmp, fa, fb, tmp / "fresh_a", tmp / "fresh_b"


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def content(run_dir, version=None):
    from rdscale.io.runs import Run

    out = {}
    for name, cols in (("proteins", ["id", "description", "length", "sequence", "embedding"]),
                       ("residues", ["id", "pos", "aa", "embedding"]), ("rejects", ["id", "reason"])):
        t = Run(str(run_dir)).dataset(name, version=version).to_table(columns=cols)
        keys = [("id", "ascending")] + ([("pos", "ascending")] if "pos" in cols else [])
        out[name] = t.sort_by(keys)
    return out


def assert_equal_content(x, y, atol=1e-5):
    for name in x:
        a, b = x[name], y[name]
        assert a.num_rows == b.num_rows, name
        for col in a.column_names:
            if col == "embedding":
                u = np.asarray(a[col].combine_chunks().flatten(), dtype=np.float32)
                v = np.asarray(b[col].combine_chunks().flatten(), dtype=np.float32)
                np.testing.assert_allclose(u, v, atol=atol, rtol=0, err_msg=name)
            else:
                assert a[col].to_pylist() == b[col].to_pylist(), (name, col)


def test_update_equals_fresh_run_and_embeds_only_what_changed(world, tmp_path):
    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    before = content(run_dir)
    report = update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert (report.unchanged, report.changed, report.new, report.removed) == (23, 5, 4, 2)
    # 5 changed = 3 edited + UR0008 (reassigned) + UR0009 (new sequence); removed 2; 4 new
    assert report.rejects == 1 and report.relabelled == 1
    embedded = lance.dataset(str(run_dir / "shards.lance")).to_table(filter="key LIKE 'update:%'")
    assert sum(embedded["proteins"].to_pylist()) == report.changed + report.new  # only those went through a model
    assert 0 < report.fraction_embedded < 0.4
    assert_equal_content(content(run_dir), content(fresh_b))
    # unchanged rows are the very rows of the run before: bit-identical
    after = content(run_dir)["proteins"]
    old = before["proteins"]
    kept = set(old["id"].to_pylist()) & set(after["id"].to_pylist())
    for ident in sorted(kept)[:10]:
        x = old.filter(lance_eq(old, ident))["embedding"].to_pylist()
        y = after.filter(lance_eq(after, ident))["embedding"].to_pylist()
        if old.filter(lance_eq(old, ident))["sequence"].to_pylist() == after.filter(lance_eq(after, ident))["sequence"].to_pylist():
            assert x == y
    # the previous release stays readable by tag, and equals the run before the update
    assert_equal_content(content(run_dir, version="initial"), before, atol=0)
    names = [r["name"] for r in releases(run_dir)]
    assert names == ["initial", "B1"]
    with pytest.raises(UpdateError, match="already at release B1"):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)


def lance_eq(t, ident):
    import pyarrow.compute as pc

    return pc.equal(t["id"], ident)



def test_interrupted_update_resumes_to_the_same_result(world, tmp_path):
    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], executor=StopAfter(2), progress=False)
    with pytest.raises(UpdateError, match="interrupted"):
        update(run_dir, [str(fb)], "B2", overrides=["ray.address=local"], progress=False)
    report = update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert report.shards_skipped > 0
    assert (report.changed, report.new, report.removed) == (5, 4, 2)
    assert_equal_content(content(run_dir), content(fresh_b))
    assert_equal_content(content(run_dir, version="initial"), content(fresh_a), atol=0)


def test_second_writer_is_refused(world, tmp_path):
    _, _, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    with WriterLease(str(run_dir)):
        with pytest.raises(RdscaleError):
            update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert "B1" not in lance.dataset(str(run_dir / "proteins.lance")).tags.list()


def test_cli_update_info_and_search_an_earlier_release(world, tmp_path, capsys):
    from rdscale.cli.main import main
    from rdscale.search import SearchError, search

    _, _, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    assert main(["update", str(run_dir), "--fasta", str(fb), "--release", "2024_01", "--local", "-q"]) == 0
    out = capsys.readouterr().out
    assert "changed: 5   new: 4   removed: 2" in out
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "initial: proteins.lance" in out and "proteins 30" in out
    assert "2024_01: proteins.lance" in out and "proteins 32" in out and "(current)" in out
    # UR0005 is gone from the new release, and still found in the previous one
    hits = search(run_dir, ids=["UR0005"], k=3, version="initial")
    assert hits.num_rows == 3
    with pytest.raises(SearchError):
        search(run_dir, ids=["UR0005"], k=3)
    assert main(["search", str(run_dir), "--id", "UR0005", "--release", "initial", "-k", "2"]) == 0
    assert "UR0005" in capsys.readouterr().out
    assert main(["update", str(run_dir), "--fasta", str(fb), "--release", "bad name", "--local"]) == 1
    assert "release name" in capsys.readouterr().err


def test_old_run_config_is_refused_after_an_update(world, tmp_path, tiny_family):
    _, fa, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    cfg = make_cfg(tmp_path, fa, tiny_family, "run")
    with pytest.raises(RdscaleError, match="different run"):
        run(cfg, LocalExecutor(), progress=False)


@pytest.mark.ray
def test_update_through_ray_equals_fresh_run(ray_session, world, tmp_path):
    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    report = update(run_dir, [str(fb)], "B1", progress=False,
                    overrides=["ray.address=null", "ray.num_actors=1", "ray.cpus_per_actor=0.5"])
    assert (report.changed, report.new, report.removed) == (5, 4, 2)
    assert_equal_content(content(run_dir), content(fresh_b))


def test_interrupted_deletes_resume_and_partitions_spill(world, tmp_path, monkeypatch):
    """A kill in the middle of the deletes (after every new row is committed) resumes to the same tables; a tiny
    rows_per_partition makes the comparison spill to hash partitions on disk."""
    import rdscale.run.update as U

    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    monkeypatch.setattr(U, "_CHUNK", 2)
    calls = {"n": 0}
    real = lance.LanceDataset.delete

    def dying_delete(self, predicate):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, predicate)

    monkeypatch.setattr(lance.LanceDataset, "delete", dying_delete)
    with pytest.raises(KeyboardInterrupt):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False, rows_per_partition=8)
    monkeypatch.setattr(lance.LanceDataset, "delete", real)
    report = update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False, rows_per_partition=8)
    assert report.shards_skipped == report.shards_total  # nothing embedded twice
    assert (report.unchanged, report.changed, report.new, report.removed) == (23, 5, 4, 2)
    assert_equal_content(content(run_dir), content(fresh_b))


def test_two_updates_in_a_row_equal_a_fresh_run_on_the_last_release(world, tmp_path, tiny_family):
    tmp, _, fb, fresh_a, fresh_b = world
    _, b = releases_ab()
    rng = random.Random(9)
    c = [(i, d, s if n % 4 else _seq(rng)) for n, (i, d, s) in enumerate(b) if n % 7 != 3]
    c.append(("UR9999", "late", _seq(rng)))
    fc = write_records(tmp_path / "C.fasta", c)
    fresh_c = tmp_path / "fresh_c"
    run(make_cfg(tmp_path, fc, tiny_family, "fresh_c", **{"fit.artifact": str(fresh_a / "fit")}), LocalExecutor(),
        progress=False)
    run_dir = copy_run(fresh_a, tmp_path / "run")
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    report = update(run_dir, [str(fc)], "C1", overrides=["ray.address=local"], progress=False)
    assert report.previous == "B1" and report.new >= 1 and report.removed >= 1
    assert_equal_content(content(run_dir), content(fresh_c))
    assert_equal_content(content(run_dir, version="B1"), content(fresh_b))
    assert [r["name"] for r in releases(run_dir)] == ["initial", "B1", "C1"]


def test_compact_cleanup_keeps_the_tagged_releases(world, tmp_path):
    from rdscale.cli.main import main

    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert main(["compact", str(run_dir), "--cleanup"]) == 0
    assert_equal_content(content(run_dir, version="initial"), content(fresh_a), atol=0)
    assert_equal_content(content(run_dir), content(fresh_b))


def test_update_of_a_run_on_object_storage(world, s3):
    from rdscale.io.location import Location, set_storage_options

    set_storage_options(None)  # the credentials of this test's environment, not options an earlier test left set
    _, _, fb, fresh_a, fresh_b = world
    remote = s3.uri("runs", "followed")
    Location.parse(str(fresh_a)).copy_tree_to(Location.parse(remote))
    fb_s3 = s3.uri("in", "B.fasta")
    Location.parse(fb_s3).write_bytes(fb.read_bytes())
    report = update(remote, [fb_s3], "B1", overrides=["ray.address=local"], progress=False)
    assert (report.unchanged, report.changed, report.new, report.removed) == (23, 5, 4, 2)
    assert_equal_content(content(remote), content(fresh_b))
    assert_equal_content(content(remote, version="initial"), content(fresh_a), atol=0)
    assert [r["name"] for r in releases(remote)] == ["initial", "B1"]


def test_verify_checks_an_updated_run_against_its_release(world, tmp_path, capsys):
    from rdscale.cli.main import main
    from rdscale.run.verify import verify

    _, _, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], executor=StopAfter(1), progress=False)
    assert "interrupted" in verify(run_dir)[0]
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert main(["verify", str(run_dir)]) == 0, capsys.readouterr().out
    # a protein deleted behind rdscale's back is found
    lance.dataset(str(run_dir / "proteins.lance")).delete("id = 'UR0004'")
    problems = verify(run_dir)
    assert any("1 missing" in p for p in problems) and any("shard" in p for p in problems)


def test_a_marking_cut_short_is_finished(world, tmp_path):
    """A kill between marking the first and the last table as followed: the rerun completes it."""
    from rdscale.io.runs import META_RUN_KEY

    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    lance.dataset(str(run_dir / "proteins.lance")).update_schema_metadata({META_RUN_KEY.decode(): "followed-x"})
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    keys = {(lance.dataset(str(p)).schema.metadata or {})[META_RUN_KEY] for p in run_dir.glob("*.lance")}
    assert keys == {b"followed-x"}
    assert_equal_content(content(run_dir), content(fresh_b))


def test_update_of_an_extended_run_equals_a_fresh_extended_run(world, tmp_path, tiny_family):
    """A run grown by `rdscale extend` follows its database too: new and changed records go through the base
    chain and then the run's extension step (its model included), so the result equals a fresh run on B extended
    with the same step."""
    import shutil

    from rdscale.model.loading import build_tiny_family
    from rdscale.run.extend import extend

    tmp, fa, fb, fresh_a, fresh_b = world
    wider = build_tiny_family(tmp_path / "wider", widths=(32, 48, 64, 80), layers=(2, 3, 4, 4), seed=0)[-1]
    run_dir = copy_run(fresh_a, tmp_path / "run")
    extend(run_dir, str(wider), sample_sequences=20, progress=False, local=True)
    fresh = copy_run(fresh_b, tmp_path / "fresh")
    shutil.copytree(run_dir / "fit_ext_64", fresh / "fit_ext_64")  # the same step: extend reuses it
    extend(fresh, str(wider), progress=False, local=True)
    report = update(run_dir, [str(fb)], "B", overrides=["ray.address=local"], progress=False)
    assert report.changed + report.new > 0
    updated = content(run_dir)
    assert updated["proteins"]["embedding"].type.list_size == 80
    assert_equal_content(content(fresh), updated)
    assert releases(run_dir)[-1]["name"] == "B"


def test_ids_repeated_across_files_of_a_release_equal_a_fresh_run(world, tmp_path, tiny_family, monkeypatch):
    """A release whose second file repeats ids of the first (a merged release): as in a fresh run the first
    occurrence is the record and every later one a duplicate_id reject, whichever of them matches the stored row.
    Was: a repeat with the stored sequence counted as unchanged and went to neither table (a lost record), a first
    occurrence that changed was moved to rejects in favour of the stored row, and verify flagged a repeated id
    inside one shard. Inputs given relative to the working directory are recorded absolute, as `run` does."""
    from rdscale.run.update import verify_release

    _, _, _, fresh_a, _ = world
    a = {r[0]: r for r in releases_ab()[0]}
    rng = random.Random(11)
    first = [r for ident, r in a.items() if ident not in ("UR0001", "UR0002", "UR0004")]
    first.append(("UR0002", "changed here", _seq(rng)))  # 3: first occurrence changed, the repeat as stored
    first.append(("UR0004", "", _seq(rng)))  # 4: both occurrences changed, differently
    first.append(("DUPIN", "", "MKVLAAGIVG"))  # a repeated id inside one shard
    first.append(("DUPIN", "", "MKVLAAGIVGW"))
    second = [a["UR0001"], ("UR0000", "again", a["UR0000"][2]),  # 1: both as stored; the repeat alone (UR0001)
              ("UR0006", "again", _seq(rng)),  # 2: first as stored, the repeat changed
              a["UR0002"], ("UR0004", "again", _seq(rng)), ("NEWDUP", "", "MKVLAAGIVGLL")]
    second += [("NEWDUP", "", "MKVLAAGIVGLLW")]
    monkeypatch.chdir(tmp_path)
    f1 = write_records(tmp_path / "rel1.fasta", first)
    f2 = write_records(tmp_path / "rel2.fasta", second)
    run_dir = copy_run(fresh_a, tmp_path / "run")
    report = update(run_dir, ["rel1.fasta", "rel2.fasta"], "R", overrides=["ray.address=local",
                                                                          "input.shard_mb=100"], progress=False)
    cfg = make_cfg(tmp_path, [f1, f2], tiny_family, "fresh", **{"fit.artifact": str(fresh_a / "fit"),
                                                                  "input.shard_mb": 100})
    run(cfg, LocalExecutor(), progress=False)
    got, want = content(run_dir), content(tmp_path / "fresh")
    assert_equal_content({k: v.drop_columns(["reason"]) if k == "rejects" else v for k, v in got.items()},
                         {k: v.drop_columns(["reason"]) if k == "rejects" else v for k, v in want.items()})
    rejects = got["rejects"]
    assert sorted(rejects["id"].to_pylist()) == sorted(["BAD1", "DUPIN", "NEWDUP", "UR0000", "UR0006", "UR0002",
                                                        "UR0004"])
    assert report.rejects == rejects.num_rows
    sources = lance.dataset(str(run_dir / "proteins.lance")).to_table(columns=["source"], filter="shard >= 0")
    assert all(s.startswith("/") for s in sources["source"].to_pylist() if "rel" in s)
    assert verify_release(run_dir) == []


def test_an_earlier_release_is_searched_exactly_and_says_so(world, tmp_path):
    # was: `search --release initial --mode ann` asked to build an index, which cannot cover an earlier release
    from rdscale.search import SearchError, search

    _, _, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert search(run_dir, ids=["UR0005"], k=2, version="initial").num_rows == 2
    for mode in ("ann", "funnel"):
        with pytest.raises(SearchError, match="exact mode only"):
            search(run_dir, ids=["UR0005"], k=2, version="initial", mode=mode)


def test_verify_of_an_updated_truncating_run(tmp_path, tiny_family):
    """Under long_policy truncate a protein stores only its first `window` residues: verify of an updated run
    counts those (it compared the residues with the full lengths and reported a complete run as broken)."""
    from rdscale.run.verify import verify

    a, b = releases_ab()
    fa, fb = write_records(tmp_path / "A.fasta", a), write_records(tmp_path / "B.fasta", b)
    cfg = make_cfg(tmp_path, fa, tiny_family, "r", **{"embedding.long_policy": "truncate", "embedding.window": 40,
                                                      "embedding.overlap": 0})
    run(cfg, LocalExecutor(), progress=False)
    assert verify(tmp_path / "r") == []
    update(tmp_path / "r", [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert verify(tmp_path / "r") == []
    lance.dataset(str(tmp_path / "r" / "residues.lance")).delete("id = 'UR0004' AND pos = 0")
    assert any(p.startswith("residues: ") for p in verify(tmp_path / "r"))


# ------------------------------------------------------------------------------- refused, interrupted, aborted


def trace(run_dir):
    """Everything an update could leave behind: files beside the tables, every table's version, tags and run key."""
    from rdscale.io.runs import Run

    run = Run(str(run_dir))
    tables = {}
    for name in ("proteins", "residues", "rejects", "shards"):
        if run.has_table(name):
            ds = run.dataset(name)
            tables[name] = (ds.version, sorted(ds.tags.list()), (ds.schema.metadata or {}).get(b"rdscale.run_key"))
    return sorted(p.name for p in run_dir.iterdir()), tables


def test_a_refused_update_leaves_no_trace(world, tmp_path, capsys):
    """A release that is not FASTA (read after the update was recorded, once) left the run 'running' for good:
    now the release is read before anything is written; one line, and the next update goes through."""
    from rdscale.cli.main import main

    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    bad = tmp_path / "bad.fasta"
    bad.write_bytes(b">a\nMKV\n>b\nMK\x00V\n")
    before = trace(run_dir)
    assert main(["update", str(run_dir), "--fasta", str(bad), "--release", "B1", "--local", "-q"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"rdscale update: error: {bad}: binary content (byte 0x00): not a FASTA text file (at byte 12)"]
    assert trace(run_dir) == before and not (run_dir / "updates.json").exists()
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert_equal_content(content(run_dir), content(fresh_b))


@pytest.mark.parametrize("name", ["2024", "007"])
def test_all_digit_release_names_are_refused(world, tmp_path, name):
    _, _, fb, fresh_a, _ = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    before = trace(run_dir)
    with pytest.raises(UpdateError, match=f"release name '{name}' is all digits and would read as a table version"):
        update(run_dir, [str(fb)], name, overrides=["ray.address=local"], progress=False)
    with pytest.raises(UpdateError, match="not all digits"):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False, previous=name)
    assert trace(run_dir) == before


def test_interrupted_update_told_to_readers_refused_to_index_and_aborted(world, tmp_path, capsys, caplog):
    """Mid-update, readers are warned (an id may be found twice, removed ids still found) and an index is refused;
    `rdscale update --abort` puts every table back to its version before the update, so the run equals the run
    before it, and a new update then goes through."""
    from rdscale.cli.main import main
    from rdscale.search import SearchError, build_index, search

    _, _, fb, fresh_a, fresh_b = world
    run_dir = copy_run(fresh_a, tmp_path / "run")
    before = trace(run_dir)
    with pytest.raises(KeyboardInterrupt):
        update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], executor=StopAfter(2), progress=False)
    with caplog.at_level("WARNING", logger="rdscale.io.store"):
        search(run_dir, ids=["UR0001"], k=2)
    assert any("the update to release B1 is running or was interrupted: until it finishes, an id may be found "
               "twice" in r.getMessage() for r in caplog.records)
    with pytest.raises(SearchError, match="not indexing proteins: the update to release B1 is running"):
        build_index(run_dir, width=32, index_type="IVF_FLAT", backend="faiss")
    assert main(["info", str(run_dir)]) == 0
    assert f"`rdscale update {run_dir} --abort` to undo it" in capsys.readouterr().out

    assert main(["update", str(run_dir), "--abort", "--release", "B1"]) == 1  # --abort takes nothing else
    assert main(["update", str(run_dir), "--abort"]) == 0
    assert "aborted the update of" in capsys.readouterr().out
    files, tables = trace(run_dir)
    assert files == before[0]
    assert {t: (tags, key) for t, (_, tags, key) in tables.items()} == \
        {t: (tags, key) for t, (_, tags, key) in before[1].items()}
    assert_equal_content(content(run_dir), content(fresh_a), atol=0)
    assert main(["update", str(run_dir), "--abort"]) == 1
    assert "has no interrupted update to abort" in capsys.readouterr().err
    update(run_dir, [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert_equal_content(content(run_dir), content(fresh_b))
    assert [r["name"] for r in releases(run_dir)] == ["initial", "B1"]


def test_update_of_an_interrupted_run_is_refused(world, tmp_path, tiny_family):
    """Its partial state would be tagged as the initial release."""
    _, fa, fb, fresh_a, _ = world
    cfg = make_cfg(tmp_path, fa, tiny_family, "run", **{"fit.artifact": str(fresh_a / "fit")})
    from rdscale.run.pipeline import embed

    with pytest.raises(KeyboardInterrupt):
        embed(cfg, None, StopAfter(2), progress=False)
    before = trace(tmp_path / "run")
    with pytest.raises(UpdateError, match=r"is an interrupted run \(incomplete: \d+ of \d+ shards committed\); "
                                          "finish it"):
        update(tmp_path / "run", [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert trace(tmp_path / "run") == before


def test_a_changed_checkpoint_is_refused_before_anything_is_written(world, tmp_path, tiny_family):
    """An extraction run (one model, no fit) whose checkpoint was replaced by other weights of the same shape."""
    import shutil

    import torch

    _, fa, fb, _, _ = world
    model = tmp_path / "m.pt"
    shutil.copy(tiny_family[0], model)
    cfg = make_cfg(tmp_path, fa, [model], "run")
    from rdscale.run.pipeline import embed

    embed(cfg, None, LocalExecutor(), progress=False)
    data = torch.load(model, weights_only=False)
    key = next(k for k, v in data["model"].items() if v.is_floating_point())
    data["model"][key] = data["model"][key] + 1
    torch.save(data, model)
    before = trace(tmp_path / "run")
    with pytest.raises(UpdateError, match=f"checkpoint {model} changed since .* was embedded with it"):
        update(tmp_path / "run", [str(fb)], "B1", overrides=["ray.address=local"], progress=False)
    assert trace(tmp_path / "run") == before


def test_abort_of_an_interrupted_update_on_object_storage(world, s3):
    from rdscale.io.location import Location, set_storage_options
    from rdscale.run.update import abort_update

    set_storage_options(None)
    _, _, fb, fresh_a, _ = world
    remote = s3.uri("runs", "aborted")
    Location.parse(str(fresh_a)).copy_tree_to(Location.parse(remote))
    with pytest.raises(KeyboardInterrupt):
        update(remote, [str(fb)], "B1", overrides=["ray.address=local"], executor=StopAfter(2), progress=False)
    assert Location.parse(remote).join("updates.json").is_file()
    assert "aborted the update" in abort_update(remote)
    assert not Location.parse(remote).join("updates.json").is_file()
    assert_equal_content(content(remote), content(fresh_a), atol=0)
    assert releases(remote) == []
