"""`rdscale verify RUN`: the check to run after a large job. Re-reads the inputs named in the run's recorded config
and checks, without trusting the ledger's counts:

- every planned shard is committed, and each committed shard's input still has the digest recorded when it was read;
- every input record is in exactly one of proteins or rejects, matched by source (file:offset), with the same id,
  and for proteins the same sequence (by digest); nothing in the tables comes from outside the input;
- the reader itself: per input file, the records it read equal the headers counted by an independent byte-level
  scan (">" at the start of a line; LF, CRLF and a lone CR all end lines; rdscale.io.headcount), so a reader
  that drops records cannot hide behind a check that reads with the same reader;
- no protein id twice, no (id, pos) twice in residues, residues only of stored proteins, one per residue;
- no rows of uncommitted shards, no missing data files;
- the tables' metadata names the same fit (checkpoint digests, tensors digest) as the fit artifact.

Works on local runs and runs on object storage alike, in bounded memory: the (source, id, digest) rows of the
input and of the tables are hash-partitioned by source (and the protein ids and per-protein residue summaries by
id) and spilled to a temporary folder for large runs (rdscale.io.partitions), so the driver holds one partition at
a time, not the run. Returns the problems as lines; an empty list means the run is exactly its input.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rdscale.config import Config
from rdscale.io.fasta import Reject, ValidationOptions, plan_shards, read_shard
from rdscale.io.headcount import file_headers
from rdscale.io.location import Location
from rdscale.io.partitions import HashPartitions, partitions_for, repeated
from rdscale.io.runs import Run
from rdscale.io.store import (
    LEDGER,
    META_MANIFEST,
    META_RUN_KEY,
    PROTEINS,
    REJECTS,
    RESIDUES,
    StoreError,
    missing_data_files,
)
from rdscale.progress import Progress
from rdscale.run.integrity import DUPS_KEY, RecordsDigest, key_range, residue_rows, shard_key
from rdscale.run.update import followed_release, verify_release

MAX_LINES = 50
ROWS_PER_PARTITION = 1_000_000
_BATCH = 1 << 16

# where: 0 = the input, 1 = proteins, 2 = rejects; digest: of the sequence ("" for a reject)
_RECORDS = pa.schema([("source", pa.string()), ("id", pa.string()), ("digest", pa.string()),
                      ("shard", pa.int32()), ("where", pa.int8())])
# per (fragment, protein): residue rows, and the sum / sum of squares of their positions
# s1 = sum of pos, s2 = sum of (pos^2 mod _P): both exact in int64 (float64 sums of pos^2 were inexact beyond
# ~300,000 residues, e.g. a chromosome fragment, and flagged a complete protein)
_P = 2_147_483_647
_RESIDUES = pa.schema([("id", pa.string()), ("n", pa.int64()), ("s1", pa.int64()), ("s2", pa.int64()),
                       ("lo", pa.int64()), ("hi", pa.int64()), ("length", pa.int64()), ("protein", pa.bool_())])


def _mod_p(values):
    """values mod _P for non-negative int64 values (pyarrow has no modulo kernel): v - floor(v / P) * P."""
    quotient = pc.cast(pc.floor(pc.divide(pc.cast(values, pa.float64(), safe=False), float(_P))), pa.int64())
    rest = pc.subtract(values, pc.multiply(quotient, _P))
    # float rounding can leave rest one P off either way: fold it back into [0, P)
    rest = pc.if_else(pc.less(rest, 0), pc.add(rest, _P), rest)
    return pc.if_else(pc.greater_equal(rest, _P), pc.subtract(rest, _P), rest)


def _seq_digest(sequence: str) -> str:
    return hashlib.blake2b(sequence.encode(), digest_size=12).hexdigest()


def verify(run_dir: str | Any, rows_per_partition: int = ROWS_PER_PARTITION, scratch: str | None = None,
           progress: bool = False) -> list[str]:
    run = Run(run_dir) if not isinstance(run_dir, Run) else run_dir
    if not run.has_table(PROTEINS) or not run.has_table(LEDGER):
        raise StoreError(f"{run} holds no rdscale run (no proteins.lance / shards.lance)")
    if followed_release(run) is not None:  # `rdscale update` moved it to another release: check that one
        return verify_release(run.location)
    tables = [name for name in (PROTEINS, RESIDUES, REJECTS) if run.has_table(name)]
    problems = [f"{name}: data file {missing} is missing"
                for name in tables for missing in missing_data_files(run.table_uri(name))]
    if problems:
        return problems  # the tables cannot be read

    meta = run.metadata()
    cfg = Config.from_dict(meta.get("config") or {})
    status = run.status()
    if not status["complete"]:
        problems.append(f"incomplete: {len(status['committed'])} of {status['planned']} shards committed")
    problems += _check_metadata(run, tables, meta)
    missing_inputs = [p for p in cfg.input.paths if not Location.parse(p).is_file()]
    if missing_inputs:
        problems.append(f"input file(s) not found: {', '.join(missing_inputs)} (cannot check records against the "
                        "input)")
        return problems
    rows = run.dataset(PROTEINS).count_rows() + (run.dataset(REJECTS).count_rows() if REJECTS in tables else 0)
    parts = partitions_for(2 * rows, rows_per_partition)
    problems += _check_against_input(run, cfg, tables, status, rows, parts, scratch, progress)
    if RESIDUES in tables:
        problems += _check_residues(run, cfg, parts, scratch, progress)
    if len(problems) > MAX_LINES:
        return problems[:MAX_LINES] + [f"... and {len(problems) - MAX_LINES} more"]
    return problems


def _check_metadata(run: Run, tables: list[str], meta: dict[str, Any]) -> list[str]:
    """One run key and one fit manifest across tables, matching the fit on disk."""
    problems = []
    schemas = {name: run.dataset(name).schema.metadata or {} for name in tables}
    if len({md.get(META_RUN_KEY) for md in schemas.values()}) != 1:
        problems.append(f"tables carry different run keys: {sorted(schemas)}")
    if len({md.get(META_MANIFEST) for md in schemas.values()}) != 1:
        problems.append("tables carry different fit manifests in their metadata")
    return problems + _check_fit(run, meta.get("fit_manifest") or {})


def _check_against_input(run: Run, cfg: Config, tables: list[str], status: dict[str, Any], rows: int, parts: int,
                         scratch: str | None, progress: bool) -> list[str]:
    """Every input record in exactly one of proteins or rejects, and nothing else there: the (source, id, digest)
    rows of the input and of the tables, hash-partitioned by source, compared one partition at a time."""
    committed = set(status["committed"])
    shards = plan_shards(cfg.input.paths, shard_bytes=int(cfg.input.shard_mb * (1 << 20)),
                         index_dir=run.gzip_index)
    ledger = {r["shard"]: r for r in run.dataset(LEDGER).to_table().to_pylist()}
    copies = any(DUPS_KEY in str(r["key"]) for r in ledger.values())  # rdscale.run.dedupe
    with HashPartitions(parts, _RECORDS, "source", scratch) as records, \
            HashPartitions(parts, pa.schema([("id", pa.string())]), "id", scratch) as protein_ids:
        problems = _read_input(cfg, shards, ledger, records, progress)
        problems += _read_tables(run, tables, committed, rows, records, protein_ids, progress)
        for part in records:
            _check_records(part, committed, status["complete"] or not copies, problems)
        problems += _repeated_ids(protein_ids)
    return problems


def _read_input(cfg: Config, shards: list, ledger: dict[int, dict], records: HashPartitions,
                progress: bool) -> list[str]:
    """The input's records into `records` (where 0); each shard's ledger range and digest, each file's record
    count against an independent count of its headers."""
    problems = []
    options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
    bar = Progress(total=len(shards), unit="shard", desc="verify: reading the input", enabled=progress)
    read_per_file: dict[int, int] = {}
    for shard in shards:
        digest = RecordsDigest()
        batch = _Batch()
        for item in read_shard(shard, options):
            read_per_file[shard.file_index] = read_per_file.get(shard.file_index, 0) + 1
            digest.update(item)
            seq = "" if isinstance(item, Reject) else _seq_digest(item.sequence)
            batch.add(f"{item.path}:{item.offset}", item.id, seq, shard.index, 0)
            if len(batch) >= _BATCH:
                records.add(batch.take())
        records.add(batch.take())
        row = ledger.get(shard.index)
        if row is not None:
            if key_range(row["key"]) != shard_key(shard):  # the input's plan, without dedupe's assignment
                problems.append(f"shard {shard.index}: ledger range {row['key']} differs from the input's plan "
                                f"{shard_key(shard)}")
            elif row.get("digest") and row["digest"] != digest.hexdigest():
                problems.append(f"shard {shard.index}: {shard.path} changed since the shard was embedded "
                                f"(bytes {shard.start}-{shard.end or 'eof'})")
        bar.update(1)
    bar.close()
    for file_index, path in enumerate(cfg.input.paths):
        headers, read = file_headers(path), read_per_file.get(file_index, 0)
        if headers != read:
            problems.append(f"{path}: holds {headers} record(s) ('>' at a line start), the reader found {read}: "
                            "records were lost or invented reading it (line endings? report this)")
    for index in sorted(set(ledger) - {s.index for s in shards}):
        problems.append(f"shard {index}: in the ledger but not in the input's shard plan")
    return problems


def _read_tables(run: Run, tables: list[str], committed: set[int], rows: int, records: HashPartitions,
                 protein_ids: HashPartitions, progress: bool) -> list[str]:
    """The proteins' and rejects' rows into `records` (where 1, 2) and the protein ids into `protein_ids`; rows of
    uncommitted shards reported."""
    stray: dict[str, set[int]] = {}
    bar = Progress(total=rows, unit="row", desc="verify: reading proteins and rejects", enabled=progress)
    for name, where in ((PROTEINS, 1), (REJECTS, 2)):
        if name not in tables:
            continue
        columns = ["source", "id", "shard"] + (["sequence"] if where == 1 else [])
        for part in run.dataset(name).to_batches(columns=columns, batch_size=_BATCH):
            bar.update(part.num_rows)
            shard_col = part.column("shard")
            outside = pc.invert(pc.is_in(shard_col, value_set=pa.array(sorted(committed), pa.int32())))
            if pc.any(outside).as_py():
                stray.setdefault(name, set()).update(pc.unique(shard_col.filter(outside)).to_pylist())
            seqs = ([_seq_digest(s) for s in part.column("sequence").to_pylist()] if where == 1
                    else [""] * part.num_rows)
            records.add(pa.record_batch(
                [part.column("source"), part.column("id"), pa.array(seqs, pa.string()),
                 part.column("shard").cast(pa.int32()), pa.array([where] * part.num_rows, pa.int8())],
                schema=_RECORDS))
            if where == 1:
                protein_ids.add(pa.record_batch([part.column("id")], names=["id"]))
    bar.close()
    return [f"{name}: rows of uncommitted shard(s) {sorted(found)[:10]}" for name, found in stray.items()]


def _repeated_ids(protein_ids: HashPartitions) -> list[str]:
    dup_ids, example = 0, None
    for part in protein_ids:
        many = repeated(part["id"])
        if len(many):
            dup_ids += len(many)
            example = example or many[0].as_py()
    return [f"proteins: {dup_ids} id(s) stored more than once, e.g. {example}"] if dup_ids else []


class _Batch:
    def __init__(self) -> None:
        self.columns: list[list] = [[] for _ in _RECORDS.names]

    def __len__(self) -> int:
        return len(self.columns[0])

    def add(self, *values) -> None:
        for column, value in zip(self.columns, values):
            column.append(value)

    def take(self) -> pa.RecordBatch:
        batch = pa.record_batch([pa.array(c, f.type) for c, f in zip(self.columns, _RECORDS)], schema=_RECORDS)
        self.columns = [[] for _ in _RECORDS.names]
        return batch


def _check_records(part: pa.Table, committed: set[int], report_missing: bool, problems: list[str]) -> None:
    """One source partition: input rows (where 0) against table rows (1 proteins, 2 rejects)."""
    if part.num_rows == 0:
        return
    where = part["where"]
    expected = part.filter(pc.equal(where, 0))
    stored = part.filter(pc.not_equal(where, 0))
    counts = stored.group_by("source").aggregate([("source", "count")])
    for row in counts.filter(pc.greater(counts["source_count"], 1)).to_pylist():
        problems.append(f"record {row['source']} is stored {row['source_count']} times (proteins + rejects)")
    outside = stored.join(expected.select(["source"]), "source", join_type="left anti")
    for source in pc.unique(outside["source"]).to_pylist():
        problems.append(f"record {source} is in the tables but not in the input")
    if report_missing:  # copies (rdscale.run.dedupe) of a partial run may wait for another shard's commit
        absent = expected.join(stored.select(["source"]), "source", join_type="left anti")
        absent = absent.filter(pc.is_in(absent["shard"], value_set=pa.array(sorted(committed), pa.int32())))
        for row in absent.select(["source", "id"]).to_pylist():
            problems.append(f"record {row['source']} ({row['id']}) is in neither proteins nor rejects")
    pairs = stored.select(["source", "id", "digest", "where"]).join(
        expected.select(["source", "id", "digest"]).rename_columns(["source", "input_id", "input_digest"]),
        "source", join_type="inner")
    for row in pairs.to_pylist():
        kind = "protein" if row["where"] == 1 else "reject"
        if row["id"] != row["input_id"]:
            problems.append(f"{kind} {row['id']} at {row['source']}: the input has id {row['input_id']} there")
        elif kind == "protein" and row["input_digest"] == "":
            problems.append(f"protein {row['id']} at {row['source']}: the input record there is a reject")
        elif kind == "protein" and row["digest"] != row["input_digest"]:
            problems.append(f"protein {row['id']} at {row['source']}: stored sequence differs from the input")


def _check_fit(run: Run, manifest: dict[str, Any]) -> list[str]:
    if not manifest or not manifest.get("tensors_sha256"):
        return []  # extraction with one model: no fit
    found = run.fit_location(manifest, {})  # recorded relative to the run, else <run>/fit
    artifact = found if found is not None else run.fit
    path = artifact.join("manifest.json")
    if not path.is_file():
        return [f"the fit the tables were embedded with ({artifact}) is gone; metadata cannot be checked"]
    on_disk = json.loads(path.read_text())
    out = []
    if on_disk.get("tensors_sha256") != manifest.get("tensors_sha256"):
        out.append(f"the fit at {artifact} is not the one the tables were embedded with (tensors digest differs)")
    have = [(m.get("name"), m.get("sha256")) for m in on_disk.get("models", [])]
    want = [(m.get("name"), m.get("sha256")) for m in manifest.get("models", [])]
    steps = manifest.get("extensions") or []
    if steps:  # grown by `rdscale extend`: the base fit holds the chain's models, each step one more
        want = want[:len(want) - len(steps)]
        for step in run.extension_steps(manifest):
            if step is None or not step.join("manifest.json").is_file():
                out.append(f"an extension step of the tables ({step or 'unrecorded'}) is gone")
    if have != want:
        out.append(f"the fit at {artifact} names models {have}, the tables' metadata {want}")
    return out


def _check_residues(run: Run, cfg: Config, parts: int, scratch: str | None, progress: bool = False) -> list[str]:
    """Per protein, exactly one residue row per position: summarised per (batch, id) as (count, sum of pos, sum of
    pos^2, min, max) and added up per id across batches (hash-partitioned by id), then compared with the protein's
    length. With count = n and every pos in [0, n), the two sums match those of 0..n-1 only for a permutation of
    0..n-1 short of contrived coincidences; more rows than positions, all in range, means a repeated (id, pos)."""
    out: list[str] = []
    repeated, repeated_example = 0, None
    with HashPartitions(parts, _RESIDUES, "id", scratch) as summaries:
        for batch in run.dataset(PROTEINS).to_batches(columns=["id", "length"], batch_size=_BATCH):
            n = batch.num_rows
            length = batch.column("length").cast(pa.int64())
            expect = residue_rows(length, cfg)
            zeros = pa.array([0] * n, pa.int64())
            summaries.add(pa.record_batch([batch.column("id"), pa.array([0] * n, pa.int64()), zeros, zeros,
                                           pa.array([0] * n, pa.int64()), pa.array([0] * n, pa.int64()),
                                           expect, pa.array([True] * n)], schema=_RESIDUES))
        residues = run.dataset(RESIDUES)
        bar = Progress(total=residues.count_rows(), unit="row", desc="verify: reading residues", enabled=progress)
        for batch in residues.to_batches(columns=["id", "pos"], batch_size=1 << 20):
            bar.update(batch.num_rows)
            table = pa.Table.from_batches([batch])
            pos = table["pos"].cast(pa.int64())
            table = table.append_column("p2", _mod_p(pc.multiply_checked(pos, pos))).append_column("pf", pos)
            agg = table.group_by("id").aggregate([("pos", "count"), ("pf", "sum"),
                                                  ("p2", "sum"), ("pos", "min"), ("pos", "max")])
            k = agg.num_rows
            summaries.add(pa.record_batch(
                [agg["id"].combine_chunks(), agg["pos_count"].combine_chunks(), agg["pf_sum"].combine_chunks(),
                 agg["p2_sum"].combine_chunks(), agg["pos_min"].combine_chunks().cast(pa.int64()),
                 agg["pos_max"].combine_chunks().cast(pa.int64()), pa.array([0] * k, pa.int64()),
                 pa.array([False] * k)], schema=_RESIDUES))
        bar.close()
        wrong, wrong_example, orphans, orphan_example, absent, absent_example = 0, None, 0, None, 0, None
        for part in summaries:
            per_id = part.group_by("id").aggregate([("n", "sum"), ("s1", "sum"), ("s2", "sum"), ("lo", "min"),
                                                    ("hi", "max"), ("length", "max"), ("protein", "max")])
            for row in per_id.to_pylist():
                n, length = int(row["n_sum"]), int(row["length_max"])
                if not row["protein_max"]:
                    orphans += 1
                    orphan_example = orphan_example or row["id"]
                    if n > row["hi_max"] - row["lo_min"] + 1:  # more rows than positions in their range
                        repeated += 1
                        repeated_example = repeated_example or row["id"]
                elif n == 0:
                    absent += 1
                    absent_example = absent_example or row["id"]
                elif n > length and row["lo_min"] >= 0 and row["hi_max"] <= length - 1:  # pigeonhole
                    repeated += 1
                    repeated_example = repeated_example or row["id"]
                elif (n != length or row["lo_min"] != 0 or row["hi_max"] != length - 1
                      or row["s1_sum"] != length * (length - 1) // 2
                      or row["s2_sum"] % _P != (length - 1) * length * (2 * length - 1) // 6 % _P):
                    wrong += 1
                    wrong_example = wrong_example or row["id"]
    if repeated:
        out.append(f"residues: (id, pos) stored more than once for {repeated} protein(s), e.g. {repeated_example}")
    if orphans:
        out.append(f"residues of {orphans} protein(s) not in proteins, e.g. {orphan_example}")
    if wrong:
        out.append(f"residues: {wrong} protein(s) without exactly one row per residue, e.g. {wrong_example}")
    if absent:
        out.append(f"residues: {absent} protein(s) have no residue rows, e.g. {absent_example}")
    return out
