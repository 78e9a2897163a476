"""FAISS IVF index builds on a real local Ray cluster (rdscale.cluster.index): the driver trains on a sample, Ray
tasks add the fragment groups' rows, one task merges and writes the index."""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pytest
from test_search import clustered, write_proteins

from rdscale import search as S
from rdscale.search import faiss_index as F

pytestmark = pytest.mark.ray

ROWS, DIM = 60000, 32


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """The same proteins table (60000 x 32 float32, 12 fragments) twice: one for each build."""
    base = tmp_path_factory.mktemp("ray_index")
    x = clustered(ROWS, DIM, 80, spread=0.3, seed=9)
    write_proteins(base / "single" / "proteins.lance", x, max_rows_per_file=5000)
    shutil.copytree(base / "single", base / "ray")
    return base / "single", base / "ray", x


@pytest.mark.parametrize("index_type", ["IVF_FLAT", "IVF_PQ"])
def test_ray_built_index_equals_the_single_process_one(ray_session, twin_runs, index_type):
    from rdscale.cluster.index import build_index_on_ray

    single, on_ray, x = twin_runs
    S.build_index(single, width=16, backend="faiss", index_type=index_type, recall=None, rebuild=True)
    info = build_index_on_ray(on_ray, width=16, index_type=index_type, rebuild=True, num_tasks=4, recall=None)
    assert info.num_rows == ROWS and F.faiss_path(on_ray, "proteins", 16, "cosine").exists()
    q = x[np.random.default_rng(3).choice(ROWS, 200, replace=False)] + 0.05
    truth = S.search(single, q, k=10, width=16)
    found = [S.search(run, q, k=10, mode="ann", nprobes=4) for run in (single, on_ray)]
    recalls = [S.recall_at_k(f, truth, k=10) for f in found]
    assert abs(recalls[0] - recalls[1]) <= 0.01, recalls
    # same training sample, same rows, labels shifted to the table's row positions: the same hits
    assert S.recall_at_k(found[1], found[0], k=10) >= 0.99
    if index_type == "IVF_FLAT":
        assert recalls[1] > 0.5


def test_the_driver_holds_no_more_than_the_training_sample(ray_session, twin_runs):
    """numpy allocations in the driver (tracemalloc sees them) peak at the training sample's size, while the
    table is 3.7x larger: the rows are read and encoded in the Ray tasks, and the recall calibration (a twin
    index over the table, searched with exact truth) runs in a Ray task too."""
    from rdscale.cluster.index import build_index_on_ray

    _, on_ray, _ = twin_runs
    nlist = F.default_faiss_params("IVF_FLAT", ROWS, DIM)["nlist"]
    sample_bytes = max(64 * nlist, 256 * 64) * DIM * 4
    table_bytes = ROWS * DIM * 4
    assert table_bytes > 3 * sample_bytes
    # first imports are not the build's allocations: faiss's module (~2 MB), and the pydantic support Ray's
    # serialiser loads on the driver's first ray.put
    import ray

    F.import_faiss()
    ray.get(ray.put(np.zeros(1)))
    tracemalloc.start()
    try:
        info = build_index_on_ray(on_ray, width=DIM, index_type="IVF_FLAT", rebuild=True, num_tasks=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.calibration["reached"]["funnel"] and (info.calibration["target"], info.calibration["k"]) == (0.95, 10)
    stored = [i for i in S.list_indexes(on_ray) if i.width == DIM]
    assert [i.calibration for i in stored] == [info.calibration]  # stored with the index by the task
    assert peak < 2.5 * sample_bytes, (peak, sample_bytes)  # the sample and its unit-normalised copy
    assert peak < table_bytes / 1.4


def test_hnsw_is_refused_on_ray(ray_session, twin_runs):
    from rdscale.cluster.index import build_index_on_ray

    with pytest.raises(S.SearchError, match="HNSW graph cannot be built in parts"):
        build_index_on_ray(twin_runs[1], width=16, index_type="HNSW", rebuild=True)


def test_cli_index_on_ray(ray_session, twin_runs, capsys):
    from test_search import rdscale

    code, out, err = rdscale(["index", "-o", twin_runs[1], "--width", 8, "--index-type", "IVF_FLAT", "--ray",
                              "--recall", 0, "--rebuild"], capsys)
    assert code == 0, err
    assert "faiss IVF_FLAT cosine index on indexes/proteins.p8.cosine.faiss (width 8, 60000 rows" in out
    code, out, err = rdscale(["index", "-o", twin_runs[1], "--width", 8, "--ray", "--rebuild"], capsys)
    assert code == 1 and "HNSW graph cannot be built in parts" in err
