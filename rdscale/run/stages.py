"""The passes that run a model, as plain Python: no Ray here, so every stage is testable in-process.

A stage is built from small arguments (a config, model names, a fit's location: what a Ray actor's constructor
can carry inline) and does its heavy work once, in `setup()`, where it runs: the run's storage options become
this process's, the models and the fit are loaded. An executor (rdscale.run.executor.LocalExecutor, or
rdscale.cluster.executor.RayExecutor) constructs each stage, calls `setup()`, then feeds it.

- `shard_batches`: one FASTA shard -> batches of `SHARD_BATCH_SCHEMA` rows (accepted records and rejects), each
  tagged with its shard and the shard's record count (the driver commits a shard once it has seen that many
  records come back). Both executors read shards through it.
- `FitWorker`: accumulates moments over a list of sample assignments (fit pass).
- `ApplyStage`: a batch of rows -> Lance fragments of proteins / residues / rejects, written where the stage runs
  (chunk by chunk, by a writer thread while the next chunk runs through the models: rdscale/run/writer.py);
  returns only small fragment descriptions (`ShardResult`), once all of them are written (apply pass).
- `FragmentExtender`: the new model of `rdscale extend`: the extension step fitted on a sample of the run, and
  whole Lance fragments given the new embedding column (extend pass).
- The chain's models themselves are `rdscale.model.encoder.ChainEncoder`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rdscale.config import Config
from rdscale.errors import RdscaleError
from rdscale.fit.artifact import ArtifactMismatchError, load_fit
from rdscale.fit.chain import ChainFit, fit_chain
from rdscale.fit.extension import ExtendError, apply_chain
from rdscale.fit.moments import Moments
from rdscale.io.fasta import Record, Reject, Shard, ValidationOptions, read_shard
from rdscale.io.location import set_storage_options
from rdscale.io.runs import Run, open_dataset
from rdscale.io.store import (
    PROTEINS,
    REJECTS,
    RESIDUES,
    ShardResult,
    proteins_table,
    rejects_table,
    residues_table,
    sql_in_list,
    write_table_fragments,
)
from rdscale.model.embed import inject_oom
from rdscale.model.encoder import ChainEncoder
from rdscale.run import provenance
from rdscale.run.integrity import RecordsDigest
from rdscale.run.writer import ChunkWriter

log = logging.getLogger(__name__)

# The rows a shard reader emits, the apply stage's input on both executors. A shard with no record to embed
# (empty, or every record left to other shards or to an earlier release) is one row with shard_records 0 and no
# record (null id): it carries the shard's digest to the shard's commit.
SHARD_BATCH_SCHEMA = pa.schema(
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
        ("copies", pa.string()),
    ]
)
ROW_FIELDS = tuple(SHARD_BATCH_SCHEMA.names)


class StageError(RdscaleError, ValueError):
    """A stage asked to do what its inputs cannot give (a changed input, a chain without its fit)."""


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
            raise StageError(f"{shard.path}: record(s) {', '.join(list(copies)[:3])} are no longer in bytes "
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


class Stage:
    """A pass that runs a model. The constructor keeps small arguments only; `setup()` runs once where the stage
    runs (this process, or a Ray actor) and is the one place a worker takes the run's storage options."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup(self) -> None:
        # storage.options (credentials, endpoint) given in the config: not only in every node's environment
        set_storage_options(self.cfg.storage.options)
        self.load()

    def load(self) -> None:
        """Load the models (and the fit) this stage runs: once per stage."""
        raise NotImplementedError


class FitWorker(Stage):
    """Fit pass: accumulates the moments of [h_1, ..., h_m] over its share of the sample, on its device."""

    def __init__(self, models: Sequence[str], cfg: Config):
        super().__init__(cfg)
        self.models = list(models)

    def load(self) -> None:
        self.encoder = ChainEncoder(self.models, self.cfg)
        self.moments = Moments(sum(self.encoder.widths), device=self.encoder.device, gram=self.cfg.fit.gram)
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


class ApplyStage(Stage):
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
        super().__init__(cfg)
        self.models = list(models)
        # `rdscale extend` steps after the fit: fit_dir = [fit, step, ...], one more model each
        self.fit_dirs = [fit_dir] if isinstance(fit_dir, (str, os.PathLike)) else list(fit_dir or [])
        self.uris = uris
        self.schemas = schemas

    def load(self) -> None:
        cfg = self.cfg
        self.encoder = ChainEncoder(self.models, cfg)
        self.fit = None
        self.steps: list = []
        if self.fit_dirs:
            info = self.encoder.model_info()
            chain = len(info) - (len(self.fit_dirs) - 1)
            # The fit must come from these very models (names, widths, checkpoint digests), or its numbers
            # mean nothing.
            self.fit = load_fit(self.fit_dirs[0], expect_models=info[:chain])[0]
            for step_dir, model in zip(self.fit_dirs[1:], info[chain:]):
                step, manifest = load_fit(step_dir)
                sha = (manifest.get("models") or [{}])[-1].get("sha256")
                if step.widths[-1] != model["width"] or (sha and model["sha256"] and sha != model["sha256"]):
                    raise ArtifactMismatchError(f"extension step {step_dir} was not fitted with {model['source']}")
                self.steps.append(step)
        if self.fit is None and len(self.models) != 1:
            raise StageError("a chain of several models needs a fit artifact to apply")
        schemas = self.schemas
        self.storage_width = schemas[RESIDUES].field("embedding").type.list_size if RESIDUES in schemas else 0
        self.batches_seen = 0
        self.fault = dict(cfg.ray.fault_injection or {})
        if "oom_at_batch_size" in self.fault or "oom_above_tokens" in self.fault:
            for embedder in self.encoder.embedders:
                embedder.forward_wrapper = inject_oom(self.fault.get("oom_at_batch_size"),
                                                      self.fault.get("oom_above_tokens"))
        self.writer = ChunkWriter(overlap=cfg.output.overlap_writes, max_pending=2)
        # output.fragment_rows > 0: rows go back to the driver, which writes fragments of the target size
        self.rows_to_driver = cfg.output.fragment_rows > 0
        self.provenance = provenance.collect(self.encoder.device_name, self.encoder.loaded[0].dtype)

    def rd_embeddings(self, sequences: Sequence[str]) -> list[torch.Tensor]:
        """-> per sequence (L, k_m) float32: the reverse-distilled embedding (or the one model's, for extract)."""
        blocks = self.encoder.blocks(sequences)
        if self.fit is None:
            return [b[0] for b in blocks]
        lengths = [b[0].shape[0] for b in blocks]
        stacked = [torch.cat([b[m] for b in blocks], dim=0) for m in range(len(blocks[0]))]  # [model] (sum L, k_i)
        if self.steps:  # an extended run's rows: the base chain, then each extension step on [z, h_next]
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

    def __call__(self, batch: pa.Table | dict[str, Any]) -> dict[str, list]:
        self.batches_seen += 1
        self._maybe_fail()
        rows = columns_to_rows(batch)
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_shard.setdefault(int(row["shard"]), []).append(row)
        out = {"shard": [], "shard_records": [], "result": [], "rows": []}
        for shard, shard_rows_ in by_shard.items():
            records = [r for r in shard_rows_ if r["id"] is not None]  # not the row of a shard without records
            if records:
                result = self.process(shard, records)
            else:
                result = ShardResult(shard=shard, fragments={}, digest=shard_rows_[0]["shard_digest"] or "")
            out["shard"].append(shard)
            out["shard_records"].append(int(shard_rows_[0]["shard_records"]))
            text, rows_ipc = result.encode()
            out["result"].append(text)
            out["rows"].append(rows_ipc)
        # large_binary: a batch of long proteins' residues can pass Arrow's 2 GiB per binary column
        out["rows"] = pa.array(out["rows"], pa.large_binary())
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
            self.writer.submit(lambda: {REJECTS: self._output(
                REJECTS, rejects_table(rejected, shard, self.schemas[REJECTS]))})
        # Chunk by chunk: the writer thread builds and writes chunk i while chunk i+1 runs through the models.
        for chunk in chunk_rows(accepted, self.encoder.chunk_tokens, self.encoder.window,
                                truncate=self.cfg.embedding.long_policy == "truncate"):
            job, residues, written = self._chunk_job(shard, chunk)
            self.writer.submit(job)
            result.proteins += written
            result.embedded += sum(len(r["sequence"]) for r in chunk)
            if RESIDUES in self.schemas:
                result.residues += residues
        # Every fragment of this call is written before its description leaves the stage (commit protocol).
        for outputs in self.writer.drain():
            for name, got in outputs.items():
                if isinstance(got, pa.Table):
                    result.tables.setdefault(name, []).append(got)
                else:
                    result.fragments.setdefault(name, []).extend(got)
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
                fragments[name] = self._output(name, t)
                self._maybe_fail("exit_in_writer_on_batch")
            return fragments

        return job, sum(lengths[i] for i in take), len(rows)

    def _output(self, name: str, table: pa.Table) -> list[str] | pa.Table:
        """A chunk's rows of one table: written here as fragments (fragment descriptions), or the rows themselves
        for the driver to write into fragments of the target size (output.fragment_rows)."""
        return table if self.rows_to_driver else write_table_fragments(self.uris[name], table)


# -- extend: the new model over the stored run ----------------------------------------------------------------

EMBEDDING = "embedding"
STAGED = "embedding__extended"  # the new column version while fragments are being written


def _sample_ids(proteins: lance.LanceDataset, n: int) -> list[str]:
    """Up to n protein ids spread evenly over the table (the run is in input order)."""
    total = proteins.count_rows()
    if total == 0:
        raise ExtendError("the run's proteins table is empty: nothing to extend")
    rows = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))
    return proteins.take(rows.tolist(), columns=["id"])["id"].to_pylist()


def fit_step_from_prefix(run: Run, encoder, sample_sequences: int, regression: str, width: int,
                         chunk: int = 64) -> tuple[ChainFit, Moments, int]:
    """Moments of [z; h_new] over the residues of a sample of proteins -> the 2-block step fit."""
    proteins = run.dataset(PROTEINS)
    residues = run.dataset(RESIDUES) if run.has_table(RESIDUES) else None
    if residues is None:
        raise ExtendError(
            f"{run} stores per-protein embeddings only: fitting the new step needs per-residue embeddings. "
            "Pass --from-fit with a fit of the longer chain (fitted together with this run's fit)."
        )
    ids = _sample_ids(proteins, sample_sequences)
    k_new = encoder.widths[0]
    moments = Moments(width + k_new, device=encoder.device)
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        seqs = dict(zip(*proteins.to_table(columns=["id", "sequence"], filter=f"id IN ({sql_in_list(part)})")
                        .to_pydict().values()))
        rows = residues.to_table(columns=["id", "pos", EMBEDDING], filter=f"id IN ({sql_in_list(part)})")
        rows = rows.sort_by([("id", "ascending"), ("pos", "ascending")])
        z_all = _fsl_numpy(rows[EMBEDDING])  # (n_rows, width)
        order = sorted(seqs)
        h = encoder.blocks([seqs[k] for k in order])  # [seq][model] (L, k_new)
        start = 0
        z_parts, h_parts = [], []
        for key, blocks in zip(order, h):
            n = int(pc.sum(pc.equal(rows["id"], key)).as_py() or 0)
            z_parts.append(z_all[start : start + n])
            h_parts.append(blocks[0][:n])
            start += n
        z = torch.as_tensor(np.concatenate(z_parts), dtype=h_parts[0].dtype, device=encoder.device)
        moments.update(torch.cat([z, torch.cat(h_parts)], dim=1))  # (n, width + k_new)
    return fit_chain(moments, (width, k_new), regression=regression), moments, len(ids)


def _fsl_numpy(column) -> np.ndarray:
    """fixed_size_list column -> (n, w) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), -1)


class ResidueColumn:
    """merge_columns value function for residue fragments: (id, pos, embedding) batches -> the new embedding.

    Rows of a protein are contiguous and in pos order, so each protein is embedded once, when its first row is
    seen (its rows may span batches and fragments; the last protein is kept for that). Its mean h is recorded
    for the proteins pass."""

    def __init__(self, step: ChainFit, encoder, sequences: dict[str, str], out_type: pa.DataType):
        self.step, self.encoder, self.sequences, self.out_type = step, encoder, sequences, out_type
        self.width, self.k_new = step.widths
        self.current: dict[str, torch.Tensor] = {}
        self.protein_means: dict[str, np.ndarray] = {}

    def _embed(self, ids: list[str]) -> None:
        missing = [i for i in ids if i not in self.current]
        if not missing:
            return
        unknown = [i for i in missing if i not in self.sequences]
        if unknown:
            raise ExtendError(f"residues of {unknown[:3]} have no row in proteins.lance; the run is inconsistent")
        blocks = self.encoder.blocks([self.sequences[i] for i in missing])
        keep = {i: self.current[i] for i in ids if i in self.current}
        for key, b in zip(missing, blocks):
            keep[key] = b[0]
            self.protein_means[key] = b[0].double().mean(dim=0).cpu().numpy()
        self.current = keep

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("id").to_pylist()
        pos = np.asarray(batch.column("pos").to_numpy(zero_copy_only=False), dtype=np.int64)
        order = list(dict.fromkeys(ids))
        self._embed(order)
        id_array = np.asarray(ids)
        h = torch.cat([self.current[i][pos[id_array == i]] for i in order])  # (n, k_new) in row order
        if 1 + sum(ids[j] != ids[j - 1] for j in range(1, len(ids))) != len(order):
            raise ExtendError("residue rows of a protein are not contiguous; the residues table was reordered")
        z = torch.as_tensor(_fsl_numpy(batch.column(EMBEDDING)), dtype=h.dtype, device=h.device)  # (n, width)
        full = self.step.apply([z, h])  # (n, k_new): [z, new block]
        full[:, : self.width] = z  # z exactly as stored (apply copies it; this keeps it bit-identical)
        values = full.cpu().numpy().astype(self.out_type.to_pandas_dtype(), copy=False)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type=self.out_type), self.k_new)
        return pa.RecordBatch.from_arrays([column], names=[STAGED])


class ProteinColumn:
    """merge_columns value function for protein fragments: ([mean z; mean h] - mean) @ P per protein."""

    def __init__(self, step: ChainFit, encoder, means: dict[str, np.ndarray] | None):
        self.step, self.encoder, self.means = step, encoder, means
        self.width, self.k_new = step.widths

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("id").to_pylist()
        seqs = batch.column("sequence").to_pylist()
        if self.means:  # the residue pass's mean h; a protein whose residues an earlier attempt extended: its own
            for key, seq in zip(ids, seqs):
                if key not in self.means:
                    self.means[key] = self.encoder.blocks([seq])[0][0].double().mean(dim=0).cpu().numpy()
            h_mean = np.stack([self.means[i] for i in ids])  # (n, k_new) float64
        else:
            h_mean = np.stack([b[0].double().mean(dim=0).cpu().numpy() for b in self.encoder.blocks(seqs)])
        z_mean = _fsl_numpy(batch.column(EMBEDDING)).astype(np.float64)  # (n, width)
        full = self.step.apply([torch.as_tensor(z_mean), torch.as_tensor(h_mean)], dtype=torch.float64).numpy()
        full[:, : self.width] = z_mean
        stored = batch.column(EMBEDDING).type.value_type  # output.protein_dtype: the widened column keeps it
        dtype = np.float16 if stored == pa.float16() else np.float32
        column = pa.FixedSizeListArray.from_arrays(pa.array(full.astype(dtype).ravel(), stored), self.k_new)
        return pa.RecordBatch.from_arrays([column], names=[STAGED])


class FragmentExtender(Stage):
    """Extend pass: the new model of `rdscale extend`, loaded once in `setup()`; then the extension step fitted on
    a sample of the run (`fit_step`), or whole Lance fragments given the new embedding column (`fragment`:
    uncommitted; the driver commits them all as one Merge).

    reuse_means: keep each protein's mean h from the residue fragments this stage extended and give proteins the
    new column from them (one forward per protein). For one stage that sees every residue fragment (in-process);
    stages spread over actors see only some, so there every protein fragment forwards its sequences again."""

    def __init__(self, model: str, cfg: Config, reuse_means: bool = False):
        super().__init__(cfg)
        self.model = model
        self.means: dict[str, np.ndarray] | None = {} if reuse_means else None

    def load(self) -> None:
        self.encoder = ChainEncoder([self.model], self.cfg)

    def fit_step(self, run: str, sample_sequences: int, regression: str, width: int):
        return fit_step_from_prefix(Run(run), self.encoder, sample_sequences, regression, width)

    def fragment(self, table: str, uri: str, version: int, fragment_id: int, step: ChainFit,
                 out_type: pa.DataType | None, proteins_uri: str) -> tuple[int, str, pa.Schema]:
        frag = open_dataset(uri, version=version).get_fragment(fragment_id)
        if table == RESIDUES:
            ids = pc.unique(frag.to_table(columns=["id"])["id"]).to_pylist()
            proteins, sequences = open_dataset(proteins_uri), {}
            for i in range(0, len(ids), 5000):
                got = proteins.to_table(columns=["id", "sequence"], filter=f"id IN ({sql_in_list(ids[i:i + 5000])})")
                sequences.update(zip(got["id"].to_pylist(), got["sequence"].to_pylist()))
            fn = ResidueColumn(step, self.encoder, sequences, out_type)
            meta, schema = frag.merge_columns(fn, columns=["id", "pos", EMBEDDING])
            if self.means is not None:
                self.means.update(fn.protein_means)
        else:
            meta, schema = frag.merge_columns(ProteinColumn(step, self.encoder, self.means),
                                              columns=["id", "sequence", EMBEDDING])
        as_json = meta.to_json()
        return fragment_id, as_json if isinstance(as_json, str) else json.dumps(as_json), schema


def chunk_rows(rows: Sequence[dict[str, Any]], chunk_tokens: int, window: int,
               truncate: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Consecutive groups of rows of about `chunk_tokens` tokens (BOS/EOS per window included); a row larger
    than that is a chunk of its own. Input order is kept. ``truncate`` (long_policy truncate): a row costs only
    its first window (counting whole sequences made chunks of a few rows: tiny forwards and fragments)."""
    chunk: list[dict[str, Any]] = []
    tokens = 0
    for row in rows:
        n = min(len(row["sequence"]), window) if truncate else len(row["sequence"])
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


def shard_batches(shard: Shard, options: ValidationOptions, rows_per_batch: int) -> Iterator[pa.Table]:
    """The rows of one shard as batches of SHARD_BATCH_SCHEMA, what either executor's apply pass reads. A shard
    with no record to embed is one row without a record (see SHARD_BATCH_SCHEMA), so that it is committed too."""
    rows, digest = shard_rows(shard, options)
    if not rows:
        yield pa.Table.from_pylist([{"shard": shard.index, "shard_records": 0, "shard_digest": digest}],
                                   schema=SHARD_BATCH_SCHEMA)
        return
    for i in range(0, len(rows), rows_per_batch):
        yield pa.table(rows_to_columns(rows[i : i + rows_per_batch]), schema=SHARD_BATCH_SCHEMA)
