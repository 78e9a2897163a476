"""Grow an embedded run to a larger model without re-embedding it (`rdscale extend`).

A run embedded at level m stores z = acc_m, the accumulated representation that chain step m+1 regresses on. So
the step needs only z and the new model's h: the new residual block is ([z; h] - mean) @ P, a 2-block `ChainFit`
on (k_m, k_new) whose first block is z itself. It comes either

- from the stored prefix: moments of [z; h] over a sample of the run's residues, solved by `fit_chain` — the same
  formula as step m+1 of a long chain fitted from scratch (chain.py's sign convention depends on V only, so the
  directions agree too); or
- from a longer fit that already holds the new model, fitted together with this run's fit (`from_fit`): its last
  step, re-expressed in z coordinates.

Then every residue and protein gets the new embedding, (.., k_new) = [z, new block], written as a new version of
the `embedding` column (the old version stays readable by version number): the smaller models never run. Per
protein the new block is ([mean z; mean h] - mean) @ P, the mean of the per-residue blocks (the map is affine).

Resumable: the step artifact is written first and reused; finished Lance fragments are recorded in
`<run>/extend.partial/` and skipped on restart; the column switch at the end is a Lance commit plus two
metadata-only operations, each detected and completed on restart.

Extendable runs store the residue table at full width (output.storage_width null). float32 residues extend
exactly; float16 residues extend within float16 rounding of z.

`extend` reads as its steps: `plan_extension` (the run as stored, the new model) -> `_step` (reused, from a longer
fit, or the executor's `extend_fit_step`) -> `_extend_tables` (the executor's `extend_runner` over each table's
fragments, committed as one Merge) -> `_commit` (the new level in every table's metadata). The new model runs in
the executor's stage (rdscale.run.stages.FragmentExtender), in this process or in Ray actors; the step's
mathematics is rdscale.fit.extension.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lance
from lance.fragment import FragmentMetadata

from rdscale.config import Config
from rdscale.fit.artifact import load_fit, save_fit
from rdscale.fit.chain import ChainFit
from rdscale.fit.extension import ExtendError, check_prefix_fit, step_from_longer_fit
from rdscale.io.lease import fenced
from rdscale.io.location import Location, set_storage_options, storage_options
from rdscale.io.runs import EXTENSIONS_KEY, Run, incomplete_message, open_dataset
from rdscale.io.store import (
    LEDGER,
    META_LEVELS,
    META_MANIFEST,
    PROTEINS,
    REJECTS,
    RESIDUES,

)
from rdscale.model.loading import describe_model
from rdscale.progress import Progress
from rdscale.run.executor import Executor, FragmentRunner, make_executor
from rdscale.run.stages import EMBEDDING, STAGED

log = logging.getLogger(__name__)

__all__ = ["ExtendError", "ExtendSummary", "Extension", "check_extendable", "extend", "storage_overrides"]


@dataclass
class ExtendSummary:
    run_dir: str
    old_width: int
    new_width: int
    model: str
    step_source: str
    models_loaded: list[str] = field(default_factory=list)
    proteins: int = 0
    residues: int = 0
    fragments_skipped: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.residues / self.seconds if self.seconds else 0.0
        return [
            f"extended {self.run_dir}: rd.{self.old_width} -> rd.{self.new_width} with {self.model}",
            f"step: {self.step_source}",
            f"proteins: {self.proteins}   residues: {self.residues}   ({rate:,.0f} residues/s, "
            f"{self.fragments_skipped} fragment(s) already done)",
            f"models run: {', '.join(self.models_loaded) or 'none'}",
        ]


# ---------------------------------------------------------------------------------------------------------------
# what is there


def _open(run: Run, name: str) -> lance.LanceDataset | None:
    return run.dataset(name) if run.has_table(name) else None


def _width(ds: lance.LanceDataset, column: str = EMBEDDING) -> int:
    return ds.schema.field(column).type.list_size


@dataclass
class Stored:
    """What an extendable run holds: its chain levels, embedding width, fit manifest and recorded config."""

    levels: list[int]
    width: int
    manifest: dict
    config: dict
    has_residues: bool


def check_extendable(run: Run | str | Path) -> Stored:
    """The run's levels, manifest and config, or ExtendError saying why it cannot be extended."""
    run = run if isinstance(run, Run) else Run(run)
    proteins = _open(run, PROTEINS)
    if proteins is None:
        raise ExtendError(f"{run} holds no rdscale run (no proteins.lance)")
    meta = run.metadata()
    levels = [int(w) for w in meta.get("levels", [])]
    width = _width(proteins) if EMBEDDING in proteins.schema.names else None
    if width is None or not levels:
        raise ExtendError(f"{run}/proteins.lance has no embedding column or no chain levels; is it an rdscale run?")
    residues = _open(run, RESIDUES)
    if residues is not None and EMBEDDING in residues.schema.names and _width(residues) < width:
        raise ExtendError(
            f"{run}/residues.lance stores a {_width(residues)}-wide prefix of the {width}-wide embedding "
            f"(output.storage_width={_width(residues)}): the next chain step regresses on the full-width "
            f"embedding, so this run cannot be extended. Re-run with output.storage_width: null (float32 residues "
            f"extend exactly, float16 within float16 rounding), or extend per-protein only after deleting "
            f"residues.lance."
        )
    return Stored(levels=levels, width=width, manifest=meta.get("fit_manifest") or {},
                  config=meta.get("config") or {}, has_residues=residues is not None)


# ---------------------------------------------------------------------------------------------------------------
# writing


def _extend_table(uri: str, runner: FragmentRunner, partial: Location, bar: Progress) -> tuple[int, int]:
    """New column version for every fragment (skipping those recorded in `partial`), committed as one Merge, then
    switched in for `embedding`. Returns (rows written, fragments skipped).

    runner(fragment_ids, version) yields (fragment_id, fragment metadata JSON, schema) as they finish, in any order
    (the executor's extend pass)."""
    ds = open_dataset(uri)
    if STAGED in ds.schema.names:  # killed between the Merge commit and the switch
        return _switch(uri), 0
    if any(f.deletion_file() is not None for f in ds.get_fragments()):
        # Row-aligned new columns need fragments without deletion vectors; compaction materialises deletions.
        with fenced(uri, "extend compact"):
            open_dataset(uri).optimize.compact_files(materialize_deletions=True,
                                                     materialize_deletions_threshold=0.0)
        ds = open_dataset(uri)
        partial.delete()
    partial.mkdir()
    state_file = partial / "version.json"
    if state_file.exists() and json.loads(state_file.read_text())["version"] != ds.version:
        partial.delete()  # the table changed since those fragments were written: start over
        partial.mkdir()
    state_file.write_text(json.dumps({"version": ds.version}))
    all_frags = ds.get_fragments()
    if not all_frags:  # an empty table: nothing to write
        return 0, 0
    # Fragments recorded in an earlier attempt are skipped. (The last fragment is redone when nothing else is,
    # because the Merge needs the new schema that only merge_columns returns.)
    todo = [f for f in all_frags if not (partial / f"{f.fragment_id}.json").exists()] or [all_frags[-1]]
    skipped = len(all_frags) - len(todo)
    bar.update(skipped)
    rows_of = {f.fragment_id: f for f in todo}
    schema, rows = None, 0

    def record(fragment_id: int, as_json) -> None:
        nonlocal rows
        (partial / f"{fragment_id}.json").write_text(as_json if isinstance(as_json, str) else json.dumps(as_json))
        rows += rows_of[fragment_id].count_rows()
        bar.update(1)

    for fragment_id, as_json, schema in runner([f.fragment_id for f in todo], ds.version):
        record(fragment_id, as_json)
    fragments = [FragmentMetadata.from_json((partial / f"{f.fragment_id}.json").read_text()) for f in all_frags]
    with fenced(uri, "extend merge"):  # each commit proves the run's lease is still ours (rdscale.io.lease)
        lance.LanceDataset.commit(uri, lance.LanceOperation.Merge(fragments, schema), read_version=ds.version,
                                  storage_options=Location.parse(uri).storage_options or None)
    _switch(uri)
    return rows, skipped


def _switch(uri: str) -> int:
    """Make the staged column the `embedding` column (two metadata-only steps, each safe to redo)."""
    with fenced(uri, "extend switch"):
        ds = open_dataset(uri)
        if EMBEDDING in ds.schema.names:
            ds.drop_columns([EMBEDDING])
        ds.alter_columns({"path": STAGED, "name": EMBEDDING})
        return ds.count_rows()


def _update_metadata(uri: str, levels: list[int], manifest: dict, extension: dict) -> None:
    with fenced(uri, "extend metadata"):
        _write_metadata(uri, levels, manifest, extension)


def _write_metadata(uri: str, levels: list[int], manifest: dict, extension: dict) -> None:
    ds = open_dataset(uri)
    md = {k.decode(): v.decode() for k, v in (ds.schema.metadata or {}).items()}
    exts = json.loads(md.get(EXTENSIONS_KEY, "[]"))
    if not any(e["width"] == extension["width"] for e in exts):
        exts.append(extension)
    md[META_LEVELS.decode()] = json.dumps(levels)
    md[META_MANIFEST.decode()] = json.dumps(manifest, sort_keys=True)
    md[EXTENSIONS_KEY] = json.dumps(exts)
    ds.update_schema_metadata(md, replace=True)


# ---------------------------------------------------------------------------------------------------------------
# the verb


def storage_overrides(overrides: Sequence[str]) -> None:
    """`--set storage.options={...}` among the overrides: made process-wide at once (the run's own config never
    records them, and its metadata cannot be read without them)."""
    given = Config.from_dict({}, [o for o in overrides if o.strip().startswith("storage.")]).storage.options
    if given:
        set_storage_options(given)




@dataclass
class Extension:
    """One `extend`: the run, what it stores, the new model, and where its step and finished fragments go."""

    run: Run
    model: str  # as the executor loads it: a hub name, or an absolute checkpoint path
    new: dict  # the new model's description (name, source, width, layers, sha256)
    stored: Stored
    cfg: Config  # the run's recorded config with the overrides: the executor's settings

    @property
    def width(self) -> int:
        return self.stored.width

    @property
    def k_new(self) -> int:
        return int(self.new["width"])

    @property
    def step_dir(self) -> Location:
        return self.run.fit_ext(self.width)

    @property
    def partial(self) -> Location:
        return self.run.extend_partial


def extend(run_dir: str | Path, model: str, from_fit: str | Path | None = None, sample_sequences: int = 1000,
           regression: str = "pcr", overrides: Sequence[str] = (), progress: bool = True,
           local: bool | None = None, executor: Executor | None = None) -> ExtendSummary:
    """Move the run in `run_dir` up one chain level with `model` (see the module docstring).

    local: True runs the new model in this process; False through the Ray executor (actors over the stored
    fragments, like `embed`); None follows the run's recorded `ray.address` (`local` = in-process). An `executor`
    given runs it, whatever `local` says."""
    started = time.perf_counter()
    storage_overrides(overrides)
    ext = plan_extension(run_dir, model, overrides, local)
    executor = executor or make_executor(ext.cfg)
    summary = ExtendSummary(run_dir=str(ext.run), old_width=ext.width, new_width=ext.k_new, model=ext.new["name"],
                            step_source="", models_loaded=[ext.new["source"]])
    step, summary.step_source = _step(ext, executor, from_fit, sample_sequences, regression)
    _extend_tables(ext, executor, step, summary, progress)
    _commit(ext, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def plan_extension(run_dir: str | Path, model: str, overrides: Sequence[str], local: bool | None) -> Extension:
    """The run as stored (complete, extendable), the new model (wider), and the config the executor runs with."""
    run = Run(run_dir if "://" in str(run_dir) else Path(run_dir).absolute())  # actors never see our cwd
    if "://" not in str(model) and (str(model).endswith(".pt") or "/" in str(model)):
        model = str(Path(model).expanduser().absolute())  # a checkpoint path, not a hub name
    if run.has_table(LEDGER) and (why := incomplete_message(run.status())):
        # Extending a partial run would change the tables' schema under the shards still to be embedded.
        raise ExtendError(f"{run} is {why}; finish the run first (rerun the same `rdscale run` command), "
                          "then extend")
    stored = check_extendable(run)
    cfg = Config.from_dict(stored.config, list(overrides)) if stored.config else Config()
    cfg.storage.options = storage_options()  # never recorded in the run: this process's go to the workers
    if local is True:
        cfg.ray.address = "local"
    elif local is False and cfg.ray.address == "local":
        cfg.ray.address = None  # the run was embedded in-process; extend it through Ray all the same
    ext = Extension(run=run, model=model, new=describe_model(model), stored=stored, cfg=cfg)
    if ext.k_new <= ext.width:
        raise ExtendError(f"{model} is {ext.k_new} wide; extending a {ext.width}-wide run needs a wider model")
    return ext


def _step(ext: Extension, executor: Executor, from_fit, sample_sequences: int, regression: str) -> tuple[ChainFit, str]:
    """The extension step and where it came from: reused from an interrupted extension, the last step of a longer
    fit, or fitted by the executor on a sample of the stored prefix. Saved before any fragment is written."""
    step_dir = ext.step_dir
    if (step_dir / "manifest.json").is_file():
        step, step_manifest = load_fit(step_dir)
        if step_manifest["models"][-1].get("sha256") not in (None, ext.new["sha256"]) \
                or step.widths != (ext.width, ext.k_new):
            raise ExtendError(f"{step_dir} holds an extension step for another model; delete it to start over")
        return step, f"{step_dir} (from an interrupted extension, reused)"
    if from_fit:
        step, moments, n_seq = _step_from_fit(ext, from_fit), None, None
        source = f"last step of {from_fit}"
    else:
        step, moments, n_seq = executor.extend_fit_step(ext.model, ext.cfg, str(ext.run), sample_sequences,
                                                        regression, ext.width)
        source = f"fitted on the stored rd.{ext.width} prefix of {n_seq} proteins ({step.n_residues} residues)"
    # the prefix "model" is this run; named relatively so a copied run's step does not point elsewhere
    models = [{"name": f"rd.{ext.width}", "width": ext.width, "source": ".", "sha256": None}, ext.new]
    extra = {"source": source, "sequences": n_seq}
    if step_dir.is_local:
        staging = Path(str(step_dir) + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        save_fit(step, staging, models=models, moments=moments, extra=extra)
        with fenced(ext.run.uri, "extend step"):
            staging.rename(step_dir.path)
    else:  # no renames on object stores: the manifest, written last, marks a complete artifact
        save_fit(step, step_dir, models=models, moments=moments, extra=extra)
    return step, source


def _step_from_fit(ext: Extension, from_fit) -> ChainFit:
    """The last step of a longer fit, checked against the run's own fit and the new model."""
    longer, longer_manifest = load_fit(from_fit)
    base_dir = ext.run.fit_location(ext.stored.manifest, ext.stored.config)
    if base_dir is None:
        raise ExtendError(f"the run's fit artifact ({ext.run.resolve(ext.stored.manifest.get('artifact')) or ext.run.fit}"
                          ") is gone; cannot check --from-fit against it")
    check_prefix_fit(longer, load_fit(base_dir)[0])
    sha = longer_manifest["models"][-1].get("sha256")
    if sha and ext.new["sha256"] and sha != ext.new["sha256"]:
        raise ExtendError(f"--from-fit's last model ({longer_manifest['models'][-1].get('name')}) is not "
                          f"{ext.model} (checkpoint hashes differ)")
    return step_from_longer_fit(longer, ext.width)


def _extend_tables(ext: Extension, executor: Executor, step: ChainFit, summary: ExtendSummary,
                   progress: bool) -> None:
    """The executor's extend pass over residues (when stored), then proteins; each table committed as one Merge."""
    run = ext.run
    proteins_uri = run.table_uri(PROTEINS)
    tables = [RESIDUES, PROTEINS] if ext.stored.has_residues else [PROTEINS]
    n_frags = sum(len(run.dataset(t).get_fragments()) for t in tables)
    with Progress(total=n_frags, unit="fragment", desc="extending", enabled=progress) as bar:
        for table in tables:
            uri = run.table_uri(table)
            ds = open_dataset(uri)
            if EMBEDDING in ds.schema.names and _width(ds) == ext.k_new:
                log.info("%s already extended to %d", table, ext.k_new)
                continue
            # residues keep their stored dtype; proteins' is read per batch (output.protein_dtype)
            out_type = (ds.schema.field(EMBEDDING if EMBEDDING in ds.schema.names else STAGED).type.value_type
                        if table == RESIDUES else None)
            runner = executor.extend_runner(ext.model, ext.cfg, table, uri, step, out_type, proteins_uri)
            rows, skipped = _extend_table(uri, runner, ext.partial / table, bar)
            summary.fragments_skipped += skipped
            if table == RESIDUES:
                summary.residues = rows
            else:
                summary.proteins = rows
    summary.proteins = summary.proteins or open_dataset(proteins_uri).count_rows()


def _commit(ext: Extension, summary: ExtendSummary) -> None:
    """The new level in every table's metadata (rejects too: every table names the same fit manifest, which
    `rdscale verify` checks; proteins last), then the record of finished fragments goes."""
    run, manifest = ext.run, ext.stored.manifest
    new_manifest = dict(manifest)
    new_manifest["models"] = list(manifest.get("models", [])) + [ext.new]
    new_manifest["extensions"] = list(manifest.get("extensions", [])) + [
        {"width": ext.k_new, "step": run.ref(ext.step_dir), "source": summary.step_source}]
    extension = {"width": ext.k_new, "model": ext.new, "step": run.ref(ext.step_dir), "from": ext.width}
    tables = [RESIDUES] * ext.stored.has_residues + [REJECTS] * run.has_table(REJECTS) + [PROTEINS]
    for table in tables:
        _update_metadata(run.table_uri(table), ext.stored.levels + [ext.k_new], new_manifest, extension)
    ext.partial.delete()
