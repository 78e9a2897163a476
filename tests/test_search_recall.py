"""Recall as a setting (rdscale.search.calibrate): indexes calibrated at build time on held-out rows, searched at
the cheapest measured point meeting a recall.

Recall is checked on 2000 queries drawn fresh from each generator (never rows of the table, so disjoint from the
calibration rows), against exact search: the bench's generator (Gaussian clusters, decaying scale) and a harder
one (low-rank centres, 400 overlapping clusters, noise; a perfect prefix-32 shortlist of 100 reaches ~0.997).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_search import real_run, rdscale, write_proteins  # noqa: F401 - a fixture
from test_search_searcher import load_bench

from rdscale.io.runs import Run
from rdscale import search as S
from rdscale.search import calibrate as C
from rdscale.search.searcher import Searcher
from rdscale.search.service import SearchService

LEVELS = [32, 64, 128]


def hard(n: int, dim: int, n_clusters: int, seed: int, rank: int = 24) -> np.ndarray:
    """(n, dim) float32: low-rank cluster centres, within-cluster spread as large as the gaps between them
    (clusters overlap), plus full-rank noise; every component decays along the embedding."""
    rng = np.random.default_rng(seed)
    spec = 1.0 / (1.0 + np.arange(dim) / 16.0)  # (dim,)
    basis = rng.standard_normal((rank, dim)) * spec  # (rank, dim)
    centres = rng.standard_normal((n_clusters, rank)) @ basis  # (C, dim)
    labels = rng.integers(0, n_clusters, n)
    within = rng.standard_normal((n, rank)) @ basis * 0.7
    noise = rng.standard_normal((n, dim)) * spec * 0.5
    return (centres[labels] + within + noise).astype(np.float32)


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """The bench generator, 12000 x 128; 2000 fresh queries from the same law (enough that a recall read on them
    moves by ~0.001 from one draw to the next: a recall 0.99 asserted on them is the index's, not the draw's)."""
    bench = load_bench()
    out = tmp_path_factory.mktemp("recall_bench")
    centres = bench.make_centres(128, 200, seed=0)
    bench.write_table(out / "proteins.lance", 12_000, centres, 0.6, LEVELS, seed=1, chunk=5000)
    return out, bench.sample(centres, 2000, 0.6, np.random.default_rng(7))


@pytest.fixture(scope="module")
def hard_data(tmp_path_factory):
    """The harder generator, 12000 x 128 (+ 2000 fresh queries of the same law, never written)."""
    out = tmp_path_factory.mktemp("recall_hard")
    x = hard(14_000, 128, 400, seed=3)
    write_proteins(out / "proteins.lance", x[:12_000], levels=LEVELS, max_rows_per_file=5000)
    return out, x[12_000:]


def recall_of(run, queries, backend, mode, **kw) -> float:
    searcher = Searcher(run)
    truth = searcher.search(queries, k=10, width=None if mode == "funnel" else 32)
    found = searcher.search(queries, k=10, mode=mode, backend=backend, **kw)
    return S.recall_at_k(found, truth, k=10)


# ---------------------------------------------------------------------------------------------------------------
# the defaults reach the target, --recall 0.99 reaches 0.99


@pytest.mark.parametrize("data", ["bench_data", "hard_data"])
def test_cli_default_index_reaches_the_recall_target_and_recall_0_99(data, request, capsys):
    run, queries = request.getfixturevalue(data)
    code, out, _ = rdscale(["index", "-o", run, "--width", "32"], capsys)  # the CLI default: FAISS HNSW, 0.95
    assert code == 0 and "calibrated funnel recall@10" in out
    (info,) = S.list_indexes(run)
    assert info.backend == "faiss" and info.calibration["target"] == 0.95 and info.calibration["k"] == 10
    for mode in ("ann", "funnel"):
        assert recall_of(run, queries, "faiss", mode) >= 0.95
        assert recall_of(run, queries, "faiss", mode, recall=0.99) >= 0.99
    # the cheapest point first: asking for less recall never costs more
    low, high = (C.search_params(info, "funnel", 10, r) for r in (0.9, 0.99))
    assert C.cost(info, low, 10, 128) <= C.cost(info, high, 10, 128)


@pytest.mark.parametrize("data", ["bench_data", "hard_data"])
def test_lance_default_index_reaches_the_recall_target(data, request):
    run, queries = request.getfixturevalue(data)
    info = S.build_index(run, width=32, backend="lance")
    assert info.index_type == S.DEFAULT_INDEX_TYPE and info.calibration["reached"]["funnel"]
    assert info.calibration["twins"] == 2  # Lance builds take no seed: read on two twin builds
    for mode in ("ann", "funnel"):
        assert recall_of(run, queries, "lance", mode) >= 0.95
        assert recall_of(run, queries, "lance", mode, recall=0.99) >= 0.99
    # read on the half of the calibration queries that did not steer the walk
    assert all("recall_walk" in p for p in info.calibration["funnel"])


def test_python_api_builds_the_cli_default_index(tmp_path, capsys):
    x = hard(3000, 128, 60, seed=5)
    for name in ("api", "cli"):
        write_proteins(tmp_path / name / "proteins.lance", x, levels=LEVELS)
    api = S.build_index(tmp_path / "api", width=32)
    assert rdscale(["index", "-o", tmp_path / "cli", "--width", "32"], capsys)[0] == 0
    (cli,) = S.list_indexes(tmp_path / "cli")
    assert (api.backend, api.index_type, api.params) == (cli.backend, cli.index_type, cli.params)
    assert api.calibration["default"] == cli.calibration["default"]  # same rows held out, same walk


class _Degraded:
    """Another "build" of an index: the searcher's answers with every other query's nearest answer dropped."""

    def __init__(self, searcher):
        self.searcher, self.calls = searcher, 0

    def index_positions(self, q, info, k, mode="ann", **kw):
        self.calls += 1
        dist, pos = self.searcher.index_positions(q, info, k, mode, **kw)
        pos = pos.copy()
        pos[::2, 0] = -1
        return dist, pos


def test_a_second_twin_build_is_read_and_each_point_keeps_the_lower_reading(tmp_path):
    """calibrate_index(second=...): an identical second build leaves every reading as it was; a worse one lowers
    the points it is worse at, and never raises one (the bound must cover the build the user gets)."""
    x = hard(3400, 128, 60, seed=11)
    write_proteins(tmp_path / "proteins.lance", x[:3000], levels=LEVELS)
    info = S.build_index(tmp_path, width=32, backend="faiss", index_type="IVF_FLAT", recall=None)
    searcher = Searcher(tmp_path)
    one = C.calibrate_index(searcher, info, x[3000:])
    same = C.calibrate_index(searcher, info, x[3000:], second=(searcher, info))
    worse = _Degraded(searcher)
    two = C.calibrate_index(searcher, info, x[3000:], second=(worse, info))
    assert (one["twins"], same["twins"], two["twins"]) == (1, 2, 2) and worse.calls > 0
    for mode in C.MODES:
        untimed = [[{a: v for a, v in p.items() if a != "ms_per_query"} for p in c[mode]] for c in (one, same)]
        assert untimed[0] == untimed[1]
        first = {json.dumps(p["params"], sort_keys=True): p for p in one[mode]}
        shared = [(first[json.dumps(p["params"], sort_keys=True)], p) for p in two[mode]
                  if json.dumps(p["params"], sort_keys=True) in first]
        assert shared and all(b["recall_low"] <= a["recall_low"] and b["recall"] <= a["recall"] for a, b in shared)
        assert any(b["recall_low"] < a["recall_low"] for a, b in shared)


def test_a_calibration_logs_where_it_is_when_asked(tmp_path, monkeypatch):
    """`rdscale index` on a large table calibrates for minutes: it says so, then where its walk is (at most every
    PROGRESS_EVERY_S); quiet without progress."""
    import logging

    from rdscale.search import searcher as searcher_module

    write_proteins(tmp_path / "proteins.lance", hard(1200, 128, 30, seed=4), levels=LEVELS)
    monkeypatch.setattr(searcher_module, "PROGRESS_EVERY_S", 0.0)
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("rdscale.progress")
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also clears the loggers' isEnabledFor caches
    logger.addHandler(handler)
    try:
        S.build_index(tmp_path, width=32, backend="faiss", index_type="IVF_FLAT")
        assert not [m for m in lines if m.startswith("calibrating")]
        S.build_index(tmp_path, width=32, backend="faiss", index_type="IVF_FLAT", rebuild=True, progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = [m for m in lines if m.startswith("calibrating the proteins index (width 32)")]
    assert said[0].endswith("for recall@10 0.95: 120 held-out rows, a twin of the index over the other rows")
    assert len(said) > 2 and all(" recall " in m and "nprobes=" in m for m in said[1:])


# ---------------------------------------------------------------------------------------------------------------
# stored with the index, shown, served


def test_calibration_is_stored_listed_served_and_kept_on_an_identical_rebuild(tmp_path, capsys):
    x = hard(3000, 128, 60, seed=6)
    write_proteins(tmp_path / "proteins.lance", x, levels=LEVELS)
    info = S.build_index(tmp_path, width=32)
    sidecar = json.loads((tmp_path / "indexes" / info.index_name).with_suffix(".json").read_text())
    assert sidecar["calibration"] == info.calibration
    assert info.calibration["queries"] == len(C.sample_positions(3000)) == 300  # a tenth; no exact duplicates here
    assert S.build_index(tmp_path, width=32).calibration == info.calibration  # kept, not measured again
    code, out, _ = rdscale(["index", "-o", tmp_path, "--list"], capsys)
    lines = out.splitlines()
    assert lines[1].startswith("proteins:   ann recall@10 ") and "curve (recall@10@params" in lines[2]
    service = SearchService(tmp_path)
    served = service.info()["tables"]["proteins"]["indexes"][0]["recall"]
    assert served["target"] == 0.95 and served["default"] == info.calibration["default"]
    assert served["curves"]["funnel"] == info.calibration["funnel"]
    answer = service.search({"vectors": x[:2].tolist(), "mode": "funnel", "recall": 0.99, "k": 5})
    assert answer["queries"] == 2 and len(answer["hits"]) == 10
    with pytest.raises(S.SearchError, match="not both"):
        service.search({"vectors": x[:2].tolist(), "mode": "funnel", "recall": 0.99, "shortlist": 50})
    with pytest.raises(S.SearchError, match="recall must be a number"):
        service.search({"vectors": x[:2].tolist(), "mode": "funnel", "recall": 1.5})


def test_a_recall_beyond_the_curve_or_without_calibration_is_one_line(tmp_path, capsys):
    x = hard(3000, 128, 60, seed=8)
    write_proteins(tmp_path / "proteins.lance", x, levels=LEVELS)
    np.save(tmp_path / "q.npy", x[:3])
    S.build_index(tmp_path, width=32, recall=None)  # uncalibrated: searches use the index's own defaults
    code, _, err = rdscale(["search", "-o", tmp_path, "--vector", tmp_path / "q.npy", "--mode", "ann",
                            "--recall", "0.9"], capsys)
    assert code == 1 and err.count("\n") == 1 and "holds no recall calibration" in err and "--rebuild" in err
    assert rdscale(["search", "-o", tmp_path, "--vector", tmp_path / "q.npy", "--mode", "ann"], capsys)[0] == 0
    info = S.build_index(tmp_path, width=32, index_type="IVF_PQ", rebuild=True)
    best = max(p["recall_low"] for p in info.calibration["ann"])
    if best < 1.0:
        code, _, err = rdscale(["search", "-o", tmp_path, "--vector", tmp_path / "q.npy", "--mode", "ann",
                                "--recall", "1"], capsys)
        assert code == 1 and "beyond what the faiss IVF_PQ index" in err and err.count("\n") == 1


def test_exact_duplicates_of_a_calibration_row_are_left_out(tmp_path):
    """A table where every row is stored twice: counting a row's twin as a found neighbour would make any index
    look perfect; left out, the measured recall is that of the other neighbours."""
    x = hard(1500, 128, 40, seed=9)
    write_proteins(tmp_path / "proteins.lance", np.concatenate([x, x]), levels=LEVELS)
    info = S.build_index(tmp_path, width=32)
    searcher = Searcher(tmp_path)
    held = C.sample_positions(3000)
    q = searcher.vectors(held, 128)
    truth = searcher.exact_positions(q, 128, 12)[1]
    for p, row in zip(held, truth):  # a row's exact duplicates: itself and its twin, the two nearest
        assert set(row[:2].tolist()) == {int(p), int(p + 1500) % 3000}
    assert info.calibration["queries"] == len(held)
    # the cheapest funnel point does not read 1.0: the twin was not counted
    assert info.calibration["funnel"][0]["recall"] < 1.0


# ---------------------------------------------------------------------------------------------------------------
# a Searcher sees an index built after it opened


@pytest.mark.parametrize("backend", ["faiss", "lance"])
def test_searcher_sees_an_index_built_after_it_opened(tmp_path, backend):
    x = hard(2000, 128, 40, seed=10)
    write_proteins(tmp_path / "proteins.lance", x, levels=LEVELS)
    searcher = Searcher(tmp_path)
    with pytest.raises(S.MissingIndexError):
        searcher.search(x[:2], mode="ann", width=32)
    service = SearchService(tmp_path, preload=False)
    assert service.info()["tables"]["proteins"]["indexes"] == []
    S.build_index(tmp_path, width=32, backend=backend)
    hits = searcher.search(x[:2], k=3, mode="ann", width=32)
    assert hits.column("id").to_pylist()[0] == "P00000"
    (listed,) = service.info()["tables"]["proteins"]["indexes"]  # /info lists it without a restart
    assert listed["backend"] == backend and listed["recall"]["target"] == 0.95


def test_searcher_error_says_how_to_refresh_when_rows_changed(tmp_path):
    import lance

    x = hard(2000, 128, 40, seed=11)
    write_proteins(tmp_path / "proteins.lance", x[:1000], levels=LEVELS)
    searcher = Searcher(tmp_path)
    write_proteins(tmp_path / "more.lance", x[1000:], levels=LEVELS)
    lance.write_dataset(lance.dataset(str(tmp_path / "more.lance")).to_table(), str(tmp_path / "proteins.lance"),
                        mode="append")
    S.build_index(tmp_path, width=32)
    with pytest.raises(S.MissingIndexError, match=r"refresh\(\)"):
        searcher.search(x[:2], mode="ann", width=32)
    searcher.refresh()
    assert searcher.search(x[:2], k=1, mode="ann", width=32).num_rows == 2


# ---------------------------------------------------------------------------------------------------------------
# the math


curves = st.lists(
    st.tuples(st.floats(0, 1), st.floats(0, 0.2), st.floats(1, 1e6)), min_size=1, max_size=12,
).map(lambda pts: [{"params": {"ef": i}, "recall": r, "recall_low": max(0.0, r - d), "cost": c}
                   for i, (r, d, c) in enumerate(pts)])


@given(curve=curves, want=st.floats(0.01, 1))
def test_choose_returns_the_cheapest_point_meeting_the_recall(curve, want):
    point = C.choose(curve, want)
    meeting = [p for p in curve if p["recall_low"] >= want]
    if not meeting:
        assert point is None
    else:
        assert point["recall_low"] >= want and point["cost"] == min(p["cost"] for p in meeting)


@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3), rate=st.floats(0.01, 0.5),
       stop=st.floats(0.5, 1.0))
def test_walk_climbs_the_grid_in_cost_order_and_stops_at_the_target(sizes, rate, stop):
    grid = {f"a{i}": [2 ** j for j in range(n)] for i, n in enumerate(sizes)}

    def measure(point):  # recall grows with every axis, saturating at 1
        r = 1 - np.exp(-rate * sum(point.values()))
        return float(r), float(r)

    def price(point):
        return float(sum(v * (i + 1) for i, v in enumerate(point.values())))

    path = C.walk(grid, measure, price, stop=stop)
    costs = [p["cost"] for p in path]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)  # each step buys something
    assert all(p["params"][a] in grid[a] for p in path for a in grid)
    hit = [p["recall"] >= stop for p in path]
    assert not any(hit[:-1])  # it stops at the first point reaching the target
    at_top = all(path[-1]["params"][a] == grid[a][-1] for a in grid)
    assert hit[-1] or at_top or len(path) == C.MAX_STEPS


@given(sizes=st.lists(st.integers(2, 6), min_size=1, max_size=3), rate=st.floats(0.05, 0.5),
       lag=st.floats(0.0, 0.3))
def test_walk_goes_on_until_the_held_out_half_confirms(sizes, rate, lag):
    """The steering half reads higher than the held-out half (by ``lag`` on the exponent): the walk must not
    stop where only the steering half reached the target while the grid still goes on."""
    grid = {f"a{i}": [2 ** j for j in range(n)] for i, n in enumerate(sizes)}
    stop = 0.9

    def steer(point):
        r = 1 - np.exp(-rate * sum(point.values()))
        return float(r), float(r)

    def held_out(point):
        return 1 - np.exp(-rate * (1 - lag) * sum(point.values()))

    path = C.walk(grid, steer, lambda p: float(sum(p.values())), stop=stop,
                  confirmed=lambda p: held_out(p) >= stop)
    confirmed = [held_out(p["params"]) >= stop for p in path]
    assert not any(confirmed[:-1])  # it stops at the first confirmed point ...
    at_top = all(path[-1]["params"][a] == grid[a][-1] for a in grid)
    assert confirmed[-1] or at_top or len(path) == C.MAX_STEPS  # ... or where the grid ends


@given(per_query=st.lists(st.floats(0, 1), min_size=2, max_size=300))
def test_lower_bound_is_below_the_mean_and_tightens_with_more_queries(per_query):
    arr = np.array(per_query)
    mean, low = C.summarise(arr)
    assert low <= mean + 1e-12 and low >= 0
    _, low4 = C.summarise(np.tile(arr, 4))
    assert low4 >= low - 1e-9


# ---------------------------------------------------------------------------------------------------------------
# sequence queries run the chain only as far as the search needs


def test_a_sequence_query_at_the_first_level_loads_and_runs_only_the_first_model(real_run):  # noqa: F811
    run, seqs = real_run
    queries = {name: seqs[name] for name in ("R04", "R00", "R17")}
    full = S.embed_sequences(run, list(queries.values()))  # (3, 64): the whole chain (32 / 48 / 64)
    searcher = Searcher(run)
    first = searcher.search_sequences(queries, k=3, width=32)  # exact at the first level
    embedder = searcher._embedder
    assert embedder.models_loaded == 1 and len(embedder.encoder.loaded) == 1
    assert embedder.encoder.widths == [32]
    # the level-1 vector is the first 32 numbers of the full one, so the answers are those of full-chain vectors
    np.testing.assert_allclose(embedder.embed(list(queries.values()), width=32), full[:, :32], atol=1e-5)
    assert first.column("id").to_pylist() == searcher.search(full, k=3, width=32).column("id").to_pylist()
    assert searcher.query_width(mode="exact", width=48) == 48 and embedder.models_for(48) == 2
    searcher.search_sequences(queries, k=3)  # exact at the stored width: the whole chain, loaded now
    assert embedder.models_loaded == 3 and len(embedder.encoder.loaded) == 3


# ---------------------------------------------------------------------------------------------------------------
# a run on object storage: indexed and searched with the defaults


def test_an_s3_run_is_indexed_with_lance_calibrated_and_searched(s3, tmp_path, capsys):
    from test_searchuser import upload

    x = hard(2200, 128, 50, seed=12)
    write_proteins(tmp_path / "run" / "proteins.lance", x[:2000], levels=LEVELS, max_rows_per_file=1000)
    remote = f"s3://{s3.bucket}/recall/run"
    upload(tmp_path / "run", remote)
    code, out, _ = rdscale(["index", remote, "--width", "32", "--backend", "lance"], capsys)  # inside the table
    assert code == 0 and "lance IVF_HNSW_SQ" in out and "calibrated funnel recall@10" in out
    (info,) = S.list_indexes(remote)
    assert info.backend == "lance" and info.calibration["reached"]["funnel"]
    searcher = Searcher(remote)
    truth = searcher.search(x[2000:], k=10)
    assert S.recall_at_k(searcher.search(x[2000:], k=10, mode="funnel", backend="lance"), truth, k=10) >= 0.95
    code, out, _ = rdscale(["index", remote, "--list"], capsys)
    assert "lance IVF_HNSW_SQ cosine on embedding_p32" in out and "funnel recall@10" in out


# ---------------------------------------------------------------------------------------------------------------
# memory: the funnel re-ranks from float16 rows or from the store, without the float32 matrix


@pytest.mark.parametrize("rows", ["float16", "store"])
def test_funnel_reranks_from_float16_rows_or_the_store_without_the_float32_matrix(bench_data, rows):
    run, queries = bench_data
    S.build_index(run, width=32)
    full = Searcher(run)
    want = full.search(queries[:50], k=10, mode="funnel", backend="faiss", shortlist=100, ef=64)
    light = Searcher(run, rerank_rows=rows).load(128)
    got = light.search(queries[:50], k=10, mode="funnel", backend="faiss", shortlist=100, ef=64)
    assert light._raw is None and not light._prepared  # no float32 matrix held
    if rows == "float16":
        assert light._half[(128, "cosine")].dtype == np.float16
        assert S.recall_at_k(got, want, k=10) >= 0.98  # float16 rows move only near-ties
        np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=2e-3)
    else:
        assert not light._half and S.recall_at_k(got, want, k=10) == 1.0
    with pytest.raises(S.SearchError, match="rerank_rows"):
        Searcher(run, rerank_rows="int8")


def test_an_s3_run_is_indexed_with_the_defaults_faiss_as_an_object_beside_it(s3, tmp_path, capsys):
    from test_searchuser import upload

    x = hard(3000, 128, 60, seed=13)
    write_proteins(tmp_path / "run" / "proteins.lance", x[:2900], levels=LEVELS, max_rows_per_file=1000)
    remote = f"s3://{s3.bucket}/recall/faiss_run"
    upload(tmp_path / "run", remote)
    code, out, _ = rdscale(["index", remote, "--width", "32"], capsys)  # the default, as for a local run
    assert code == 0 and "faiss HNSW" in out
    names = sorted(loc.name for loc in Run(remote).index_dir.list())
    assert names == ["proteins.p32.cosine.faiss", "proteins.p32.cosine.json"]
    (info,) = S.list_indexes(remote)
    assert info.backend == "faiss" and info.calibration["reached"]["funnel"]
    searcher = Searcher(remote)
    got = searcher.search(x[2900:], k=10, mode="funnel", backend="faiss")
    assert S.recall_at_k(got, searcher.search(x[2900:], k=10), k=10) >= 0.95
    # the same answers as the same run on a local disk with its own index
    S.build_index(tmp_path / "run", width=32, backend="faiss")
    local = Searcher(tmp_path / "run").search(x[2900:], k=10, mode="funnel", backend="faiss")
    assert got.column("id").to_pylist() == local.column("id").to_pylist()
