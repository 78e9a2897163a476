"""The query pass as a stage (rdscale.search.sequences.QueryEmbedder): small constructor arguments, setup() once,
then calls; in plain Python (no Ray), its vectors are those of the run's chain computed directly, for the base chain
and for an extended chain, and a query at a level loads only the models that level needs."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import make_cfg, table, write_fasta

import rdscale.model.loading
from rdscale.config import load_config
from rdscale.fit.artifact import load_fit, load_query_chain
from rdscale.fit.extension import apply_chain
from rdscale.io.location import set_storage_options, storage_options
from rdscale.model.encoder import ChainEncoder
from rdscale.run.executor import LocalExecutor
from rdscale.run.extend import extend
from rdscale.run.pipeline import run
from rdscale.run.stages import Stage
from rdscale.search.sequences import QueryEmbedder
from rdscale.search.tables import SearchError

LIMIT = 64 * 1024  # bytes of pickled constructor arguments, as for the run's actors (tests/test_executors.py)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("fa") / "query.fasta", n=12, seed=9, long_every=5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fasta, tiny_family):
    """A run of the three-model chain (32 / 48 / 64), and a two-model run extended by the third model."""
    tmp = tmp_path_factory.mktemp("runs")
    run(make_cfg(tmp, fasta, tiny_family, "full"), LocalExecutor(), progress=False)
    run(make_cfg(tmp, fasta, tiny_family[:2], "extended"), LocalExecutor(), progress=False)
    extend(tmp / "extended", str(tiny_family[2]), progress=False)
    return tmp / "full", tmp / "extended"


def reference(run_dir, sequences, upto):
    """(q, k) protein vectors of the run's chain over its first `upto` models, computed here from its parts."""
    proteins = table(run_dir, "proteins")
    meta = proteins.schema.metadata
    manifest = json.loads(meta[b"rdscale.fit_manifest"])
    config = json.loads(meta[b"rdscale.config"])
    embedding = {**config["embedding"], "device": "auto", "dtype": "auto"}
    cfg = load_config(None, [f"embedding={json.dumps(embedding)}"])
    encoder = ChainEncoder([m["source"] for m in manifest["models"]][:upto], cfg)
    blocks = encoder.blocks(list(sequences))  # [seq][model] (L, k_i)
    with torch.no_grad():
        if manifest.get("extensions"):
            fits = load_query_chain(run_dir)
            if upto > len(fits[0].widths):
                rd = [apply_chain(fits[: 1 + upto - len(fits[0].widths)], b).float().cpu() for b in blocks]
            else:
                rd = [fits[0].apply(b).float().cpu() for b in blocks]
        else:
            fit, _ = load_fit(run_dir / "fit")
            rd = [fit.apply(b).float().cpu() for b in blocks]  # [seq] (L, k_upto)
    return torch.stack([e.mean(dim=0) for e in rd]).numpy()  # (q, k_upto)


def test_the_query_stage_is_a_stage_with_small_arguments(runs):
    full, _ = runs
    stage = QueryEmbedder(full, "proteins", models=None, device="cpu", storage={"region": "us-east-1"})
    assert isinstance(stage, Stage)
    assert 0 < len(pickle.dumps(stage)) <= LIMIT  # nothing read yet: the run, the table, names, a device
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    assert 0 < len(cloudpickle.dumps(stage)) <= LIMIT
    before = storage_options()
    try:
        stage.setup()  # the storage options become this process's, as in any stage's setup
        assert storage_options() == {"region": "us-east-1"}
    finally:
        set_storage_options(before)
    assert len(pickle.dumps(stage.fit)) > 0 and stage.models_loaded == 0  # the fit read once; no model yet


@pytest.mark.parametrize("which", ["base", "extended"])
def test_the_stage_embeds_as_the_chain_does(runs, which, loaded_models):
    run_dir = runs[0] if which == "base" else runs[1]
    seqs = table(run_dir, "proteins")["sequence"].to_pylist()[:4]
    stage = QueryEmbedder(str(run_dir), "proteins", device="cpu")
    stage.setup()
    assert loaded_models == []  # setup reads the chain and the fit; the models load on the first call
    full = stage(seqs)  # (4, 64)
    assert full.shape == (4, 64) and len(loaded_models) == 3
    np.testing.assert_array_equal(full, reference(run_dir, seqs, 3))
    stored = np.asarray(table(run_dir, "proteins")["embedding"].combine_chunks().flatten()).reshape(-1, 64)[:4]
    np.testing.assert_allclose(full, stored, atol=1e-4)


def test_a_level_loads_only_the_models_it_needs(runs, loaded_models):
    full, extended = runs
    seqs = table(full, "proteins")["sequence"].to_pylist()[:3]
    for run_dir in (full, extended):
        loaded_models.clear()
        stage = QueryEmbedder(run_dir, device="cpu")
        stage.setup()
        first = stage(seqs, width=32)  # (3, 32): the first model alone
        assert first.shape == (3, 32) and len(loaded_models) == 1 and stage.models_loaded == 1
        np.testing.assert_array_equal(first, reference(run_dir, seqs, 1))
        second = stage(seqs, width=40)  # the first level at least 40 wide: 48, two models
        assert second.shape == (3, 48) and stage.models_loaded == 2 and len(stage.encoder.loaded) == 2
        np.testing.assert_array_equal(second, reference(run_dir, seqs, 2))
        np.testing.assert_allclose(first, second[:, :32], atol=1e-5)  # the levels nest
        stage(seqs, width=32)  # a narrower query after a wider one loads nothing more
        assert stage.models_loaded == 2


def test_a_stage_without_a_chain_says_so_in_setup(tmp_path):
    from test_search import write_proteins

    write_proteins(tmp_path / "proteins.lance", np.ones((4, 8), np.float32))
    stage = QueryEmbedder(tmp_path)  # constructing reads nothing
    with pytest.raises(SearchError, match="no chain to embed queries with"):
        stage.setup()



@pytest.mark.ray
def test_sharded_search_embeds_sequences_in_a_query_actor(ray_session, runs):
    """ShardedSearcher's sequence queries: one QueryActor (the stage built from its small arguments, set up in the
    actor) embeds them; the hits are a single Searcher's."""
    from rdscale.cluster.search import ShardedSearcher
    from rdscale.search.searcher import Searcher

    full, _ = runs
    seqs = table(full, "proteins")["sequence"].to_pylist()
    queries = {"a": seqs[0], "b": seqs[5][::-1]}
    sharded = ShardedSearcher(full, num_shards=2, num_cpus=0, device="cpu")
    try:
        for options in ({"k": 4}, {"k": 3, "width": 32}):
            got = sharded.search_sequences(queries, **options)
            want = Searcher(full, device="cpu").search_sequences(queries, **options)
            for c in ("query", "id", "rank"):
                assert got.column(c).to_pylist() == want.column(c).to_pylist()
            np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-6)
    finally:
        sharded.close()


@pytest.mark.ray
def test_sharded_sequence_queries_on_a_table_without_a_chain_say_why(ray_session, tmp_path):
    from test_search import write_proteins

    from rdscale.cluster.search import ShardedSearcher

    write_proteins(tmp_path / "proteins.lance", np.ones((4, 8), np.float32))
    sharded = ShardedSearcher(tmp_path, num_shards=1, num_cpus=0)
    try:
        with pytest.raises(SearchError, match="no chain to embed queries with"):
            sharded.search_sequences({"q": "MKTAYIAKQR"})
    finally:
        sharded.close()
