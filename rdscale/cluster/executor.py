"""All of rdscale's Ray wiring, and nothing else.

- fit pass: plain Ray actors (`FitWorker`, one per GPU) each accumulate moments over their share of the sample on
  their device; only the (K, K) accumulators travel, and the driver merges them (Chan et al.), so the result does
  not depend on how the sample was split.
- apply pass: a Ray Data pipeline: `FastaDatasource` (one read task per byte-range shard) -> `map_batches` with
  the `ApplyStage` callable class on an actor pool (`num_gpus` per actor, fractional allowed). Actors write Lance
  fragments themselves and return only fragment descriptions; the driver commits shard by shard. A dead actor is
  restarted by Ray and its batch retried; fragments written by the failed attempt were never reported, so they are
  never committed (nothing lost, nothing duplicated).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rdscale.config import Config
from rdscale.io.fasta import Shard, ValidationOptions
from rdscale.io.store import ShardResult
from rdscale.run.stages import (
    ROW_FIELDS,
    ApplyStage,
    FitWorker,
    rows_to_columns,
    shard_rows,
)

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("shard_records", pa.int64()),
        ("accepted", pa.bool_()),
        ("id", pa.string()),
        ("description", pa.string()),
        ("sequence", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("shard_digest", pa.string()),
    ]
)
assert tuple(ROW_SCHEMA.names) == ROW_FIELDS


class FastaDatasource(Datasource):
    """One read task per shard; each yields the shard's rows (records and rejects) in blocks."""

    def __init__(self, shards: Sequence[Shard], options: ValidationOptions, rows_per_block: int = 1024):
        self.shards = list(shards)
        self.options = options
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(((s.end or s.start) - s.start) for s in self.shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for shard in self.shards:
            size = (shard.end - shard.start) if shard.end is not None else None
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=(shard.path,))
            tasks.append(ReadTask(_shard_reader(shard, self.options, self.rows_per_block), meta, schema=ROW_SCHEMA))
        return tasks


def _shard_reader(shard: Shard, options: ValidationOptions, rows_per_block: int):
    def read() -> Iterator[pa.Table]:
        rows = shard_rows(shard, options)
        if not rows:
            # An empty shard still reports itself so the driver can commit it (zero records).
            yield pa.table(
                {"shard": [shard.index], "shard_records": [0], "accepted": [False], "id": [""],
                 "description": [""], "sequence": [""], "source": [""], "reason": ["__empty_shard__"],
                 "shard_digest": [""]},
                schema=ROW_SCHEMA,
            )
            return
        for i in range(0, len(rows), rows_per_block):
            yield pa.table(rows_to_columns(rows[i : i + rows_per_block]), schema=ROW_SCHEMA)

    return read


class _ApplyActor(ApplyStage):
    """ApplyStage that recognises the empty-shard marker row (which carries no record)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        marker = pa.compute.equal(table["reason"], "__empty_shard__")
        empties = table.filter(marker)
        out = {"shard": [], "shard_records": [], "result": []}
        for shard in set(empties["shard"].to_pylist()):
            out["shard"].append(shard)
            out["shard_records"].append(0)
            out["result"].append(json.dumps({"shard": shard, "fragments": {}}))
        rest = table.filter(pa.compute.invert(marker))
        if rest.num_rows:
            produced = super().__call__(rest)
            for key in out:
                out[key].extend(produced[key])
        return out


class RayExecutor:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
            address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
            if address:
                kwargs["address"] = address
            elif cfg.ray.object_store_mb:
                kwargs["object_store_memory"] = int(cfg.ray.object_store_mb) << 20
            ray.init(**kwargs)
        # rdscale draws its own per-shard progress; Ray Data's bars would interleave with it.
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.gpus = self._gpus_per_actor()

    def _gpus_per_actor(self) -> float:
        if self.cfg.ray.gpus_per_actor is not None:
            return float(self.cfg.ray.gpus_per_actor)
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def fit_moments(self, models: Sequence[str], cfg: Config, plan: list[tuple[Shard, int]]) -> list[dict]:
        n = max(1, min(cfg.ray.num_actors, len(plan)))
        worker_cls = ray.remote(num_gpus=self.gpus, num_cpus=cfg.ray.cpus_per_actor,
                                max_restarts=cfg.ray.max_restarts, max_task_retries=cfg.ray.max_restarts)(FitWorker)
        workers = [worker_cls.remote(models, cfg) for _ in range(n)]
        shares = [plan[i::n] for i in range(n)]
        try:
            return ray.get([w.run.remote(share) for w, share in zip(workers, shares)])
        finally:
            for w in workers:
                ray.kill(w)

    def apply(self, cfg, models, fit_dir, uris, schemas, shards) -> Iterator[tuple[int, int, ShardResult]]:
        options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
        ds = ray.data.read_datasource(FastaDatasource(shards, options), override_num_blocks=len(shards))
        ds = ds.map_batches(
            _ApplyActor,
            fn_constructor_kwargs={"cfg": cfg, "models": list(models), "fit_dir": fit_dir, "uris": uris,
                                   "schemas": schemas},
            batch_size=cfg.output.records_per_batch,
            batch_format="pyarrow",
            # Ray Data restarts a dead actor and retries its batches by default (max_restarts=-1); a retried
            # batch only rewrites uncommitted fragments, so nothing is lost or duplicated.
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
            num_gpus=self.gpus,
            num_cpus=cfg.ray.cpus_per_actor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                yield int(row["shard"]), int(row["shard_records"]), ShardResult(**json.loads(row["result"]))
