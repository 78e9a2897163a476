"""Residue search in two stages (the default for exact residue search): proteins shortlisted by the mean of the
query protein's residues, then exactly those proteins' residues searched.

Synthetic runs with the structure of real ones: families of homologous proteins share a template of per-residue
vectors (a residue is its family template's vector at that position plus noise; the template has a family-wide
part, as a language model's residue vectors carry their protein's context), and each protein's stored
embedding is the mean of its stored residues, as the pipeline writes it. Ground truth is numpy brute force in
float64.
"""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_search import fsl, rdscale, write_proteins

from rdscale import search as S
from rdscale.search.searcher import Searcher

LEVELS = [8, 16, 32]
WIDTH = 32


def family_run(path, n_families: int, per_family: int, seed: int, noise: float = 0.6, max_rows_per_file=4000):
    """Write proteins.lance (mean residue per protein, float32) and residues.lance (float16) under ``path``;
    returns ((n_res, 32) float32 stored residues, (n_res,) protein index, (n_prot, 32) float32 proteins)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1.0 + np.arange(WIDTH) / 8.0)  # early numbers carry most of the signal (Matryoshka)
    rows, owner = [], []
    for f in range(n_families):
        length = int(rng.integers(6, 16))
        # a residue embedding carries its protein's context (a family-wide part, as a language model's residue
        # vectors do) and its position's own part
        template = (rng.standard_normal(WIDTH) + 0.7 * rng.standard_normal((length, WIDTH))) * scale  # (L, 32)
        for _ in range(per_family):
            shift = rng.standard_normal(WIDTH) * scale * 0.3  # the protein's own drift from its family
            rows.append(template + shift + noise * rng.standard_normal((length, WIDTH)) * scale)
            owner += [len(rows) - 1] * length
    res = np.concatenate(rows).astype(np.float16).astype(np.float32)  # as stored
    owner = np.asarray(owner)
    n_prot = len(rows)
    prot = np.stack([res[owner == i].mean(axis=0) for i in range(n_prot)]).astype(np.float32)
    write_proteins(path / "proteins.lance", prot, levels=LEVELS, max_rows_per_file=max_rows_per_file)
    pos = np.concatenate([np.arange((owner == i).sum()) for i in range(n_prot)])
    tbl = pa.table({
        "id": [f"P{i:05d}" for i in owner],
        "pos": pa.array(pos, pa.int32()),
        "aa": ["A"] * len(res),
        "embedding": fsl(res.astype(np.float16), pa.float16()),
        "shard": pa.array(np.zeros(len(res)), pa.int32()),
    }).replace_schema_metadata({b"rdscale.levels": json.dumps(LEVELS).encode()})
    lance.write_dataset(tbl, str(path / "residues.lance"), max_rows_per_file=max_rows_per_file)
    return res, owner, prot


def cosine(q, x):
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - q @ x.T


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("twostage_small")
    return (out, *family_run(out, n_families=12, per_family=5, seed=3, max_rows_per_file=250))


@pytest.fixture(scope="module")
def small_searchers(small_run):
    out = small_run[0]
    return {"resident": Searcher(out, "residues"), "store": Searcher(out, "residues", resident=False)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    protein=st.integers(0, 59),
    shortlist=st.integers(1, 90),
    width=st.sampled_from(LEVELS),
    k=st.integers(1, 12),
    by_id=st.booleans(),
    where=st.sampled_from(["resident", "store"]),
    filtered=st.booleans(),
)
def test_two_stage_is_exact_search_over_the_shortlisted_proteins(small_run, small_searchers, protein, shortlist,
                                                                 width, k, by_id, where, filtered):
    """Two-stage = exact residue search restricted to the `shortlist` proteins nearest the query protein's mean
    residue vector; with a shortlist covering every protein (>= 60) that is exact residue search itself."""
    _, res, owner, prot = small_run
    mine = np.flatnonzero(owner == protein)
    if by_id:
        q = res[mine]
        got = small_searchers[where].search(ids=[f"P{protein:05d}"], width=width, k=k, protein_shortlist=shortlist,
                                            filter="pos >= 2" if filtered else None)
    else:  # unlabelled vectors: one query protein's residues, perturbed
        q = res[mine[::2]] + 0.05 * np.random.default_rng(protein).standard_normal((len(mine[::2]), WIDTH))
        q = q.astype(np.float32)
        got = small_searchers[where].search(q, width=width, k=k, protein_shortlist=shortlist,
                                            filter="pos >= 2" if filtered else None)
    # numpy: stage 1 over the proteins table, then exact over the shortlisted proteins' residues
    near = np.argsort(cosine(q.mean(axis=0, keepdims=True)[:, :width], prot[:, :width])[0], kind="stable")
    kept = np.isin(owner, near[:shortlist])
    if filtered:
        pos = np.concatenate([np.arange((owner == i).sum()) for i in range(len(prot))])
        kept &= pos >= 2
    rows = np.flatnonzero(kept)
    d = cosine(q[:, :width], res[rows, :width])  # (nq, m)
    for qi in range(len(q)):
        want_order = np.argsort(d[qi], kind="stable")[:k]
        sel = got.filter(pa.compute.equal(got.column("query"), got.column("query").unique()[qi]))
        assert sel.num_rows == min(k, len(rows))
        np.testing.assert_allclose(sel.column("score").to_numpy(), d[qi, want_order], atol=2e-5)
        want_ids = [f"P{owner[rows[j]]:05d}" for j in want_order]
        gaps = np.diff(d[qi, np.argsort(d[qi])[: k + 1]])
        for rank, (a, b) in enumerate(zip(sel.column("id").to_pylist(), want_ids)):
            clear = (rank == 0 or gaps[rank - 1] > 1e-4) and (rank >= len(gaps) or gaps[rank] > 1e-4)
            if clear:  # a near-tie may come out in either order
                assert a == b
    if shortlist >= len(prot) and not filtered:
        glob = small_searchers[where].search(q if not by_id else None, ids=[f"P{protein:05d}"] if by_id else None,
                                             width=width, k=k, residue_mode="global")
        np.testing.assert_allclose(got.column("score").to_numpy(), glob.column("score").to_numpy(), atol=1e-6)


def test_residue_mode_options(small_run):
    out = small_run[0]
    with pytest.raises(S.SearchError, match="use residue_mode global"):
        S.search(out, ids=["P00001"], table="residues", mode="ann", residue_mode="two-stage")
    with pytest.raises(S.SearchError, match="unknown residue_mode"):
        S.search(out, ids=["P00001"], table="residues", residue_mode="local")
    with pytest.raises(S.SearchError, match="applies to residue search"):
        S.search(out, ids=["P00001"], residue_mode="global")
    with pytest.raises(S.SearchError, match="protein_shortlist applies to two-stage"):
        S.search(out, ids=["P00001"], table="residues", residue_mode="global", protein_shortlist=5)


@pytest.fixture(scope="module")
def family_table(tmp_path_factory):
    """2400 proteins in 240 families, ~25 k residues; a FAISS HNSW index on the proteins at width 16."""
    out = tmp_path_factory.mktemp("twostage_families")
    res, owner, prot = family_run(out, n_families=240, per_family=10, seed=7, noise=0.8)
    S.build_index(out, table="proteins", width=16, backend="faiss")
    return out, res, owner, prot


def test_two_stage_recall_against_exact_aggregated(family_table, capsys):
    """Aggregated to proteins, two-stage (stage 1 through the proteins' index) finds >= 95% of the 10 proteins
    exact residue search finds, at a default shortlist of 200 of 2400 proteins."""
    out, _, _, prot = family_table
    searcher = Searcher(out, "residues")
    ids = [f"P{i:05d}" for i in np.random.default_rng(0).choice(len(prot), 20, replace=False)]
    exact = searcher.search(ids=ids, k=10, aggregate="proteins", residue_mode="global")
    two = searcher.search(ids=ids, k=10, aggregate="proteins")
    assert S.recall_at_k(two, exact, k=10) >= 0.95
    assert searcher.proteins_searcher().find_index(None, "cosine").width == 16  # stage 1 went through the index
    # the CLI (a non-resident searcher: the shortlisted proteins' residues read by id) gives the same proteins
    code, text, err = rdscale(["search", "-o", out, "--table", "residues", "--id", ids[0], "--aggregate", "proteins",
                               "--protein-shortlist", 200], capsys)
    assert code == 0, err
    assert [line.split()[1] for line in text.splitlines()[2:]] == \
        two.filter(pa.compute.equal(two.column("query"), ids[0])).column("id").to_pylist()



def test_two_stage_reads_residues_through_an_id_index(family_table, tmp_path, capsys):
    """`rdscale index --id-index` makes a BTREE on residues.id (kept on a second call); two-stage search read by id
    through it answers as without it."""
    import shutil

    from rdscale.search.keys_index import has_id_index

    out = tmp_path / "run"
    shutil.copytree(family_table[0], out)
    ids = ["P00007", "P01234"]
    before = Searcher(out, "residues", resident=False).search(ids=ids, k=10, aggregate="proteins")
    code, text, err = rdscale(["index", "-o", out, "--table", "residues", "--id-index", "--width", 8,
                               "--index-type", "IVF_FLAT", "--recall", 0], capsys)
    assert code == 0 and "residues: scalar BTREE index on id (built)" in text, err
    assert has_id_index(S.open_table(out, "residues"))
    code, text, _ = rdscale(["index", "-o", out, "--table", "residues", "--id-index", "--width", 8,
                             "--index-type", "IVF_FLAT", "--recall", 0], capsys)
    assert code == 0 and "(kept: it exists)" in text
    after = Searcher(out, "residues", resident=False).search(ids=ids, k=10, aggregate="proteins")
    assert after.to_pylist() == before.to_pylist()
