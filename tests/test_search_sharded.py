"""Sharded search on Ray (rdscale.cluster.search): partitions of fragments held by actors, scatter-gather merge.

Uses the session's Ray cluster (tests/conftest.py); actors reserve no CPU so they fit beside other tests' work.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_search import clustered, write_proteins

from rdscale import search as S
from rdscale.search.searcher import Searcher

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_run")
    prot = clustered(6000, 32, 60, spread=0.35, seed=3)
    write_proteins(out / "proteins.lance", prot, max_rows_per_file=1500)  # 4 fragments
    return out, prot


@pytest.fixture(scope="module")
def sharded(ray_session, run):
    from rdscale.cluster.search import ShardedSearcher

    out, _ = run
    searcher = ShardedSearcher(out, num_shards=3, build=[{"width": 8}], num_cpus=0)
    yield searcher
    searcher.close()


def test_partitions_cover_every_fragment_once(sharded, run):
    from rdscale.cluster.search import partition_fragments

    assert sorted(f for g in sharded.groups for f in g) == [0, 1, 2, 3] and len(sharded.groups) == 3
    assert sharded.num_rows == 6000
    groups = partition_fragments([(i, r) for i, r in enumerate([5, 1, 1, 1, 1, 1])], 3)
    assert [f for g in groups for f in g] == list(range(6)) and all(groups)


@pytest.mark.parametrize("filter", [None, "length > 200"])
def test_sharded_exact_equals_single_process_exact(sharded, run, filter):
    out, prot = run
    q = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
    for width, metric in ((32, "cosine"), (16, "l2")):
        got = sharded.search(q, k=15, width=width, metric=metric, filter=filter)
        want = S.search(out, q, k=15, width=width, metric=metric, filter=filter)
        for c in ("query", "id", "rank"):
            assert got.column(c).to_pylist() == want.column(c).to_pylist()
        np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-5)

    got = sharded.search(ids=["P00010", "P05999"], k=5, exclude_self=True)
    want = S.search(out, ids=["P00010", "P05999"], k=5, exclude_self=True)
    assert got.column("query").to_pylist() == want.column("query").to_pylist()
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert got.column("rank").to_pylist() == [1, 2, 3, 4, 5] * 2


def test_sharded_ann_recall_is_the_single_index_recall(sharded, run):
    out, prot = run
    rng = np.random.default_rng(1)
    q = prot[rng.choice(6000, 100, replace=False)] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    single = Searcher(out, build=[{"width": 8}])
    truth = single.search(q, k=10)
    for mode in ("ann", "funnel"):
        one = S.recall_at_k(single.search(q, k=10, mode=mode), truth, k=10)
        many = S.recall_at_k(sharded.search(q, k=10, mode=mode), truth, k=10)
        assert many >= one - 0.01, (mode, many, one)
    assert S.recall_at_k(sharded.search(q, k=10, mode="funnel"), truth, k=10) >= 0.95
