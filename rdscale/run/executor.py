"""Executors: what runs the stages (rdscale/run/stages.py) of every pass that runs a model.

`Executor` names the passes; `LocalExecutor` runs them in this process (tiny inputs, debugging, tests of the logic);
`RayExecutor` (rdscale/cluster/executor.py: Ray Data and actor pools, locally or on a cluster) runs the same
stages. Each pass constructs its stage from small arguments, calls its `setup()` once where it runs, then feeds it.
The verbs (rdscale/run/pipeline.py, extend.py, update.py) take an executor; `make_executor` picks one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import pyarrow as pa

from rdscale.config import Config
from rdscale.fit.chain import ChainFit
from rdscale.fit.moments import Moments
from rdscale.io.fasta import Shard, ValidationOptions
from rdscale.io.store import ShardResult
from rdscale.run import dedupe
from rdscale.run.stages import ApplyStage, FitWorker, FragmentExtender, shard_batches

# runner(fragment ids, table version) -> (fragment id, fragment metadata JSON, schema) per fragment, as they finish
FragmentRunner = Callable[[list[int], int], Iterator[tuple[int, str, pa.Schema]]]


class Executor(Protocol):
    def fit_moments(self, models: Sequence[str], cfg: Config, plan: list[tuple[Shard, int]]) -> list[dict]:
        """Fit pass: the moments of the chain's embeddings over the sample `plan`, as parts to merge."""
        ...

    def apply(
        self, cfg: Config, models: Sequence[str], fit_dir: str | None, uris: dict[str, str],
        schemas: dict[str, Any], shards: Sequence[Shard],
    ) -> Iterator[tuple[int, int, ShardResult]]:
        """Apply pass: yields (shard index, records in that shard, partial result) as batches complete, in any
        order; a shard without records yields one result of zero records."""
        ...

    def map_shards(self, fn, shards: Sequence[Shard], *args) -> Iterator[Any]:
        """fn(shard, *args) for every shard (a plain function of small results), yielded in shard order."""
        ...

    def extend_fit_step(self, model: str, cfg: Config, run: str, sample: int, regression: str,
                        width: int) -> tuple[ChainFit, Moments, int]:
        """Extend pass: the extension step fitted on a sample of the run's stored prefix, with the new model."""
        ...

    def extend_runner(self, model: str, cfg: Config, table: str, uri: str, step: ChainFit,
                      out_type: pa.DataType | None, proteins_uri: str) -> FragmentRunner:
        """Extend pass: a runner giving fragments of `table` the new embedding column (uncommitted)."""
        ...


class LocalExecutor:
    """Runs the stages in this process, one batch after another."""

    def fit_moments(self, models, cfg, plan):
        stage = FitWorker(models, cfg)
        stage.setup()
        return [stage.run(plan)]

    map_shards = staticmethod(dedupe.map_here)

    def apply(self, cfg, models, fit_dir, uris, schemas, shards):
        stage = ApplyStage(cfg, models, fit_dir, uris, schemas)
        stage.setup()
        options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
        for shard in shards:
            for batch in shard_batches(shard, options, cfg.output.records_per_batch):
                out = stage(batch)
                for s, total, result, rows in zip(out["shard"], out["shard_records"], out["result"], out["rows"]):
                    yield s, total, ShardResult.decode(result, rows)

    def _extender(self, model: str, cfg: Config) -> FragmentExtender:
        """One stage for the whole extension (step, residues, proteins): the new model loads once, and the
        proteins take their mean h from the residue pass."""
        held = getattr(self, "_extending", None)  # subclasses in tests need not call __init__
        if held is None or held.model != model:
            held = FragmentExtender(model, cfg, reuse_means=True)
            held.setup()
            self._extending = held
        return held

    def extend_fit_step(self, model, cfg, run, sample, regression, width):
        return self._extender(model, cfg).fit_step(run, sample, regression, width)

    def extend_runner(self, model, cfg, table, uri, step, out_type, proteins_uri):
        stage = self._extender(model, cfg)

        def runner(fragment_ids: list[int], version: int):
            for fragment_id in fragment_ids:
                yield stage.fragment(table, uri, version, fragment_id, step, out_type, proteins_uri)

        return runner


def make_executor(cfg: Config) -> Executor:
    """LocalExecutor for `ray.address: local`, else the Ray executor."""
    if cfg.ray.address == "local":
        return LocalExecutor()
    # Ray is imported only when a run asks for it (a local run, `rdscale extract` on a bare install, never do).
    from rdscale.cluster.executor import RayExecutor

    return RayExecutor(cfg)
