"""The executor seam (rdscale/run/executor.py, rdscale/cluster/executor.py): stages built from small arguments and
set up where they run; both executors give the same tables for run, extend and a resumed run with empty shards
and windowed long sequences."""

from __future__ import annotations

import random
import shutil

import lance
import numpy as np
import pytest
from helpers import StopAfter, make_cfg
from test_pipeline import assert_same_tables

from rdscale.io.fasta import ValidationOptions, plan_shards
from rdscale.run.executor import LocalExecutor
from rdscale.run.extend import extend
from rdscale.run.pipeline import EmbedPlan, _plan_embedding, _once, fit, run
from rdscale.run.stages import SHARD_BATCH_SCHEMA, ApplyStage, shard_batches

AA = "ACDEFGHIKLMNPQRSTVWY"
LIMIT = 64 * 1024  # bytes of pickled constructor arguments per actor: far below Ray's inline limit (100 KB)


def long_fasta(path, n=10, seed=3):
    """Short records around one of 1500 residues: with 400-byte shards, the shards inside that record hold no
    record start (empty shards), and the record itself is embedded in windows (window 120)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            length = 1500 if i == n // 2 else rng.randint(20, 80)
            seq = "".join(rng.choice(AA) for _ in range(length))
            f.write(f">L{i:03d} long case {i}\n")
            f.write("".join(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60)))
    return path


def ledger_of(run_dir):
    return lance.dataset(str(run_dir / "shards.lance")).to_table(columns=["shard", "records", "digest"]).sort_by("shard")


@pytest.fixture(scope="module")
def long_case(tmp_path_factory, tiny_family):
    tmp = tmp_path_factory.mktemp("long_case")
    fasta = long_fasta(tmp / "long.fasta")
    cfg = make_cfg(tmp, fasta, tiny_family, "local")
    run(cfg, LocalExecutor(), progress=False)
    return tmp, fasta, tmp / "local"


def test_a_shard_without_records_is_one_row_and_one_zero_record_result(long_case, tiny_family):
    tmp, fasta, local = long_case
    cfg = make_cfg(tmp, fasta, tiny_family, "unused", **{"fit.artifact": str(local / "fit")})
    shards = plan_shards([str(fasta)], int(cfg.input.shard_mb * (1 << 20)))
    options = ValidationOptions()
    batches = {s.index: list(shard_batches(s, options, 8)) for s in shards}
    empty = [i for i, b in batches.items() if sum(t.num_rows for t in b) == 1 and b[0]["id"][0].as_py() is None]
    assert len(empty) >= 2, "the case has no empty shard"
    assert all(t.schema.equals(SHARD_BATCH_SCHEMA) for b in batches.values() for t in b)
    stage = ApplyStage(cfg, cfg.models, str(local / "fit"), {}, {})
    stage.setup()
    out = stage(batches[empty[0]][0])
    assert out["shard"] == [empty[0]] and out["shard_records"] == [0]
    ledger = ledger_of(local)
    assert sorted(r["shard"] for r in ledger.to_pylist() if r["records"] == 0) == sorted(empty)


def test_actor_constructor_arguments_are_small(long_case, tiny_family):
    """What RayExecutor hands every actor's constructor (fit, apply, extend), for a real run's config, fit and
    tables, pickles to at most 64 KB: the models and the fit are loaded in the actor's setup(), never shipped."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from rdscale.cluster.executor import apply_actor_kwargs, extend_actor_args, fit_actor_args

    tmp, fasta, local = long_case
    cfg = make_cfg(tmp, fasta, tiny_family, "sized", **{"fit.artifact": str(local / "fit"),
                                                        "storage.options": {"region": "us-east-1"}})
    planned: EmbedPlan = _plan_embedding(cfg, cfg.fit.artifact, None, _once(LocalExecutor(), cfg), False)
    uris = {name: str(tmp / "sized" / f"{name}.lance") for name in planned.schemas}
    sizes = {
        "fit": len(cloudpickle.dumps(fit_actor_args(planned.models, cfg))),
        "apply": len(cloudpickle.dumps(apply_actor_kwargs(cfg, planned.models, planned.fit_dir, uris,
                                                          planned.schemas))),
        "extend": len(cloudpickle.dumps(extend_actor_args(str(tiny_family[-1]), cfg))),
    }
    assert all(0 < size <= LIMIT for size in sizes.values()), sizes
    # the measure can fail: a fit's moments shipped with the arguments would not pass
    moments = np.zeros(LIMIT // 8 + 1)  # (K,) float64 with K > 8192
    assert len(cloudpickle.dumps((apply_actor_kwargs(cfg, planned.models, planned.fit_dir, uris,
                                                     planned.schemas), moments))) > LIMIT


@pytest.mark.ray
def test_ray_resumes_a_local_run_with_empty_shards_to_the_same_tables(ray_session, long_case, tiny_family):
    """A run stopped after two results (local), resumed through Ray: the tables of one local run. The case has
    empty shards and a windowed long record."""
    tmp, fasta, local = long_case
    cfg = make_cfg(tmp, fasta, tiny_family, "resumed", **{"fit.artifact": str(local / "fit")})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, StopAfter(2), progress=False)
    ray_cfg = make_cfg(tmp, fasta, tiny_family, "resumed",
                       **{"fit.artifact": str(local / "fit"), "ray.address": None, "ray.num_actors": 1,
                          "ray.cpus_per_actor": 0.5})
    summary = run(ray_cfg, progress=False)
    assert summary.shards_skipped >= 1
    assert_same_tables(tmp / "resumed", local)
    assert ledger_of(tmp / "resumed").equals(ledger_of(local))


@pytest.mark.ray
def test_extend_through_ray_equals_the_local_extend(ray_session, tmp_path, long_case, tiny_family):
    tmp, fasta, _ = long_case
    small = tmp_path / "small"
    run(make_cfg(tmp_path, fasta, tiny_family[:2], "small", **{"output.records_per_batch": 2}), LocalExecutor(),
        progress=False)  # small batches: several fragments per table
    through = tmp_path / "through"
    shutil.copytree(small, through)
    extend(small, str(tiny_family[2]), progress=False, local=True)
    summary = extend(through, str(tiny_family[2]), progress=False, local=False)
    assert summary.new_width == 64
    assert_same_tables(through, small)


def test_local_fit_pass_sets_up_its_stage_once(long_case, tiny_family, monkeypatch):
    from rdscale.run import stages

    tmp, fasta, _ = long_case
    calls = []
    original = stages.Stage.setup
    monkeypatch.setattr(stages.Stage, "setup", lambda self: calls.append(type(self).__name__) or original(self))
    fit(make_cfg(tmp, fasta, tiny_family, "unused"), LocalExecutor(), out=tmp / "fit_once")
    assert calls == ["FitWorker"]
