"""Pipeline stages as plain Python: no Ray here, so every stage is testable in-process.

- `shard_rows`: one FASTA shard -> rows (accepted records and rejects), each tagged with its shard and the shard's
  record count (the driver commits a shard once it has seen that many records come back).
- `ChainEncoder`: every model of the chain resident on one device; sequences -> per-model embeddings, moments of
  the concatenation (fit pass) or reverse-distilled embeddings (apply pass).
- `FitWorker`: accumulates moments over a list of sample assignments (fit pass).
- `ApplyStage`: a batch of rows -> Lance fragments of proteins / residues / rejects, written where the actor runs
  (chunk by chunk, by a writer thread while the next chunk runs through the models: rdscale/run/writer.py);
  returns only small fragment descriptions, once all of them are written (apply pass).
"""

from __future__ import annotations

import json
import logging
import os
import time
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
from rdscale.model.embed import inject_oom
from rdscale.model.fast_esm import device_budget, model_budgets
from rdscale.model.stub import StubEmbedder
from rdscale.run import provenance
from rdscale.run.integrity import RecordsDigest
from rdscale.run.writer import ChunkWriter

log = logging.getLogger(__name__)

ROW_FIELDS = (
    "shard", "shard_records", "accepted", "id", "description", "sequence", "source", "reason", "shard_digest",
    "copies",
)


def _record_row(item: Record | Reject, shard: Shard, total: int, digest: str = "") -> dict[str, Any]:
    if isinstance(item, Reject):
        return {
            "shard": shard.index, "shard_records": total, "accepted": False, "id": item.id,
            "description": "", "sequence": "", "source": item.source, "reason": item.reason,
            "shard_digest": digest, "copies": "",
        }
    return {
        "shard": shard.index, "shard_records": total, "accepted": True, "id": item.id,
        "description": item.description, "sequence": item.sequence,
        "source": f"{item.path}:{item.offset}", "reason": "", "shard_digest": digest, "copies": "",
    }


def shard_rows(shard: Shard, options: ValidationOptions) -> tuple[list[dict[str, Any]], str]:
    """Every record of a shard as a row, and the digest of what was read (the run's ledger keeps it to notice an
    input edited under committed shards; a shard whose records are all left to others has no row to carry it).
    The shard is read whole (bounded by the shard size, not the file size) because each row must carry the
    shard's record count."""
    digest = RecordsDigest()
    items = []
    for item in read_shard(shard, options):
        digest.update(item)
        items.append(item)
    text = digest.hexdigest()
    keep = getattr(shard, "keep", None)  # rdscale.run.update.UpdateShard: embed only these ids (new or changed)
    if keep is not None:
        items = [item for item in items if isinstance(item, Reject) or item.id in keep]
    skip = getattr(shard, "skip", None)  # rdscale.run.dedupe.DedupShard: copies that another shard writes
    if skip:
        items = [item for item in items if isinstance(item, Reject) or item.id not in skip]
    copies: dict[str, list] = {}  # canonical id -> [[copy id, description, source], ...] written with it
    for canonical, *copy in getattr(shard, "copies", ()):
        copies.setdefault(canonical, []).append(copy)
    total = len(items) + sum(map(len, copies.values()))  # a copy is a record of this shard's commit
    rows = [_record_row(item, shard, total, text) for item in items]
    if copies:
        for row in rows:
            if row["accepted"] and row["id"] in copies:
                row["copies"] = json.dumps(copies.pop(row["id"]))
        if copies:  # the plan and the shard disagree: the input changed since the plan was made
            raise ValueError(f"{shard.path}: record(s) {', '.join(list(copies)[:3])} are no longer in bytes "
                             f"{shard.start}-{shard.end or 'eof'}; the input changed during the run")
    return rows, text


def with_copies(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """rows, each followed by the rows of its copies (rdscale.run.dedupe): the same sequence under the copy's id,
    description and source. Also returns, per output row, the index of the row whose embedding it takes."""
    out, take = [], []
    for i, row in enumerate(rows):
        out.append(row)
        take.append(i)
        for ident, description, source in json.loads(row.get("copies") or "[]"):
            out.append({**row, "id": ident, "description": description, "source": source, "copies": ""})
            take.append(i)
    return out, take


def rows_to_columns(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    return {name: [r[name] for r in rows] for name in ROW_FIELDS}


def columns_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A Ray Data / pyarrow batch (dict of columns) -> list of row dicts with plain Python values."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: cols[k][i] for k in cols} for i in range(n)]


def device_properties(device: torch.device) -> tuple[str, int | None]:
    """(name, total memory in bytes or None) of a torch device: the GPU's own name ("NVIDIA H100 80GB HBM3") on
    CUDA, "cpu" (memory unknown: a CPU's budget is not a memory question) otherwise."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    return device.type, None


class ChainEncoder:
    """The chain's models, loaded once, on one device. `models` smallest first."""

    def __init__(self, models: Sequence[str], cfg: Config):
        from rdscale.model.embed import Embedder
        from rdscale.model.loading import load_model

        e = cfg.embedding
        device = None if e.device == "auto" else e.device
        dtype = None if e.dtype == "auto" else e.dtype
        self.loaded = [load_model(m, device=device, dtype=dtype) for m in models]
        self.device_name, memory = device_properties(self.loaded[0].device)
        weights = sum(p.numel() * p.element_size() for lm in self.loaded if lm.model is not None  # stubs: none
                      for p in lm.model.parameters())
        self.toks_per_batch = device_budget(self.device_name, memory, e.toks_per_batch, e.toks_per_batch_by_device,
                                            e.toks_per_gib, weights)
        if self.toks_per_batch != e.toks_per_batch:
            log.info("token budget %d on %s (embedding.toks_per_batch_by_device / toks_per_gib)",
                     self.toks_per_batch, self.device_name)
        self.budgets = model_budgets(self.toks_per_batch, [lm.spec.width for lm in self.loaded],
                                     e.toks_per_batch_per_model)
        self.embedders = [
            StubEmbedder(lm.spec.width, e.long_policy, e.window) if lm.model is None else Embedder(
                lm, layer=e.layer, toks_per_batch=budget, long_policy=e.long_policy,
                window=e.window, overlap=e.overlap, forward=e.forward, fast_attention=e.attention,
                compile=e.compile,
            )
            for lm, budget in zip(self.loaded, self.budgets)
        ]
        # Apply-stage chunk: the largest budget, so every model runs its own full batches on it.
        self.chunk_tokens = max(self.budgets)
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
        self.moments = Moments(sum(self.encoder.widths), device=self.encoder.device, gram=cfg.fit.gram)
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
                if sum(map(len, batch)) >= 4 * self.encoder.toks_per_batch:
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
        fit_dir: str | Sequence[str] | None,
        uris: dict[str, str],
        schemas: dict[str, Any],
    ):
        from rdscale.io.location import set_storage_options

        set_storage_options(cfg.storage.options)
        self.cfg = cfg
        self.encoder = ChainEncoder(models, cfg)
        self.fit = None
        self.steps: list = []  # `rdscale extend` steps after the fit: fit_dir = [fit, step, ...], one more model each
        fits = [fit_dir] if isinstance(fit_dir, (str, os.PathLike)) else list(fit_dir or [])
        if fits:  # imported only here: extraction runs without safetensors installed
            from rdscale.fit.artifact import ArtifactMismatchError, load_fit

            info = self.encoder.model_info()
            chain = len(info) - (len(fits) - 1)
            # The fit must come from these very models (names, widths, checkpoint digests), or its numbers
            # mean nothing.
            self.fit = load_fit(fits[0], expect_models=info[:chain])[0]
            for step_dir, model in zip(fits[1:], info[chain:]):
                step, manifest = load_fit(step_dir)
                sha = (manifest.get("models") or [{}])[-1].get("sha256")
                if step.widths[-1] != model["width"] or (sha and model["sha256"] and sha != model["sha256"]):
                    raise ArtifactMismatchError(f"extension step {step_dir} was not fitted with {model['source']}")
                self.steps.append(step)
        if self.fit is None and len(models) != 1:
            raise ValueError("a chain of several models needs a fit artifact to apply")
        self.uris = uris
        self.schemas = schemas
        self.storage_width = schemas[RESIDUES].field("embedding").type.list_size if RESIDUES in schemas else 0
        self.batches_seen = 0
        self.fault = dict(cfg.ray.fault_injection or {})
        if "oom_at_batch_size" in self.fault or "oom_above_tokens" in self.fault:
            for embedder in self.encoder.embedders:
                embedder.forward_wrapper = inject_oom(self.fault.get("oom_at_batch_size"),
                                                      self.fault.get("oom_above_tokens"))
        self.writer = ChunkWriter(overlap=cfg.output.overlap_writes, max_pending=2)
        self.provenance = provenance.collect(self.encoder.device_name, self.encoder.loaded[0].dtype)

    def rd_embeddings(self, sequences: Sequence[str]) -> list[torch.Tensor]:
        """-> per sequence (L, k_m) float32: the reverse-distilled embedding (or the one model's, for extract)."""
        blocks = self.encoder.blocks(sequences)
        if self.fit is None:
            return [b[0] for b in blocks]
        lengths = [b[0].shape[0] for b in blocks]
        stacked = [torch.cat([b[m] for b in blocks], dim=0) for m in range(len(blocks[0]))]  # [model] (sum L, k_i)
        if self.steps:  # an extended run's rows: the base chain, then each extension step on [z, h_next]
            from rdscale.run.extend import apply_chain

            rd = apply_chain([self.fit, *self.steps], stacked)  # (sum L, k_last)
        else:
            rd = self.fit.apply(stacked)  # (sum L, k_m)
        return list(torch.split(rd, lengths, dim=0))

    def _maybe_fail(self, key: str = "exit_on_batch") -> None:
        """Test hook: exit the process on the N-th batch, once per marker file, to exercise actor restarts
        (`exit_on_batch`: as the batch arrives; `exit_in_writer_on_batch`: on the writer thread, after the
        batch's first fragments are written and before the stage returns them)."""
        n = self.fault.get(key)
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
        started = time.perf_counter()
        accepted = [r for r in rows if r["accepted"] and not self.encoder.too_long(r["sequence"])]
        rejected = [r for r in rows if not r["accepted"]]
        rejected += [
            {**r, "reason": f"too_long: {len(r['sequence'])} residues > window {self.encoder.window}"}
            for r in with_copies([r for r in rows if r["accepted"] and self.encoder.too_long(r["sequence"])])[0]
        ]
        records = len(rows) + sum(len(json.loads(r["copies"])) for r in rows if r.get("copies"))
        result = ShardResult(shard=shard, fragments={}, records=records, rejects=len(rejected),
                             digest=rows[0].get("shard_digest") or "" if rows else "", provenance=self.provenance)
        if rejected:
            self.writer.submit(lambda: {REJECTS: write_table_fragments(
                self.uris[REJECTS], rejects_table(rejected, shard, self.schemas[REJECTS]))})
        # Chunk by chunk: the writer thread builds and writes chunk i while chunk i+1 runs through the models.
        for chunk in chunk_rows(accepted, self.encoder.chunk_tokens, self.encoder.window):
            job, residues, written = self._chunk_job(shard, chunk)
            self.writer.submit(job)
            result.proteins += written
            result.embedded += sum(len(r["sequence"]) for r in chunk)
            if RESIDUES in self.schemas:
                result.residues += residues
        # Every fragment of this call is written before its description leaves the stage (commit protocol).
        for fragments in self.writer.drain():
            for name, frags in fragments.items():
                result.fragments.setdefault(name, []).extend(frags)
        result.seconds = time.perf_counter() - started  # this actor's (its device's) time on these rows
        return result

    def _chunk_job(self, shard: int, chunk: list[dict[str, Any]]):
        """Run the chunk's forward here; return (the job that turns its output into written fragments, the
        number of per-residue rows it writes)."""
        rd = self.rd_embeddings([r["sequence"] for r in chunk])  # [seq] (L, k_m) on the device
        means = torch.stack([e.mean(dim=0) for e in rd])  # (n, k_m)
        per_res = None
        if RESIDUES in self.schemas:
            d = self.storage_width
            # Cast on the device: only the stored prefix, in the stored dtype, crosses to the host.
            dtype = torch.float16 if self.cfg.output.residue_dtype == "float16" else torch.float32
            per_res = torch.cat([e[:, :d] for e in rd]).to(dtype)  # (sum L, d)
        lengths = [e.shape[0] for e in rd]
        host, ready = _to_host_async([means, per_res])
        rows, take = with_copies(chunk)  # identical sequences of other records: rows, not forwards

        def job() -> dict[str, list[str]]:
            if ready is not None:
                ready.synchronize()  # the copies were queued behind the forward; wait here, not in the caller
            means_h, per_res_h = (t.numpy() if t is not None else None for t in host)
            if len(take) != len(chunk):
                means_h = means_h[take]
            tables = {PROTEINS: proteins_table(rows, means_h.astype(np.float32, copy=False), shard,
                                               self.schemas[PROTEINS])}
            if per_res_h is not None:
                parts = np.split(per_res_h, np.cumsum(lengths)[:-1])
                tables[RESIDUES] = residues_table(rows, [parts[i] for i in take], shard, self.schemas[RESIDUES])
            # Written on the writer thread; the caller only collects the fragment descriptions.
            fragments = {}
            for name, t in tables.items():
                fragments[name] = write_table_fragments(self.uris[name], t)
                self._maybe_fail("exit_in_writer_on_batch")
            return fragments

        return job, sum(lengths[i] for i in take), len(rows)


def chunk_rows(rows: Sequence[dict[str, Any]], chunk_tokens: int, window: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive groups of rows of about `chunk_tokens` tokens (BOS/EOS per window included); a row larger
    than that is a chunk of its own. Input order is kept."""
    chunk: list[dict[str, Any]] = []
    tokens = 0
    for row in rows:
        n = len(row["sequence"])
        cost = n + 2 * max(1, -(-n // max(1, window)))
        if chunk and tokens + cost > chunk_tokens:
            yield chunk
            chunk, tokens = [], 0
        chunk.append(row)
        tokens += cost
    if chunk:
        yield chunk


def _to_host_async(tensors: list[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], Any]:
    """Host copies of device tensors. On CUDA the copies go to pinned memory without blocking and an event marks
    their completion (returned; None on CPU), so the caller can queue the next forward at once."""
    if not any(t is not None and t.is_cuda for t in tensors):
        return [t.cpu() if t is not None else None for t in tensors], None
    host = []
    for t in tensors:
        if t is None:
            host.append(None)
            continue
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    event = torch.cuda.Event()
    event.record()
    return host, event


def iter_row_batches(rows: Sequence[dict[str, Any]], size: int) -> Iterator[dict[str, list]]:
    for i in range(0, len(rows), size):
        yield rows_to_columns(rows[i : i + size])
