"""Readers of a run on S3 see what they see of the same run on local disk: `rdscale info` (committed shards only,
the partial-run line, missing data files), `reader_filter` and search. Real SeaweedFS server (tests/s3.py), the
commit protocol's fault hook to interrupt both runs at the same point."""

from __future__ import annotations

import re
import shutil

import pytest
from helpers import embed_killed_before_ledger, make_cfg, write_fasta

from rdscale.cli.main import main
from rdscale.io.location import Location
from rdscale.io.runs import Run
from rdscale.io.store import StoreError, reader_filter
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit


@pytest.fixture(scope="module")
def twins(s3_server, tiny_family, tmp_path_factory):
    """The same partial run (two shards committed, a third in the tables only) on local disk and on S3; also the
    configs that finish them."""
    mp = pytest.MonkeyPatch()
    for key, value in s3_server.env().items():
        mp.setenv(key, value)
    tmp = tmp_path_factory.mktemp("s3_readers")
    fasta = write_fasta(tmp / "in.fasta", n=24, seed=3)
    fit_dir = fit(make_cfg(tmp, fasta, tiny_family, "unused"), LocalExecutor(), out=tmp / "fit")
    cfgs = {}
    for where, out in (("local", str(tmp / "run")), ("s3", s3_server.uri("readers", "run"))):
        cfg = make_cfg(tmp, fasta, tiny_family, **{"fit.artifact": str(fit_dir)})
        cfg.output.dir = out
        embed_killed_before_ledger(cfg, commits=2)
        cfgs[where] = cfg
    yield cfgs, tmp
    mp.undo()


def _info(capsys, run: str) -> str:
    """`rdscale info RUN`'s output with the run's location written RUN and data file names written FILE."""
    capsys.readouterr()
    assert main(["info", run]) == 0
    out = capsys.readouterr().out.replace(run, "RUN")
    out = re.sub(r"data/[0-9a-z]+\.lance", "data/FILE", out)
    # measured times (device-hours, residues/s, ETA) differ between two runs of the same data: their values go
    out = re.sub(r"ETA [0-9.]+ (s|min|h) ", "ETA T ", out)
    return re.sub(r"[0-9][0-9,.]* (device-hours|residues/s)", r"N \1", out)


def test_info_of_a_partial_s3_run_equals_its_local_twin(twins, s3, capsys):
    cfgs, _ = twins
    local, remote = cfgs["local"].output.dir, cfgs["s3"].output.dir
    status = Run(remote).status()
    assert status == Run(local).status()
    assert status["committed"] == [0, 1] and not status["complete"] and status["planned"] > 3

    a, b = _info(capsys, local), _info(capsys, remote)
    assert b == a
    committed = Run(remote).dataset("proteins").count_rows(filter=Run(remote).committed_filter())
    total = Run(remote).dataset("proteins").count_rows()
    assert total > committed > 0  # the third shard's rows are in the S3 table, and info does not count them
    assert f"incomplete: 2 of {status['planned']} shards committed" in b
    assert f"proteins: {committed} rows  (RUN/proteins.lance)" in b


def test_extend_refuses_a_partial_s3_run(twins, s3, tiny_family):
    from rdscale.run.extend import ExtendError, extend

    cfgs, _ = twins
    with pytest.raises(ExtendError, match="incomplete: 2 of"):
        extend(cfgs["s3"].output.dir, str(tiny_family[-1]), progress=False)


def test_readers_of_a_partial_s3_run_hide_uncommitted_shards(twins, s3):
    from rdscale.search import search

    cfgs, _ = twins
    remote = cfgs["s3"].output.dir
    proteins = Run(remote).dataset("proteins")
    where = reader_filter(proteins.uri)
    assert where == reader_filter(Run(cfgs["local"].output.dir).table_uri("proteins")) == "shard IN (0, 1)"
    assert reader_filter(proteins.uri, "length > 20") == "(shard IN (0, 1)) AND (length > 20)"
    visible = proteins.to_table(columns=["id", "shard", "embedding"], filter=where)
    assert set(visible["shard"].to_pylist()) == {0, 1} and visible.num_rows < proteins.count_rows()
    vec = visible["embedding"].to_numpy(zero_copy_only=False)[0]
    hits = search(remote, vec[None, :], k=100, mode="exact")
    assert sorted(hits["id"].to_pylist()) == sorted(visible["id"].to_pylist())


def test_finished_and_damaged_s3_run_report_like_local(twins, s3, capsys):
    cfgs, tmp = twins
    for cfg in cfgs.values():  # the rerun finishes both
        embed(cfg, None, LocalExecutor(), progress=False)
    local, remote = cfgs["local"].output.dir, cfgs["s3"].output.dir
    a, b = _info(capsys, local), _info(capsys, remote)
    assert b == a and "incomplete" not in b and "damaged" not in b
    assert reader_filter(Run(remote).table_uri("proteins")) is None  # complete: nothing to filter

    # one data file of proteins.lance deleted in copies of both
    copies = {"local": str(tmp / "damaged"), "s3": s3.uri("readers", "damaged")}
    shutil.copytree(local, copies["local"])
    Location.parse(remote).copy_tree_to(Location.parse(copies["s3"]))
    for copy in copies.values():
        table = Run(copy).table("proteins")
        name = Run(copy).dataset("proteins").get_fragments()[0].data_files()[0].path
        table.join("data", name).delete()
    a, b = _info(capsys, copies["local"]), _info(capsys, copies["s3"])
    assert b == a
    assert "proteins: damaged, 1 data file(s) missing  (RUN/proteins.lance)" in b
    assert "damaged: data file RUN/proteins.lance/data/FILE is missing; run `rdscale verify RUN`" in b
    with pytest.raises(StoreError, match="damaged"):
        reader_filter(Run(copies["s3"]).table_uri("proteins"))
