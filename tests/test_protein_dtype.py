"""output.protein_dtype: per-protein embeddings stored in float16 (half the bytes) search as the float32 ones do.

The tables are written through the store's own schema and table builders (what the pipeline's writer calls), from
the same float32 means in both dtypes; a tiny-model pipeline run checks the option end to end.
"""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest
from test_search import clustered

from rdscale import search as S
from rdscale.config import load_config
from rdscale.errors import RdscaleError
from rdscale.io.store import PROTEINS, proteins_table, run_schemas, schema_metadata

LEVELS = [8, 16, 32]


def write_run(path, x: np.ndarray, dtype: str):
    schema = run_schemas(LEVELS[-1], None, schema_metadata(LEVELS, {}, {}, "k"), residues=False,
                         protein_dtype=dtype)[PROTEINS]
    rows = [{"id": f"P{i:05d}", "description": "", "sequence": "M" * 10, "source": "db.fa"} for i in range(len(x))]
    lance.write_dataset(proteins_table(rows, x, 0, schema), str(path / "proteins.lance"), max_rows_per_file=2000)


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    x = clustered(6000, 32, 60, spread=0.25, seed=5)  # (6000, 32) float32 means
    runs = {}
    for dtype in ("float32", "float16"):
        out = tmp_path_factory.mktemp(f"proteins_{dtype}")
        write_run(out, x, dtype)
        S.build_index(out, width=16, backend="faiss")  # HNSW, calibrated on held-out rows of its own table
        runs[dtype] = out
    return runs, x


def test_float16_proteins_are_stored_in_half_the_bytes(twin_runs):
    runs, x = twin_runs
    f16 = lance.dataset(str(runs["float16"] / "proteins.lance"))
    assert f16.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    stored = np.stack(f16.to_table(columns=["embedding"]).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(stored, x.astype(np.float16))


@pytest.mark.parametrize("mode", ["exact", "ann", "funnel"])
def test_float16_proteins_search_like_float32(twin_runs, mode):
    """recall@10 of the float16 run against the float32 run's exact top 10 (at the same width) >= 0.95, in every
    mode; the float16
    index's calibration holds on the float16 table."""
    runs, x = twin_runs
    q = x[np.random.default_rng(1).choice(len(x), 100, replace=False)] + 0.05 * \
        np.random.default_rng(2).standard_normal((100, 32)).astype(np.float32)
    width = 16 if mode == "ann" else None  # ann: the index's width; exact and funnel: the stored width
    truth = S.search(runs["float32"], q, k=10, width=width)
    got = S.search(runs["float16"], q, k=10, mode=mode, width=width)
    assert S.recall_at_k(got, truth, k=10) >= 0.95
    if mode == "exact":  # distances of float16 rows to ~1e-3 of the float32 ones
        np.testing.assert_allclose(np.sort(got.column("score").to_numpy()), np.sort(truth.column("score").to_numpy()),
                                   atol=2e-3)
    (info,) = S.list_indexes(runs["float16"])
    assert info.calibration and info.calibration["target"] == 0.95


def test_protein_dtype_is_validated():
    with pytest.raises(RdscaleError, match="output.protein_dtype must be float16 or float32"):
        load_config(None, ["output.protein_dtype=bfloat16"])


def test_a_pipeline_run_stores_float16_proteins(tmp_path, tiny_family):
    from rdscale.run.pipeline import run

    rng = np.random.default_rng(3)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    seqs = {f"R{i:02d}": "".join(rng.choice(letters, rng.integers(30, 60))) for i in range(12)}
    (tmp_path / "db.fa").write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    cfg = load_config(None, [
        "ray.address=local", f"output.dir={tmp_path / 'run'}", f"input.paths={json.dumps([str(tmp_path / 'db.fa')])}",
        f"models={json.dumps([str(p) for p in tiny_family])}", "fit.sample_sequences=12",
        "output.protein_dtype=float16",
    ])
    run(cfg, progress=False)
    ds = lance.dataset(str(tmp_path / "run" / "proteins.lance"))
    assert ds.schema.field("embedding").type.value_type == pa.float16()
    hits = S.search_sequences(tmp_path / "run", {n: seqs[n] for n in ("R00", "R07")}, k=2)
    first = hits.filter(pa.compute.equal(hits.column("rank"), 1))
    assert first.column("id").to_pylist() == ["R00", "R07"]
    assert np.all(first.column("score").to_numpy() < 1e-3)  # the query's float32 vector vs its float16 row
