"""What a run is made of, and the checks that keep a resumed run from mixing two versions of anything.

- Each committed shard's ledger row holds a digest of the records its byte range held when it was read (computed by
  the reader, `RecordsDigest`), and the input file's size and mtime at the time. On resume, a committed shard whose
  file's size, mtime or content changed is read again and its digest compared; a shard whose byte range no longer
  matches the plan (the file grew or shrank) counts as changed too. Changed shards refuse the run
  (`InputChangedError`, naming the file) unless the caller asks to redo them.
- Content, not only mtime: every start of a run hashes each local input file in full (sha256, `content_digests`)
  and records the digests in the run's plan file; a file whose digest differs from the recorded one has its
  committed shards read again even when its size and mtime are unchanged (an edit in place with the mtime restored:
  rsync -t, cp -p, make). Objects on a store are not hashed: their modification time is set by the server on every
  write and cannot be restored by a client, so size and mtime identify their content.
- The run's plan (number of shards and their keys) is written to `run_plan.json`, so readers can tell a complete
  run from a partial one and the end of a run can check the plan, not only the shards that started.
- The end-of-run accounting compares, shard by shard, the ledger's record count with the rows in proteins and
  rejects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow.compute as pc

from rdscale.errors import RdscaleError
from rdscale.io.fasta import Record, Reject, Shard, ValidationOptions, read_shard
from rdscale.io.lease import WriterLease
from rdscale.io.location import Location
from rdscale.io.runs import FIT, PARTIAL_FIT, Run
from rdscale.io.store import (
    PROTEINS,
    REJECTS,
    RunStore,
    StoreError,
    storage_error,
)

log = logging.getLogger(__name__)


class InputChangedError(RdscaleError, ValueError):
    """An input file changed under committed shards; the message names the file and what to do."""


class RecordsDigest:
    """Digest of a shard's records in reading order: everything the shard's output depends on (offset, id,
    description and sequence of accepted records; offset, id and reason of rejects)."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, item: Record | Reject) -> None:
        if isinstance(item, Reject):
            line = f"J\t{item.offset}\t{item.id}\t{item.reason}\n"
        else:
            line = f"R\t{item.offset}\t{item.id}\t{item.description}\t{item.sequence}\n"
        self._h.update(line.encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


EMPTY_DIGEST = RecordsDigest().hexdigest()


def shard_digest(shard: Shard, options: ValidationOptions) -> str:
    digest = RecordsDigest()
    for item in read_shard(shard, options):
        digest.update(item)
    return digest.hexdigest()


DUPS_KEY = "#dups="  # what follows a shard key's byte range when the shard shares identical sequences


def key_range(key: str) -> str:
    """A ledger key without its identical-sequence assignment: the file and byte range alone."""
    return key.split(DUPS_KEY, 1)[0]


def shard_key(shard: Shard) -> str:
    """The shard's byte range, with the file named by its absolute path (independent of the working directory)."""
    loc = Location.parse(shard.path)
    name = os.path.abspath(loc.path) if loc.is_local else loc.uri
    # a shard that shares identical sequences with others (rdscale.run.dedupe) names that assignment too
    return f"{name}@{shard.start}-{'eof' if shard.end is None else shard.end}{getattr(shard, 'key_suffix', '')}"


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a local file or an object (objects without a modification time: 0)."""
    found = Location.parse(path).fingerprint()
    return found["size"], found["mtime_ns"] or 0


def fingerprints(shards: Sequence[Shard]) -> dict[int, dict[str, Any]]:
    """Per planned shard: its file's size and mtime now (taken before any shard is read, so an edit during the run
    shows up as a changed mtime on the next one)."""
    stats = {path: file_stat(path) for path in {s.path for s in shards}}
    return {s.index: {"file_size": stats[s.path][0], "file_mtime_ns": stats[s.path][1]} for s in shards}


INPUTS_KEY = "inputs"  # in the plan file: {input name: sha256 of its content} at the last start of the run


def content_digests(paths: Iterable[str]) -> dict[str, str]:
    """{input name (shard_key's): sha256 of the whole file} for the local files among `paths` (objects: see the
    module docstring). Streams the file; costs one sequential read (bench/input_hash.py measures it)."""
    out = {}
    for path in dict.fromkeys(paths):
        loc = Location.parse(path)
        if not loc.is_local:
            continue
        with open(loc.path, "rb") as f:
            out[os.path.abspath(loc.path)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _input_name(path: str) -> str:
    loc = Location.parse(path)
    return os.path.abspath(loc.path) if loc.is_local else loc.uri


def changed_shards(store: RunStore, shards: Sequence[Shard], options: ValidationOptions,
                   contents: dict[str, str] | None = None) -> dict[int, str]:
    """Committed shards that no longer match the input: {shard index: why}. A committed shard is read again only
    when its file's size or mtime differs from what the ledger recorded, or its content digest (`contents`, of
    now) from the one recorded at the run's last start."""
    ledger = store.committed()
    now = fingerprints(shards)
    recorded = (read_plan(store.root) or {}).get(INPUTS_KEY) or {}
    contents = contents or {}
    changed: dict[int, str] = {}
    for index, row in sorted(ledger.items()):
        if index >= len(shards):
            changed[index] = f"shard {index} ({row['key']}) is no longer in the input's shard plan"
            continue
        shard = shards[index]
        if row["key"] != shard_key(shard):
            if key_range(row["key"]) == key_range(shard_key(shard)):
                changed[index] = "the identical sequences it shares with other shards changed"
            else:
                changed[index] = f"its byte range moved ({row['key']} is now {shard_key(shard)})"
            continue
        fp = now[index]
        name = _input_name(shard.path)
        same_content = recorded.get(name) is None or contents.get(name) in (None, recorded[name])
        if row.get("file_size") == fp["file_size"] and row.get("file_mtime_ns") == fp["file_mtime_ns"] \
                and same_content:
            continue
        if not row.get("digest") or shard_digest(shard, options) != row["digest"]:
            changed[index] = f"its content changed ({shard.path} bytes {shard.start}-{shard.end or 'eof'})"
    # A shard that rejected a duplicate id because a changed shard held it first must be judged again.
    if changed:
        rejects = store.dataset(REJECTS).to_table(columns=["shard", "reason"])
        for shard, reason in zip(rejects["shard"].to_pylist(), rejects["reason"].to_pylist()):
            if reason.startswith("duplicate_id: first seen in shard "):
                first = int(reason.rsplit(" ", 1)[1])
                if first in changed and shard not in changed:
                    changed[shard] = f"it rejected an id as a duplicate of changed shard {first}"
    return changed


def refuse_or_redo(store: RunStore, shards: Sequence[Shard], options: ValidationOptions, redo: bool) -> list[int]:
    """Raise InputChangedError when committed shards no longer match the input, unless `redo`: then delete their
    rows and ledger rows (under the lease) so they are embedded again. Returns the shards forgotten. Records the
    inputs' content digests of now for the next start's check (once nothing committed contradicts them)."""
    contents = content_digests(s.path for s in shards)
    changed = changed_shards(store, shards, options, contents)
    if not changed:
        _record_contents(store, contents)
        return []
    by_file: dict[str, list[int]] = {}
    ledger = store.committed()
    for index in changed:
        path = shards[index].path if index < len(shards) else ledger[index]["key"].rsplit("@", 1)[0]
        by_file.setdefault(path, []).append(index)
    if not redo:
        path, indices = next(iter(by_file.items()))
        first = changed[indices[0]]
        others = f" (and {len(by_file) - 1} more file(s))" if len(by_file) > 1 else ""
        raise InputChangedError(
            f"{path}{others} changed since it was embedded into {store.root}: {len(changed)} committed shard(s) no "
            f"longer match the input (shard {indices[0]}: {first}); rerun with --redo-changed to redo exactly "
            "those shards, or --restart to start the run over"
        )
    forgotten = sorted(changed)
    log.warning("redoing %d shard(s) whose input changed: %s", len(forgotten),
                "; ".join(f"{i}: {changed[i]}" for i in forgotten))
    store.forget_shards(forgotten)
    _record_contents(store, contents)
    return forgotten


def _record_contents(store: RunStore, contents: dict[str, str]) -> None:
    plan = read_plan(store.root) or {}
    if plan.get(INPUTS_KEY) != contents:
        store.run.plan.write_text(json.dumps({**plan, INPUTS_KEY: contents}, indent=1))


def write_plan(store: RunStore, shards: Sequence[Shard]) -> None:
    """Record the run's shard plan next to its tables (atomically), for readers and for the end-of-run check."""
    payload = {"run_key": store.run_key, "shards": len(shards), "keys": [shard_key(s) for s in shards],
               INPUTS_KEY: (read_plan(store.root) or {}).get(INPUTS_KEY) or {}}  # kept: refuse_or_redo's
    with store.step("plan"):
        store.run.plan.write_text(json.dumps(payload, indent=1))  # atomic: temp file + rename, or one PUT


def read_plan(root: str | Path | Location) -> dict[str, Any] | None:
    path = Run(root).plan
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RdscaleError):
        return None


def check_complete(store: RunStore, shards: Sequence[Shard], accounting: bool = True) -> None:
    """The end of `run`/`embed`: every planned shard is in the ledger under its planned key, and (accounting) in
    every shard the ledger's record count equals its proteins + rejects rows (every input record in exactly one of
    them; reads the tables' `shard` column)."""
    ledger = store.committed()
    missing = [s.index for s in shards if s.index not in ledger]
    if missing:
        raise StoreError(
            f"incomplete: {len(shards) - len(missing)} of {len(shards)} shards committed in {store.root} (missing "
            f"{_ranges(missing)}); run the same command again to finish"
        )
    wrong = [s.index for s in shards if ledger[s.index]["key"] != shard_key(s)]
    extra = sorted(set(ledger) - {s.index for s in shards})
    if wrong or extra:
        raise StoreError(f"the ledger of {store.root} does not match the shard plan (shards "
                         f"{_ranges(wrong + extra)}); rerun with --redo-changed")
    if not accounting:
        return
    rows = {name: rows_per_shard(store, name) for name in (PROTEINS, REJECTS)}
    bad = []
    for index, row in sorted(ledger.items()):
        have = rows[PROTEINS].get(index, 0) + rows[REJECTS].get(index, 0)
        if have != row["records"]:
            bad.append(f"shard {index}: {row['records']} records, {have} rows")
    if bad:
        raise StoreError(f"accounting mismatch in {store.root}: {'; '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}; run `rdscale verify {store.root}`")


def rows_per_shard(tables: Any, name: str) -> dict[int, int]:
    """{shard: rows} of table `name` of `tables` (a RunStore or a Run: anything with `.dataset(name)`)."""
    table = tables.dataset(name).to_table(columns=["shard"])
    if table.num_rows == 0:
        return {}
    counts = pc.value_counts(table["shard"])
    return {int(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def residue_rows(lengths, cfg: Any):
    """(n,) residue rows stored for proteins of these (n,) lengths (`cfg`: the run's Config): one per position,
    only the first embedding.window under long_policy truncate."""
    if cfg.embedding.long_policy == "truncate":
        return pc.min_element_wise(lengths, cfg.embedding.window)
    return lengths


def _ranges(indices: Iterable[int]) -> str:
    items = sorted(set(indices))
    text = ", ".join(map(str, items[:10]))
    return text + (f" and {len(items) - 10} more" if len(items) > 10 else "")


# ------------------------------------------------------------------------------------------------ run location

def clear_run(root: Path, keep_fit: bool = False) -> None:
    """--restart: delete what rdscale wrote in a run directory (never other files), keeping the writer lease (and
    the fit, for `embed --restart`, which applies it)."""
    if not root.exists():
        return
    for entry in root.iterdir():
        name = entry.name
        if keep_fit and name == FIT:
            continue
        if Run.is_written(name):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    log.warning("--restart: deleted the previous output in %s", root)


def clear_stale_staging(root: Path, keep: str | None = None) -> None:
    """Remove fit staging directories of earlier, dead runs (the caller holds the lease, so none is live)."""
    if not root.exists():
        return
    for entry in root.glob(f"{PARTIAL_FIT}*"):
        if entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def writing(location: str | Path, lease: WriterLease | None = None) -> Iterator[WriterLease]:
    """Hold the run location's writer lease for the block (or reuse `lease`, already held by the caller), and turn
    storage errors a user can fix (disk full, permissions, read-only) into one-line StoreErrors naming it."""
    try:
        if lease is not None:
            yield lease
            return
        with WriterLease(location) as held:
            yield held
    except Exception as err:
        problem = storage_error(err, location)
        if problem is None:
            raise
        raise problem from err
