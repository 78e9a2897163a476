"""Pipeline stages as plain Python: no Ray here, so every stage is testable in-process.

- `shard_rows`: one FASTA shard -> rows (accepted records and rejects), each tagged with its shard and the shard's
  record count (the driver commits a shard once it has seen that many records come back).
- `ChainEncoder`: every model of the chain resident on one device; sequences -> per-model embeddings, moments of
  the concatenation (fit pass) or reverse-distilled embeddings (apply pass).
- `FitWorker`: accumulates moments over a list of sample assignments (fit pass).
- `ApplyStage`: a batch of rows -> Lance fragments of proteins / residues / rejects, written where the actor runs;
  returns only small fragment descriptions (apply pass).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rdscale.config import Config
from rdscale.io.fasta import Record, Reject, Shard, ValidationOptions, read_shard
from rdscale.io.store import (
    PROTEINS,
    REJECTS,
    RESIDUES,
    ShardResult,
    proteins_table,
    rejects_table,
    residues_table,
    write_table_fragments,
)

log = logging.getLogger(__name__)

ROW_FIELDS = ("shard", "shard_records", "accepted", "id", "description", "sequence", "source", "reason")


def _record_row(item: Record | Reject, shard: Shard, total: int) -> dict[str, Any]:
    if isinstance(item, Reject):
        return {
            "shard": shard.index, "shard_records": total, "accepted": False, "id": item.id,
            "description": "", "sequence": "", "source": item.source, "reason": item.reason,
        }
    return {
        "shard": shard.index, "shard_records": total, "accepted": True, "id": item.id,
        "description": item.description, "sequence": item.sequence,
        "source": f"{item.path}:{item.offset}", "reason": "",
    }


def shard_rows(shard: Shard, options: ValidationOptions) -> list[dict[str, Any]]:
    """Every record of a shard as a row. The shard is read whole (bounded by the shard size, not the file size)
    because each row must carry the shard's record count."""
    items = list(read_shard(shard, options))
    return [_record_row(item, shard, len(items)) for item in items]


def rows_to_columns(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    return {name: [r[name] for r in rows] for name in ROW_FIELDS}


def columns_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A Ray Data / pyarrow batch (dict of columns) -> list of row dicts with plain Python values."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: cols[k][i] for k in cols} for i in range(n)]


class ChainEncoder:
    """The chain's models, loaded once, on one device. `models` smallest first."""

    def __init__(self, models: Sequence[str], cfg: Config):
        from rdscale.model.embed import Embedder
        from rdscale.model.loading import load_model

        e = cfg.embedding
        device = None if e.device == "auto" else e.device
        dtype = None if e.dtype == "auto" else e.dtype
        self.loaded = [load_model(m, device=device, dtype=dtype) for m in models]
        self.embedders = [
            Embedder(
                lm, layer=e.layer, toks_per_batch=e.toks_per_batch, long_policy=e.long_policy,
                window=e.window, overlap=e.overlap,
            )
            for lm in self.loaded
        ]
        self.window = e.window
        self.long_policy = e.long_policy
        self.widths = [lm.spec.width for lm in self.loaded]

    @property
    def device(self) -> torch.device:
        return self.loaded[0].device

    def model_info(self) -> list[dict[str, Any]]:
        return [
            {"name": lm.spec.name, "source": lm.source, "width": lm.spec.width, "sha256": lm.sha256,
             "layers": lm.spec.layers}
            for lm in self.loaded
        ]

    def too_long(self, sequence: str) -> bool:
        return self.long_policy == "reject" and len(sequence) > self.window

    def blocks(self, sequences: Sequence[str]) -> list[list[torch.Tensor]]:
        """-> per sequence, per model: (L, k_i) float32 (float64 when the models run in float64) on the device."""
        per_model = [emb.embed(sequences) for emb in self.embedders]  # [model][seq] (L, k_i)
        dtype = torch.float64 if self.loaded[0].dtype == torch.float64 else torch.float32
        return [[per_model[m][s].to(dtype) for m in range(len(per_model))] for s in range(len(sequences))]

    def concatenated(self, sequences: Sequence[str]) -> torch.Tensor:
        """-> x: (sum L, K) float32 on the device, the per-residue concatenation [h_1, ..., h_m]."""
        return torch.cat([torch.cat(b, dim=1) for b in self.blocks(sequences)], dim=0)


def sample_plan(shards: Sequence[Shard], n_sequences: int) -> list[tuple[Shard, int]]:
    """Which shards the fit sample is drawn from and how many accepted records each contributes: the first
    `quota` records of up to `n_sequences` shards spread evenly over the input, so a sorted database (UniRef is
    ordered by cluster size) is not fitted on its head alone. Deterministic for a given shard plan."""
    if not shards:
        return []
    m = min(len(shards), n_sequences)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(shards) - 1, m)})
    quota = -(-n_sequences // len(picks))
    return [(shards[i], quota) for i in picks]


class FitWorker:
    """Fit pass: accumulates the moments of [h_1, ..., h_m] over its share of the sample, on its device."""

    def __init__(self, models: Sequence[str], cfg: Config):
        from rdscale.fit.moments import Moments
        from rdscale.io.location import set_storage_options

        set_storage_options(cfg.storage.options)
        self.cfg = cfg
        self.encoder = ChainEncoder(models, cfg)
        self.moments = Moments(sum(self.encoder.widths), device=self.encoder.device)
        self.sequences = 0
        self.residues = 0

    def run(self, assignments: Sequence[tuple[Shard, int]]) -> dict[str, Any]:
        options = ValidationOptions(remove_gaps=self.cfg.input.remove_gaps)
        batch: list[str] = []
        for shard, quota in assignments:
            taken = 0
            for item in read_shard(shard, options):
                if taken >= quota:
                    break
                if isinstance(item, Reject) or self.encoder.too_long(item.sequence):
                    continue
                batch.append(item.sequence)
                taken += 1
                if sum(map(len, batch)) >= 4 * self.cfg.embedding.toks_per_batch:
                    self._update(batch)
                    batch = []
        if batch:
            self._update(batch)
        return self.result()

    def _update(self, sequences: list[str]) -> None:
        x = self.encoder.concatenated(sequences)  # (n_res, K)
        self.moments.update(x)
        self.sequences += len(sequences)
        self.residues += x.shape[0]

    def result(self) -> dict[str, Any]:
        return {
            "moments": self.moments.to_arrays(),
            "sequences": self.sequences,
            "residues": self.residues,
            "models": self.encoder.model_info(),
        }


class ApplyStage:
    """Apply pass for a batch of rows: embed accepted records through the chain (or one model, for extract),
    write proteins / residues / rejects fragments, return per-shard fragment descriptions as JSON strings.

    Usable directly (local executor, tests) and as a Ray Data callable class (one instance per actor)."""

    def __init__(
        self,
        cfg: Config,
        models: Sequence[str],
        fit_dir: str | None,
        uris: dict[str, str],
        schemas: dict[str, Any],
    ):
        from rdscale.fit.artifact import load_fit
        from rdscale.io.location import is_remote, set_storage_options

        set_storage_options(cfg.storage.options)
        self.cfg = cfg
        self.encoder = ChainEncoder(models, cfg)
        # checkpoints fetched from an object store must be the ones the fit was made with (sha256 in the manifest)
        expect = [{"sha256": m["sha256"] if is_remote(m["source"]) else None} for m in self.encoder.model_info()]
        self.fit = load_fit(fit_dir, expect_models=expect if fit_dir and len(expect) > 1 else None)[0] \
            if fit_dir else None
        if self.fit is None and len(models) != 1:
            raise ValueError("a chain of several models needs a fit artifact to apply")
        self.uris = uris
        self.schemas = schemas
        self.storage_width = schemas[RESIDUES].field("embedding").type.list_size if RESIDUES in schemas else 0
        self.batches_seen = 0
        self.fault = dict(cfg.ray.fault_injection or {})

    def rd_embeddings(self, sequences: Sequence[str]) -> list[torch.Tensor]:
        """-> per sequence (L, k_m) float32: the reverse-distilled embedding (or the one model's, for extract)."""
        blocks = self.encoder.blocks(sequences)
        if self.fit is None:
            return [b[0] for b in blocks]
        lengths = [b[0].shape[0] for b in blocks]
        stacked = [torch.cat([b[m] for b in blocks], dim=0) for m in range(len(blocks[0]))]  # [model] (sum L, k_i)
        rd = self.fit.apply(stacked)  # (sum L, k_m)
        return list(torch.split(rd, lengths, dim=0))

    def _maybe_fail(self) -> None:
        """Test hook: exit the process on the N-th batch, once per marker file, to exercise actor restarts."""
        n = self.fault.get("exit_on_batch")
        marker = self.fault.get("marker")
        if n is not None and self.batches_seen == int(n) and marker and not os.path.exists(marker):
            Path(marker).write_text("killed")
            os._exit(1)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        self.batches_seen += 1
        self._maybe_fail()
        rows = columns_to_rows(batch)
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_shard.setdefault(int(row["shard"]), []).append(row)
        out = {"shard": [], "shard_records": [], "result": []}
        for shard, shard_rows_ in by_shard.items():
            result = self.process(shard, shard_rows_)
            out["shard"].append(shard)
            out["shard_records"].append(int(shard_rows_[0]["shard_records"]))
            out["result"].append(json.dumps(asdict(result)))
        return out

    def process(self, shard: int, rows: list[dict[str, Any]]) -> ShardResult:
        accepted = [r for r in rows if r["accepted"] and not self.encoder.too_long(r["sequence"])]
        rejected = [r for r in rows if not r["accepted"]]
        rejected += [
            {**r, "reason": f"too_long: {len(r['sequence'])} residues > window {self.encoder.window}"}
            for r in rows
            if r["accepted"] and self.encoder.too_long(r["sequence"])
        ]
        result = ShardResult(shard=shard, fragments={}, records=len(rows), rejects=len(rejected))
        tables = {}
        if rejected:
            tables[REJECTS] = rejects_table(rejected, shard, self.schemas[REJECTS])
        if accepted:
            rd = self.rd_embeddings([r["sequence"] for r in accepted])  # [seq] (L, k_m) float32
            means = torch.stack([e.mean(dim=0) for e in rd]).cpu().numpy()  # (n, k_m)
            tables[PROTEINS] = proteins_table(accepted, means, shard, self.schemas[PROTEINS])
            result.proteins = len(accepted)
            if RESIDUES in self.schemas:
                d = self.storage_width
                # Cast on the device: only the stored prefix, in the stored dtype, crosses to the host.
                dtype = torch.float16 if self.cfg.output.residue_dtype == "float16" else torch.float32
                per_res = [e[:, :d].to(dtype).cpu().numpy() for e in rd]
                tables[RESIDUES] = residues_table(accepted, per_res, shard, self.schemas[RESIDUES])
                result.residues = sum(len(p) for p in per_res)
        for name, table in tables.items():
            result.fragments[name] = write_table_fragments(self.uris[name], table)
        return result


def iter_row_batches(rows: Sequence[dict[str, Any]], size: int) -> Iterator[dict[str, list]]:
    for i in range(0, len(rows), size):
        yield rows_to_columns(rows[i : i + size])
