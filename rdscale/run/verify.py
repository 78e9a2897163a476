"""`rdscale verify RUN`: the check to run after a large job. Re-reads the inputs named in the run's recorded config
and checks, without trusting the ledger's counts:

- every planned shard is committed, and each committed shard's input still has the digest recorded when it was read;
- every input record is in exactly one of proteins or rejects, matched by source (file:offset), with the same id,
  and for proteins the same sequence (by digest); nothing in the tables comes from outside the input;
- no protein id twice, no (id, pos) twice in residues, residues only of stored proteins, one per residue;
- no rows of uncommitted shards, no missing data files;
- the tables' metadata names the same fit (checkpoint digests, tensors digest) as the fit artifact on disk.

Returns the problems as lines; an empty list means the run is exactly its input.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from rdscale.config import Config
from rdscale.io.fasta import Reject, ValidationOptions, plan_shards, read_shard
from rdscale.io.store import (
    LEDGER,
    META_MANIFEST,
    META_RUN_KEY,
    PROTEINS,
    REJECTS,
    RESIDUES,
    StoreError,
    missing_data_files,
    read_metadata,
    run_status,
)
from rdscale.run.integrity import RecordsDigest, shard_key

MAX_LINES = 50


def _seq_digest(sequence: str) -> str:
    return hashlib.blake2b(sequence.encode(), digest_size=12).hexdigest()


def verify(run_dir: str | Path) -> list[str]:
    from rdscale.run.update import followed_release, verify_release

    if followed_release(run_dir) is not None:  # `rdscale update` moved it to another release: check that one
        return verify_release(run_dir)
    root = Path(run_dir)
    if not (root / f"{PROTEINS}.lance").exists() or not (root / f"{LEDGER}.lance").exists():
        raise StoreError(f"{root} holds no rdscale run (no proteins.lance / shards.lance)")
    problems: list[str] = []
    add = problems.append

    tables = {name: root / f"{name}.lance" for name in (PROTEINS, RESIDUES, REJECTS) if (root / f"{name}.lance").exists()}
    for name, path in tables.items():
        for missing in missing_data_files(path):
            add(f"{name}: data file {missing} is missing")
    if problems:
        return problems  # the tables cannot be read

    meta = read_metadata(tables[PROTEINS])
    cfg = Config.from_dict(meta.get("config") or {})
    status = run_status(root)
    committed = set(status["committed"])
    if not status["complete"]:
        add(f"incomplete: {len(committed)} of {status['planned']} shards committed")

    # --- metadata: one run key and one fit manifest across tables, matching the fit on disk
    keys = {name: (lance.dataset(str(p)).schema.metadata or {}).get(META_RUN_KEY) for name, p in tables.items()}
    if len(set(keys.values())) != 1:
        add(f"tables carry different run keys: {sorted(keys)}")
    manifests = {name: (lance.dataset(str(p)).schema.metadata or {}).get(META_MANIFEST) for name, p in tables.items()}
    if len(set(manifests.values())) != 1:
        add("tables carry different fit manifests in their metadata")
    manifest = meta.get("fit_manifest") or {}
    problems += _check_fit(root, manifest)

    # --- inputs
    missing_inputs = [p for p in cfg.input.paths if not Path(p).is_file()]
    if missing_inputs:
        add(f"input file(s) not found: {', '.join(missing_inputs)} (cannot check records against the input)")
        return problems
    shards = plan_shards(cfg.input.paths, shard_bytes=int(cfg.input.shard_mb * (1 << 20)))
    ledger = {r["shard"]: r for r in lance.dataset(str(root / f"{LEDGER}.lance")).to_table().to_pylist()}
    options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
    expected: dict[str, tuple[str, str | None, int]] = {}  # source -> (id, sequence digest or None if reject, shard)
    for shard in shards:
        digest = RecordsDigest()
        for item in read_shard(shard, options):
            digest.update(item)
            seq = None if isinstance(item, Reject) else _seq_digest(item.sequence)
            expected[f"{item.path}:{item.offset}"] = (item.id, seq, shard.index)
        row = ledger.get(shard.index)
        if row is not None:
            if row["key"].split("#dups=", 1)[0] != shard_key(shard):  # the suffix: rdscale.run.dedupe
                add(f"shard {shard.index}: ledger range {row['key']} differs from the input's plan {shard_key(shard)}")
            elif row.get("digest") and row["digest"] != digest.hexdigest():
                add(f"shard {shard.index}: {shard.path} changed since the shard was embedded "
                    f"(bytes {shard.start}-{shard.end or 'eof'})")
    for index in sorted(set(ledger) - {s.index for s in shards}):
        add(f"shard {index}: in the ledger but not in the input's shard plan")

    # --- every record in exactly one of proteins / rejects
    proteins = lance.dataset(str(tables[PROTEINS])).to_table(columns=["id", "source", "sequence", "shard"])
    rejects = lance.dataset(str(tables[REJECTS])).to_table(columns=["id", "source", "reason", "shard"]) \
        if REJECTS in tables else pa.table({"id": [], "source": [], "reason": [], "shard": []})
    for name, t in ((PROTEINS, proteins), (REJECTS, rejects)):
        stray = sorted({s for s in t["shard"].to_pylist() if s not in committed})
        if stray:
            add(f"{name}: rows of uncommitted shard(s) {stray[:10]}")
    seen = Counter(proteins["source"].to_pylist()) + Counter(rejects["source"].to_pylist())
    for source, n in seen.items():
        if n > 1:
            add(f"record {source} is stored {n} times (proteins + rejects)")
        elif source not in expected:
            add(f"record {source} is in the tables but not in the input")
    for source, (id_, _, shard) in expected.items():
        if source not in seen and shard in committed:
            add(f"record {source} ({id_}) is in neither proteins nor rejects")
    for row in proteins.to_pylist():
        want = expected.get(row["source"])
        if want is None:
            continue
        if want[0] != row["id"]:
            add(f"protein {row['id']} at {row['source']}: the input has id {want[0]} there")
        elif want[1] is None:
            add(f"protein {row['id']} at {row['source']}: the input record there is a reject")
        elif want[1] != _seq_digest(row["sequence"]):
            add(f"protein {row['id']} at {row['source']}: stored sequence differs from the input")
    for row in rejects.to_pylist():
        want = expected.get(row["source"])
        if want is not None and want[0] != row["id"]:
            add(f"reject {row['id']} at {row['source']}: the input has id {want[0]} there")
    ids = Counter(proteins["id"].to_pylist())
    dup_ids = [i for i, n in ids.items() if n > 1]
    if dup_ids:
        add(f"proteins: {len(dup_ids)} id(s) stored more than once, e.g. {dup_ids[0]}")

    # --- residues
    if RESIDUES in tables:
        problems += _check_residues(tables[RESIDUES], proteins, cfg)
    if len(problems) > MAX_LINES:
        problems = problems[:MAX_LINES] + [f"... and {len(problems) - MAX_LINES} more"]
    return problems


def _check_fit(root: Path, manifest: dict[str, Any]) -> list[str]:
    if not manifest or not manifest.get("tensors_sha256"):
        return []  # extraction with one model: no fit
    from rdscale.io.runs import Run

    found = Run(root).fit_location(manifest, {})  # recorded relative to the run, else <run>/fit
    artifact = Path(found.path) if found is not None and found.is_local else root / "fit"
    path = artifact / "manifest.json"
    if not path.exists():
        return [f"the fit the tables were embedded with ({artifact}) is gone; metadata cannot be checked"]
    on_disk = json.loads(path.read_text())
    out = []
    if on_disk.get("tensors_sha256") != manifest.get("tensors_sha256"):
        out.append(f"the fit at {artifact} is not the one the tables were embedded with (tensors digest differs)")
    have = [(m.get("name"), m.get("sha256")) for m in on_disk.get("models", [])]
    want = [(m.get("name"), m.get("sha256")) for m in manifest.get("models", [])]
    if have != want:
        out.append(f"the fit at {artifact} names models {have}, the tables' metadata {want}")
    return out


def _check_residues(path: Path, proteins: pa.Table, cfg: Config) -> list[str]:
    out = []
    residues = lance.dataset(str(path)).to_table(columns=["id", "pos"])
    if residues.num_rows == 0 and proteins.num_rows == 0:
        return out
    per_id = residues.group_by("id").aggregate([("pos", "count"), ("pos", "count_distinct"), ("pos", "max")])
    dup = per_id.filter(pc.not_equal(per_id["pos_count"], per_id["pos_count_distinct"]))
    if dup.num_rows:
        out.append(f"residues: (id, pos) stored more than once for {dup.num_rows} protein(s), e.g. {dup['id'][0]}")
    lengths = dict(zip(proteins["id"].to_pylist(), proteins["sequence"].to_pylist()))
    truncate = cfg.embedding.long_policy == "truncate"
    wrong = []
    for row in per_id.to_pylist():
        seq = lengths.get(row["id"])
        if seq is None:
            out.append(f"residues of {row['id']}, which is not in proteins")
            continue
        n = min(len(seq), cfg.embedding.window) if truncate else len(seq)
        if row["pos_count_distinct"] != n or row["pos_max"] != n - 1:
            wrong.append(row["id"])
    if wrong:
        out.append(f"residues: {len(wrong)} protein(s) without exactly one row per residue, e.g. {wrong[0]}")
    absent = set(lengths) - set(per_id["id"].to_pylist())
    if absent:
        out.append(f"residues: {len(absent)} protein(s) have no residue rows, e.g. {sorted(absent)[0]}")
    return out
