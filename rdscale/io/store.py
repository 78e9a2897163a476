"""Lance tables of a run: proteins, residues, rejects (DESIGN.md section 5), plus a ledger of committed shards.

Writes are split the way Lance intends for distributed jobs: workers write data files (`write_fragments`, which
returns small fragment descriptions) and the driver commits them, one input shard at a time, with
`LanceDataset.commit`. A shard is done when its row in the `shards` ledger is committed, which happens last; on
resume, rows of shards that have no ledger row (a run killed between two tables' commits) are deleted first, so
a restarted run ends with exactly the rows of an uninterrupted one.

Every row carries `shard` (its index in the run's shard plan) for that recovery and for provenance.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from rdscale import __version__
from rdscale.errors import RdscaleError
from rdscale.io.location import Location
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
    open_dataset,
)
from rdscale.io.runs import read_metadata as _read_metadata

log = logging.getLogger(__name__)


class StoreError(RdscaleError, RuntimeError):
    """The output directory cannot be used for this run; the message says why and what to do."""


RESIDUE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def run_schemas(
    width: int,
    storage_width: int | None,
    metadata: dict[bytes, bytes],
    residues: bool = True,
    residue_dtype: str = "float16",
) -> dict[str, pa.Schema]:
    """Arrow schemas of a run's tables. width: k_m of the chain; storage_width: per-residue prefix stored."""
    d = width if storage_width is None else storage_width
    if not 1 <= d <= width:
        raise StoreError(f"output.storage_width={d} must be between 1 and the embedding width {width}")
    if residue_dtype not in RESIDUE_DTYPES:
        raise StoreError(f"output.residue_dtype must be one of {sorted(RESIDUE_DTYPES)}, got {residue_dtype!r}")
    schemas = {
        PROTEINS: pa.schema(
            [
                ("id", pa.string()),
                ("description", pa.string()),
                ("length", pa.int32()),
                ("sequence", pa.string()),
                ("source", pa.string()),
                ("embedding", pa.list_(pa.float32(), width)),
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
    """rows: dicts with id, description, sequence, source; embeddings: (n, k_m) float32 per-protein means."""
    n = len(rows)
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "description": [r["description"] for r in rows],
            "length": pa.array([len(r["sequence"]) for r in rows], pa.int32()),
            "sequence": [r["sequence"] for r in rows],
            "source": [r["source"] for r in rows],
            "embedding": _fixed_list(embeddings.astype(np.float32, copy=False).reshape(n, -1), pa.float32()),
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
    lengths = [len(e) for e in per_residue]
    total = int(sum(lengths))
    ids = np.repeat(np.array([r["id"] for r in rows], dtype=object), lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if total else np.zeros(0, np.int32)
    aa = [ch for r, n in zip(rows, lengths) for ch in r["sequence"][:n]]
    stacked = np.concatenate(per_residue, axis=0) if total else np.zeros((0, d), np.float32)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "pos": pa.array(pos, pa.int32()),
            "aa": pa.array(aa, pa.string()),
            "embedding": _fixed_list(stacked[:, :d].astype(value_type.to_pandas_dtype()), value_type),
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


def write_table_fragments(uri: str, table: pa.Table) -> list[str]:
    """Worker side: write `table` as new data files of the dataset at `uri`, uncommitted.
    Returns the fragments as JSON so they travel between processes as plain strings."""
    if table.num_rows == 0:
        return []
    out = []
    options = Location.parse(uri).storage_options or None
    for frag in write_fragments(table, uri, schema=table.schema, storage_options=options):
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

    def add(self, other: "ShardResult") -> None:
        for name, frags in other.fragments.items():
            self.fragments.setdefault(name, []).extend(frags)
        self.records += other.records
        self.proteins += other.proteins
        self.rejects += other.rejects
        self.residues += other.residues


class RunStore:
    """The Lance tables of one run directory, opened by the driver."""

    def __init__(self, out_dir: str | Path | Location, schemas: dict[str, pa.Schema], run_key: str):
        self.run = Run(out_dir)
        self.root = self.run.location
        self.schemas = schemas
        self.run_key = run_key
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
        if dataset_exists(uri):
            found = self.dataset(name).schema
            key = (found.metadata or {}).get(META_RUN_KEY, b"").decode()
            if key != self.run_key:
                raise StoreError(
                    f"{uri} holds the output of a different run (different inputs, models, fit or storage "
                    f"settings). Choose a new output.dir, or delete {self.root} to start over."
                )
            return
        try:
            lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, []), storage_options=self._options)
        except (OSError, ValueError) as err:
            if self.root.is_local:
                raise
            raise Location.parse(uri).error(err, "create the Lance dataset") from None

    def dataset(self, name: str) -> lance.LanceDataset:
        return open_dataset(self.uri(name))

    def committed(self) -> dict[int, dict[str, Any]]:
        """Ledger rows of the shards whose output is complete, by shard index."""
        table = self.dataset(LEDGER).to_table()
        return {row["shard"]: row for row in table.to_pylist()}

    def recover(self) -> int:
        """Delete rows left by shards that never reached the ledger (a run killed mid-commit). Returns rows deleted."""
        done = sorted(self.committed())
        deleted = 0
        for name in self.schemas:
            ds = self.dataset(name)
            predicate = f"shard NOT IN ({', '.join(map(str, done))})" if done else "shard >= -2147483648"
            stray = ds.count_rows(filter=predicate)
            if stray:
                log.warning("removing %d rows of uncommitted shards from %s", stray, name)
                ds.delete(predicate)
                deleted += stray
        return deleted

    def commit_shard(self, result: ShardResult, key: str) -> None:
        """Driver side: make one shard's fragments visible, table by table, then record it in the ledger."""
        for name, frags in result.fragments.items():
            if not frags:
                continue
            ds = self.dataset(name)
            op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in frags])
            lance.LanceDataset.commit(self.uri(name), op, read_version=ds.version, storage_options=self._options)
        row = pa.table(
            {
                "shard": pa.array([result.shard], pa.int32()),
                "key": [key],
                "records": pa.array([result.records], pa.int64()),
                "proteins": pa.array([result.proteins], pa.int64()),
                "rejects": pa.array([result.rejects], pa.int64()),
                "residues": pa.array([result.residues], pa.int64()),
            },
            schema=LEDGER_SCHEMA,
        )
        lance.write_dataset(row, self.uri(LEDGER), mode="append", storage_options=self._options)

    def write_and_commit(self, result: ShardResult, tables: dict[str, pa.Table], key: str) -> None:
        """Single-process convenience: write the tables' fragments here and commit them as one shard."""
        for name, table in tables.items():
            result.fragments.setdefault(name, []).extend(write_table_fragments(self.uri(name), table))
        self.commit_shard(result, key)

    def dedupe_across_shards(self) -> int:
        """Reject later occurrences of an id already seen in an earlier shard (the readers reject duplicates
        within a shard). 'Earlier' is shard order, which is input order. Idempotent, so safe to rerun after a kill.
        Returns the number of proteins moved to the rejects table."""
        proteins = self.dataset(PROTEINS).to_table(columns=["id", "shard", "source"])
        rejects = self.dataset(REJECTS).to_table(columns=["id", "shard", "reason"])
        if proteins.num_rows == 0:
            return 0
        seen = pa.concat_tables([proteins.select(["id", "shard"]), rejects.select(["id", "shard"])])
        first = seen.group_by("id").aggregate([("shard", "min"), ("shard", "count")])
        first = first.filter(pc.greater(first["shard_count"], 1))
        if first.num_rows == 0:
            return 0
        joined = proteins.join(first, "id").filter(
            pc.greater(pc.field("shard"), pc.field("shard_min"))
        )
        if joined.num_rows == 0:
            return 0
        # A rerun after a kill between writing these rejects and deleting the proteins must not write them twice;
        # the reason text is specific to this step (the readers' within-shard duplicates word it differently).
        already = {(r["id"], r["shard"], r["reason"]) for r in rejects.to_pylist()}
        new_rejects = []
        for r in joined.to_pylist():
            reason = f"duplicate_id: first seen in shard {r['shard_min']}"
            if (r["id"], r["shard"], reason) not in already:
                new_rejects.append({"id": r["id"], "source": r["source"], "reason": reason, "shard": r["shard"]})
        if new_rejects:
            table = pa.Table.from_pylist(new_rejects, schema=self.schemas[REJECTS])
            lance.write_dataset(table, self.uri(REJECTS), mode="append", storage_options=self._options)
        by_shard: dict[int, list[str]] = {}
        for r in joined.to_pylist():
            by_shard.setdefault(r["shard"], []).append(r["id"])
        for shard, ids in by_shard.items():
            predicate = f"shard = {shard} AND id IN ({sql_in_list(ids)})"
            if RESIDUES in self.schemas:
                self.dataset(RESIDUES).delete(predicate)
            self.dataset(PROTEINS).delete(predicate)
        return joined.num_rows

    def compact(self) -> None:
        for name in self.schemas:
            ds = self.dataset(name)
            if len(ds.get_fragments()) > 1:
                ds.optimize.compact_files()

    def counts(self) -> dict[str, int]:
        out = {name: self.dataset(name).count_rows() for name in self.schemas}
        ledger = self.dataset(LEDGER).to_table(columns=["records"])
        out["records"] = int(pc.sum(ledger["records"]).as_py() or 0)
        return out


def sql_str(value: str) -> str:
    """A string literal for a Lance SQL filter (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def sql_in_list(values) -> str:
    """`'a', 'b', ...` for an `IN (...)` filter."""
    return ", ".join(sql_str(v) for v in values)


def read_metadata(path: str | Path | Location) -> dict[str, Any]:
    """The rdscale metadata of a run's table (proteins.lance etc.), decoded (see rdscale.io.runs)."""
    return _read_metadata(path)

