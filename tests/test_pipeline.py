"""The pipeline end to end: fit pass, apply pass into Lance, accounting, resume, actor failure.

Most checks run in-process (LocalExecutor, the same stages without Ray); the Ray-specific ones share the session's
local Ray cluster (`ray_session`)."""

from __future__ import annotations

import gzip
import hashlib

import lance
import numpy as np
import pyarrow.compute as pc
import pytest
from helpers import StopAfter, make_cfg, table, write_fasta

from rdscale.fit.artifact import load_fit
from rdscale.io.fasta import Reject, read_fasta
from rdscale.io.runs import read_metadata
from rdscale.model.encoder import ChainEncoder
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, fit, run


def checksum(t) -> str:
    """Content hash of a table's rows in a canonical order (independent of fragment layout)."""
    h = hashlib.sha256()
    for name in sorted(c for c in t.column_names if c != "shard"):
        col = t[name].combine_chunks()
        if name == "embedding":
            h.update(np.asarray(col.flatten()).tobytes())
        else:
            h.update(repr(col.to_pylist()).encode())
    return h.hexdigest()


def assert_same_tables(a_dir, b_dir, atol=1e-5):
    """Same rows (every column but the embeddings exactly) and embeddings within `atol`: runs that batch records
    differently (Ray Data forms its own batches) differ in float round-off only."""
    for name in ("proteins", "residues", "rejects"):
        a, b = table(a_dir, name), table(b_dir, name)
        assert a.num_rows == b.num_rows, name
        for col in a.column_names:
            if col == "shard":
                continue
            if col == "embedding":
                x = np.asarray(a[col].combine_chunks().flatten(), dtype=np.float32)
                y = np.asarray(b[col].combine_chunks().flatten(), dtype=np.float32)
                np.testing.assert_allclose(x, y, atol=atol, rtol=0)
            else:
                assert a[col].to_pylist() == b[col].to_pylist(), (name, col)


def snapshot(run_dir):
    return {
        name: (table(run_dir, name).num_rows, checksum(table(run_dir, name)))
        for name in ("proteins", "residues", "rejects")
    }


@pytest.fixture(scope="module")
def clean_fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("fa") / "clean.fasta", n=24, seed=1, long_every=8)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, clean_fasta, tiny_family):
    tmp = tmp_path_factory.mktemp("local_run")
    cfg = make_cfg(tmp, clean_fasta, tiny_family)
    summary = run(cfg, LocalExecutor(), progress=False)
    return cfg, tmp / "run", summary


# ----------------------------------------------------------------------------------------------- correctness


def test_residues_equal_core_apply_and_prefix_is_smallest_model(local_run):
    cfg, run_dir, summary = local_run
    fit_obj, manifest = load_fit(run_dir / "fit")
    assert [m["width"] for m in manifest["models"]] == [32, 48, 64]
    encoder = ChainEncoder(cfg.models, cfg)
    residues = table(run_dir, "residues")
    proteins = table(run_dir, "proteins")
    records = [r for r in read_fasta(cfg.input.paths[0]) if not isinstance(r, Reject)]
    assert proteins.num_rows == len(records) == summary.proteins
    assert summary.residues == residues.num_rows == sum(len(r.sequence) for r in records)
    stored = np.asarray(residues["embedding"].combine_chunks().flatten()).reshape(-1, 64)
    ids = residues["id"].to_pylist()
    offset = 0
    for rec in sorted(records, key=lambda r: r.id):
        blocks = encoder.blocks([rec.sequence])[0]  # [model] (L, k_i)
        expected = fit_obj.apply(blocks).numpy()  # (L, 64) float32, the core library on the same model outputs
        got = stored[offset : offset + len(rec.sequence)]
        assert ids[offset] == rec.id and len(got) == len(rec.sequence)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[:, :32], blocks[0].numpy(), atol=1e-5, rtol=0)
        prot = np.asarray(proteins.filter(pc.equal(proteins["id"], rec.id))["embedding"][0].as_py())
        np.testing.assert_allclose(prot, expected.mean(axis=0), atol=1e-5)
        offset += len(rec.sequence)
    assert offset == len(stored)


def test_metadata_carries_levels_manifest_and_config(local_run):
    cfg, run_dir, _ = local_run
    meta = read_metadata(run_dir / "residues.lance")
    assert meta["levels"] == [32, 48, 64]
    assert [m["width"] for m in meta["fit_manifest"]["models"]] == [32, 48, 64]
    assert meta["config"]["models"] == cfg.models
    assert meta["version"]


def test_rerun_of_a_finished_run_changes_nothing(local_run, tiny_family):
    cfg, run_dir, _ = local_run
    before = snapshot(run_dir)
    summary = run(cfg, LocalExecutor(), progress=False)
    assert summary.shards_skipped == summary.shards_total > 1
    assert snapshot(run_dir) == before


def test_storage_width_and_per_protein_only(tmp_path, clean_fasta, tiny_family, local_run):
    _, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "narrow", **{"output.storage_width": 32,
                                                                    "output.residue_dtype": "float16",
                                                                    "fit.artifact": str(full_dir / "fit")})
    run(cfg, LocalExecutor(), progress=False)
    narrow = table(tmp_path / "narrow", "residues")
    full = table(full_dir, "residues")
    assert narrow.schema.field("embedding").type.list_size == 32
    a = np.asarray(narrow["embedding"].combine_chunks().flatten()).reshape(-1, 32).astype(np.float32)
    b = np.asarray(full["embedding"].combine_chunks().flatten()).reshape(-1, 64)[:, :32]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # float16 storage of the same prefix

    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "proteins_only",
                   **{"output.residues": False, "fit.artifact": str(full_dir / "fit")})
    summary = run(cfg, LocalExecutor(), progress=False)
    assert not (tmp_path / "proteins_only" / "residues.lance").exists()
    assert summary.proteins == table(full_dir, "proteins").num_rows


def test_extract_one_model_matches_its_embedder(tmp_path, clean_fasta, tiny_family):
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family[:1], "extract")
    summary = embed(cfg, None, LocalExecutor(), progress=False)
    residues = table(tmp_path / "extract", "residues")
    assert residues.schema.field("embedding").type.list_size == 32
    assert summary.residues == residues.num_rows
    encoder = ChainEncoder(cfg.models, cfg)
    first = next(r for r in read_fasta(clean_fasta) if r.id == residues["id"][0].as_py())
    got = np.asarray(residues["embedding"].combine_chunks().flatten()).reshape(-1, 32)[: len(first.sequence)]
    np.testing.assert_allclose(got, encoder.blocks([first.sequence])[0][0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- accounting


def messy_bytes() -> bytes:
    return (
        b">ok1 fine\nMKTAYIAKQR\nQISFVKSHFS\n"
        b">lower\nmktayiakqr\n"
        b">star\nMKTAYIAKQR*\n"
        b">crlf\r\nMKTAYI\r\nAKQR\r\n"
        b"\n\n"
        b">empty\n"
        b">digits\nMKT4YIAK\n"
        b">gaps\nMKT--AYI\n"
        b">ok1 duplicate within the file\nMKTAYI\n"
        b">punct\nMKT.AYI\n"
        b">ok2\nACDEFGHIKLMNPQRSTVWYXBZUO\n"
        b">nonl\nMKTAYIAKQRQ"
    )


def test_accounting_on_messy_input_across_files_and_formats(tmp_path, tiny_family, local_run):
    _, full_dir, _ = local_run
    plain = tmp_path / "messy.fasta"
    plain.write_bytes(messy_bytes())
    gz = tmp_path / "messy2.fasta.gz"
    # The same records again: every id in the second file duplicates one in the first (cross-shard duplicates).
    gz.write_bytes(gzip.compress(messy_bytes()))
    cfg = make_cfg(tmp_path, [plain, gz], tiny_family, "messy",
                   **{"fit.artifact": str(full_dir / "fit"), "input.shard_mb": 0.00005})
    summary = run(cfg, LocalExecutor(), progress=False)
    n_records = 2 * 11
    proteins = table(tmp_path / "messy", "proteins")
    rejects = table(tmp_path / "messy", "rejects")
    assert summary.records == n_records
    assert proteins.num_rows + rejects.num_rows == n_records
    assert sorted(proteins["id"].to_pylist()) == ["crlf", "lower", "nonl", "ok1", "ok2", "star"]
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert {"empty", "digits", "gaps", "punct"} <= set(reasons)
    assert sum("duplicate" in r for r in rejects["reason"].to_pylist()) == 2 + 6  # 1 in each file + 6 across
    # Every reject says where the record was.
    assert all(s for s in rejects["source"].to_pylist())
    seq = dict(zip(proteins["id"].to_pylist(), proteins["sequence"].to_pylist()))
    assert seq["lower"] == "MKTAYIAKQR" and seq["star"] == "MKTAYIAKQR" and seq["crlf"] == "MKTAYIAKQR"


# ----------------------------------------------------------------------------------------------- resume



def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, clean_fasta, tiny_family, local_run):
    cfg0, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "resumed", **{"fit.artifact": str(full_dir / "fit")})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, StopAfter(3), progress=False)
    store_ledger = lance.dataset(str(tmp_path / "resumed" / "shards.lance")).count_rows()
    assert 0 < store_ledger < 10  # some shards committed, not all

    # A kill between a table commit and the ledger row leaves rows of an unrecorded shard: simulate it.
    proteins = lance.dataset(str(tmp_path / "resumed" / "proteins.lance"))
    stray = proteins.to_table(limit=1)
    stray = stray.set_column(stray.schema.get_field_index("shard"), "shard", pc.add(stray["shard"], 10_000).cast("int32"))
    lance.write_dataset(stray, proteins.uri, mode="append")

    summary = run(cfg, LocalExecutor(), progress=False)
    assert summary.shards_skipped == store_ledger
    assert snapshot(tmp_path / "resumed") == snapshot(full_dir)


def test_changed_inputs_refuse_to_mix_into_an_old_run(tmp_path, clean_fasta, tiny_family, local_run):
    _, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "r", **{"fit.artifact": str(full_dir / "fit")})
    run(cfg, LocalExecutor(), progress=False)
    other = write_fasta(tmp_path / "other.fasta", n=5, seed=9)
    cfg2 = make_cfg(tmp_path, other, tiny_family, "r", **{"fit.artifact": str(full_dir / "fit")})
    with pytest.raises(Exception, match="different run"):
        run(cfg2, LocalExecutor(), progress=False)


# ----------------------------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_run_equals_local_run(ray_session, tmp_path, clean_fasta, tiny_family, local_run):
    _, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "ray",
                   **{"ray.address": None, "ray.num_actors": 2, "ray.cpus_per_actor": 0.5,
                      "fit.artifact": str(full_dir / "fit")})
    run(cfg, progress=False)
    assert_same_tables(tmp_path / "ray", full_dir)


@pytest.mark.ray
def test_fit_is_invariant_to_actors_and_shards(ray_session, tmp_path, clean_fasta, tiny_family):
    # float64 models: fp32 kernels round differently for different batch shapes (~1e-7), which would hide what is
    # tested here, that splitting the sample over actors and shards changes nothing beyond summation order.
    fits = []
    for i, (actors, shard_mb) in enumerate([(1, 1.0), (3, 0.0004), (2, 0.0002)]):
        cfg = make_cfg(tmp_path, clean_fasta, tiny_family, f"fit{i}",
                       **{"ray.address": None, "ray.num_actors": actors, "ray.cpus_per_actor": 0.25,
                          "input.shard_mb": shard_mb, "embedding.dtype": "float64"})
        fits.append(load_fit(fit(cfg))[0])
    for other in fits[1:]:
        assert other.n_residues == fits[0].n_residues
        np.testing.assert_allclose(other.mean, fits[0].mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(other.projection, fits[0].projection, rtol=0, atol=1e-9)


@pytest.mark.ray
def test_killed_actor_loses_and_duplicates_nothing(ray_session, tmp_path, clean_fasta, tiny_family, local_run):
    _, full_dir, _ = local_run
    marker = tmp_path / "killed.marker"
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "killed",
                   **{"ray.address": None, "ray.num_actors": 1, "ray.cpus_per_actor": 0.5,
                      "fit.artifact": str(full_dir / "fit"),
                      "ray.fault_injection": {"exit_on_batch": 2, "marker": str(marker)}})
    run(cfg, progress=False)
    assert marker.exists(), "the fault was not injected"
    assert_same_tables(tmp_path / "killed", full_dir)


# ----------------------------------------------------------------------------------------------- out of memory


def test_out_of_memory_back_off_keeps_the_tables(tmp_path, clean_fasta, tiny_family, local_run, caplog):
    """Every forward of 3 or more sequences raises torch.cuda.OutOfMemoryError (the embedder's fault hook): the
    actor splits and goes on, and the tables equal the run without the fault."""
    _, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "oom",
                   **{"fit.artifact": str(full_dir / "fit"), "ray.fault_injection": {"oom_at_batch_size": 3}})
    with caplog.at_level("WARNING", logger="rdscale.model.embed"):
        run(cfg, LocalExecutor(), progress=False)
    assert any("out of memory on a batch of" in r.getMessage() for r in caplog.records), "no fault was injected"
    assert_same_tables(tmp_path / "oom", full_dir)


@pytest.mark.ray
def test_out_of_memory_back_off_in_ray_actors(ray_session, tmp_path, clean_fasta, tiny_family, local_run):
    _, full_dir, _ = local_run
    cfg = make_cfg(tmp_path, clean_fasta, tiny_family, "oom_ray",
                   **{"ray.address": None, "ray.num_actors": 1, "ray.cpus_per_actor": 0.5,
                      "fit.artifact": str(full_dir / "fit"), "ray.fault_injection": {"oom_at_batch_size": 2}})
    run(cfg, progress=False)
    assert_same_tables(tmp_path / "oom_ray", full_dir)
