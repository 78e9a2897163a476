"""`rdscale update RUN --fasta NEW_RELEASE...`: follow a database release by release, embedding only what changed.

An update compares every record of the new release with the run by id and sequence digest (blake2b of the
sequence, computed from the run's stored `sequence` column: no extra column, no schema change) and then

1. embeds only the new and changed sequences, with the run's own models and frozen fit (and, for a run grown by
   `rdscale extend`, its extension steps and their models), through the same stages and executor as `embed`
   (local or Ray). The new rows are committed shard by shard into the run's ledger as shards
   `base + i` (base: one past the run's highest shard) under the key `update:<release>:<shard key>`, so an
   interrupted update resumes from its last committed shard exactly like `run`;
2. deletes the rows of ids that are gone and the old rows of changed ids (rows of shards below `base` only, so a
   rerun never deletes what this update wrote), and every old reject (the release's rejects are written anew);
3. corrects the ledger rows of the old shards to the rows they still hold (one atomic merge), so the run's
   accounting (`check_complete`) holds again;
4. tags the current version of every table with the release name (Lance tags). Before the first update, the run's
   versions are tagged `initial` (or `--previous NAME`), so every earlier release stays readable by tag or
   version (`lance.dataset(uri, version="2024_01")`, `rdscale search --release`).

Unchanged rows are never rewritten: their embeddings stay bit-identical, and their `source` keeps pointing at the
release they were embedded from (file:offset there). The comparison is made against the table versions recorded
when the update started (`updates.json` in the run), so a resumed update finds exactly the same work.

Memory is bounded: the (id, digest) pairs of the run and of the release are hash-partitioned by id and spilled to
a scratch folder when there are more than `rows_per_partition` of them (as `dedupe_across_shards` does); the driver
holds one partition, plus the ids to embed and the ids to delete.

The whole update holds the run's writer lease: a second update (or a `run`, `extend`, `compact`) of the same run is
refused while one is in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rdscale.config import Config
from rdscale.errors import RdscaleError
from rdscale.io.fasta import Record, Shard, ValidationOptions, read_shard
from rdscale.io.headcount import file_headers
from rdscale.io.location import Location, set_storage_options
from rdscale.io.runs import (
    LEDGER,
    META_RUN_KEY,
    PROTEINS,
    REJECTS,
    RESIDUES,
    Run,
)
from rdscale.io.store import (
    LEDGER_SCHEMA,
    RunStore,
    StoreError,
    _IdPartitions,
    incomplete_message,
    run_schemas,
    sql_in_list,
)
from rdscale.model.loading import describe_model  # torch: imported with run.pipeline's stages anyway
from rdscale.progress import Progress
from rdscale.run import dedupe, provenance
from rdscale.run.dedupe import DedupShard, seq_digest
from rdscale.run.integrity import fingerprints, residue_rows, rows_per_shard, writing
from rdscale.run.executor import make_executor
from rdscale.run.pipeline import committer_for, ledger_values, plan

log = logging.getLogger(__name__)

FOLLOWED = "followed-"  # run key prefix of a run that `rdscale update` moved to another release
INITIAL = "initial"  # the tag of a run's versions before its first update
TABLES = (PROTEINS, RESIDUES, REJECTS, LEDGER)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# ids per delete predicate: each delete scans the table once, so fewer, larger IN lists (DataFusion hashes them)
# are faster; measured on 4M rows: 400k ids in chunks of 20k 5.7 s, of 100k 3.3 s, of 400k 2.9 s
_CHUNK = 200_000


class UpdateError(RdscaleError, ValueError):
    """An update that cannot be made as asked (bad release name, another release interrupted, a fit gone...)."""


@dataclass(frozen=True)
class UpdateShard(DedupShard):
    """A shard of the new release of which only the accepted records whose id is in `keep` are embedded (the others
    are unchanged and already in the run); its rejects are all kept. `rdscale.run.stages.shard_rows` honours it."""

    keep: frozenset = frozenset()


def _stored_dtype(schema: pa.Schema) -> str:
    """The proteins table's embedding dtype (output.protein_dtype of the run): a release keeps it."""
    return "float16" if schema.field("embedding").type.value_type == pa.float16() else "float32"


def _input_name(path: str) -> str:
    """An input as the update records it: an absolute path, or the URI (independent of the working directory)."""
    loc = Location.parse(path)
    return os.path.abspath(loc.path) if loc.is_local else loc.uri


@dataclass
class UpdateReport:
    release: str
    previous: str
    unchanged: int = 0
    changed: int = 0
    new: int = 0
    removed: int = 0
    rejects: int = 0  # of the new release
    relabelled: int = 0  # unchanged sequences whose description changed (description replaced, not embedded)
    copies: int = 0  # new/changed records whose identical sequence was embedded once for all (dedupe_sequences)
    residues_saved: int = 0
    residues_release: int = 0  # of the new release's accepted records: what a full rerun would embed
    residues_embedded: int = 0  # by this update (all its shards, also those of an interrupted earlier attempt)
    residues_this_call: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # committed by an earlier, interrupted attempt
    seconds: float = 0.0
    proteins: int = 0  # rows after the update
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def fraction_embedded(self) -> float:
        return self.residues_embedded / self.residues_release if self.residues_release else 0.0

    def lines(self) -> list[str]:
        return [
            f"release {self.release} (previous: {self.previous})",
            f"unchanged: {self.unchanged}   changed: {self.changed}   new: {self.new}   removed: {self.removed}   "
            f"rejects: {self.rejects}   (unchanged with a new description: {self.relabelled})",
            f"residues embedded: {self.residues_embedded} of {self.residues_release} "
            f"({100 * self.fraction_embedded:.1f}% of a full rerun)   this call: {self.residues_this_call} in "
            f"{self.seconds:.1f} s",
            f"shards: {self.shards_total} ({self.shards_skipped} already committed, skipped)",
            *([f"identical sequences: {self.copies} new/changed record(s) written as copies "
               f"({self.residues_saved:,} residues saved)"] if self.copies else []),
            f"proteins: {self.proteins}   tagged {self.release}: "
            + ", ".join(f"{k} v{v}" for k, v in self.versions.items()),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction_embedded": self.fraction_embedded}


@dataclass
class Diff:
    todo: dict[int, set[str]]  # plan index of a release shard -> ids of its accepted records to embed
    drop: pa.Table  # (id, shard): rows of the run to delete (ids gone, old rows of changed ids)
    relabel: pa.Table | None = None  # (id, description): unchanged sequences whose description changed
    unchanged: int = 0
    changed: int = 0
    new: int = 0
    removed: int = 0
    rejects: int = 0
    repeated: int = 0  # accepted records whose id an earlier shard already holds: the run moves them to rejects
    residues_release: int = 0


# ------------------------------------------------------------------------------------------------ comparison


def _batches_of_release(shards: Sequence[Shard], options: ValidationOptions, diff: Diff, size: int = 1 << 16):
    """(id, shard, reason=digest) batches of the release's accepted records; counts its rejects and residues."""
    ids, where, digests = [], [], []
    for shard in shards:
        for item in read_shard(shard, options):
            if not isinstance(item, Record):
                diff.rejects += 1
                continue
            diff.residues_release += len(item.sequence)
            ids.append(item.id)
            where.append(shard.index)
            digests.append(f"{seq_digest(item.sequence)}\t{item.description}")
            if len(ids) >= size:
                yield _rows(ids, where, digests)
                ids, where, digests = [], [], []
    if ids:
        yield _rows(ids, where, digests)


def _rows(ids, shards, digests) -> pa.RecordBatch:
    return pa.record_batch([pa.array(ids, pa.string()), pa.array(shards, pa.int32()), pa.array(digests, pa.string())],
                           names=["id", "shard", "reason"])


def _batches_of_run(proteins) -> Any:
    for batch in proteins.to_batches(columns=["id", "shard", "sequence", "description"], batch_size=1 << 16):
        digests = [f"{seq_digest(s)}\t{d}" for s, d in zip(batch.column("sequence").to_pylist(),
                                                          batch.column("description").to_pylist())]
        yield pa.record_batch([batch.column("id"), batch.column("shard"), pa.array(digests, pa.string())],
                              names=["id", "shard", "reason"])


def diff_release(proteins, shards: Sequence[Shard], options: ValidationOptions,
                 rows_per_partition: int = 1_000_000, scratch: str | None = None) -> Diff:
    """Compare the run's proteins (a Lance dataset, at the version the update started from) with the release's
    shards (plan indexes = the shard numbers the new rows get). Pure reading: nothing is written."""
    diff = Diff(todo={s.index: set() for s in shards}, drop=pa.table({"id": pa.array([], pa.string()),
                                                                       "shard": pa.array([], pa.int32())}))
    total = 2 * proteins.count_rows()
    parts = max(1, -(-total // max(1, int(rows_per_partition))))
    drops, relabels = [], []
    with _IdPartitions(parts, scratch) as partitions:
        for batch in _batches_of_run(proteins):
            partitions.add(batch, protein=True)
        for batch in _batches_of_release(shards, options, diff):
            partitions.add(batch, protein=False)
        for part in partitions:
            old = _split(part.filter(part["protein"]))
            new, repeats = _first_occurrences(_split(part.filter(pc.invert(part["protein"]))))
            # an id repeated across shards of the release: as in a fresh run its first occurrence is the record and
            # each later one a duplicate_id reject. The later ones are embedded in their shards (`todo`), whatever
            # their sequence, and `dedupe_across_shards` moves them to rejects: the first occurrence's row (kept or
            # new) is in an earlier shard. Compared as records they would count as unchanged (and be lost) or
            # changed (and replace the first occurrence's row).
            diff.repeated += repeats.num_rows
            for shard, ident in zip(repeats["shard"].to_pylist(), repeats["id"].to_pylist()):
                diff.todo[shard].add(ident)
            keyed = old.select(["id", "reason"])
            same = new.select(["id", "shard", "reason", "description"]).join(
                old.select(["id", "reason", "old_description"]), ["id", "reason"], join_type="inner")
            diff.unchanged += same.num_rows
            relabelled = same.filter(pc.not_equal(same["description"], same["old_description"]))
            if relabelled.num_rows:
                relabels.append(relabelled.select(["id", "description"]))
            todo = new.join(keyed, ["id", "reason"], join_type="left anti")
            changed = todo.join(old.select(["id"]), "id", join_type="left semi").num_rows
            diff.changed += changed
            diff.new += todo.num_rows - changed
            for shard, ident in zip(todo["shard"].to_pylist(), todo["id"].to_pylist()):
                diff.todo[shard].add(ident)
            drop = old.join(new.select(["id", "reason"]), ["id", "reason"], join_type="left anti")
            diff.removed += drop.join(new.select(["id"]), "id", join_type="left anti").num_rows
            drops.append(drop.select(["id", "shard"]))
    if drops:
        diff.drop = pa.concat_tables([diff.drop, *drops])
    if relabels:
        diff.relabel = pa.concat_tables(relabels)
    return diff


def _first_occurrences(new: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows of each id's first shard, the rest): a shard holds an id at most once (read_shard rejects the repeats
    inside a shard), so (id, first shard) names one row."""
    if new.num_rows == len(pc.unique(new["id"])):
        return new, new.slice(0, 0)
    agg = new.group_by("id").aggregate([("shard", "min")])
    firsts = pa.table({"id": agg["id"], "shard": agg["shard_min"].cast(new.schema.field("shard").type)})
    return (new.join(firsts, ["id", "shard"], join_type="left semi"),
            new.join(firsts, ["id", "shard"], join_type="left anti"))


def _split(rows: pa.Table) -> pa.Table:
    """(id, shard, reason="<sequence digest>\t<description>") -> (id, shard, reason=digest, description,
    old_description): the sequence decides what is embedded, the description only what a row says."""
    digest = pc.utf8_slice_codeunits(rows["reason"], 0, 32)
    description = pc.utf8_slice_codeunits(rows["reason"], 33, 1 << 30)
    return pa.table({"id": rows["id"], "shard": rows["shard"], "reason": digest, "description": description,
                     "old_description": description})


# ------------------------------------------------------------------------------------------------ state


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Release:
    """One release an update brings a run to: an entry of the run's update state (`updates.json`), the same
    keys in the same JSON. Made when the update starts, rewritten when it is done."""

    name: str
    inputs: list[str]  # the release's FASTA files, as `_input_name` records them
    base: int  # shard number of the release's first shard: one past the run's highest before the update
    before: dict[str, int]  # table -> the version the update compares against (and `--abort` restores)
    previous: str  # the release the run was at
    previous_versions: dict[str, int] | None = None  # first update only: the run's versions, tagged `previous`
    previous_proteins: int | None = None  # first update only: rows before it
    status: str = "running"  # "running" (also: interrupted) or "done"
    started: str = ""
    versions: dict[str, int] | None = None  # done: table -> the version tagged with the release name
    report: dict[str, Any] | None = None  # done: UpdateReport.to_dict()
    finished: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Release:
        known = {f.name for f in fields(cls)}
        release = cls(**{k: v for k, v in entry.items() if k in known})
        release.base = int(release.base)
        release.before = {k: int(v) for k, v in release.before.items()}
        return release

    def to_dict(self) -> dict[str, Any]:
        """The updates.json entry: a running release has no versions, report or finished keys yet."""
        entry = asdict(self)
        for key in ("versions", "report", "finished"):
            if entry[key] is None:
                del entry[key]
        return entry

    def resume_command(self, run: Run) -> str:
        return f"rdscale update {run} --release {self.name} --fasta {' '.join(self.inputs)}"


def read_releases(run: Run) -> list[Release]:
    """The run's update state: its releases, oldest first (none for a run never updated)."""
    loc = run.update_state
    if not loc.is_file():
        return []
    return [Release.from_dict(e) for e in json.loads(loc.read_text())["releases"]]


def _write_releases(run: Run, entries: Sequence[Release]) -> None:
    run.update_state.write_text(json.dumps({"releases": [e.to_dict() for e in entries]}, indent=1))


def releases(run: str | Run) -> list[dict[str, Any]]:
    """The run's releases, oldest first: {name, versions: {table: version}, proteins, status, report}. A run that
    was never updated has none."""
    run = Run(run) if not isinstance(run, Run) else run
    out = []
    for entry in read_releases(run):
        if entry.previous_versions and not any(r["name"] == entry.previous for r in out):
            out.append({"name": entry.previous, "versions": entry.previous_versions,
                        "proteins": entry.previous_proteins, "status": "done"})
        out.append({"name": entry.name, "versions": entry.versions or {},
                    "proteins": (entry.report or {}).get("proteins"), "status": entry.status,
                    "report": entry.report})
    return out


def _mark_followed(run: Run, start: bool = False) -> bool:
    """A run that follows a database no longer is the output of its original inputs: its tables get a new run key,
    so a `run`/`embed` of the old config into it is refused (RunStore: "the output of a different run") instead of
    resuming into it. Idempotent; without `start`, only completes a marking that an interrupted update began (some
    tables marked, some not). Returns whether a key changed."""
    keys = {t: (run.dataset(t).schema.metadata or {}).get(META_RUN_KEY, b"").decode()
            for t in TABLES if run.has_table(t)}
    marked = [k for k in keys.values() if k.startswith(FOLLOWED)]
    if not marked and not start:
        return False
    key = marked[0] if marked else FOLLOWED + hashlib.blake2b(keys[PROTEINS].encode(), digest_size=12).hexdigest()
    changed = False
    for t, k in keys.items():
        if k != key:
            run.dataset(t).update_schema_metadata({META_RUN_KEY.decode(): key})
            changed = True
    return changed


def _tag(ds, name: str, version: int) -> None:
    tags = ds.tags.list()
    if name in tags:
        if tags[name]["version"] != version:
            ds.tags.update(name, version)
        return
    ds.tags.create(name, version)


# ------------------------------------------------------------------------------------------------ update


def update(run_dir: str | Location, inputs: Sequence[str], release: str, *, overrides: Sequence[str] = (),
           storage_options: dict | None = None, executor=None, progress: bool = True, previous: str = INITIAL,
           rows_per_partition: int = 1_000_000) -> UpdateReport:
    """Bring the run at `run_dir` to the release in `inputs` (FASTA files), tagged `release`. `overrides`:
    `section.key=value` settings over the run's recorded config (e.g. ray.address=local, embedding.device=cuda);
    the models, fit and embedding settings are the run's own."""
    if not _NAME.match(release or ""):
        raise UpdateError(f"release name {release!r}: use letters, digits, '.', '-' and '_' (e.g. 2024_01)")
    if release.isdigit():  # `--release 3` and lance.dataset(version="3") would read table version 3
        raise UpdateError(f"release name {release!r} is all digits and would read as a table version number; "
                          f"add a letter or separator (e.g. r{release} or {release}_01)")
    if not _NAME.match(previous or "") or previous == release or previous.isdigit():
        raise UpdateError(f"--previous {previous!r} must be a valid release name (not all digits) other than "
                          f"{release!r}")
    run = Run(run_dir).require()
    meta = run.metadata()
    config = meta.get("config") or {}
    manifest = meta.get("fit_manifest") or {}
    frozen = ("models", "embedding.layer", "embedding.long_policy", "embedding.window", "embedding.overlap",
              "input.remove_gaps", "output.dir", "output.residues", "output.storage_width", "output.residue_dtype",
              "output.protein_dtype",
              "fit.")
    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith(frozen)]
    if bad:
        raise UpdateError(f"{bad[0]!r}: an update uses the run's own models, embedding and output settings")
    # absolute, as `run` makes them: the rows' `source` and the recorded inputs must not depend on the cwd
    items = [*overrides, f"input.paths={json.dumps([_input_name(str(p)) for p in inputs])}",
             f"output.dir={json.dumps(run.uri)}",
             "fit.artifact=null", "output.compact=false"]
    cfg = Config.from_dict(config, items)
    if storage_options:
        cfg.storage.options = dict(storage_options)
    set_storage_options(cfg.storage.options)
    with writing(cfg.output.dir) as lease:
        return _update(_Updating(run, cfg, manifest, lease, executor or make_executor(cfg), progress,
                                 rows_per_partition), release, previous)


@dataclass
class _Updating:
    """What every step of one update works with: the run, its config for the release, the fit manifest it was
    embedded with, the writer lease every write is fenced by, the executor, and the run's store (reopened when
    the update changes the run key)."""

    run: Run
    cfg: Config
    manifest: dict
    lease: Any
    executor: Any
    progress: bool
    rows_per_partition: int
    levels: list[int] = field(default_factory=list)
    store: RunStore | None = None
    schemas: dict = field(default_factory=dict)

    def open_store(self) -> None:
        proteins_schema = self.run.dataset(PROTEINS).schema
        run_key = (proteins_schema.metadata or {}).get(META_RUN_KEY, b"").decode()
        self.schemas = run_schemas(self.levels[-1], self.cfg.output.storage_width,
                                   dict(proteins_schema.metadata or {}),
                                   residues=self.run.has_table(RESIDUES) and self.cfg.output.residues,
                                   residue_dtype=self.cfg.output.residue_dtype,
                                   protein_dtype=_stored_dtype(proteins_schema))
        self.store = RunStore(self.run.location, self.schemas, run_key, lease=self.lease)


def _update(u: _Updating, name: str, previous: str) -> UpdateReport:
    """plan -> compare -> record -> embed -> delete -> ledger -> tag: each step below, resumable as a whole."""
    started = time.perf_counter()
    entries = read_releases(u.run)
    if any(e.name == name and e.done for e in entries):
        raise UpdateError(f"{u.run} is already at release {name}; choose a new release name")
    shards = plan(u.cfg)
    u.levels = [int(w) for w in u.run.levels()]
    with u.lease.step("update state"):  # every write of an update is a fenced step (rdscale.io.lease)
        _mark_followed(u.run)  # finish a marking an interrupted update began
    u.open_store()
    release, resumed = _begin(u, entries, name, previous)
    # Everything that can refuse the update is checked before its first write (a refused update leaves no trace):
    # the checkpoints, then the whole release, read and compared with the run (pure reading).
    _check_checkpoints(u.run, u.cfg, u.manifest)
    options = ValidationOptions(remove_gaps=u.cfg.input.remove_gaps)
    planned = [UpdateShard(**{**_shard_fields(s), "index": release.base + s.index}) for s in shards]
    diff = diff_release(u.run.dataset(PROTEINS, version=release.before[PROTEINS]), planned, options,
                        u.rows_per_partition)
    if not resumed:
        _record_start(u, entries, release)
    u.store.recover()
    u.store.drop_derived_columns()

    report = UpdateReport(release=name, previous=release.previous, unchanged=diff.unchanged,
                          changed=diff.changed, new=diff.new, removed=diff.removed,
                          rejects=diff.rejects + diff.repeated,
                          residues_release=diff.residues_release, shards_total=len(planned))
    todo = _shards_to_embed(u, planned, diff, options, report)
    _embed(u, release, todo, report)  # 1.
    dropped_residues = _delete_old_rows(u, release, diff, report)  # 2.
    _correct_ledger(u, release, diff, dropped_residues)  # 3.
    _finish(u, entries, release, report)  # 4.
    report.seconds = time.perf_counter() - started
    release.report = report.to_dict()
    with u.lease.step("update state"):
        _write_releases(u.run, entries)
    return report


def _shard_fields(shard: Shard) -> dict[str, Any]:
    return {f: getattr(shard, f) for f in Shard.__dataclass_fields__}


def _begin(u: _Updating, entries: list[Release], name: str, previous: str) -> tuple[Release, bool]:
    """(the release to make, whether it resumes an interrupted update): refuses another interrupted release, other
    inputs, a tag taken, an interrupted run; a new release compares against the tables' versions now."""
    run = u.run
    running = [e for e in entries if not e.done]
    inputs = [_input_name(p) for p in u.cfg.input.paths]
    if running:
        release = running[0]
        if release.name != name:
            raise UpdateError(f"the update of {run} to release {release.name} was interrupted; finish it first "
                              f"({release.resume_command(run)})")
        if release.inputs != inputs:
            raise UpdateError(f"the interrupted update to release {name} read {' '.join(release.inputs)}; "
                              "rerun it with the same --fasta files")
        log.info("resuming the interrupted update to release %s", name)
        return release, True
    if any(name in run.dataset(t).tags.list() for t in TABLES if run.has_table(t)):
        raise UpdateError(f"{run} already has a table version tagged {name}; choose a new release name")
    done = [e for e in entries if e.done]
    status = run.status()
    if not done and not status["complete"]:  # its partial state must not become the previous release
        raise UpdateError(f"{run} is an interrupted run ({incomplete_message(status)}); finish it (rerun the "
                          "command that made it) before updating it to a release")
    u.store.recover()  # rows of an interrupted run's unrecorded shards must not enter the comparison
    before = {t: run.dataset(t).version for t in TABLES if run.has_table(t)}
    base = max(u.store.committed(), default=-1) + 1
    return Release(name=name, inputs=inputs, base=base, before=before,
                   previous=done[-1].name if done else previous,
                   previous_versions=before if not done else None,
                   previous_proteins=run.dataset(PROTEINS).count_rows() if not done else None,
                   started=_now()), False


def _record_start(u: _Updating, entries: list[Release], release: Release) -> None:
    """The first writes of a new release: the run as it was tagged (first update), the run key marked, the release
    recorded as running."""
    if not any(e.done for e in entries):  # the run as it was stays readable by name (later previous releases are
        # tagged by their own update)
        with u.lease.step("tag previous"):
            for t, v in release.before.items():
                if release.previous not in u.run.dataset(t).tags.list():
                    u.run.dataset(t).tags.create(release.previous, v)
    with u.lease.step("update state"):
        marked = _mark_followed(u.run, start=True)
    if marked:
        u.open_store()
    entries.append(release)
    with u.lease.step("update state"):
        _write_releases(u.run, entries)


def _shards_to_embed(u: _Updating, planned: list[UpdateShard], diff: Diff, options: ValidationOptions,
                     report: UpdateReport) -> list[UpdateShard]:
    """The release's shards, each keeping only the ids to embed; identical new sequences embedded once."""
    shards = [UpdateShard(**{**_shard_fields(s), "keep": frozenset(diff.todo[s.index])}) for s in planned]
    if dedupe.enabled(u.cfg):  # the grouping is deterministic: a resumed update, comparing against the same
        # versions, finds the same copies
        duplicates = dedupe.plan_duplicates(shards, options, progress=u.progress,
                                            map_shards=u.executor.map_shards)
        shards = duplicates.shards
        report.copies, report.residues_saved = duplicates.copies, duplicates.residues_saved
    return shards


def _embed_models(u: _Updating) -> tuple[list[str], Any]:
    """(models, fit): the run's own chain and frozen fit, with the extension steps of a run grown by `extend`."""
    run, cfg, manifest = u.run, u.cfg, u.manifest
    fit_loc = run.fit_location(manifest, None) if len(cfg.models) > 1 else None
    if len(cfg.models) > 1 and fit_loc is None:
        raise UpdateError(f"the fit artifact of {run} was not found; an update embeds with the run's own fit")
    fit_dir = fit_loc.uri if fit_loc is not None else None
    models = list(cfg.models)
    if manifest.get("extensions"):  # grown by `rdscale extend`: its models and steps after the chain's
        models += [m.get("source") or m.get("name") for m in manifest["models"][len(cfg.models):]]
        steps = run.extension_steps(manifest)
        missing = [str(s) for s in steps if s is None or not s.join("manifest.json").is_file()]
        if missing or fit_dir is None:
            raise UpdateError(f"the extension steps of {run} were not found ({', '.join(missing) or 'no fit'});"
                              " an update embeds with the run's own fit and steps")
        fit_dir = [fit_dir, *(s.uri for s in steps)]
    return models, fit_dir


def _embed(u: _Updating, release: Release, shards: list[UpdateShard], report: UpdateReport) -> None:
    """1. the new and changed sequences, shard by shard, each committed into the ledger as it completes (an
    interrupted update resumes from its last committed shard)."""
    run, store = u.run, u.store
    done = store.committed()
    keys = {s.index: f"update:{release.name}:{_input_name(s.path)}@{s.start}-{'eof' if s.end is None else s.end}"
            for s in shards}
    for s in shards:
        if s.index in done and done[s.index]["key"] != keys[s.index]:
            raise StoreError(f"the ledger of {run} holds shard {s.index} with another key ({done[s.index]['key']}); "
                             "the update state does not match the run")
    todo = [s for s in shards if s.index not in done]
    report.shards_skipped = len(shards) - len(todo)
    if not todo:
        return
    models, fit_dir = _embed_models(u)
    stats = fingerprints(todo) if all(Location.parse(s.path).is_local for s in todo) else {}
    uris = {name: store.uri(name) for name in u.schemas}
    watch = provenance.ChangeWatch(list(done.values()), log)
    with Progress(total=len(todo), unit="shard", desc=f"update {release.name}", enabled=u.progress) as bar:
        ledger = lambda index, result: (keys[index], ledger_values(stats.get(index, {}), result))  # noqa: E731
        with committer_for(u.cfg, store, ledger, bar.update) as committer:
            for index, total, part in u.executor.apply(u.cfg, models, fit_dir, uris, u.schemas, todo):
                watch.see(part.provenance)
                report.residues_this_call += part.embedded
                committer.add(index, total, part)
    if committer.incomplete:
        raise StoreError(f"{len(committer.incomplete)} shard(s) of the update did not complete "
                         f"({committer.incomplete}); run the same command again to resume")


def _delete_old_rows(u: _Updating, release: Release, diff: Diff, report: UpdateReport) -> dict[int, int]:
    """2. what the release no longer holds: ids gone, old rows of changed ids, every old reject; unchanged
    sequences under a new description relabelled. Returns {old shard: its residue rows deleted}."""
    run, store, lease = u.run, u.store, u.lease
    store.scalar_indexes()  # the deletes below are `id IN (...)` lookups in the index, not scans of the table
    old = f"shard < {release.base}"
    drop_ids = pc.unique(diff.drop["id"]).to_pylist() if diff.drop.num_rows else []
    dropped_residues: dict[int, int] = {}
    if RESIDUES in u.schemas and drop_ids:
        residues_before = run.dataset(RESIDUES, version=release.before[RESIDUES])
        for i in range(0, len(drop_ids), _CHUNK):
            got = residues_before.to_table(columns=["shard"],
                                           filter=f"{old} AND id IN ({sql_in_list(drop_ids[i:i + _CHUNK])})")
            for v in pc.value_counts(got["shard"]).to_pylist() if got.num_rows else []:
                dropped_residues[int(v["values"])] = dropped_residues.get(int(v["values"]), 0) + int(v["counts"])
    for i in range(0, len(drop_ids), _CHUNK):
        predicate = f"{old} AND id IN ({sql_in_list(drop_ids[i:i + _CHUNK])})"
        with lease.step("delete gone ids"):
            if RESIDUES in u.schemas:
                store.dataset(RESIDUES).delete(predicate)
            store.dataset(PROTEINS).delete(predicate)
    with lease.step("delete old rejects"):
        if store.dataset(REJECTS).count_rows(filter=old):
            store.dataset(REJECTS).delete(old)
    # unchanged sequences under a new description: the row's description is replaced, its embedding kept
    if diff.relabel is not None:
        for i in range(0, diff.relabel.num_rows, _CHUNK):
            with lease.step("relabel"):
                store.dataset(PROTEINS).merge_insert("id").when_matched_update_all().execute(
                    diff.relabel.slice(i, _CHUNK))
        report.relabelled = diff.relabel.num_rows
    return dropped_residues


def _correct_ledger(u: _Updating, release: Release, diff: Diff, dropped_residues: dict[int, int]) -> None:
    """3. the old shards' ledger rows: what they hold now (one atomic merge; computed from the versions the update
    started from, so a rerun writes the same rows)."""
    ledger_before = u.run.dataset(LEDGER, version=release.before[LEDGER]).to_table()
    if not ledger_before.num_rows:
        return
    dropped = {}
    if diff.drop.num_rows:
        for v in pc.value_counts(diff.drop["shard"]).to_pylist():
            dropped[int(v["values"])] = int(v["counts"])
    shard_ids = ledger_before["shard"].to_pylist()
    proteins_left = [p - dropped.get(s, 0) for s, p in zip(shard_ids, ledger_before["proteins"].to_pylist())]
    residues_left = [None if r is None else r - dropped_residues.get(s, 0)
                     for s, r in zip(shard_ids, ledger_before["residues"].to_pylist())]
    fixed = ledger_before.set_column(LEDGER_SCHEMA.get_field_index("records"), "records",
                                     pa.array(proteins_left, pa.int64()))
    fixed = fixed.set_column(LEDGER_SCHEMA.get_field_index("proteins"), "proteins",
                             pa.array(proteins_left, pa.int64()))
    fixed = fixed.set_column(LEDGER_SCHEMA.get_field_index("rejects"), "rejects",
                             pa.array(np.zeros(len(shard_ids), np.int64)))
    fixed = fixed.set_column(LEDGER_SCHEMA.get_field_index("residues"), "residues",
                             pa.array(residues_left, pa.int64()))
    current = u.store.dataset(LEDGER).to_table(filter=f"shard < {release.base}")
    if not current.sort_by("shard").equals(fixed.sort_by("shard")):
        with u.lease.step("ledger counts"):
            u.store.dataset(LEDGER).merge_insert("shard").when_matched_update_all().execute(fixed)


def _finish(u: _Updating, entries: list[Release], release: Release, report: UpdateReport) -> None:
    """4. finish like `embed` (dedupe across shards, indexes, accounting), tag the release, count what it did;
    the release is then done (written by the caller, with the report)."""
    run, store = u.run, u.store
    store.dedupe_across_shards()
    store.scalar_indexes()  # rejects written since step 2 (the tagged version carries current indexes)
    _check_accounting(store)
    with u.lease.step("tag release"):
        report.versions = {t: run.dataset(t).version for t in TABLES if run.has_table(t)}
        for t, v in report.versions.items():
            _tag(run.dataset(t), release.name, v)
    store.cleanup_orphans()
    # what went through the models: the rows this update wrote (all attempts), less the copies it wrote
    written = store.dataset(PROTEINS).to_table(columns=["length"], filter=f"shard >= {release.base}")
    report.residues_embedded = int(pc.sum(written["length"]).as_py() or 0) - report.residues_saved
    report.proteins = store.dataset(PROTEINS).count_rows()
    release.status, release.versions, release.finished = "done", report.versions, _now()


def _check_checkpoints(run: Run, cfg: Config, manifest: dict) -> None:
    """The run's checkpoints (chain, then extension steps) still hold the weights it was embedded with (sha256)."""
    recorded = manifest.get("models") or []
    specs = list(cfg.models) + [m.get("source") or m.get("name") for m in recorded[len(cfg.models):]]
    for spec, model in zip(specs, recorded):
        have = describe_model(spec).get("sha256") if model.get("sha256") else None
        if have is not None and have != model["sha256"]:
            raise UpdateError(f"checkpoint {spec} changed since {run} was embedded with it (sha256 {have[:12]} is "
                              f"not {model['sha256'][:12]}); an update embeds with the run's own models: restore "
                              "that checkpoint, or make a new run")


def abort_update(run_dir: str | Location, storage_options: dict | None = None) -> str:
    """`rdscale update RUN --abort`: undo an interrupted (or refused) update: every table back to its version
    from before the update (restored as the latest version), the tags that update made removed, its entry
    dropped from the update state. Holds the writer lease. Returns what it did, in one line."""
    if storage_options:
        set_storage_options(storage_options)
    run = Run(run_dir).require()
    with writing(run.uri) as lease:
        entries = read_releases(run)
        running = [e for e in entries if not e.done]
        if not running:
            raise UpdateError(f"{run} has no interrupted update to abort")
        release = running[0]
        first = bool(release.previous_versions)
        for t, version in release.before.items():
            if not run.has_table(t):
                continue
            lease.check()
            if run.dataset(t).version != version:
                run.dataset(t, version=version).restore()  # also the run key the update changed
            tags = run.dataset(t).tags
            for name in (release.name, *([release.previous] if first else [])):
                if name in tags.list():
                    tags.delete(name)
        entries = [e for e in entries if e is not release]
        if entries:
            _write_releases(run, entries)
        else:
            run.update_state.delete()
    return (f"aborted the update of {run} to release {release.name}: its tables are back at their versions "
            f"from before it" + (f" (release {release.previous})" if not first else ""))


def _check_accounting(store: RunStore) -> None:
    """Every ledger shard's record count equals its proteins + rejects rows (as `check_complete` checks)."""
    rows = {name: rows_per_shard(store, name) for name in (PROTEINS, REJECTS)}
    bad = []
    for index, row in sorted(store.committed().items()):
        have = rows[PROTEINS].get(index, 0) + rows[REJECTS].get(index, 0)
        if have != row["records"]:
            bad.append(f"shard {index}: {row['records']} records, {have} rows")
    if bad:
        raise StoreError(f"accounting mismatch after the update of {store.root}: {'; '.join(bad[:5])}")


def release_lines(run: str | Run) -> list[str]:
    """`rdscale info`: the run's releases (tags of its table versions) with their row counts, oldest first, and an
    update in progress, if any."""
    run = Run(run) if not isinstance(run, Run) else run
    proteins = run.dataset(PROTEINS)
    tags = sorted(proteins.tags.list().items(), key=lambda kv: kv[1]["version"])
    lines = []
    for name, tag in tags:
        version = int(tag["version"])
        counts = [f"proteins {run.dataset(PROTEINS, version=version).count_rows()}"]
        if run.has_table(REJECTS) and name in run.dataset(REJECTS).tags.list():
            counts.append(f"rejects {run.dataset(REJECTS, version=name).count_rows()}")
        current = " (current)" if version == proteins.version else ""
        lines.append(f"  {name}: proteins.lance v{version}, {', '.join(counts)}{current}")
    for release in (e for e in read_releases(run) if not e.done):
        lines.append(f"  {release.name}: update interrupted; rerun `{release.resume_command(run)}` to finish it, or "
                     f"`rdscale update {run} --abort` to undo it")
    return ["releases (table versions tagged by `rdscale update`):", *lines] if lines else []


def followed_release(run_dir: str | Location | Run) -> Release | None:
    """The last release of a run that follows a database (done or interrupted), or None."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    entries = read_releases(run)
    return entries[-1] if entries else None


def verify_release(run_dir: str | Location) -> list[str]:
    """`rdscale verify` of an updated run: its tables against its current release's inputs (the inputs of its
    first run no longer apply). Checks, in bounded memory (the update's own comparison, against the latest
    versions): every accepted record of the release is in proteins with the same id, sequence and description,
    and nothing else is; the rejects are as many as the release's; no protein id twice; every ledger shard's
    record count equals its rows; residues only of stored proteins, as many as the ledger says. Returns problems."""
    run = Run(run_dir).require()
    entry = followed_release(run)
    if entry is None:
        raise UpdateError(f"{run} was never updated")
    if not entry.done:
        return [f"the update to release {entry.name} was interrupted; rerun `{entry.resume_command(run)}` to "
                "finish it"]
    config = run.metadata().get("config") or {}
    cfg = Config.from_dict(config, [f"input.paths={json.dumps(entry.inputs)}", "ray.address=local",
                                    "fit.artifact=null"])
    options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
    shards = plan(cfg)
    problems = []
    diff = diff_release(run.dataset(PROTEINS), shards, options)
    read = diff.rejects + diff.repeated + diff.unchanged + diff.changed + diff.new
    headers = sum(file_headers(p) for p in cfg.input.paths)
    if headers != read:  # the reader itself, checked by an independent count (as `verify` does for a run)
        problems.append(f"release {entry.name}: its files hold {headers} record(s) ('>' at a line start), the "
                        f"reader found {read}: records were lost or invented reading them")
    if diff.changed or diff.new or diff.removed:
        problems.append(f"proteins differ from release {entry.name}: {diff.changed} with another sequence, "
                        f"{diff.new} missing, {diff.removed} not in the release")
    if diff.relabel is not None:
        problems.append(f"{diff.relabel.num_rows} protein(s) with another description than in release "
                        f"{entry.name} (e.g. {diff.relabel['id'][0].as_py()})")
    proteins = run.dataset(PROTEINS)
    ids = proteins.to_table(columns=["id"])["id"]
    if len(pc.unique(ids)) != len(ids):
        problems.append(f"proteins: {len(ids) - len(pc.unique(ids))} id(s) stored twice")
    rejects = run.dataset(REJECTS).count_rows() if run.has_table(REJECTS) else 0
    # the release's rejects: those its shards reject (a repeated id inside one shard among them), and the
    # repeats of an id across shards, which the run moves to rejects (duplicate_id) after their shards committed
    if rejects != diff.rejects + diff.repeated:
        problems.append(f"rejects: {rejects} rows, release {entry.name} has {diff.rejects + diff.repeated} "
                        f"rejects")
    ledger = run.dataset(LEDGER).to_table()
    rows = {name: rows_per_shard(run, name) for name in (PROTEINS, REJECTS)}
    for index, records in zip(ledger["shard"].to_pylist(), ledger["records"].to_pylist()):
        have = rows[PROTEINS].get(index, 0) + rows[REJECTS].get(index, 0)
        if have != records:
            problems.append(f"shard {index}: the ledger says {records} records, the tables hold {have} rows")
    if run.has_table(RESIDUES):
        # one row per position of every stored protein (the ledger's residue counts also hold the rows of a
        # repeated id that `dedupe_across_shards` moved to rejects after its shard committed)
        residues = run.dataset(RESIDUES).count_rows()
        lengths = proteins.to_table(columns=["length"])["length"].cast(pa.int64())
        expected = int(pc.sum(residue_rows(lengths, cfg)).as_py() or 0)
        if residues != expected:
            problems.append(f"residues: {residues} rows, the stored proteins have {expected} positions")
    return problems
