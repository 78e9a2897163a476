"""Searching as a new user would: cases an outside check found broken (serve on S3, query letters, zero vectors).

Each test is the smallest real reproduction: real Lance tables, a real S3 server (SeaweedFS), the real chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_search import (  # noqa: F401
    clustered,
    rdscale,
    real_run,
    run_dir,
    write_proteins,
    write_residues,
)

from rdscale import search as S
from rdscale.io.location import Location
from rdscale.search.service import SearchService


def upload(local: Path, remote: str) -> None:
    """Copy a local run directory to an object-store prefix, file by file (what `aws s3 sync` does)."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        Location.parse(f"{remote}/{f.relative_to(local).as_posix()}").write_bytes(f.read_bytes())


def test_service_on_an_object_store_run_serves_every_table(s3, tmp_path):
    """`rdscale serve s3://...` found no table (a local Path test): every request answered 'holds []'."""
    local = tmp_path / "run"
    prot = clustered(300, 32, 10, spread=0.2, seed=3)
    write_proteins(local / "proteins.lance", prot, max_rows_per_file=100)
    write_residues(local / "residues.lance", clustered(200, 32, 5, spread=0.3, seed=4)[:, :16].astype(np.float16))
    remote = f"s3://{s3.bucket}/searchuser/serve_run"
    upload(local, remote)

    service = SearchService(remote, preload=False)
    assert sorted(service.searchers) == ["proteins", "residues"]
    info = service.info()
    assert info["run"] == "serve_run" and info["tables"]["proteins"]["rows"] == 300
    got = service.search({"ids": ["P00007", "P00100"], "k": 4})
    want = S.search(local, ids=["P00007", "P00100"], k=4).to_pylist()
    assert [(h["query"], h["id"], h["rank"]) for h in got["hits"]] == [(w["query"], w["id"], w["rank"]) for w in want]
    np.testing.assert_allclose([h["score"] for h in got["hits"]], [w["score"] for w in want], atol=1e-5)
    res = service.search({"table": "residues", "ids": ["P00003:2"], "k": 3})
    assert res["hits"][0]["id"] == "P00003" and res["hits"][0]["pos"] == 2


def test_query_sequences_in_lower_case_or_with_a_stop_equal_the_upper_case(real_run):  # noqa: F811
    """The FASTA path (CLI) accepted lower case and a trailing '*', the API and the server refused them."""
    from rdscale.search.searcher import Searcher

    run, seqs = real_run
    searcher = Searcher(run)
    upper = searcher.search_sequences({"q": seqs["R09"]}, k=3)
    odd = searcher.search_sequences({"q": seqs["R09"].lower()[:20] + "\n" + seqs["R09"][20:] + "*"}, k=3)
    assert odd.column("id").to_pylist() == upper.column("id").to_pylist()
    np.testing.assert_allclose(odd.column("score").to_numpy(), upper.column("score").to_numpy(), atol=1e-6)
    assert upper.column("id").to_pylist()[0] == "R09"

    service = SearchService(run, tables=["proteins"], preload=False)
    body = service.search({"sequences": {"q": seqs["R09"].lower()}, "k": 3})
    assert [h["id"] for h in body["hits"]] == upper.column("id").to_pylist()
    with pytest.raises(S.SearchError, match="query blank is an empty sequence"):
        service.search({"sequences": {"ok": "MKT", "blank": " * "}})
    with pytest.raises(S.SearchError, match="query bad: .*'1'"):
        service.search({"sequences": {"bad": "mk1"}})


def test_a_zero_query_vector_is_an_error_for_cosine_not_a_tie_of_every_row(run_dir, tmp_path, capsys):  # noqa: F811
    """A zero vector has no direction: cosine search ranked arbitrary rows, all at distance 1.0."""
    run_dir, prot, _ = run_dir
    zeros = np.zeros((2, 32), np.float32)
    zeros[0, 20] = 1.0  # non-zero only beyond the 8-wide prefix searched
    with pytest.raises(S.SearchError, match="query 0 is all zeros in its first 8 numbers"):
        S.search(run_dir, zeros, width=8)
    with pytest.raises(S.SearchError, match="query 1 is all zeros in its first 32 numbers"):
        S.search(run_dir, zeros)
    near = S.search(run_dir, zeros, width=8, metric="l2", k=2)  # l2 is defined: the rows nearest the origin
    norms = (prot[:, :8].astype(np.float64) ** 2).sum(1)
    assert near.column("score").to_numpy()[0] == pytest.approx(norms.min(), rel=1e-5)

    np.save(tmp_path / "z.npy", np.zeros(32, np.float32))
    code, _, err = rdscale(["search", "-o", run_dir, "--vector", tmp_path / "z.npy"], capsys)
    assert code == 1 and err.count("\n") == 1 and "all zeros" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", ["faiss", "lance"])
def test_ivf_search_with_a_filter_returns_k_rows_when_the_filtered_table_holds_them(tmp_path, backend):
    """An IVF index probes nprobe lists; a filter passing ~20% of the rows (too many for the exact path) left
    queries with fewer than k hits, although the docs promise fewer only when the filtered table has fewer."""
    prot = clustered(6000, 32, 60, spread=0.1, seed=5)
    write_proteins(tmp_path / "proteins.lance", prot, max_rows_per_file=2000)
    if backend == "faiss":
        S.build_index(tmp_path, width=16, index_type="IVF_FLAT", backend="faiss", nprobe=1)
        nprobes = None
    else:
        S.build_index(tmp_path, width=16, index_type="IVF_FLAT", backend="lance", num_partitions=64)
        nprobes = 1
    where = "length > 480"
    lengths = S.open_table(tmp_path).to_table(columns=["length"]).column("length").to_numpy()
    assert 1024 < (lengths > 480).sum() < 2000
    queries = clustered(30, 32, 60, spread=0.1, seed=6)
    exact = S.search(tmp_path, queries, width=16, k=10, filter=where)
    for mode in ("ann", "funnel"):
        got = S.search(tmp_path, queries, width=16, k=10, filter=where, mode=mode, nprobes=nprobes)
        counts = np.bincount(got.column("query").to_numpy(), minlength=30)
        assert (counts == 10).all(), (mode, counts)
        keep = set(np.flatnonzero(lengths > 480).tolist())
        assert {int(i[1:]) for i in got.column("id").to_pylist()} <= keep
    assert exact.num_rows == 300


def test_one_shot_search_aggregates_residue_hits_like_the_searcher(run_dir):  # noqa: F811
    """README: `rdscale.search.search(...)` is the Python form of `rdscale search`; --aggregate was missing."""
    from rdscale.search.searcher import Searcher

    run_dir, _, _ = run_dir
    got = S.search(run_dir, ids=["P00012"], table="residues", k=4, aggregate="proteins", residue_hits=30)
    want = Searcher(run_dir, "residues").search(ids=["P00012"], k=4, aggregate="proteins", residue_hits=30)
    assert got.to_pylist() == want.to_pylist() and got.column_names == ["query", "id", "score", "hits", "rank"]
    assert got.column("id").to_pylist()[0] == "P00012" and got.column("hits").to_pylist()[0] >= 10


@pytest.mark.parametrize("argv, message", [
    (["--index-type", "IVF_PQ", "--param", "pq_m=0"], "pq_m=0 must be an integer at least 1"),
    (["--param", "m=abc"], "m='abc' must be an integer"),
    (["--param", "m=1"], "m=1 must be an integer at least 2"),
    (["--index-type", "IVF_PQ", "--param", "pq_bits=40"], "pq_bits=40 must be an integer between 1 and 16"),
    (["--backend", "lance", "--param", "num_partitions=0"], "cannot build the Lance IVF_HNSW_SQ index"),
    (["--backend", "lance", "--index-type", "IVF_PQ", "--param", "num_sub_vectors=3"], "divisible"),
])
def test_bad_index_parameters_are_one_line_not_a_traceback(run_dir, capsys, argv, message):  # noqa: F811
    run_dir, _, _ = run_dir
    code, _, err = rdscale(["index", run_dir, "--width", "8", *argv], capsys)
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_exact_l2_distances_are_exact_far_from_the_origin():
    """The Gram trick |q|^2 - 2q.x + |x|^2 in float32 cancels: rows with |x|^2 ~ 1e3 and neighbours ~1e-2 apart
    got distances off by ~1e-4 and near neighbours swapped; the top k are now measured from differences."""
    from rdscale.search import exact as E

    rng = np.random.default_rng(7)
    x = (5.0 + 0.05 * rng.standard_normal((5000, 48))).astype(np.float32)  # (n, w), |x|^2 ~ 1200
    q = (5.0 + 0.05 * rng.standard_normal((7, 48))).astype(np.float32)
    want_all = ((q.astype(np.float64)[:, None, :] - x.astype(np.float64)[None]) ** 2).sum(-1)  # (q, n)
    want_i = np.argsort(want_all, axis=1, kind="stable")[:, :10]
    prepared, x_sq = E.prepare_rows(x, "l2")
    for rows in (None, np.arange(0, 5000, 3)):
        d, i = E.topk(q, prepared, x_sq, 10, rows=rows, block_rows=2048)
        ref = want_all if rows is None else want_all[:, rows]
        ref_i = want_i if rows is None else rows[np.argsort(ref, axis=1, kind="stable")[:, :10]]
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, np.take_along_axis(want_all, i, 1), rtol=1e-5, atol=1e-6)


def test_index_list_marks_an_index_the_table_outgrew(tmp_path, capsys):
    """`rdscale index --list` listed an index that search then refused (rows appended since) as if usable."""
    import lance
    import pyarrow as pa

    prot = clustered(400, 32, 8, spread=0.2, seed=8)
    write_proteins(tmp_path / "proteins.lance", prot)
    S.build_index(tmp_path, width=8, backend="faiss")
    code, out, _ = rdscale(["index", tmp_path, "--list"], capsys)
    assert code == 0 and "faiss HNSW cosine" in out and "STALE" not in out
    more = lance.dataset(str(tmp_path / "proteins.lance")).to_table(limit=5)
    more = more.set_column(0, "id", pa.array([f"N{i}" for i in range(5)]))
    lance.write_dataset(more, str(tmp_path / "proteins.lance"), mode="append")
    code, out, _ = rdscale(["index", tmp_path, "--list"], capsys)
    assert code == 0 and "faiss HNSW cosine" in out and "STALE" in out and "rdscale index" in out
    with pytest.raises(S.MissingIndexError, match="rows were added"):
        S.search(tmp_path, ids=["P00001"], mode="ann")


@pytest.mark.parametrize("port", ["busy", "70000"])
def test_serve_on_a_taken_or_impossible_port_is_one_line(run_dir, capsys, port):  # noqa: F811
    """A taken port gave a 100-line traceback (Serve's proxy retrying the bind), before any one-line error."""
    import socket

    run_dir, _, _ = run_dir
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1] if port == "busy" else int(port)
        code, _, err = rdscale(["serve", run_dir, "--port", number], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("Address already in use" in err and "another --port" in err) if port == "busy" else "1-65535" in err


def test_eval_reconstruction_of_an_extended_run_reports_the_extension_step(tmp_path, tiny_family, capsys):
    """`rdscale eval reconstruction RUN` on a run grown by `rdscale extend` reported the base fit's chain only,
    as if the run stopped at the width it was first embedded at."""
    from helpers import make_cfg, write_fasta

    from rdscale.run.extend import extend
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    fasta = write_fasta(tmp_path / "ext.fasta", n=12, seed=5)
    run(make_cfg(tmp_path, fasta, tiny_family[:2], "small"), LocalExecutor(), progress=False)
    small = tmp_path / "small"
    code, out, _ = rdscale(["eval", "reconstruction", small], capsys)
    assert code == 0 and "extension" not in out
    base_rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["2"]]
    extend(small, str(tiny_family[2]), progress=False)
    code, out, err = rdscale(["eval", "reconstruction", small, "-o", tmp_path / "rep"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["2"], ["3"])}
    assert rows["2"] == base_rows[0]  # the base step as before
    assert rows["3"][1:3] == ["32+48", "64"] and 0.0 <= float(rows["3"][5]) <= 1.0  # from widths, to width, R^2
    assert "extension step" in out
    report = json.loads((tmp_path / "rep" / "reconstruction.json").read_text())
    assert [r["to_width"] for r in report["steps"]] == [48, 64]

    # dms RUN scores the whole chain: the extension's model raw and its rd level, through the extension step
    dms = Path(__file__).resolve().parents[1] / "examples" / "dms"
    code, out, err = rdscale(["eval", "dms", small, "--csv", dms / "TOY_SYNTH.csv", "--wild-type",
                              dms / "wild_types.fasta", "-o", tmp_path / "dms"], capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines() if line.startswith(("raw:", "rd:"))]
    assert names[-1] == "rd:64" and "rd:48" in names and len([n for n in names if n.startswith("raw:")]) == 3


def test_python_api_odd_arguments(run_dir):  # noqa: F811
    """ids="P00001" searched six one-letter ids; k=2.0 said 'k must be >= 1'; exclude_self with vectors was
    silently ignored (the CLI refuses it); complex vectors were cast to real with a warning."""
    run_dir, prot, _ = run_dir
    one = S.search(run_dir, ids="P00001", k=3)
    assert one.column("query").to_pylist() == ["P00001"] * 3 and one.column("id")[0].as_py() == "P00001"
    with pytest.raises(S.SearchError, match="k must be a positive integer, got 2.0"):
        S.search(run_dir, ids=["P00001"], k=2.0)
    with pytest.raises(S.SearchError, match="exclude_self applies to ids= queries"):
        S.search(run_dir, prot[:2], exclude_self=True)
    with pytest.raises(S.SearchError, match="must be numbers"):
        S.search(run_dir, prot[:2].astype(np.complex64))


def test_a_query_vector_file_that_is_not_npy_is_named_so(run_dir, tmp_path, capsys):  # noqa: F811
    """A FASTA file given to --vector was reported as 'pickled (object) data' (numpy's guess)."""
    run_dir, _, _ = run_dir
    (tmp_path / "q.fa").write_text(">q\nMKT\n")
    code, _, err = rdscale(["search", run_dir, "--vector", tmp_path / "q.fa"], capsys)
    assert code == 1 and "is not a .npy file" in err and "pickle" not in err and err.count("\n") == 1


def test_an_s3_run_does_not_log_botocore_credential_notices(s3, caplog):
    """Every `rdscale run` to S3 printed 'INFO botocore.credentials: Found credentials in environment variables'."""
    import logging

    from rdscale.io.lease import S3LeaseBackend

    logging.getLogger("botocore").setLevel(logging.NOTSET)
    with caplog.at_level(logging.INFO):
        backend = S3LeaseBackend()
        backend.client.list_objects_v2(Bucket=s3.bucket, MaxKeys=1)
    assert not [r for r in caplog.records if r.name.startswith("botocore")], caplog.text


def test_search_results_written_to_an_object_store(s3, run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """--csv s3://bucket/x.csv wrote a local file ./s3:/bucket/x.csv and said 'wrote s3:/bucket/x.csv'."""
    import pyarrow as pa

    run_dir, _, _ = run_dir
    monkeypatch.chdir(tmp_path)
    csv_uri, arrow_uri = f"s3://{s3.bucket}/searchuser/hits.csv", f"s3://{s3.bucket}/searchuser/hits.arrow"
    code, _, err = rdscale(["search", run_dir, "--id", "P00003", "-k", "2", "--csv", csv_uri, "--arrow", arrow_uri],
                           capsys)
    assert code == 0 and f"wrote {csv_uri}" in err and f"wrote {arrow_uri}" in err
    assert not (tmp_path / "s3:").exists()
    lines = Location.parse(csv_uri).read_bytes().decode().splitlines()
    assert lines[0] == "query,id,score,rank" and lines[1].startswith("P00003,P00003,")
    table = pa.ipc.open_file(pa.py_buffer(Location.parse(arrow_uri).read_bytes())).read_all()
    assert table.column("id").to_pylist()[0] == "P00003" and table.num_rows == 2

    # and query vectors read from there ("does not exist" before: a local Path test)
    import io

    buf = io.BytesIO()
    np.save(buf, np.ones((1, 32), np.float32))
    vec_uri = f"s3://{s3.bucket}/searchuser/q.npy"
    Location.parse(vec_uri).write_bytes(buf.getvalue())
    code, _, err = rdscale(["search", run_dir, "--vector", vec_uri, "-k", "1"], capsys)
    assert code == 0 and "1 queries, 1 rows" in err, err
    code, _, err = rdscale(["search", run_dir, "--vector", vec_uri + ".missing"], capsys)
    assert code == 1 and "does not exist" in err


@pytest.mark.parametrize("verb", ["reconstruction", "dms"])
def test_eval_report_to_an_object_store_is_refused_not_written_to_a_local_s3_folder(tmp_path, capsys, monkeypatch,
                                                                                    verb):
    """`rdscale eval ... -o s3://b/x` wrote ./s3:/b/x/... and printed those paths as if uploaded."""
    monkeypatch.chdir(tmp_path)
    argv = ["eval", verb, "--fit", tmp_path / "fit", "-o", "s3://bucket/reports/x"]
    if verb == "dms":
        argv += ["--csv", tmp_path / "x.csv", "--wild-type", tmp_path / "wt.fa"]
    code, _, err = rdscale(argv, capsys)
    assert code == 2 and "writes its report to a local directory" in err and err.count("\n") == 1
    assert not (tmp_path / "s3:").exists()


def test_distances_are_never_negative(run_dir):  # noqa: F811
    """1 - cos of a row with itself rounds below zero: the CLI printed "-0.0000" as the best hit's score."""
    run_dir, _, _ = run_dir
    ids = [f"P{i:05d}" for i in range(300)]
    for table, keys in (("proteins", ids), ("residues", [(f"P{i:05d}", 3) for i in range(100)])):
        got = S.search(run_dir, ids=keys, table=table, k=3).column("score").to_numpy()
        assert got.min() >= 0.0 and (got[::3] < 1e-6).all()


def test_funnel_shortlist_error_with_exclude_self_says_why_k_grew(tmp_path):
    """--shortlist 5 -k 5 --exclude-self said 'shortlist (5) must be at least k (6)' with k=5 asked."""
    write_proteins(tmp_path / "proteins.lance", clustered(300, 32, 8, spread=0.2, seed=9))
    S.build_index(tmp_path, width=8, backend="faiss")
    with pytest.raises(S.SearchError, match=r"at least k \(6, k \+ 1 with exclude_self\)"):
        S.search(tmp_path, ids=["P00001"], k=5, mode="funnel", shortlist=5, exclude_self=True)
    assert S.search(tmp_path, ids=["P00001"], k=5, mode="funnel", shortlist=6, exclude_self=True).num_rows == 5
