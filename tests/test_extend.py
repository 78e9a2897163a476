"""`rdscale extend`: a run embedded with (32 -> 48) grown to 64 equals the three-model chain run from scratch."""

from __future__ import annotations

import json

import lance
import numpy as np
import pytest
from helpers import make_cfg, table, write_fasta

import rdscale.model.loading
from rdscale.run.extend import ExtendError, extend
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import run


def embeddings(run_dir, name):
    t = table(run_dir, name)
    width = t.schema.field("embedding").type.list_size
    return t, np.asarray(t["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, width)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("fa") / "ext.fasta", n=20, seed=5, long_every=7)


@pytest.fixture(scope="module")
def full_chain(tmp_path_factory, fasta, tiny_family):
    tmp = tmp_path_factory.mktemp("full")
    run(make_cfg(tmp, fasta, tiny_family, "full"), LocalExecutor(), progress=False)
    return tmp / "full"


def two_level_run(tmp_path, fasta, tiny_family, name, **overrides):
    run(make_cfg(tmp_path, fasta, tiny_family[:2], name, **overrides), LocalExecutor(), progress=False)
    return tmp_path / name


@pytest.mark.parametrize("residue_dtype, atol", [("float32", 1e-4), ("float16", 1e-2)])
def test_extension_equals_the_chain_from_scratch(tmp_path, fasta, tiny_family, full_chain, loaded_models,
                                                 residue_dtype, atol):
    small = two_level_run(tmp_path, fasta, tiny_family, "small", **{"output.residue_dtype": residue_dtype})
    old_res, old_res_emb = embeddings(small, "residues")
    old_prot, old_prot_emb = embeddings(small, "proteins")
    loaded_models.clear()

    summary = extend(small, str(tiny_family[2]), sample_sequences=1000, progress=False)

    assert loaded_models == [str(tiny_family[2])]  # the smaller models never ran
    assert summary.new_width == 64 and summary.residues == old_res.num_rows
    new_res, new_res_emb = embeddings(small, "residues")
    new_prot, new_prot_emb = embeddings(small, "proteins")
    ref_res, ref_res_emb = embeddings(full_chain, "residues")
    ref_prot, ref_prot_emb = embeddings(full_chain, "proteins")
    assert new_res["id"].to_pylist() == ref_res["id"].to_pylist() == old_res["id"].to_pylist()
    assert new_prot["id"].to_pylist() == ref_prot["id"].to_pylist()
    # The old prefix is untouched, bit for bit, and the old version of the table is still readable.
    np.testing.assert_array_equal(new_res_emb[:, :48], old_res_emb)
    np.testing.assert_array_equal(new_prot_emb[:, :48], old_prot_emb)
    ds = lance.dataset(str(small / "residues.lance"))
    assert ds.schema.field("embedding").type.list_size == 64
    # Equal to the three-model chain run from scratch on the same sample.
    np.testing.assert_allclose(new_res_emb, ref_res_emb, atol=atol, rtol=0)
    np.testing.assert_allclose(new_prot_emb, ref_prot_emb, atol=atol, rtol=0)
    meta = lance.dataset(str(small / "proteins.lance")).schema.metadata
    assert json.loads(meta[b"rdscale.levels"]) == [32, 48, 64]


def test_from_a_longer_fit_matches_and_needs_no_sample(tmp_path, fasta, tiny_family, full_chain, loaded_models):
    small = two_level_run(tmp_path, fasta, tiny_family, "small")
    loaded_models.clear()
    # The run's own fit is a 2-model fit on the same sample as full_chain's, so the 3-model fit's head equals it.
    extend(small, str(tiny_family[2]), from_fit=full_chain / "fit", progress=False)
    assert loaded_models == [str(tiny_family[2])]
    np.testing.assert_allclose(embeddings(small, "residues")[1], embeddings(full_chain, "residues")[1], atol=2e-4)


def test_interrupted_extension_resumes_without_loss_or_duplicates(tmp_path, fasta, tiny_family, full_chain,
                                                                  monkeypatch):
    # groups of >= 100 rows: several fragments (of several shards each) to be interrupted between
    small = two_level_run(tmp_path, fasta, tiny_family, "small", **{"output.compact": False,
                                                                     "output.fragment_rows": 100})
    assert len(lance.dataset(str(small / "residues.lance")).get_fragments()) > 2
    import rdscale.run.stages as ext

    calls = {"n": 0}
    original = ext.ResidueColumn.__call__

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(ext.ResidueColumn, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        extend(small, str(tiny_family[2]), progress=False)
    assert any((small / "extend.partial" / "residues").glob("*.json"))
    monkeypatch.setattr(ext.ResidueColumn, "__call__", original)
    summary = extend(small, str(tiny_family[2]), progress=False)
    assert summary.fragments_skipped >= 1
    res, res_emb = embeddings(small, "residues")
    ref, ref_emb = embeddings(full_chain, "residues")
    assert res["id"].to_pylist() == ref["id"].to_pylist() and res["pos"].to_pylist() == ref["pos"].to_pylist()
    np.testing.assert_allclose(res_emb, ref_emb, atol=2e-4)
    np.testing.assert_allclose(embeddings(small, "proteins")[1], embeddings(full_chain, "proteins")[1], atol=2e-4)
    assert not (small / "extend.partial").exists()


def test_truncated_storage_is_refused(tmp_path, fasta, tiny_family):
    small = two_level_run(tmp_path, fasta, tiny_family, "narrow", **{"output.storage_width": 32})
    with pytest.raises(ExtendError, match="storage_width"):
        extend(small, str(tiny_family[2]), progress=False)


def test_search_by_sequence_on_an_extended_run(tmp_path, fasta, tiny_family):
    from rdscale.search import embed_sequences

    small = two_level_run(tmp_path, fasta, tiny_family, "small")
    extend(small, str(tiny_family[2]), progress=False)
    proteins = table(small, "proteins")
    seqs = proteins["sequence"].to_pylist()[:3]
    got = embed_sequences(small, seqs)  # (3, 64) through the base fit and the extension step
    stored = np.asarray(proteins["embedding"].combine_chunks().flatten()).reshape(-1, 64)[:3]
    np.testing.assert_allclose(got, stored, atol=1e-4)


def test_verify_accepts_an_extended_run_and_notices_a_lost_step(tmp_path, fasta, tiny_family, full_chain):
    # was: "tables carry different fit manifests" (rejects kept the old manifest) and "the fit names models
    # [3 models], the tables' metadata [4 models]" on every extended run
    import shutil

    from rdscale.run.verify import verify

    small = two_level_run(tmp_path, fasta, tiny_family, "small")
    extend(small, str(tiny_family[2]), from_fit=full_chain / "fit", progress=False)
    assert verify(small) == []
    shutil.rmtree(small / "fit_ext_48")
    assert any("extension step" in p for p in verify(small))
