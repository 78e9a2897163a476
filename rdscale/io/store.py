"""Lance tables of a run: proteins, residues, rejects (docs/architecture.md, "store"), and a ledger of shards.

Writes are split the way Lance intends for distributed jobs: workers write data files (`write_fragments`, which
returns small fragment descriptions) and the driver commits them, one input shard at a time, with
`LanceDataset.commit`. A shard is done when its row in the `shards` ledger is committed, which happens last; on
resume, rows of shards that have no ledger row (a run killed between two tables' commits) are deleted first, so
a restarted run ends with exactly the rows of an uninterrupted one.

Every row carries `shard` (its index in the run's shard plan) for that recovery and for provenance.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from rdscale import __version__
from rdscale.errors import RdscaleError, write_problem
from rdscale.io.lease import LeaseError, pause_point
from rdscale.io.location import Location
from rdscale.io.partitions import HashPartitions
from rdscale.io.runs import (  # noqa: F401 - re-exported: table names and metadata keys live with the run
    DATA_TABLES,
    LEDGER,
    META_CONFIG,
    META_LEVELS,
    META_MANIFEST,
    META_RUN_KEY,
    META_VERSION,
    PROTEINS,
    REJECTS,
    RESIDUES,
    Run,
    dataset_exists,
    incomplete_message,
    open_dataset,
)

log = logging.getLogger(__name__)


class StoreError(RdscaleError, RuntimeError):
    """The output directory cannot be used for this run; the message says why and what to do."""


RESIDUE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
SCALAR_INDEXED = ("id", "shard")  # BTREE-indexed columns of every data table (RunStore.scalar_indexes)


def run_schemas(
    width: int,
    storage_width: int | None,
    metadata: dict[bytes, bytes],
    residues: bool = True,
    residue_dtype: str = "float16",
    protein_dtype: str = "float32",
) -> dict[str, pa.Schema]:
    """Arrow schemas of a run's tables. width: k_m of the chain; storage_width: per-residue prefix stored."""
    d = width if storage_width is None else storage_width
    if not 1 <= d <= width:
        raise StoreError(f"output.storage_width={d} must be between 1 and the embedding width {width}")
    if residue_dtype not in RESIDUE_DTYPES:
        raise StoreError(f"output.residue_dtype must be one of {sorted(RESIDUE_DTYPES)}, got {residue_dtype!r}")
    if protein_dtype not in RESIDUE_DTYPES:
        raise StoreError(f"output.protein_dtype must be one of {sorted(RESIDUE_DTYPES)}, got {protein_dtype!r}")
    schemas = {
        PROTEINS: pa.schema(
            [
                ("id", pa.string()),
                ("description", pa.string()),
                ("length", pa.int32()),
                ("sequence", pa.string()),
                ("source", pa.string()),
                ("embedding", pa.list_(RESIDUE_DTYPES[protein_dtype], width)),
                ("shard", pa.int32()),
            ],
            metadata=metadata,
        ),
        REJECTS: pa.schema(
            [("id", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("shard", pa.int32())],
            metadata=metadata,
        ),
    }
    if residues:
        schemas[RESIDUES] = pa.schema(
            [
                ("id", pa.string()),
                ("pos", pa.int32()),
                ("aa", pa.string()),
                ("embedding", pa.list_(RESIDUE_DTYPES[residue_dtype], d)),
                ("shard", pa.int32()),
            ],
            metadata=metadata,
        )
    return schemas


LEDGER_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("key", pa.string()),
        ("records", pa.int64()),
        ("proteins", pa.int64()),
        ("rejects", pa.int64()),
        ("residues", pa.int64()),
        # What the shard was made of (rdscale.run.integrity): a digest of its records as read, and the input file's
        # size and mtime then, so a rerun notices an input edited in place.
        ("digest", pa.string()),
        ("file_size", pa.int64()),
        ("file_mtime_ns", pa.int64()),
        # Provenance and cost (rdscale.run.provenance): what wrote the shard's rows and the actors' seconds on it.
        # Runs from before these columns keep their ledger as it is; readers treat the columns as optional.
        ("host", pa.string()),
        ("device", pa.string()),
        ("cuda", pa.string()),
        ("torch", pa.string()),
        ("esm", pa.string()),
        ("rdscale", pa.string()),
        ("dtype", pa.string()),
        ("seconds", pa.float64()),
        ("committed_at", pa.float64()),
    ]
)


def schema_metadata(levels: Sequence[int], manifest: dict | None, config: dict, run_key: str) -> dict[bytes, bytes]:
    return {
        META_LEVELS: json.dumps(list(levels)).encode(),
        META_MANIFEST: json.dumps(manifest or {}, sort_keys=True).encode(),
        META_CONFIG: json.dumps(config, sort_keys=True).encode(),
        META_VERSION: __version__.encode(),
        META_RUN_KEY: run_key.encode(),
    }


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """values: (n, w) -> fixed_size_list<value_type, w> without a Python loop."""
    n, w = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, w)


def proteins_table(rows: Sequence[dict[str, Any]], embeddings: np.ndarray, shard: int, schema: pa.Schema) -> pa.Table:
    """rows: dicts with id, description, sequence, source; embeddings: (n, k_m) float32 per-protein means, stored
    in the schema's dtype (output.protein_dtype)."""
    n = len(rows)
    value_type = schema.field("embedding").type.value_type
    dtype = np.float16 if value_type == pa.float16() else np.float32
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "description": [r["description"] for r in rows],
            "length": pa.array([len(r["sequence"]) for r in rows], pa.int32()),
            "sequence": [r["sequence"] for r in rows],
            "source": [r["source"] for r in rows],
            "embedding": _fixed_list(embeddings.astype(dtype, copy=False).reshape(n, -1), value_type),
            "shard": pa.array(np.full(n, shard, dtype=np.int32)),
        },
        schema=schema,
    )


def residues_table(
    rows: Sequence[dict[str, Any]], per_residue: Sequence[np.ndarray], shard: int, schema: pa.Schema
) -> pa.Table:
    """per_residue[i]: (L_i', d) rd embeddings of rows[i], already cut to the storage width (L_i' < L_i only when
    long sequences are truncated)."""
    d = schema.field("embedding").type.list_size
    value_type = schema.field("embedding").type.value_type
    # Vectorised: one Arrow take for the ids, arange arithmetic for the positions, the residue letters sliced
    # out of one byte buffer; no per-residue Python objects.
    lengths = np.array([len(e) for e in per_residue], dtype=np.int64)
    total = int(lengths.sum())
    row_of = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)  # (total,) row index of each residue
    starts = np.cumsum(lengths) - lengths  # (n,) first residue of each row
    pos = (np.arange(total, dtype=np.int64) - starts[row_of]).astype(np.int32)
    ids = pa.array([r["id"] for r in rows], pa.string()).take(pa.array(row_of))
    letters = "".join(r["sequence"][:n] for r, n in zip(rows, lengths.tolist())).encode("ascii")
    aa = pa.StringArray.from_buffers(total, pa.py_buffer(np.arange(total + 1, dtype=np.int32)),
                                     pa.py_buffer(letters))
    stacked = np.concatenate(per_residue, axis=0) if total else np.zeros((0, d), np.float32)
    return pa.table(
        {
            "id": ids,
            "pos": pa.array(pos, pa.int32()),
            "aa": aa,
            "embedding": _fixed_list(stacked[:, :d].astype(value_type.to_pandas_dtype(), copy=False), value_type),
            "shard": pa.array(np.full(total, shard, dtype=np.int32)),
        },
        schema=schema,
    )


def rejects_table(rows: Sequence[dict[str, Any]], shard: int, schema: pa.Schema) -> pa.Table:
    """rows: dicts with id, source, reason."""
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "source": [r["source"] for r in rows],
            "reason": [r["reason"] for r in rows],
            "shard": pa.array(np.full(len(rows), shard, dtype=np.int32)),
        },
        schema=schema,
    )


def write_table_fragments(uri: str, table: pa.Table, one_fragment: bool = False) -> list[str]:
    """Worker side: write `table` as new data files of the dataset at `uri`, uncommitted.
    Returns the fragments as JSON so they travel between processes as plain strings. one_fragment: all of its rows
    in one fragment (a group of shards, ShardCommitter), not split at Lance's default of 1Mi rows per file."""
    if table.num_rows == 0:
        return []
    out = []
    options = Location.parse(uri).storage_options or None
    sizes = {"max_rows_per_file": table.num_rows, "max_bytes_per_file": 1 << 62} if one_fragment else {}
    for frag in write_fragments(table, uri, schema=table.schema, storage_options=options, **sizes):
        meta = frag.to_json()  # a dict in recent pylance, a str in older releases
        out.append(meta if isinstance(meta, str) else json.dumps(meta))
    return out


@dataclass
class ShardResult:
    """What the workers produced for (part of) one shard: uncommitted fragments per table and row counts."""

    shard: int
    fragments: dict[str, list[str]]
    records: int = 0  # input records handled (accepted + rejected)
    proteins: int = 0
    rejects: int = 0
    residues: int = 0
    digest: str = ""  # of the shard's records as the reader saw them (rdscale.run.integrity.records_digest)
    embedded: int = 0  # residues that went through the models (not copies; also for per-protein output)
    seconds: float = 0.0  # the actors' time on these rows (summed over parts: device-seconds)
    provenance: dict[str, str] = field(default_factory=dict)  # rdscale.run.provenance.collect() of who wrote them
    # Rows not yet written (output.fragment_rows > 0): the driver writes them into fragments of the target size
    # (ShardCommitter). They travel as Arrow IPC beside the JSON of the other fields (`encode` / `decode`).
    tables: dict[str, list[pa.Table]] = field(default_factory=dict)

    def add(self, other: "ShardResult") -> None:
        for name, frags in other.fragments.items():
            self.fragments.setdefault(name, []).extend(frags)
        for name, tables in other.tables.items():
            self.tables.setdefault(name, []).extend(tables)
        if other.digest:
            if self.digest and other.digest != self.digest:
                raise StoreError(
                    f"shard {self.shard} was read twice with different content (the input changed during the run); "
                    "run the same command again"
                )
            self.digest = other.digest
        self.records += other.records
        self.proteins += other.proteins
        self.rejects += other.rejects
        self.residues += other.residues
        self.embedded += other.embedded
        self.seconds += other.seconds
        self.provenance = self.provenance or other.provenance

    def encode(self) -> tuple[str, bytes]:
        """(JSON of the counts and fragment descriptions, the rows as Arrow IPC streams one after another): plain
        values a Ray Data batch column holds. The JSON's `rows` lists (table, bytes) of each stream."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "tables"}
        streams = []
        for name, tables in self.tables.items():
            tables = [t for t in tables if t.num_rows]
            if not tables:
                continue
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, tables[0].schema) as writer:
                for t in tables:
                    writer.write_table(t)
            streams.append((name, sink.getvalue()))
        fields["rows"] = [(name, buf.size) for name, buf in streams]
        return json.dumps(fields), b"".join(buf.to_pybytes() for _, buf in streams)

    @classmethod
    def decode(cls, text: str, rows: bytes | None = None) -> "ShardResult":
        fields = json.loads(text)
        sizes = fields.pop("rows", [])
        result = cls(**fields)
        if isinstance(rows, pa.Scalar):  # the local executor hands over the batch column's value as is
            rows = rows.as_buffer()
        at, buffer = 0, rows if isinstance(rows, pa.Buffer) else pa.py_buffer(rows or b"")
        for name, size in sizes:
            result.tables[name] = [pa.ipc.open_stream(buffer.slice(at, size)).read_all()]
            at += size
        return result


class RunStore:
    """The Lance tables of one run directory, opened by the driver."""

    def __init__(self, out_dir: str | Path | Location, schemas: dict[str, pa.Schema], run_key: str, lease=None):
        self.run = Run(out_dir)
        self.root = self.run.location
        self.schemas = schemas
        self.run_key = run_key
        self.lease = lease  # rdscale.io.lease.WriterLease: when set, every change is a fenced step of it
        self.root.mkdir()
        for name, schema in schemas.items():
            self._open_or_create(name, schema)
        self._open_or_create(LEDGER, LEDGER_SCHEMA.with_metadata({META_RUN_KEY: run_key.encode()}))

    def uri(self, name: str) -> str:
        return self.run.table_uri(name)

    @property
    def _options(self) -> dict[str, str] | None:
        return self.root.storage_options or None

    def _open_or_create(self, name: str, schema: pa.Schema) -> None:
        uri = self.uri(name)
        if self.run.has_table(name):
            found = self.dataset(name).schema
            key = (found.metadata or {}).get(META_RUN_KEY, b"").decode()
            if key != self.run_key:
                raise StoreError(
                    f"{uri} holds the output of a different run (different inputs, models, fit or storage "
                    f"settings). Choose a new output.dir, or start over: rerun with --restart (run, embed) or "
                    f"delete {self.root}."
                )
            return
        try:
            with self.step(f"create {name}"):
                if self.run.has_table(name):  # created by the writer whose lease this one took over, meanwhile
                    return
                lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, []),
                                          storage_options=self._options)
        except (OSError, ValueError) as err:
            if self.root.is_local:
                raise
            raise self.run.table(name).error(err, "create the Lance dataset") from None

    def dataset(self, name: str) -> lance.LanceDataset:
        return self.run.dataset(name)

    def committed(self) -> dict[int, dict[str, Any]]:
        """Ledger rows of the shards whose output is complete, by shard index."""
        table = self.dataset(LEDGER).to_table()
        return {row["shard"]: row for row in table.to_pylist()}

    @contextmanager
    def step(self, what: str, required: bool = False):
        """One fenced write to the run (rdscale.io.lease.WriterLease.step): under the commit gate, after checking
        that the lease is still ours, so a writer that lost its lease writes nothing. Without a lease (library use
        on a private directory) there is no fence, unless `required`."""
        if self.lease is not None:
            with self.lease.step(what):
                yield
        elif required:
            raise StoreError(f"{self.root}: recovery deletes rows of unrecorded shards and must hold the run's writer "
                             "lease (rdscale.io.lease.WriterLease); set RunStore.lease first")
        else:
            yield

    def recover(self) -> int:
        """Delete rows left by shards that never reached the ledger (a run killed mid-commit), and data files no
        table version references (fragments of shards that failed before their commit). Only the lease holder may
        do this: another writer's uncommitted shard looks exactly like a dead one's. Returns rows deleted."""
        deleted = 0
        with self.step("recover", required=True):  # the ledger read and the deletes: no commit in between
            done = sorted(self.committed())
            for name in self.schemas:
                ds = self.dataset(name)
                predicate = f"shard NOT IN ({', '.join(map(str, done))})" if done else "shard >= -2147483648"
                stray = ds.count_rows(filter=predicate)
                if stray:
                    log.warning("removing %d rows of uncommitted shards from %s", stray, name)
                    ds.delete(predicate)
                    deleted += stray
            self.cleanup_orphans()
        return deleted

    def cleanup_orphans(self) -> int:
        """Delete data files that no version of a table references (written by workers of a shard that never
        committed). Keeps every version. Returns files removed; a failure is a warning (they only waste space).
        Under the gate: a writer that lost its lease can no longer commit, so the files its workers wrote stay
        unreferenced for good, and a file that a committed version references is never removed."""
        removed = 0
        for name in (*self.schemas, LEDGER):
            with self.step(f"cleanup {name}", required=True):
                try:
                    stats = self.dataset(name).cleanup_old_versions(
                        older_than=datetime.timedelta(days=36500), delete_unverified=True
                    )
                    removed += int(getattr(stats, "data_files_removed", 0) or 0)
                except Exception as err:  # noqa: BLE001 - cleanup is best effort
                    log.warning("could not remove orphan data files of %s: %s", self.uri(name), one_line(err))
        if removed:
            log.info("removed %d orphan data file(s) of uncommitted shards", removed)
        return removed

    def forget_shards(self, shards: Sequence[int]) -> int:
        """Delete every row of `shards` and then their ledger rows (to redo them). Returns table rows deleted."""
        if not shards:
            return 0
        predicate = f"shard IN ({', '.join(str(int(s)) for s in shards)})"
        deleted = 0
        for name in self.schemas:
            with self.step(f"forget {name}", required=True):
                ds = self.dataset(name)
                n = ds.count_rows(filter=predicate)
                if n:
                    ds.delete(predicate)
                    deleted += n
        with self.step("forget ledger", required=True):
            self.dataset(LEDGER).delete(predicate)
        return deleted

    def commit_shard(self, result: ShardResult, key: str, fingerprint: dict[str, Any] | None = None) -> bool:
        """Driver side: make one shard's fragments visible, table by table, then record it in the ledger.
        Idempotent: a shard already in the ledger is not committed again (its new fragments stay orphans, removed by
        `cleanup_orphans`). Returns whether this call committed it. fingerprint: digest, file_size, file_mtime_ns, and
        the provenance columns (rdscale.run.provenance.ledger_values).
        Each table's commit and the ledger append is a fenced step (`step`): a writer that lost its lease on the way
        stops before its next write, and the shard stays out of the ledger (its rows are removed by the successor's
        recovery)."""
        with self.step("commit check"):
            if self.dataset(LEDGER).count_rows(filter=f"shard = {int(result.shard)}"):
                log.warning("shard %d is already committed; not committing it twice", result.shard)
                return False
        fault_point("before_tables")
        for name, frags in result.fragments.items():
            if not frags:
                continue
            self.append_fragments(name, frags)
            fault_point("between_tables")
        fault_point("before_ledger")
        self.append_ledger([(result, key, fingerprint)])
        fault_point("after_ledger")
        return True

    def append_fragments(self, name: str, frags: Sequence[str]) -> None:
        """One fenced append of written fragments (JSON descriptions) to table `name`."""
        with self.step(f"append {name}"):
            ds = self.dataset(name)
            op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in frags])
            lance.LanceDataset.commit(self.uri(name), op, read_version=ds.version, storage_options=self._options)

    def append_ledger(self, shards: Sequence[tuple[ShardResult, str, dict[str, Any] | None]]) -> None:
        """The ledger rows of (result, key, fingerprint) shards, in one fenced append: the commit of all of them.
        fingerprint: digest, file_size, file_mtime_ns and the provenance columns."""
        values = []
        for result, key, fingerprint in shards:
            fp = fingerprint or {}
            values.append({**fp, "shard": result.shard, "key": key, "records": result.records,
                           "proteins": result.proteins, "rejects": result.rejects, "residues": result.residues,
                           "digest": fp.get("digest") or result.digest or None})
        with self.step("append ledger"):
            # The ledger's own columns: a run from before the provenance columns goes on without them.
            schema = self.dataset(LEDGER).schema.remove_metadata()
            rows = pa.table({f.name: pa.array([v.get(f.name) for v in values], f.type) for f in schema},
                            schema=schema)
            listed = ", ".join(str(int(v["shard"])) for v in values)
            if self.dataset(LEDGER).count_rows(filter=f"shard IN ({listed})"):
                raise StoreError(f"shard(s) {listed} of {self.root} were committed by another writer meanwhile; "
                                 "stopping without committing them twice")
            lance.write_dataset(rows, self.uri(LEDGER), mode="append", storage_options=self._options)

    def write_and_commit(self, result: ShardResult, tables: dict[str, pa.Table], key: str) -> bool:
        """Single-process convenience: write the tables' fragments here and commit them as one shard."""
        for name, table in tables.items():
            result.fragments.setdefault(name, []).extend(write_table_fragments(self.uri(name), table))
        return self.commit_shard(result, key)

    def dedupe_across_shards(self, rows_per_partition: int = 1_000_000, scratch: str | Path | None = None) -> int:
        """Reject later occurrences of an id already seen in an earlier shard (the readers reject duplicates
        within a shard). 'Earlier' is shard order, which is input order. Idempotent, so safe to rerun after a kill.
        Returns the number of proteins moved to the rejects table.

        Bounded memory: the (id, shard) pairs of both tables are streamed from Lance and hash-partitioned by id
        into ceil(rows / rows_per_partition) partitions, spilled to `scratch` (a temporary folder by default) when
        there is more than one; every occurrence of an id lands in the same partition, so each partition is
        deduplicated on its own. The driver holds one partition (about rows_per_partition rows) plus the
        duplicates found, never every id of the run."""
        n_proteins = self.dataset(PROTEINS).count_rows()
        if n_proteins == 0:
            return 0
        total = n_proteins + self.dataset(REJECTS).count_rows()
        parts = max(1, -(-total // max(1, int(rows_per_partition))))
        moved, new = [], []
        with _IdPartitions(parts, scratch) as partitions:
            for name in (PROTEINS, REJECTS):
                columns = ["id", "shard"] + (["reason"] if name == REJECTS else [])
                for batch in self.dataset(name).to_batches(columns=columns, batch_size=1 << 16):
                    partitions.add(batch, protein=name == PROTEINS)
            for part in partitions:
                found = _duplicates_in_partition(part)
                if found is not None:
                    moved.append(found[0])
                    new.append(found[1])
        if not moved:
            return 0
        with self.step("move duplicates"):
            self._move_duplicates(moved, new)
        return sum(t.num_rows for t in moved)

    def _move_duplicates(self, moved: list[pa.Table], new: list[pa.Table]) -> None:
        moved_t = pa.concat_tables(moved)  # (id, shard): proteins to delete
        new_t = pa.concat_tables(new)  # (id, shard, reason): rejects not written by an earlier, killed attempt
        # Write the rejects first, then delete: a kill in between leaves rows a rerun recognises (see above).
        if new_t.num_rows:
            wanted = pc.unique(new_t["id"]).to_pylist()
            source: dict[tuple[str, int], str] = {}
            for i in range(0, len(wanted), 20_000):  # one scan per 20,000 duplicate ids, not one per shard
                got = self.dataset(PROTEINS).to_table(columns=["id", "shard", "source"],
                                                      filter=f"id IN ({sql_in_list(wanted[i : i + 20_000])})")
                source.update(zip(zip(got["id"].to_pylist(), got["shard"].to_pylist()), got["source"].to_pylist()))
            ids, shards = new_t["id"].to_pylist(), new_t["shard"].to_pylist()
            table = pa.table({"id": ids, "source": [source[k] for k in zip(ids, shards)], "reason": new_t["reason"],
                              "shard": pa.array(shards, pa.int32())}, schema=self.schemas[REJECTS])
            lance.write_dataset(table, self.uri(REJECTS), mode="append", storage_options=self._options)
        # One delete (a scan of each table) per ~20,000 ids, whatever the number of shards they are spread over.
        clauses, size = [], 0
        for shard, ids, _ in _by_shard(moved_t):
            for chunk in range(0, len(ids), 20_000):
                part = ids[chunk : chunk + 20_000]
                clauses.append(f"(shard = {shard} AND id IN ({sql_in_list(part)}))")
                size += len(part)
                if size >= 20_000:
                    self._delete(" OR ".join(clauses))
                    clauses, size = [], 0
        if clauses:
            self._delete(" OR ".join(clauses))

    def _delete(self, predicate: str) -> None:
        if RESIDUES in self.schemas:
            self.dataset(RESIDUES).delete(predicate)
        self.dataset(PROTEINS).delete(predicate)

    def scalar_indexes(self) -> dict[str, list[str]]:
        """Build, or bring up to date, the BTREE indexes on `id` and `shard` of every data table (not the ledger:
        a row per shard). An update's `id IN (...)` deletes and the dedupe pass's lookups then read the index
        instead of scanning the table, and recovery's / readers' `shard IN (...)` filters likewise. Lance keeps an
        index valid across appends: fragments added since it was built are scanned (only those) until this is
        called again, which merges them in (`optimize_indices`, incremental). Called by the writing verbs at their
        end. Only an optimisation, like `compact`: a failure (disk full, say) is a warning and leaves the tables as
        they were (readers are correct with or without an index). Returns {table: [columns indexed or updated]}."""
        done: dict[str, list[str]] = {}
        for name in self.schemas:
            try:
                with self.step(f"index {name}"):  # an index commit is a write to the run: fenced like the others
                    self._scalar_indexes_of(name, done)
            except LeaseError:
                raise
            except Exception as err:  # noqa: BLE001 - see docstring
                log.warning("could not index %s by id and shard (lookups in it scan instead): %s", self.uri(name),
                            one_line(err))
        return done

    def _scalar_indexes_of(self, name: str, done: dict[str, list[str]]) -> None:
        """One table's part of `scalar_indexes`."""
        ds = self.dataset(name)
        if ds.count_rows() == 0:
            return  # nothing to index yet (Lance refuses an index of an empty table)
        have = {tuple(getattr(d, "field_names", []) or []): d for d in ds.describe_indices()}
        stale = []
        for column in SCALAR_INDEXED:
            if column not in ds.schema.names:
                continue
            current = have.get((column,))
            if current is None:
                ds.create_scalar_index(column, "BTREE", name=f"{column}_idx", replace=True)
                ds = self.dataset(name)
                done.setdefault(name, []).append(column)
            elif ds.stats.index_stats(current.name).get("num_unindexed_fragments", 0):
                stale.append(current.name)
        if stale:
            ds.optimize.optimize_indices(index_names=stale)
            done.setdefault(name, []).extend(n.removesuffix("_idx") for n in stale)

    def drop_derived_columns(self) -> list[str]:
        """Drop columns that readers added after the run wrote its rows (prefix columns of `rdscale index` and
        their vector indexes): rows added since read them as null, so an index built before a resume would
        silently miss the new rows. Dropping is metadata-only; `rdscale index` builds them again. Returns
        'table.column' of what was dropped."""
        dropped = []
        for name, schema in self.schemas.items():
            with self.step(f"drop derived {name}"):
                ds = self.dataset(name)
                extra = [c for c in ds.schema.names if c not in schema.names]
                if extra:
                    for index in ds.describe_indices() if hasattr(ds, "describe_indices") else []:
                        if set(getattr(index, "field_names", []) or []) & set(extra):
                            ds.drop_index(index.name)
                    self.dataset(name).drop_columns(extra)
                    dropped += [f"{name}.{c}" for c in extra]
        if dropped:
            log.warning("rows were added to the run: dropped the derived column(s) %s (and their indexes); run "
                        "`rdscale index` again", ", ".join(dropped))
        return dropped

    def compact(self) -> bool:
        """Merge small fragments. Only an optimisation: a failure (disk full, say) leaves the committed tables as
        they were and is reported as a warning, not as a failed run. Returns whether every table was compacted."""
        ok = True
        for name in self.schemas:
            try:
                with self.step(f"compact {name}"):
                    ds = self.dataset(name)
                    if len(ds.get_fragments()) > 1:
                        ds.optimize.compact_files()
            except LeaseError:
                raise
            except Exception as err:  # noqa: BLE001 - see docstring
                ok = False
                log.warning("compaction of %s failed, the table is intact but fragmented: %s", self.uri(name),
                            one_line(err))
        if not ok:
            self.cleanup_orphans()
        return ok

    def counts(self) -> dict[str, int]:
        out = {name: self.dataset(name).count_rows() for name in self.schemas}
        ledger = self.dataset(LEDGER).to_table(columns=["records"])
        out["records"] = int(pc.sum(ledger["records"]).as_py() or 0)
        return out


class ShardCommitter:
    """Driver side of an apply pass (`embed`, `update`): shards are committed once all their records came back, in
    groups whose rows make one fragment per table of about `rows` rows or `mb` MiB, whichever comes first
    (output.fragment_rows / fragment_mb), so a UniRef-sized table has thousands of fragments, not one per batch.

    The parts' rows (ShardResult.tables) are buffered here, per table. When any table's buffer reaches the target,
    every buffer is written as one fragment per table and appended (`flush`), rows of a shard still running
    included, which bounds the memory by the target; then the ledger rows of every shard complete by then go in
    one append, last. The commit protocol is the one of `RunStore.commit_shard`, for a group: a shard is committed
    exactly when its ledger row exists, and that row is written only after all of its rows were appended. A kill
    anywhere leaves rows of shards without a ledger row, which the next writer's `recover` deletes; shards finished
    but still buffered are redone (at most a group's worth of work). A shard bigger than the target spans several
    fragments. Parts that arrive as fragments already written (rows 0: a fragment per batch, the workers write)
    are appended when their shard completes, a shard per commit, as before groups.

    As a context manager: leaving it flushes the shards complete by then (also when the executor raised, so
    finished work is not lost), unless the error came from a flush itself."""

    def __init__(self, store: "RunStore", ledger_values, rows: int = 0, mb: float = 0.0, seconds: float = 0.0,
                 on_commit=None, clock=time.monotonic):
        self.store = store
        self.ledger_values = ledger_values  # (shard, ShardResult) -> (key, fingerprint for commit_shard)
        self.rows_target = int(rows)
        self.bytes_target = int(float(mb) * (1 << 20)) if self.rows_target > 0 else 0
        # A slow run (few rows a minute, or wide shards) would hold finished shards for hours before reaching the
        # size target: a kill would redo all of them, and `status` would show none committed.
        self.seconds_target = float(seconds) if self.rows_target > 0 else 0.0
        self.clock = clock
        self.last_flush = clock()
        self.on_commit = on_commit  # called with the number of shards each flush committed
        self.pending: dict[int, ShardResult] = {}  # shards not in the ledger yet: counts, fragments, provenance
        self.complete: list[int] = []  # of them, those whose records all came back
        self.buffers: dict[str, list[pa.Table]] = {}
        self.sizes: dict[str, list[int]] = {}  # per table: [rows, bytes] buffered
        self.broken = False  # a flush failed part way: nothing more is committed by this committer
        self.latencies: list[tuple[int, float]] = []  # (shards committed so far, seconds of that flush): benches

    def __enter__(self) -> "ShardCommitter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.flush(only_complete=True)
        elif not self.broken and issubclass(kind, (Exception, KeyboardInterrupt)):
            try:
                self.flush(only_complete=True)
            except BaseException as flush_err:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not commit the shards finished before the error: %s", one_line(flush_err))

    @property
    def incomplete(self) -> list[int]:
        """Shards some of whose records never came back (nothing of them is committed)."""
        return sorted(set(self.pending) - set(self.complete))

    def add(self, index: int, total: int, part: ShardResult) -> None:
        if self.broken:
            raise StoreError("an earlier commit of this pass failed; run the same command again to resume")
        tables, part.tables = part.tables, {}
        acc = self.pending.setdefault(index, ShardResult(shard=index, fragments={}))
        acc.add(part)
        for name, parts in tables.items():
            for t in parts:
                if t.num_rows:
                    self.buffers.setdefault(name, []).append(t)
                    size = self.sizes.setdefault(name, [0, 0])
                    size[0] += t.num_rows
                    size[1] += t.nbytes
        if acc.records == total and index not in self.complete:
            self.complete.append(index)
            if self.rows_target <= 0:
                self.flush()
        if self.rows_target > 0 and any(r >= self.rows_target or b >= self.bytes_target
                                        for r, b in self.sizes.values()):
            self.flush()
        elif self.seconds_target > 0 and self.complete and self.clock() - self.last_flush >= self.seconds_target:
            self.flush()

    def flush(self, only_complete: bool = False) -> int:
        """Append the buffered rows (only_complete: only those of complete shards) and the fragments of complete
        shards to their tables, then the complete shards' ledger rows. Returns the shards committed."""
        if not self.complete and not self.buffers:
            return 0
        started = time.perf_counter()
        store, done = self.store, list(self.complete)
        self.broken = True  # until the whole group is committed
        rows: dict[str, pa.Table] = {}
        for name, parts in self.buffers.items():
            table = pa.concat_tables(parts)
            if only_complete:
                table = table.filter(pc.is_in(table["shard"], pa.array(done, pa.int32())))
            if table.num_rows:
                rows[name] = table
        written = {name: [f for s in done for f in self.pending[s].fragments.get(name, [])]
                   for name in store.schemas}
        # Data files first, outside the commit gate (they are invisible until appended); unreferenced if we die.
        for name, table in rows.items():
            written[name] += write_table_fragments(store.uri(name), table, one_fragment=True)
        shards = sorted(set(done).union(*(pc.unique(t["shard"]).to_pylist() for t in rows.values())))
        with store.step("commit check"):
            if shards and store.dataset(LEDGER).count_rows(filter=f"shard IN ({', '.join(map(str, shards))})"):
                raise StoreError(f"shard(s) among {shards} of {store.root} are already in the ledger; stopping "
                                 "without committing them twice")
        fault_point("before_tables")
        for name in store.schemas:
            frags = written.get(name)
            if frags:
                store.append_fragments(name, frags)
                fault_point("between_tables")
        self.buffers, self.sizes = {}, {}
        if done:
            fault_point("before_ledger")
            store.append_ledger([(self.pending[s], *self.ledger_values(s, self.pending[s])) for s in done])
            fault_point("after_ledger")
        for s in done:
            del self.pending[s]
        self.complete = []
        self.broken = False
        self.last_flush = self.clock()
        committed = self.latencies[-1][0] if self.latencies else 0
        self.latencies.append((committed + len(done), time.perf_counter() - started))
        if self.on_commit is not None and done:
            self.on_commit(len(done))
        return len(done)


FAULT_HOOKS: dict[str, Any] = {}  # tests: point -> callable, run when the commit protocol reaches that point


def fault_point(point: str) -> None:
    """Test hook at each step of a shard's commit (before_tables, between_tables, before_ledger, after_ledger).
    In-process tests register callables in FAULT_HOOKS (to interrupt, fill the disk, start a second writer); a test
    that runs rdscale as a subprocess sets RDSCALE_FAULT_HOLD=<file> to hold the writer after each ledger commit
    while <file> exists (lease held, so another writer, a kill -9 or a takeover can be staged deterministically)."""
    hook = FAULT_HOOKS.get(point)
    if hook is not None:
        hook()
    pause_point(point)
    hold = os.environ.get("RDSCALE_FAULT_HOLD")
    if hold and point == "after_ledger":
        while os.path.exists(hold):
            time.sleep(0.05)


DUPLICATE_REASON = "duplicate_id: first seen in shard "
_PARTITION_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int32()), ("protein", pa.bool_()),
                               ("reason", pa.string())])


class _IdPartitions(HashPartitions):
    """(id, shard, protein?, reason) rows split by id (rdscale.io.partitions)."""

    def __init__(self, parts: int, scratch: str | Path | None = None):
        super().__init__(parts, _PARTITION_SCHEMA, "id", scratch)

    def add(self, batch: pa.RecordBatch, protein: bool) -> None:
        n = batch.num_rows
        reason = batch.column("reason") if "reason" in batch.schema.names else pa.nulls(n, pa.string())
        super().add(pa.record_batch([batch.column("id").cast(pa.string()), batch.column("shard").cast(pa.int32()),
                                     pa.array(np.full(n, protein)), reason.cast(pa.string())],
                                    schema=_PARTITION_SCHEMA))


def _duplicates_in_partition(part: pa.Table) -> tuple[pa.Table, pa.Table] | None:
    """part: (id, shard, protein, reason) rows of one id partition -> (proteins to move: (id, shard), reject rows
    still to write: (id, shard, reason)), or None when the partition holds no duplicate."""
    first = part.group_by("id").aggregate([("shard", "min"), ("shard", "count")])
    first = first.filter(pc.greater(first["shard_count"], 1)).select(["id", "shard_min"])
    if first.num_rows == 0:
        return None
    proteins = part.filter(part["protein"]).select(["id", "shard"])
    joined = proteins.join(first, "id").filter(pc.greater(pc.field("shard"), pc.field("shard_min")))
    if joined.num_rows == 0:
        return None
    reason = pc.binary_join_element_wise(DUPLICATE_REASON, pc.cast(joined["shard_min"], pa.string()), "")
    wanted = pa.table({"id": joined["id"], "shard": joined["shard"], "reason": reason})
    # A rerun after a kill between writing these rejects and deleting the proteins must not write them twice.
    written = part.filter(pc.invert(part["protein"])).select(["id", "shard", "reason"])
    new = wanted.join(written, ["id", "shard", "reason"], join_type="left anti")
    return joined.select(["id", "shard"]), new


def _by_shard(table: pa.Table):
    """(shard, ids, reasons or None) per shard of an (id, shard[, reason]) table, shards ascending."""
    table = table.sort_by([("shard", "ascending"), ("id", "ascending")])
    shards = table["shard"].to_numpy()
    if not len(shards):
        return
    cuts = np.flatnonzero(np.diff(shards)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(shards)]):
        chunk = table.slice(int(lo), int(hi - lo))
        reasons = chunk["reason"].to_pylist() if "reason" in chunk.column_names else None
        yield int(shards[lo]), chunk["id"].to_pylist(), reasons


def sql_str(value: str) -> str:
    """A string literal for a Lance SQL filter (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def sql_in_list(values) -> str:
    """`'a', 'b', ...` for an `IN (...)` filter."""
    return ", ".join(sql_str(v) for v in values)


# ------------------------------------------------------------------------------------------ errors and status


def one_line(err: BaseException) -> str:
    """An exception as one line: Lance's IO errors carry a Rust source location after the message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(", /")[0].replace("LanceError(IO): ", "")


def storage_error(err: BaseException, location: str | Path) -> StoreError | None:
    """A one-line StoreError naming `location` when `err` (or what caused it, also inside Ray's wrappers) is a
    storage problem a user can fix (disk full, quota, permissions, read-only); None for anything else. The wording
    is the error contract's own (rdscale.errors.write_problem), so a CLI user sees the same line either way."""
    message = write_problem(err, location)
    return StoreError(message) if message else None


def reader_filter(table_uri: str | Path | Location, user_filter: str | None = None) -> str | None:
    """For readers of a run's table (search, index): `user_filter` narrowed to the rows of committed shards, with a
    warning when the run is incomplete. Tables outside an rdscale run (no ledger beside them) are returned
    unfiltered. Local directories and object-store prefixes alike."""
    table = Location.parse(table_uri)
    run = Run(table.parent)
    if not run.has_table(LEDGER):
        return user_filter
    missing = missing_data_files(table)
    if missing:
        raise StoreError(f"{table} is damaged: {len(missing)} data file(s) are missing (e.g. {missing[0]}); "
                         f"run `rdscale verify {run}`, then rerun the run into a new output.dir")
    status = run.status()
    why = incomplete_message(status)
    if why:
        log.warning("%s is %s; reading the committed shards' rows only", run, why)
    updating = run.update_in_progress()
    if updating:
        log.warning("%s: %s", run, updating)
    committed = run.committed_filter(status)
    if committed is None:
        return user_filter
    return committed if not user_filter else f"({committed}) AND ({user_filter})"


def unfinished_writes(table_uri: str | Path | Location) -> str | None:
    """Why a run's table is not in a state to build a lasting derivative (an index) from: a partial run (its table
    holds rows of uncommitted shards) or an update running or interrupted; None when it is, or outside a run."""
    run = Run(Location.parse(table_uri).parent)
    if not run.has_table(LEDGER):
        return None
    why = incomplete_message(run.status())
    if why:
        return (f"{run} is {why}: finish the run (rerun the same command) first; search reads its committed rows "
                "meanwhile")
    updating = run.update_in_progress()
    return f"{updating}" if updating else None


def missing_data_files(table_uri: str | Path | Location) -> list[str]:
    """Data files the table's current version references but that are gone (a damaged run), as paths or URIs.
    One listing of the table's data folder, so an object store answers in one request (per 1000 files)."""
    table = Location.parse(table_uri)
    ds = open_dataset(table)
    data = table.join("data")
    referenced = [d.path for fragment in ds.get_fragments() for d in fragment.data_files()]
    if not referenced:
        return []
    present = {loc.relative_to(data) for loc in data.walk()}
    return [data.join(path).uri for path in referenced if path not in present]
