"""The driver of `rdscale fit / embed / run`: plans shards, runs the fit pass and the apply pass through an
executor (rdscale/run/executor.py: the same stages in this process or on Ray), commits on the run, summarises.

`embed` reads as its steps: `_plan_embedding` (the fit, the shards, the tables' schemas) -> `_open_store` (what
is committed, what is left) -> `_apply` (the executor's apply pass, each shard committed as it completes) ->
`_finish` (completeness, duplicates across shards, indexes, counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rdscale.config import Config, ConfigError
from rdscale.fit.artifact import ArtifactMismatchError, load_fit, save_fit
from rdscale.fit.chain import fit_chain
from rdscale.fit.moments import Moments
from rdscale.io.fasta import Shard, ValidationOptions, nucleotide_share, plan_shards
from rdscale.io.lease import WriterLease
from rdscale.io.location import Location, set_storage_options
from rdscale.io.runs import Run, default_fit, recorded_config
from rdscale.io.store import (
    DATA_TABLES,
    RESIDUES,
    RunStore,
    ShardCommitter,
    ShardResult,
    StoreError,
    run_schemas,
    schema_metadata,
)
from rdscale.model.loading import describe_model
from rdscale.progress import Progress
from rdscale.run import dedupe, provenance
from rdscale.run.executor import Executor, make_executor
from rdscale.run.integrity import (
    EMPTY_DIGEST,
    check_complete,
    clear_run,
    clear_stale_staging,
    fingerprints,
    refuse_or_redo,
    shard_key,
    write_plan,
    writing,
)
from rdscale.run.stages import sample_plan

log = logging.getLogger(__name__)


@dataclass
class Summary:
    out_dir: str
    records: int = 0
    proteins: int = 0
    residues: int = 0
    rejects: int = 0
    duplicates_moved: int = 0
    copies: int = 0  # records whose identical sequence was embedded once for all of them (input.dedupe_sequences)
    residues_saved: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # already committed by an earlier, interrupted run
    seconds: float = 0.0
    residues_embedded: int = 0  # by this invocation
    tables: dict[str, str] = field(default_factory=dict)
    fit_dir: str | None = None
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.residues_embedded / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"records: {self.records} (proteins {self.proteins} + rejects {self.rejects})",
            f"residues: {self.residues if 'residues' in self.tables else 'no table (output.residues: false)'}   "
            f"this run: {self.residues_embedded} embedded in {self.seconds:.1f} s ({rate:,.0f} residues/s)",
            f"shards: {self.shards_total} ({self.shards_skipped} already committed, skipped)",
        ]
        if self.duplicates_moved:
            out.append(f"duplicate ids moved to rejects: {self.duplicates_moved}")
        if self.copies:
            out.append(f"identical sequences: {self.copies} record(s) written as copies, not embedded again "
                       f"({self.residues_saved:,} residues saved)")
        if self.fit_dir:
            out.append(f"fit artifact: {self.fit_dir}")
        out += [f"{name}: {path}" for name, path in self.tables.items()]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def plan(cfg: Config) -> list[Shard]:
    if not cfg.input.paths:
        raise ConfigError("no input FASTA files: set input.paths in the config or pass --fasta")
    missing = [p for p in cfg.input.paths if not Location.parse(p).is_file()]
    for p in missing:
        if not Location.parse(p).is_local:  # name a missing bucket as such
            raise ConfigError(f"input file not found: {Location.parse(p).not_found_error()}")
    if missing:
        folders = [p for p in missing if Location.parse(p).is_local and Location.parse(p).is_dir()]
        if folders:  # a folder is not read as "every FASTA in it": name the files (a shell glob does)
            raise ConfigError(f"input path(s) are directories, not FASTA files: {', '.join(folders)}; name the "
                              "files, e.g. --fasta dir/*.fasta")
        raise ConfigError(f"input file(s) not found: {', '.join(missing)}")
    shards = plan_shards(cfg.input.paths, shard_bytes=int(cfg.input.shard_mb * (1 << 20)),
                         index_dir=Run(cfg.output.dir).gzip_index)
    _warn_if_nucleotide(cfg.input.paths)
    return shards


_WARNED_NUCLEOTIDE: set[str] = set()  # once per file and process (`run` plans for its fit and for its embedding)


def _warn_if_nucleotide(paths) -> None:
    """DNA or RNA is valid protein text (A C G T U N are amino-acid letters) and would be embedded silently."""
    for path in paths:
        if path in _WARNED_NUCLEOTIDE:
            continue
        try:
            share, seen = nucleotide_share(path)
        except (ValueError, OSError):
            continue  # damaged: the reading pass reports it
        if seen >= 100 and share >= 0.9:
            _WARNED_NUCLEOTIDE.add(path)
            log.warning("%s looks like nucleotide sequences (%.0f%% of its first %d residues are A, C, G, T, U or "
                        "N); rdscale embeds protein sequences and reads these letters as amino acids", path,
                        100 * share, seen)


def check_fit_models(fit_dir: Path, models: Sequence[str]) -> None:
    """Refuse a fit made from other models than the config's (count, order, names, widths, checkpoint digests)."""
    try:
        load_fit(fit_dir, expect_models=[describe_model(m) for m in models])
    except ArtifactMismatchError as err:
        raise ArtifactMismatchError(
            f"{fit_dir} was fitted with other models than the config names ({err}); rerun with --restart to start "
            "over with these models, or choose a new output.dir"
        ) from None


def _check_models(cfg: Config) -> list[str]:
    if not cfg.models:
        raise ConfigError("no models: set `models` (the chain, smallest first) in the config or pass --models")
    return list(cfg.models)


def fit(cfg: Config, executor: Executor | None = None, out: str | Path | None = None,
        final: str | Path | None = None) -> Path:
    """Fit pass: moments of the chain's embeddings on the sample, merged, solved; writes the fit artifact.
    `final`: where the artifact ends up when `out` is a staging directory (only for the log line)."""
    set_storage_options(cfg.storage.options)
    models = _check_models(cfg)
    if len(models) < 2:
        raise ConfigError("a fit needs a chain of at least two models (smallest first)")
    if out is None:  # <output.dir>/fit belongs to the run there: write it under the run's lease, staged
        with writing(cfg.output.dir) as lease:
            root = Path(cfg.output.dir)
            staging = fit(cfg, executor, out=Path(Run(root).partial_fit(lease.run_id)))
            with lease.step("fit"):
                if Path(default_fit(root)).exists():
                    shutil.rmtree(default_fit(root))
                staging.rename(default_fit(root))
            return Path(default_fit(root))
    executor = executor or make_executor(cfg)
    shards = plan(cfg)
    sample = sample_plan(shards, cfg.fit.sample_sequences)
    started = time.perf_counter()
    log.info("fit pass: %d models, sample of up to %d sequences from %d shards",
             len(models), cfg.fit.sample_sequences, len(sample))
    parts = executor.fit_moments(models, cfg, sample)
    merged = Moments.from_arrays(parts[0]["moments"])
    for part in parts[1:]:
        merged = merged.merge(Moments.from_arrays(part["moments"]))
    sequences = sum(p["sequences"] for p in parts)
    residues = sum(p["residues"] for p in parts)
    if sequences == 0:
        raise ConfigError("the fit sample is empty: no accepted sequence was found in the sampled shards")
    if sequences < cfg.fit.sample_sequences:
        log.warning("fit sample has %d sequences (asked for %d): the input is smaller than the sample, or the "
                    "sampled shards ran short", sequences, cfg.fit.sample_sequences)
    model_info = parts[0]["models"]
    fit_result = fit_chain(merged, [m["width"] for m in model_info], regression=cfg.fit.regression)
    fit_dir = Location.parse(out) if out else default_fit(cfg.output.dir)
    save_fit(
        fit_result, fit_dir, models=model_info,
        extra={"sequences": sequences, "residues": residues, "config": recorded_config(cfg.to_dict()),
               "seconds": time.perf_counter() - started},
        moments=merged,
    )
    log.info("fit artifact written to %s (%d sequences, %d residues)", final or fit_dir, sequences, residues)
    return Path(fit_dir.path) if fit_dir.is_local else fit_dir  # a remote artifact stays a Location


def _file_fingerprint(path: str) -> dict[str, Any]:
    loc = Location.parse(path)
    return {"path": str(Path(loc.path).resolve()) if loc.is_local else loc.uri}


def run_key(cfg: Config, shards: Sequence[Shard], manifest: dict) -> str:
    """What makes two invocations 'the same run' (safe to resume into the same tables): which input files, models,
    fit and settings. What the inputs held is checked shard by shard against the ledger (rdscale.run.integrity),
    so an input edited in place is refused by name, or its changed shards redone, rather than mixed in."""
    e = cfg.embedding
    payload = {
        "inputs": [_file_fingerprint(p) for p in cfg.input.paths],
        "shard_bytes": int(cfg.input.shard_mb * (1 << 20)),
        "models": [(m.get("name"), m.get("sha256")) for m in manifest.get("models", [])],
        "fit": manifest.get("tensors_sha256"),
        "embedding": [e.layer, e.long_policy, e.window, e.overlap],
        "remove_gaps": cfg.input.remove_gaps,
        "output": [cfg.output.residues, cfg.output.storage_width, cfg.output.residue_dtype],
    }
    if cfg.output.protein_dtype != "float32":  # only when set, so the keys of earlier runs stay what they were
        payload["protein_dtype"] = cfg.output.protein_dtype
    if dedupe.enabled(cfg):  # only when on, so the keys of runs made without it stay what they were
        payload["dedupe_sequences"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class EmbedPlan:
    """What one `embed` commits: the models and their fit, the shards, and the tables they go to."""

    models: list[str]
    fit_dir: str | None
    shards: list[Shard]
    schemas: dict[str, Any]
    key: str  # run_key: what makes two invocations the same run
    duplicates: dedupe.DuplicatePlan | None = None


def embed(cfg: Config, fit_dir: str | Path | None = None, executor: Executor | None = None,
          progress: bool = True, *, lease: WriterLease | None = None, redo_changed: bool = False,
          restart: bool = False) -> Summary:
    """Apply pass: every input record into proteins / residues, or rejects. Resumes an interrupted run in the
    same output.dir. With one model and no fit, this is plain extraction (`rdscale extract`).
    Holds the run's writer lease throughout (`lease`: one the caller already holds). redo_changed: redo committed
    shards whose input changed instead of refusing; restart: delete the previous tables first (not the fit)."""
    set_storage_options(cfg.storage.options)
    if lease is None:
        with writing(cfg.output.dir) as held:
            return embed(cfg, fit_dir, executor, progress, lease=held, redo_changed=redo_changed, restart=restart)
    if restart:
        with lease.step("restart"):
            _clear(cfg.output.dir, keep_fit=True)
    executors = _once(executor, cfg)  # Ray starts only if a step needs it
    planned = _plan_embedding(cfg, fit_dir or cfg.fit.artifact, lease, executors, progress)
    state = _open_store(cfg, planned, lease, redo_changed)
    if state.todo:
        _apply(cfg, planned, state, executors(), progress)
    _finish(cfg, planned, state)
    return state.summary


def _once(executor: Executor | None, cfg: Config) -> Callable[[], Executor]:
    """`executor`, or the config's, made on first use."""
    held = [executor]

    def get() -> Executor:
        if held[0] is None:
            held[0] = make_executor(cfg)
        return held[0]

    return get


def _plan_embedding(cfg: Config, fit_dir: str | Path | None, lease: WriterLease, executors, progress: bool) -> EmbedPlan:
    """The fit (checked against the models), the shards (grouped for dedupe), the tables' schemas and run key."""
    models = _check_models(cfg)
    if fit_dir:
        fit_obj, manifest = load_fit(fit_dir, expect_models=[describe_model(m) for m in models])
        # where `extend` and `search` find it again: relative to the run when inside it (a copied run still works)
        manifest = {**manifest, "artifact": Run(cfg.output.dir).ref(_absolute(fit_dir))}
        names = [m.get("source") or m.get("name") for m in manifest["models"]]
        if len(names) != len(models):
            raise ConfigError(
                f"the fit at {fit_dir} is for a chain of {len(names)} models ({', '.join(names)}), "
                f"but the config names {len(models)}"
            )
        levels = list(fit_obj.levels)
    elif len(models) == 1:
        info = describe_model(models[0])
        manifest = {"models": [info], "chain": [info["name"]], "fit": None}
        levels = [info["width"]]
    else:
        raise ConfigError("a chain of several models needs a fit: run `rdscale fit` first or use `rdscale run`")
    shards = plan(cfg)
    duplicates = None
    if dedupe.enabled(cfg):
        cache = Run(cfg.output.dir).dedupe_plan
        duplicates, reused = dedupe.cached_plan(cache, shards, ValidationOptions(remove_gaps=cfg.input.remove_gaps),
                                                guard=lease.step, progress=progress,
                                                map_shards=executors().map_shards)
        shards = duplicates.shards
        log.info("%s%s", duplicates.line(), " (the grouping of an earlier start of this plan)" if reused else "")
    key = run_key(cfg, shards, manifest)
    metadata = schema_metadata(levels, manifest, recorded_config(cfg.to_dict()), key)
    schemas = run_schemas(levels[-1], cfg.output.storage_width, metadata, residues=cfg.output.residues,
                          residue_dtype=cfg.output.residue_dtype, protein_dtype=cfg.output.protein_dtype)
    return EmbedPlan(models=models, fit_dir=str(fit_dir) if fit_dir else None, shards=shards, schemas=schemas,
                     key=key, duplicates=duplicates)


@dataclass
class EmbedState:
    """The run being written: its tables, the shards still to embed, the ledger rows already committed."""

    store: RunStore
    todo: list[Shard]
    committed: list[dict]
    summary: Summary
    started: float = field(default_factory=time.perf_counter)  # this invocation's embedding began
    committer: ShardCommitter | None = None  # the apply pass's (its commit latencies: bench/bench_scale.py)


def _open_store(cfg: Config, planned: EmbedPlan, lease: WriterLease, redo_changed: bool) -> EmbedState:
    """The run's tables, recovered from an interrupted commit and checked against the inputs; the plan recorded;
    the shards still to embed."""
    shards = planned.shards
    store = RunStore(cfg.output.dir, planned.schemas, planned.key, lease=lease)
    removed = store.recover()
    refuse_or_redo(store, shards, ValidationOptions(remove_gaps=cfg.input.remove_gaps), redo=redo_changed)
    write_plan(store, shards)
    done = store.committed()
    todo = [s for s in shards if s.index not in done]
    summary = Summary(out_dir=str(store.root), shards_total=len(shards), shards_skipped=len(shards) - len(todo),
                      fit_dir=planned.fit_dir)
    if planned.duplicates is not None:
        summary.copies, summary.residues_saved = planned.duplicates.copies, planned.duplicates.residues_saved
    if removed:
        log.warning("removed %d rows left by an interrupted commit", removed)
    return EmbedState(store=store, todo=todo, committed=list(done.values()), summary=summary)


def _apply(cfg: Config, planned: EmbedPlan, state: EmbedState, executor: Executor, progress: bool) -> None:
    """The executor's apply pass over the shards to do; each is committed once all its records came back."""
    store, todo, summary = state.store, state.todo, state.summary
    uris = {name: store.uri(name) for name in planned.schemas}
    stats = fingerprints(planned.shards)
    keys = {s.index: shard_key(s) for s in planned.shards}
    records_seen = 0
    watch = provenance.ChangeWatch(state.committed, log)
    with Progress(total=len(todo), unit="shard", desc="embedding", enabled=progress) as bar:
        committer = committer_for(cfg, store, lambda index, result: (keys[index], ledger_values(stats[index], result)),
                                  bar.update)
        state.committer = committer
        with committer:  # shards committed in groups sized for the store; finished ones also when the pass fails
            for index, total, part in executor.apply(cfg, planned.models, planned.fit_dir, uris, planned.schemas,
                                                     todo):
                watch.see(part.provenance)
                summary.residues_embedded += part.embedded
                records_seen += part.records
                bar.postfix(records=records_seen, residues=summary.residues_embedded)
                committer.add(index, total, part)
    if committer.incomplete:
        raise StoreError(
            f"{len(committer.incomplete)} shard(s) did not complete ({committer.incomplete}); their rows were not "
            "committed. Run the same command again to resume."
        )


def committer_for(cfg: Config, store: RunStore, ledger: Callable[[int, ShardResult], tuple[str, dict]],
                  on_commit: Callable[[int], Any] | None = None) -> ShardCommitter:
    """The apply pass's committer: groups of shards whose rows make fragments of output.fragment_rows rows or
    output.fragment_mb MiB, or that waited output.fragment_seconds (fragment_rows 0: a shard per commit, the
    fragments its workers wrote)."""
    return ShardCommitter(store, ledger, rows=cfg.output.fragment_rows, mb=cfg.output.fragment_mb,
                          seconds=cfg.output.fragment_seconds, on_commit=on_commit)


def ledger_values(stats: dict[str, Any], result: ShardResult) -> dict[str, Any]:
    """The ledger row's fingerprint of a complete shard: its input file's stats, the records' digest, provenance."""
    digest = result.digest or (EMPTY_DIGEST if result.records == 0 else None)
    return {**stats, "digest": digest, **provenance.ledger_values(result.provenance, result.seconds)}


def _finish(cfg: Config, planned: EmbedPlan, state: EmbedState) -> None:
    """Completeness against the plan, duplicate ids across shards, indexes, compaction, the summary's counts."""
    store, summary = state.store, state.summary
    if state.todo:
        store.drop_derived_columns()  # an index built before this resume does not cover the new rows
    check_complete(store, planned.shards, accounting=False)  # the plan, not only the shards that started
    store.scalar_indexes()  # before the dedupe pass: its deletes are `shard = s AND id IN (...)` lookups
    summary.duplicates_moved = store.dedupe_across_shards()
    if cfg.output.compact and not store.compact():
        summary.warnings.append("compaction failed (see the log); the tables are complete but fragmented")
    store.scalar_indexes()  # the rejects the dedupe pass wrote (a no-op when there were none)
    summary.seconds = time.perf_counter() - state.started
    counts = store.counts()
    summary.records = counts["records"]
    summary.proteins = counts["proteins"]
    summary.rejects = counts["rejects"]
    summary.residues = counts.get(RESIDUES, 0)
    summary.tables = {name: store.uri(name) for name in DATA_TABLES if name in planned.schemas}
    check_complete(store, planned.shards)  # and again after the duplicates moved between tables
    store.cleanup_orphans()


def run(cfg: Config, executor: Executor | None = None, progress: bool = True, *, restart: bool = False,
        redo_changed: bool = False) -> Summary:
    """Fit (unless fit.artifact names an existing fit), then apply; one writer at a time (the run's lease).
    A fit already in <output.dir>/fit is reused only when it was made from the config's models."""
    set_storage_options(cfg.storage.options)
    with writing(cfg.output.dir) as lease:
        if restart:
            with lease.step("restart"):
                _clear(cfg.output.dir)
        fit_dir = cfg.fit.artifact
        if not fit_dir:
            fit_loc = default_fit(cfg.output.dir)
            if fit_loc.join("manifest.json").is_file():
                check_fit_models(fit_loc.path if fit_loc.is_local else fit_loc, _check_models(cfg))
                log.info("reusing the fit already in %s (made from the same models)", fit_loc)
            elif fit_loc.is_local:
                root = Path(cfg.output.dir)
                executor = executor or make_executor(cfg)
                staging = Path(Run(root).partial_fit(lease.run_id))  # per run: never shared with another writer
                with lease.step("clear staging"):
                    clear_stale_staging(root)
                fit(cfg, executor, out=staging, final=fit_loc.path)
                with lease.step("fit"):
                    staging.rename(fit_loc.path)
            else:  # no renames on object stores: the manifest, written last, marks a complete artifact
                # (its files are written without the gate, which a long fit would hold for minutes: a writer that
                # lost its lease meanwhile stops at the step below, and a successor fitting the same sample writes
                # the same bytes, since the fit is deterministic)
                fit(cfg, executor or make_executor(cfg), out=fit_loc)
                with lease.step("fit"):
                    pass  # the proof that the fit just written is this lease holder's, before embedding with it
            fit_dir = fit_loc.uri
        return embed(cfg, fit_dir, executor, progress=progress, lease=lease, redo_changed=redo_changed)


def _clear(out_dir: str, keep_fit: bool = False) -> None:
    """--restart: delete what rdscale wrote into the run (local), or refuse on an object store."""
    loc = Location.parse(out_dir)
    if not loc.is_local:
        raise ConfigError(f"--restart is not supported on object storage: delete {loc.uri} yourself (every object "
                          "under that prefix), then run again")
    clear_run(Path(loc.path), keep_fit=keep_fit)


def _absolute(where: str | Path | Location) -> Location:
    loc = Location.parse(where)
    return Location("file", str(Path(loc.path).resolve())) if loc.is_local else loc
