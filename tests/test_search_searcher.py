"""The long-lived Searcher, the blocked-GEMM exact top-k, the FAISS backend and the search user contract.

Data: the same synthetic tables as tests/test_search.py, and for recall the benchmark's own generator
(bench/bench_search.py: Gaussian clusters, per-dimension scale decaying along the embedding) at a small size.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_search import clustered, ids_by_query, rdscale, write_proteins

from rdscale import search as S
from rdscale.search import exact as E
from rdscale.search import faiss_index as F
from rdscale.search.searcher import Searcher, key_positions, num_queries, widen

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "bench" / "bench_search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """proteins 2000 x 32 float32 (3 fragments), residues 1500 x 16 float16; levels 8/16/32."""
    from test_search import write_residues

    out = tmp_path_factory.mktemp("searcher_run")
    prot = clustered(2000, 32, 40, spread=0.15, seed=1)
    res = clustered(1500, 32, 30, spread=0.3, seed=2)[:, :16].astype(np.float16)
    write_proteins(out / "proteins.lance", prot)
    write_residues(out / "residues.lance", res)
    return out, prot, res


@pytest.fixture(scope="module")
def searchers(run_dir):
    out, _, _ = run_dir
    return {t: Searcher(out, t) for t in ("proteins", "residues")}


# ---------------------------------------------------------------------------------------------------------------
# exact: blocked GEMM


@given(
    n=st.integers(1, 300),
    nq=st.integers(1, 5),
    k=st.integers(1, 40),
    block=st.integers(1, 128),
    metric=st.sampled_from(["cosine", "l2"]),
    filtered=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocked_topk_equals_a_full_sort(n, nq, k, block, metric, filtered, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    q = rng.standard_normal((nq, 6)).astype(np.float32)
    rows = np.sort(rng.choice(n, size=max(1, n // 2), replace=False)) if filtered else None
    prepared, sq = E.prepare_rows(x, metric)
    dist, pos = E.topk(q, prepared, sq, k, rows=rows, block_rows=block)

    full = E.pairwise_distances(q, x, metric)  # (nq, n)
    allowed = np.arange(n) if rows is None else rows
    want = np.sort(full[:, allowed], axis=1)[:, :k]
    assert dist.shape == pos.shape == want.shape
    np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)
    # every position is allowed, distinct per query, and really at the distance claimed
    assert np.isin(pos, allowed).all()
    assert all(len(set(p)) == len(p) for p in pos)
    np.testing.assert_allclose(np.take_along_axis(full, pos, 1), dist, rtol=1e-5, atol=1e-5)


@given(
    n=st.integers(1, 400),
    k=st.integers(1, 30),
    block=st.integers(1, 64),
    filtered=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocked_topk_keeps_ties_in_row_order(n, k, block, filtered, seed):
    """Small integer vectors: every l2 distance is exact, many are equal. The top k are the k first rows of a
    stable sort by distance (ties in row order), whether a block's rows are selected or only compared with each
    query's k-th so far."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    q = rng.integers(-2, 3, size=(3, 4)).astype(np.float32)
    rows = np.sort(rng.choice(n, size=max(1, n // 2), replace=False)) if filtered else None
    prepared, sq = E.prepare_rows(x, "l2")
    dist, pos = E.topk(q, prepared, sq, k, rows=rows, block_rows=block)
    allowed = np.arange(n) if rows is None else rows
    full = ((q[:, None, :] - x[None, allowed, :]) ** 2).sum(-1)  # (3, m) exact
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(pos, allowed[order])
    np.testing.assert_array_equal(dist, np.take_along_axis(full, order, 1))


@given(
    table=st.sampled_from(["proteins", "residues"]),
    width=st.sampled_from([8, 16, 32]),
    k=st.integers(1, 30),
    metric=st.sampled_from(["cosine", "l2"]),
    filter=st.sampled_from([None, "length > 300", "id < 'P00700'"]),
    seed=st.integers(0, 2**16),
)
def test_resident_searcher_equals_one_shot_streamed_search(run_dir, searchers, table, width, k, metric, filter,
                                                           seed):
    """Ids identical and distances within 1e-6: the resident GEMM and the streamed scan of search() agree."""
    out, _, _ = run_dir
    if table == "residues":
        width = min(width, 16)
        filter = None if filter == "length > 300" else filter
    q = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    got = searchers[table].search(q, width=width, k=k, metric=metric, filter=filter)
    want = S.search(out, q, table=table, width=width, k=k, metric=metric, filter=filter)
    assert got.column_names == want.column_names
    for c in ("query", "id", "rank") + (("pos",) if table == "residues" else ()):
        assert got.column(c).to_pylist() == want.column(c).to_pylist(), c
    scale = 1.0 if metric == "cosine" else max(1.0, float(np.max(want.column("score").to_numpy())))
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-6 * scale)


def test_searcher_exact_matches_float64_brute_force(run_dir, searchers):
    out, prot, _ = run_dir
    q = prot[[5, 900, 1999]] + 0.05
    got = searchers["proteins"].search(q, width=16, k=10)
    xn = prot[:, :16].astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    qn = q[:, :16].astype(np.float64)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    truth = 1.0 - qn @ xn.T
    order = np.argsort(truth, axis=1)[:, :10]
    assert got.column("id").to_pylist() == [f"P{i:05d}" for i in order.ravel()]
    np.testing.assert_allclose(got.column("score").to_numpy(), np.take_along_axis(truth, order, 1).ravel(),
                               atol=1e-6)


def _rerank_reference(x: np.ndarray, q: np.ndarray, cand: np.ndarray, metric: str, k: int):
    """The funnel re-rank as it was first written: blocks of 64 queries, one einsum each (the same values)."""
    dist = np.full(cand.shape, np.inf, np.float32)
    valid = cand >= 0
    qp = E.unit_rows(q) if metric == "cosine" else q
    for s in range(0, len(q), 64):
        c = cand[s : s + 64]
        rows = x[np.where(c >= 0, c, 0)].astype(np.float32, copy=False)
        if metric == "cosine":
            dist[s : s + 64] = 1.0 - np.einsum("qsw,qw->qs", rows, qp[s : s + 64])
        else:
            dist[s : s + 64] = E.rerank(q[s : s + 64], rows, metric)
    dist[~valid] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(cand, order, 1)


@given(nq=st.integers(1, 150), shortlist=st.integers(1, 60), width=st.sampled_from([8, 16, 32]),
       metric=st.sampled_from(["cosine", "l2"]), rerank=st.sampled_from(["float32", "float16"]),
       seed=st.integers(0, 2**16))
def test_rerank_in_cache_sized_blocks_gives_the_same_bits(run_dir, searchers, nq, shortlist, width, metric, rerank,
                                                          seed):
    """The funnel's re-rank, in blocks sized to the CPU cache, returns exactly (bit for bit) what the 64-query
    blocks returned: the same rows, distances and tie order, -1 (missing) candidates last."""
    out, prot, _ = run_dir
    rng = np.random.default_rng(seed)
    one = searchers["proteins"] if rerank == "float32" else Searcher(out, rerank_rows="float16")
    q = rng.standard_normal((nq, width)).astype(np.float32)
    cand = rng.integers(0, len(prot), (nq, shortlist))
    cand[rng.random((nq, shortlist)) < 0.1] = -1
    k = int(rng.integers(1, shortlist + 1))
    x = one._half_rows(width, metric) if rerank == "float16" else one._prepared_rows(width, metric)[0]
    want = _rerank_reference(x, q, cand, metric, k)
    got = one._rerank(q, cand, metric, k)
    assert np.array_equal(got[1], want[1])
    assert np.array_equal(got[0], want[0])


def test_resident_searcher_holds_prepared_rows_not_a_second_stored_copy(run_dir):
    """A resident searcher's rows are streamed from the table straight into their prepared form (the same values
    as preparing the stored matrix), so the stored float32 matrix is never held beside them; id queries still
    read the stored vectors."""
    out, prot, _ = run_dir
    one = Searcher(out).load(32, "cosine")
    one.search(prot[:3], width=16, k=5, metric="l2")
    assert one._raw is None
    for (width, metric), (x, x_sq) in one._prepared.items():
        want_x, want_sq = E.prepare_rows(prot[:, :width], metric)
        assert np.array_equal(x, want_x)
        assert (x_sq is None and want_sq is None) or np.array_equal(x_sq, want_sq)
    by_id = one.search(ids=["P00007"], k=3)
    assert by_id.column("id").to_pylist()[0] == "P00007"
    np.testing.assert_array_equal(one.vectors(np.array([7, 3]), 32), prot[[7, 3]])
    assert one._raw is None


# ---------------------------------------------------------------------------------------------------------------
# user contract: filters, query counts, clamping


def test_bad_filter_is_one_line_search_error(run_dir, searchers, capsys, tmp_path):
    out, prot, _ = run_dir
    for bad, what in (("nope > 3", "nope"), ("length >>> 3", "length >>> 3")):
        with pytest.raises(S.SearchError, match="bad filter") as info:
            searchers["proteins"].search(prot[:1], filter=bad)
        assert what in str(info.value) and "\n" not in str(info.value) and ".rs:" not in str(info.value)
        code, _, err = rdscale(["search", "-o", out, "--id", "P00001", "--filter", bad], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "bad filter" in err, err


def test_filter_with_ids_reports_the_number_of_queries(run_dir, capsys):
    out, _, _ = run_dir
    code, _, err = rdscale(["search", "-o", out, "--id", "P00001", "P00002", "P00003", "--filter", "length < 0"],
                           capsys)
    assert code == 0 and ": 3 queries, 0 rows" in err, err
    code, _, err = rdscale(["search", "-o", out, "--id", "P00001", "P00002", "-k", 3], capsys)
    assert code == 0 and ": 2 queries, 6 rows" in err, err
    result = S.search(out, ids=["P00001", "P00002"], filter="length < 0")
    assert result.num_rows == 0 and num_queries(result) == 2


@pytest.mark.parametrize("backend", ["faiss", "lance"])
def test_huge_k_shortlist_nprobes_ef_are_clamped_not_passed_on(run_dir, tmp_path, capsys, backend):
    src, _, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(src, run)
    S.build_index(run, width=8, backend=backend)
    big = 1_000_000_000
    code, _, err = rdscale(["search", "-o", run, "--id", "P00001", "-k", big, "--mode", "funnel",
                            "--backend", backend, "--max-rows", 0], capsys)
    assert code == 0 and "1 queries, 2000 rows" in err, err
    for mode in ("ann", "funnel"):
        r = S.search(run, ids=["P00001"], k=5, mode=mode, shortlist=big, nprobes=big, ef=big, refine_factor=big)
        assert r.column("id").to_pylist()[0] == "P00001" and r.num_rows == 5
    for name in ("shortlist", "nprobes", "ef"):
        with pytest.raises(S.SearchError, match=f"{name} must be a positive integer"):
            S.search(run, ids=["P00001"], mode="funnel", **{name: 0})


# ---------------------------------------------------------------------------------------------------------------
# FAISS backend


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """The benchmark generator's data, small: 20000 x 128, levels 32/64/128, 200 clusters; 50 held-out queries."""
    bench = load_bench()
    out = tmp_path_factory.mktemp("bench_run")
    centres = bench.make_centres(128, 200, seed=0)
    bench.write_table(out / "proteins.lance", 20_000, centres, 0.6, [32, 64, 128], seed=1, chunk=5000)
    queries = bench.sample(centres, 50, 0.6, np.random.default_rng(2))
    return out, queries


@pytest.mark.parametrize("index_type", ["HNSW", "IVF_FLAT", "IVF_PQ"])
def test_faiss_funnel_recall_at_10_at_default_settings(bench_run, index_type):
    out, queries = bench_run
    info = S.build_index(out, width=32, backend="faiss", index_type=index_type)
    assert info.backend == "faiss" and info.index_type == index_type
    searcher = Searcher(out)
    truth = searcher.search(queries, k=10)
    found = searcher.search(queries, k=10, mode="funnel", backend="faiss")
    assert S.recall_at_k(found, truth, k=10) >= 0.95
    # the funnel's scores are exact at the full width: every returned score equals the exact distance
    exact_all = searcher.search(queries, k=20_000)
    score_of = {(q, i): s for q, i, s in zip(*(exact_all.column(c).to_pylist() for c in ("query", "id", "score")))}
    got = [score_of[(q, i)] for q, i in zip(found.column("query").to_pylist(), found.column("id").to_pylist())]
    np.testing.assert_allclose(found.column("score").to_numpy(), got, atol=1e-6)
    # one-shot search and the non-resident path give the same answer
    one_shot = S.search(out, queries, k=10, mode="funnel", backend="faiss")
    assert ids_by_query(one_shot) == ids_by_query(found)


def test_faiss_index_is_relocatable_and_idempotent(run_dir, tmp_path):
    src, prot, _ = run_dir
    run = tmp_path / "a" / "run"
    shutil.copytree(src, run)
    S.build_index(run, width=8, backend="faiss")
    path = F.faiss_path(run, "proteins", 8, "cosine")
    stamp = path.stat().st_mtime_ns
    S.build_index(run, width=8, backend="faiss")  # identical and fresh: kept
    assert path.stat().st_mtime_ns == stamp
    sidecar = path.with_suffix(".json").read_text()
    assert str(tmp_path) not in sidecar and json.loads(sidecar)["file"] == path.name
    before = S.search(run, ids=["P00042", "P00007"], k=5, mode="funnel")

    moved = tmp_path / "b" / "elsewhere"
    shutil.move(str(run), str(moved))
    after = S.search(moved, ids=["P00042", "P00007"], k=5, mode="funnel")
    assert after.equals(before)
    assert after.column("id").to_pylist()[0] == "P00042"


def test_faiss_filter_exclude_self_and_stale_index(run_dir, tmp_path):
    src, prot, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(src, run)
    S.build_index(run, width=8, backend="faiss")
    lengths = lance.dataset(str(run / "proteins.lance")).to_table(columns=["length"]).column("length").to_numpy()
    q = prot[[3, 70, 1500]]
    funnel = S.search(run, q, k=10, mode="funnel", filter="length > 300", shortlist=400)
    exact = S.search(run, q, k=10, filter="length > 300")
    assert all(lengths[int(i[1:])] > 300 for i in funnel.column("id").to_pylist())
    assert ids_by_query(funnel) == ids_by_query(exact)

    for mode in ("ann", "funnel"):  # a filter keeping a handful of rows: found, not lost in the graph
        few = S.search(run, q, k=3, mode=mode, filter="id IN ('P00042', 'P01999', 'P00500')")
        assert sorted(ids_by_query(few)[0]) == ["P00042", "P00500", "P01999"]
    excluded = S.search(run, ids=["P00042"], k=4, mode="ann", exclude_self=True)
    assert "P00042" not in excluded.column("id").to_pylist() and excluded.num_rows == 4

    more = clustered(10, 32, 3, 0.1, seed=9)
    extra = write_proteins(tmp_path / "extra.lance", more).to_table()
    extra = extra.set_column(0, "id", pa.array([f"X{i}" for i in range(10)]))
    lance.write_dataset(extra, str(run / "proteins.lance"), mode="append")
    with pytest.raises(S.MissingIndexError, match="rows were added .* --backend faiss|rows were added"):
        S.search(run, q, mode="funnel", backend="faiss")
    S.build_index(run, width=8, backend="faiss")
    assert S.search(run, ids=["X3"], mode="funnel", k=1).column("id").to_pylist() == ["X3"]


def test_faiss_errors(run_dir, tmp_path):
    src, _, _ = run_dir
    with pytest.raises(S.SearchError, match="unknown faiss index type"):
        S.build_index(src, width=8, backend="faiss", index_type="KD_TREE")
    with pytest.raises(S.SearchError, match="unknown HNSW parameter"):
        S.build_index(src, width=8, backend="faiss", nlist=4)
    with pytest.raises(S.SearchError, match="unknown backend"):
        S.build_index(src, width=8, backend="annoy")
    with pytest.raises(S.MissingIndexError, match="no faiss cosine vector index .* --backend faiss"):
        S.search(src, ids=["P00001"], mode="ann", backend="faiss")


# ---------------------------------------------------------------------------------------------------------------
# compressed per-residue search: IVF-PQ on a residue prefix, exact re-rank from the stored float16 rows


@pytest.fixture(scope="module")
def residue_run(tmp_path_factory):
    from test_search import write_residues

    out = tmp_path_factory.mktemp("residue_run")
    res = clustered(12_000, 32, 120, spread=0.3, seed=5).astype(np.float16)  # stored at width 32, float16
    write_residues(out / "residues.lance", res)
    write_proteins(out / "proteins.lance", clustered(1200, 32, 10, 0.3, seed=6))
    S.build_index(out, table="residues", width=16, backend="faiss", index_type="IVF_PQ")
    return out, res


def test_residue_ivf_pq_funnel_reranks_exactly_from_float16_rows(residue_run):
    out, res = residue_run
    (info,) = S.list_indexes(out, "residues")
    assert (info.backend, info.index_type, info.width) == ("faiss", "IVF_PQ", 16)
    index_bytes = F.faiss_path(out, "residues", 16, "cosine").stat().st_size
    assert index_bytes < res.nbytes  # compressed: smaller than the stored float16 rows themselves
    q = res[np.random.default_rng(0).choice(len(res), 40, replace=False)].astype(np.float32)
    searcher = Searcher(out, "residues", resident=False)  # candidates read from the table, not held
    # 40 residues of 40 proteins: the whole residues table, not one query protein's shortlist
    truth = searcher.search(q, k=10, residue_mode="global")
    found = searcher.search(q, k=10, mode="funnel", shortlist=200, nprobes=8)
    assert S.recall_at_k(found, truth, k=10) >= 0.9
    # re-ranked scores are the exact full-width distances of the stored float16 rows
    x = res.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = [int(i[1:]) * 10 + p for i, p in zip(found.column("id").to_pylist(), found.column("pos").to_pylist())]
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    want = 1.0 - np.einsum("nw,nw->n", x[rows], qn[found.column("query").to_numpy()])
    np.testing.assert_allclose(found.column("score").to_numpy(), want, atol=1e-5)


def test_residue_hits_aggregate_to_proteins(residue_run, capsys):
    out, _ = residue_run
    searcher = Searcher(out, "residues")
    # this fixture's proteins table is not its residues' means: every residue searched (two-stage has its tests)
    agg = searcher.search(ids=["P00042"], k=5, aggregate="proteins", residue_hits=30, residue_mode="global")
    raw = searcher.search(ids=["P00042"], k=30, residue_mode="global")  # each of the 10 residues of P00042: its 30 nearest residues
    best: dict[str, float] = {}
    count: dict[str, int] = {}
    for pid, score in zip(raw.column("id").to_pylist(), raw.column("score").to_pylist()):
        best[pid] = min(best.get(pid, np.inf), score)
        count[pid] = count.get(pid, 0) + 1
    want = sorted(best, key=lambda p: (best[p], -count[p]))[:5]
    assert agg.column_names == ["query", "id", "score", "hits", "rank"]
    assert agg.column("query").to_pylist() == ["P00042"] * 5
    assert agg.column("id").to_pylist() == want
    assert agg.column("hits").to_pylist() == [count[p] for p in want]
    np.testing.assert_allclose(agg.column("score").to_numpy(), [best[p] for p in want], atol=1e-7)
    assert agg.column("id")[0].as_py() == "P00042"

    code, text, err = rdscale(["search", "-o", out, "--table", "residues", "--id", "P00042", "--aggregate",
                               "proteins", "--residue-hits", 30, "-k", 5, "--residue-mode", "global"], capsys)
    assert code == 0 and text.splitlines()[0].split() == ["query", "id", "score", "hits", "rank"], (text, err)
    assert [line.split()[1] for line in text.splitlines()[2:]] == want
    with pytest.raises(S.SearchError, match="applies to residue search"):
        Searcher(out).search(ids=["P00001"], aggregate="proteins")


def test_widen_converts_every_float16_value_exactly():
    """The float16 re-rank widens rows through torch (numpy's astype is scalar); every one of the 65,536 float16
    bit patterns must come out as numpy's exact conversion gives it (NaNs as NaN), in blocks of any shape."""
    half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(64, 32, 32)  # (b, shortlist, width)
    out = widen(half, np.empty(half.shape, np.float32))
    want = half.astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.array_equal(out[finite], want[finite])
    assert np.array_equal(np.signbit(out[finite]), np.signbit(want[finite]))  # -0.0 stays -0.0
    part = widen(half[:3], np.empty((3, 32, 32), np.float32))  # a last block shorter than the buffer
    assert np.array_equal(part[finite[:3]], want[:3][finite[:3]])


@given(keys=st.lists(st.sampled_from([f"P{i}" for i in range(12)]), max_size=40),
       wanted=st.lists(st.sampled_from([f"P{i}" for i in range(16)]), max_size=20), few=st.sampled_from([0, 4096]))
def test_key_positions_are_first_occurrences_or_minus_one(keys, wanted, few):
    """Both ways of finding query ids (hash the few wanted ids, or hash the table's) give each wanted id's first
    row in the table and -1 for ids it does not hold, in the order asked, repeats included."""
    want = [keys.index(w) if w in keys else -1 for w in wanted]
    got = key_positions(pa.array(keys, pa.string()), wanted, few=few)
    assert got.dtype == np.int64
    assert got.tolist() == want
