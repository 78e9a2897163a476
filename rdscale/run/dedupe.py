"""Identical sequences within one input, embedded once (`input.dedupe_sequences`).

Before the apply pass the driver reads the input once and groups its accepted records by sequence digest. In each
group of identical sequences the first record (in shard order, then file order) is the *canonical* one: it is
embedded as usual, in its own shard. Every other member is a *copy*: its shard does not embed it, and the
canonical record's shard writes its rows instead, with the canonical record's embeddings and the copy's own id,
description and source (file:offset of the copy). A copy's rows therefore carry the canonical record's `shard`
number: each shard's commit holds exactly the rows it wrote, so the ledger, resume and the per-shard accounting
(records = proteins + rejects rows, copies included) work unchanged.

Only records whose id occurs once in the whole input take part (an id seen twice, accepted or rejected, keeps the
usual duplicate-id handling: the later occurrence is rejected), so the tables equal those of a run without
deduplication, row for row, and only the embedding work differs. Under `embedding.long_policy: reject` a copy of a
too-long canonical record is rejected like the record itself.

Which copies a shard writes and which records it leaves to another shard is part of its ledger key
(`<file>@<range>#dups=<digest>`), so a resume whose input changed elsewhere (and with it the grouping) finds the
affected shards changed instead of mixing two groupings.

Memory is bounded like `dedupe_across_shards`: the (id) and (digest, id, shard, ...) rows are hash-partitioned and
spilled to a scratch folder when the input is large; the driver holds one partition plus the copies found.

The grouping reads the whole input once, so its result is kept in the run (`Run.dedupe_plan`, see
`cached_plan`) and reused by a resume of the same plan: same shards, same input files (size and mtime), same
options. Anything else (an input edited in place, another shard size) makes a new grouping.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rdscale.io.fasta import Record, Shard, ValidationOptions, read_shard
from rdscale.io.location import Location, LocationError
from rdscale.io.partitions import HashPartitions, partitions_for, repeated
from rdscale.progress import Progress
from rdscale.run.integrity import DUPS_KEY

log = logging.getLogger(__name__)

_BYTES_PER_RECORD = 64  # a low estimate of a FASTA record's size: more partitions than needed, never fewer
_IDS = pa.schema([("id", pa.string())])
_SEQUENCES = pa.schema([("digest", pa.string()), ("id", pa.string()), ("shard", pa.int32()),
                        ("ordinal", pa.int64()), ("length", pa.int64()), ("source", pa.string()),
                        ("description", pa.string())])


def seq_digest(sequence: str) -> str:
    """What makes two sequences the same: blake2b-128 of the validated sequence (hex)."""
    return hashlib.blake2b(sequence.encode("ascii", "surrogateescape"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class DedupShard(Shard):
    """A shard that leaves its records in `skip` (ids) to other shards and writes `copies` of its own records:
    (canonical id, copy id, copy description, copy source) in copy order. `rdscale.run.stages.shard_rows` honours
    both."""

    skip: frozenset = frozenset()
    copies: tuple = ()

    @property
    def key_suffix(self) -> str:
        """Part of the shard's ledger key: which records it leaves to others and which copies it writes."""
        if not self.skip and not self.copies:
            return ""
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps([sorted(self.skip), list(self.copies)]).encode("utf-8", "surrogatepass"))
        return f"{DUPS_KEY}{h.hexdigest()}"


@dataclass
class DuplicatePlan:
    shards: list[Shard]
    sequences: int = 0  # accepted records read
    copies: int = 0  # records written as copies instead of embedded
    groups: int = 0  # sequences that occur more than once (among eligible records)
    residues_saved: int = 0
    ambiguous_ids: int = 0  # ids occurring more than once: left out of the grouping

    def line(self) -> str:
        return (f"identical sequences: {self.copies} record(s) copied from {self.groups} embedded sequence(s) "
                f"instead of embedded again ({self.residues_saved:,} residues saved)")


def enabled(cfg) -> bool:
    """input.dedupe_sequences, with null meaning: on for per-protein output only (per-residue copies cost as
    much storage as embedding them, so there the saving is GPU time alone)."""
    flag = cfg.input.dedupe_sequences
    return (not cfg.output.residues) if flag is None else bool(flag)


def plan_duplicates(shards: Sequence[Shard], options: ValidationOptions, *, rows_per_partition: int = 1_000_000,
                    scratch: str | None = None, progress: bool = False, map_shards=None) -> DuplicatePlan:
    """Read every shard once; return the shards as `DedupShard`s (unchanged `Shard`s where a shard has no part in
    any group) and what was found. `map_shards(fn, shards, *args)`: yields fn(shard, *args) per shard, in shard
    order (an executor's: the shards are read in parallel, on the cluster); default: here, one after another."""
    map_shards = map_shards or map_here
    size = 0
    for path in {s.path for s in shards}:
        size += Location.parse(path).fingerprint()["size"]
    parts = partitions_for(size // _BYTES_PER_RECORD, rows_per_partition)
    plan = DuplicatePlan(shards=list(shards))
    skip: dict[int, list[str]] = {}
    copies: dict[int, list[tuple]] = {}
    with HashPartitions(parts, _IDS, "id", scratch) as by_id, \
            HashPartitions(parts, _SEQUENCES, "digest", scratch) as by_seq:
        with Progress(total=len(shards), unit="shard", desc="finding identical sequences", enabled=progress) as bar:
            for ids, sequences in map_shards(shard_keys, shards, options):
                by_id.add(ids)
                by_seq.add(sequences)
                plan.sequences += sequences.num_rows
                bar.update(1)
        ambiguous: list[str] = []
        for part in by_id:
            ambiguous.extend(repeated(part["id"]).to_pylist())
        plan.ambiguous_ids = len(ambiguous)
        excluded = pa.array(ambiguous, pa.string())
        for part in by_seq:
            _groups(part, excluded, plan, skip, copies)
    assignments = {index: {"skip": sorted(skip.get(index, ())),
                           "copies": [list(c[2:]) for c in sorted(copies.get(index, []))]}
                   for index in skip.keys() | copies.keys()}
    plan.shards = _assign(shards, assignments)
    return plan


def _assign(shards: Sequence[Shard], assignments: dict[int, dict]) -> list[Shard]:
    """The shards with their part in the grouping: {shard index: {"skip": [ids], "copies": [[canonical id, copy
    id, copy description, copy source], ...] in copy order}}; shards without an entry stay as they are."""
    out = []
    for shard in shards:
        found = assignments.get(shard.index)
        if found is not None:
            assignment = {"skip": frozenset(found["skip"]), "copies": tuple(tuple(c) for c in found["copies"])}
            if isinstance(shard, DedupShard):  # e.g. an update's shard: keeps its own fields
                shard = replace(shard, **assignment)
            else:
                shard = DedupShard(**{f.name: getattr(shard, f.name) for f in fields(Shard)}, **assignment)
        out.append(shard)
    return out


_COUNTERS = ("sequences", "copies", "groups", "residues_saved", "ambiguous_ids")


def plan_key(shards: Sequence[Shard], options: ValidationOptions) -> str:
    """What the grouping depends on: every shard (its type and fields), the input files' size and mtime, the
    validation options. Equal keys: the grouping would come out the same."""
    files = {}
    for path in dict.fromkeys(s.path for s in shards):
        found = Location.parse(path).fingerprint()
        files[path] = [found["size"], found["mtime_ns"]]
    described = [[type(s).__name__, *[getattr(s, f.name) for f in fields(s)]] for s in shards]
    payload = json.dumps({"version": 1, "shards": described, "files": files, "options": repr(options)},
                         sort_keys=True, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def cached_plan(cache: Location | None, shards: Sequence[Shard], options: ValidationOptions, *, guard=None,
                **kwargs) -> tuple[DuplicatePlan, bool]:
    """`plan_duplicates`, or the grouping kept at `cache` when it was made for the same plan (`plan_key`); a new
    grouping is kept there for the next resume. Only the run's writer (lease holder) calls this; `guard(what)`: a
    context manager around the write (the lease's fenced step), held for the write only, not the grouping.
    Returns (plan, whether it came from the cache). kwargs: plan_duplicates'."""
    key = plan_key(shards, options) if cache is not None else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(gzip.decompress(cache.read_bytes()))
        except (OSError, ValueError) as err:  # damaged (a kill while writing it): group again
            log.warning("ignoring the damaged grouping plan %s: %s", cache, err)
            data = {}
        if data.get("key") == key:
            plan = DuplicatePlan(shards=_assign(shards, {int(k): v for k, v in data["assignments"].items()}),
                                 **{c: int(data["counters"][c]) for c in _COUNTERS})
            return plan, True
    plan = plan_duplicates(shards, options, **kwargs)
    if cache is not None:
        assignments = {str(s.index): {"skip": sorted(s.skip), "copies": [list(c) for c in s.copies]}
                       for s in plan.shards if isinstance(s, DedupShard) and (s.skip or s.copies)}
        data = {"key": key, "counters": {c: getattr(plan, c) for c in _COUNTERS}, "assignments": assignments}
        payload = gzip.compress(json.dumps(data).encode("utf-8", "surrogatepass"), compresslevel=3)
        try:  # written whole (an atomic rename / one PUT)
            with guard("grouping plan") if guard is not None else contextlib.nullcontext():
                cache.write_bytes(payload)
        except (OSError, LocationError) as err:  # only an optimisation: the run goes on, a resume groups again
            log.warning("could not keep the grouping plan at %s (a resume will group again): %s", cache, err)
    return plan, False


def map_here(fn, shards, *args):
    """fn(shard, *args) for every shard, in this process, one after another (the local executor's map_shards)."""
    for shard in shards:
        yield fn(shard, *args)


def shard_keys(shard: Shard, options: ValidationOptions) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """What the grouping needs of one shard: the ids of all its records (ids: (n,) string), and per accepted
    record (digest, id, shard, ordinal, length, source, description). Plain function: runs where the executor
    puts it."""
    ids: list[str] = []
    rows: dict[str, list] = {name: [] for name in _SEQUENCES.names}
    keep = getattr(shard, "keep", None)  # an update's shard embeds only these (the rest is in the run already)
    for ordinal, item in enumerate(read_shard(shard, options)):
        if item.id:
            ids.append(item.id)
        if isinstance(item, Record) and (keep is None or item.id in keep):
            for name, value in (("digest", seq_digest(item.sequence)), ("id", item.id), ("shard", shard.index),
                                ("ordinal", ordinal), ("length", len(item.sequence)), ("source", item.source),
                                ("description", item.description)):
                rows[name].append(value)
    return (pa.record_batch([pa.array(ids, pa.string())], schema=_IDS),
            pa.record_batch([pa.array(rows[n], _SEQUENCES.field(n).type) for n in _SEQUENCES.names],
                            schema=_SEQUENCES))


def _groups(part: pa.Table, excluded: pa.Array, plan: DuplicatePlan, skip: dict, copies: dict) -> None:
    """One digest partition: each group of >= 2 eligible records -> its canonical record (first by shard, then
    ordinal) and copies."""
    if part.num_rows < 2:
        return
    if len(excluded):
        part = part.filter(pc.invert(pc.is_in(part["id"], value_set=excluded)))
    counts = part.group_by("digest").aggregate([("digest", "count")])
    repeated = counts.filter(pc.greater(counts["digest_count"], 1)).select(["digest"])
    if repeated.num_rows == 0:
        return
    rows = part.join(repeated, "digest", join_type="left semi").sort_by(
        [("digest", "ascending"), ("shard", "ascending"), ("ordinal", "ascending")])
    digests = rows["digest"].to_numpy(zero_copy_only=False)
    first = np.r_[True, digests[1:] != digests[:-1]]  # (n,) canonical rows
    head = np.maximum.accumulate(np.where(first, np.arange(len(digests)), 0))  # (n,) row of each row's canonical
    ids = rows["id"].to_pylist()
    shard = rows["shard"].to_numpy()
    ordinal = rows["ordinal"].to_numpy()
    length = rows["length"].to_numpy()
    source = rows["source"].to_pylist()
    description = rows["description"].to_pylist()
    plan.groups += int(first.sum())
    for i in np.flatnonzero(~first).tolist():
        c = int(head[i])
        s, o = int(shard[i]), int(ordinal[i])
        skip.setdefault(s, []).append(ids[i])
        # sorted by (copy shard, copy ordinal): the order the canonical shard writes its copies in
        copies.setdefault(int(shard[c]), []).append((s, o, ids[c], ids[i], description[i], source[i]))
        plan.copies += 1
        plan.residues_saved += int(length[i])
