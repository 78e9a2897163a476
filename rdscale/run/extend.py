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
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rdscale.config import Config
from rdscale.errors import RdscaleError
from rdscale.fit.artifact import ArtifactError, load_fit, save_fit
from rdscale.fit.chain import ChainFit, fit_chain
from rdscale.fit.moments import Moments
from rdscale.io.lease import fenced
from rdscale.io.location import Location, set_storage_options, storage_options
from rdscale.io.runs import EXTENSIONS_KEY, Run, open_dataset
from rdscale.io.store import (
    META_LEVELS,
    META_MANIFEST,
    PROTEINS,
    REJECTS,
    RESIDUES,
    sql_in_list,
)
from rdscale.progress import Progress

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
STAGED = "embedding__extended"  # the new column version while fragments are being written


class ExtendError(RdscaleError, RuntimeError):
    """The run cannot be extended as asked; the message says why and what to do."""


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


def check_extendable(run: Run | str | Path) -> dict[str, Any]:
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
    return {"levels": levels, "width": width, "manifest": meta.get("fit_manifest") or {},
            "config": meta.get("config") or {}, "has_residues": residues is not None}


# ---------------------------------------------------------------------------------------------------------------
# the step


def step_from_longer_fit(longer: ChainFit, width: int) -> ChainFit:
    """The last step of `longer` (whose second-to-last level is `width`) as a 2-block fit on [z; h_new].

    In the long chain, new block = ((h - mu_h) - (acc - mean acc) W) V with acc = z and mean acc = the offset of z
    ([mean h_1, 0, ...], chain.py's `affine`), i.e. ([z; h] - [offset; mu_h]) @ [[-W V], [V]]."""
    if len(longer.widths) < 2 or longer.widths[-2] != width:
        raise ExtendError(f"the longer fit's chain {longer.widths} does not extend a {width}-wide embedding")
    k_new = longer.widths[-1]
    predictor, direction = longer.predictors[-1], longer.directions[-1]  # (width, k_new), (k_new, k_new - width)
    _, _, offset = _truncate(longer, len(longer.widths) - 1).affine()  # offset: (width,)
    mean = np.concatenate([offset, longer.mean[-k_new:]])  # (width + k_new,)
    projection = np.concatenate([-predictor @ direction, direction], axis=0)  # (width + k_new, k_new - width)
    return ChainFit(
        widths=(width, k_new), regression=longer.regression, mean=mean, projection=projection,
        predictors=[predictor], directions=[direction], steps=[longer.steps[-1]], n_residues=longer.n_residues,
        options=dict(longer.options),
    )


def _truncate(fit: ChainFit, levels: int) -> ChainFit:
    """The first `levels` levels of a chain fit: a fit of the first `levels` models (level j uses models <= j)."""
    widths = fit.widths[:levels]
    k_total = sum(widths)
    return ChainFit(
        widths=widths, regression=fit.regression, mean=fit.mean[:k_total],
        projection=fit.projection[:k_total, : widths[-1] - widths[0]],
        predictors=fit.predictors[: levels - 1], directions=fit.directions[: levels - 1],
        steps=fit.steps[: levels - 1], n_residues=fit.n_residues, options=dict(fit.options),
    )


def _check_prefix_fit(longer: ChainFit, base: ChainFit) -> None:
    m = len(base.widths)
    if tuple(longer.widths[:m]) != tuple(base.widths) or len(longer.widths) != m + 1:
        raise ExtendError(f"--from-fit has chain {longer.widths}; this run needs {tuple(base.widths)} + one model")
    head = _truncate(longer, m)
    if not (np.allclose(head.mean, base.mean, rtol=1e-9, atol=1e-12)
            and np.allclose(head.projection, base.projection, rtol=1e-7, atol=1e-9)):
        raise ExtendError(
            "the longer fit's first levels differ from this run's fit (fitted on another sample?), so its last "
            "step does not apply to the stored embeddings; omit --from-fit to fit the step from the stored prefix"
        )


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
    proteins, residues = _open(run, PROTEINS), _open(run, RESIDUES)
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


# ---------------------------------------------------------------------------------------------------------------
# writing


class _ResidueColumn:
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


class _ProteinColumn:
    """merge_columns value function for protein fragments: ([mean z; mean h] - mean) @ P per protein."""

    def __init__(self, step: ChainFit, encoder, means: dict[str, np.ndarray] | None):
        self.step, self.encoder, self.means = step, encoder, means
        self.width, self.k_new = step.widths

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("id").to_pylist()
        if self.means is not None:
            missing = [i for i in ids if i not in self.means]
            if missing:
                raise ExtendError(f"proteins {missing[:3]} have no residues in residues.lance; the run is inconsistent")
            h_mean = np.stack([self.means[i] for i in ids])  # (n, k_new) float64
        else:
            seqs = batch.column("sequence").to_pylist()
            h_mean = np.stack([b[0].double().mean(dim=0).cpu().numpy() for b in self.encoder.blocks(seqs)])
        z_mean = _fsl_numpy(batch.column(EMBEDDING)).astype(np.float64)  # (n, width)
        full = self.step.apply([torch.as_tensor(z_mean), torch.as_tensor(h_mean)], dtype=torch.float64).numpy()
        full[:, : self.width] = z_mean
        stored = batch.column(EMBEDDING).type.value_type  # output.protein_dtype: the widened column keeps it
        dtype = np.float16 if stored == pa.float16() else np.float32
        column = pa.FixedSizeListArray.from_arrays(pa.array(full.astype(dtype).ravel(), stored), self.k_new)
        return pa.RecordBatch.from_arrays([column], names=[STAGED])


def _extend_table(uri: str, fn, columns: list[str], partial: Location, bar: Progress, runner=None) -> tuple[int, int]:
    """New column version for every fragment (skipping those recorded in `partial`), committed as one Merge, then
    switched in for `embedding`. Returns (rows written, fragments skipped).

    runner: None to compute the fragments here with `fn`; else runner(fragment_ids, version) yields
    (fragment_id, fragment metadata JSON, schema) as they finish, in any order (the executor's actors)."""
    from lance.fragment import FragmentMetadata

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

    if runner is None:
        for frag in todo:
            meta, schema = frag.merge_columns(fn, columns=columns)
            record(frag.fragment_id, meta.to_json())
    else:
        for fragment_id, as_json, schema in runner([f.fragment_id for f in todo], ds.version):
            record(fragment_id, as_json)
    fragments = [FragmentMetadata.from_json((partial / f"{f.fragment_id}.json").read_text()) for f in all_frags]
    with fenced(uri, "extend merge"):  # each commit proves the run's lease is still ours (rdscale.io.lease)
        lance.LanceDataset.commit(uri, lance.LanceOperation.Merge(fragments, schema), read_version=ds.version,
                                  storage_options=Location.parse(uri).storage_options or None)
    _switch(uri)
    return rows, skipped


class FragmentExtender:
    """One executor actor's share of `extend` (plain Python; rdscale.cluster.executor runs it in Ray actors): the
    new model loaded once, then whole Lance fragments given the new embedding column (uncommitted; the driver
    commits them all as one Merge), or the step fitted on a sample."""

    def __init__(self, model: str, cfg: Config):
        from rdscale.run.stages import ChainEncoder

        set_storage_options(cfg.storage.options)  # an actor process: the driver's options are not here
        self.encoder = ChainEncoder([model], cfg)

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
            fn, columns = _ResidueColumn(step, self.encoder, sequences, out_type), ["id", "pos", EMBEDDING]
        else:
            # Per-protein mean h from the sequence (a second pass of the new model over each protein): the
            # residue pass's means are spread over the actors, and gathering them would put O(proteins x k_new)
            # on the driver.
            fn, columns = _ProteinColumn(step, self.encoder, None), ["id", "sequence", EMBEDDING]
        meta, schema = frag.merge_columns(fn, columns=columns)
        as_json = meta.to_json()
        return fragment_id, as_json if isinstance(as_json, str) else json.dumps(as_json), schema


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


def extend(run_dir: str | Path, model: str, from_fit: str | Path | None = None, sample_sequences: int = 1000,
           regression: str = "pcr", overrides: Sequence[str] = (), progress: bool = True,
           local: bool | None = None) -> ExtendSummary:
    """Move the run in `run_dir` up one chain level with `model` (see the module docstring).

    local: True runs the new model in this process; False through the Ray executor (actors over the stored
    fragments, like `embed`); None follows the run's recorded `ray.address` (`local` = in-process)."""
    from rdscale.run.stages import ChainEncoder

    started = time.perf_counter()
    storage_overrides(overrides)
    run = Run(run_dir if "://" in str(run_dir) else Path(run_dir).absolute())  # actors never see our cwd
    if "://" not in str(model) and (str(model).endswith(".pt") or "/" in str(model)):
        model = str(Path(model).expanduser().absolute())  # a checkpoint path, not a hub name
    from rdscale.io.store import LEDGER, incomplete_message

    if run.has_table(LEDGER) and (why := incomplete_message(run.status())):
        # Extending a partial run would change the tables' schema under the shards still to be embedded.
        raise ExtendError(f"{run} is {why}; finish the run first (rerun the same `rdscale run` command), "
                          "then extend")
    info = check_extendable(run)
    width, levels, manifest = info["width"], info["levels"], info["manifest"]
    cfg = Config.from_dict(info["config"], list(overrides)) if info["config"] else Config()
    cfg.storage.options = storage_options()  # never recorded in the run: this process's go to the actors
    step_dir = run.fit_ext(width)
    partial_root = run.extend_partial

    if local is True:
        cfg.ray.address = "local"
    elif local is False and cfg.ray.address == "local":
        cfg.ray.address = None  # the run was embedded in-process; extend it through Ray all the same
    executor = None
    if cfg.ray.address == "local":
        encoder = ChainEncoder([model], cfg)  # the only model this command runs
        new = encoder.model_info()[0]
    else:
        from rdscale.model.loading import describe_model
        from rdscale.run.pipeline import make_executor

        encoder = None  # the new model runs in the executor's actors only
        new = describe_model(model)
        executor = make_executor(cfg)
    k_new = new["width"]
    if k_new <= width:
        raise ExtendError(f"{model} is {k_new} wide; extending a {width}-wide run needs a wider model")
    summary = ExtendSummary(run_dir=str(run), old_width=width, new_width=k_new, model=new["name"], step_source="",
                            models_loaded=[new["source"]])

    if (step_dir / "manifest.json").is_file():
        step, step_manifest = load_fit(step_dir)
        if step_manifest["models"][-1].get("sha256") not in (None, new["sha256"]) or step.widths != (width, k_new):
            raise ExtendError(f"{step_dir} holds an extension step for another model; delete it to start over")
        summary.step_source = f"{step_dir} (from an interrupted extension, reused)"
    else:
        if from_fit:
            longer, longer_manifest = load_fit(from_fit)
            base_dir = run.fit_location(manifest, info["config"])
            if base_dir is None:
                raise ExtendError(f"the run's fit artifact ({run.resolve(manifest.get('artifact')) or run.fit}) is "
                                  "gone; cannot check --from-fit against it")
            _check_prefix_fit(longer, load_fit(base_dir)[0])
            sha = longer_manifest["models"][-1].get("sha256")
            if sha and new["sha256"] and sha != new["sha256"]:
                raise ExtendError(f"--from-fit's last model ({longer_manifest['models'][-1].get('name')}) is not "
                                  f"{model} (checkpoint hashes differ)")
            step, moments, n_seq = step_from_longer_fit(longer, width), None, None
            source = f"last step of {from_fit}"
        else:
            if executor is None:
                step, moments, n_seq = fit_step_from_prefix(run, encoder, sample_sequences, regression, width)
            else:
                step, moments, n_seq = executor.extend_fit_step(model, cfg, str(run), sample_sequences, regression,
                                                                width)
            source = f"fitted on the stored rd.{width} prefix of {n_seq} proteins ({step.n_residues} residues)"
        # the prefix "model" is this run; named relatively so a copied run's step does not point elsewhere
        prefix_model = {"name": f"rd.{width}", "width": width, "source": ".", "sha256": None}
        if step_dir.is_local:
            staging = Path(str(step_dir) + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            save_fit(step, staging, models=[prefix_model, new], moments=moments,
                     extra={"source": source, "sequences": n_seq})
            with fenced(run.uri, "extend step"):
                staging.rename(step_dir.path)
        else:  # no renames on object stores: the manifest, written last, marks a complete artifact
            save_fit(step, step_dir, models=[prefix_model, new], moments=moments,
                     extra={"source": source, "sequences": n_seq})
        summary.step_source = source

    proteins_uri, residues_uri = run.table_uri(PROTEINS), run.table_uri(RESIDUES)
    tables = [RESIDUES, PROTEINS] if info["has_residues"] else [PROTEINS]
    n_frags = sum(len(run.dataset(t).get_fragments()) for t in tables)
    proteins = open_dataset(proteins_uri)
    with Progress(total=n_frags, unit="fragment", desc="extending", enabled=progress) as bar:
        means = None
        if info["has_residues"]:
            residues = open_dataset(residues_uri)
            if EMBEDDING in residues.schema.names and _width(residues) == k_new:
                log.info("residues already extended to %d", k_new)
            else:
                out_type = residues.schema.field(EMBEDDING).type.value_type if EMBEDDING in residues.schema.names \
                    else residues.schema.field(STAGED).type.value_type
                if executor is None:
                    sequences = dict(zip(*proteins.to_table(columns=["id", "sequence"]).to_pydict().values()))
                    fn = _ResidueColumn(step, encoder, sequences, out_type)
                    rows, skipped = _extend_table(residues_uri, fn, ["id", "pos", EMBEDDING],
                                                  partial_root / RESIDUES, bar)
                    means = fn.protein_means
                else:
                    runner = executor.extend_runner(model, cfg, RESIDUES, residues_uri, step, out_type, proteins_uri)
                    rows, skipped = _extend_table(residues_uri, None, [], partial_root / RESIDUES, bar, runner)
                summary.residues, summary.fragments_skipped = rows, summary.fragments_skipped + skipped
        if EMBEDDING in proteins.schema.names and _width(proteins) == k_new:
            log.info("proteins already extended to %d", k_new)
        else:
            if means is not None and len(means) < proteins.count_rows():
                # Residue fragments done in an earlier attempt were skipped: their proteins' mean h is missing.
                have = set(means)
                rest = [i for i in proteins.to_table(columns=["id"])["id"].to_pylist() if i not in have]
                seqs = dict(zip(*proteins.to_table(columns=["id", "sequence"], filter=f"id IN ({sql_in_list(rest)})")
                                .to_pydict().values()))
                for key in rest:
                    means[key] = encoder.blocks([seqs[key]])[0][0].double().mean(dim=0).cpu().numpy()
            columns = ["id", EMBEDDING] if means is not None else ["id", "sequence", EMBEDDING]
            runner = None if executor is None else \
                executor.extend_runner(model, cfg, PROTEINS, proteins_uri, step, None, proteins_uri)
            rows, skipped = _extend_table(proteins_uri, _ProteinColumn(step, encoder, means), columns,
                                          partial_root / PROTEINS, bar, runner)
            summary.proteins, summary.fragments_skipped = rows, summary.fragments_skipped + skipped

    new_manifest = dict(manifest)
    new_manifest["models"] = list(manifest.get("models", [])) + [new]
    new_manifest["extensions"] = list(manifest.get("extensions", [])) + [
        {"width": k_new, "step": run.ref(step_dir), "source": summary.step_source}]
    extension = {"width": k_new, "model": new, "step": run.ref(step_dir), "from": width}
    # rejects too: every table names the same fit manifest (`rdscale verify` checks it); proteins last
    rejects = [run.table_uri(REJECTS)] if run.has_table(REJECTS) else []
    for uri in [residues_uri] * info["has_residues"] + rejects + [proteins_uri]:
        _update_metadata(uri, levels + [k_new], new_manifest, extension)
    partial_root.delete()
    summary.proteins = summary.proteins or proteins.count_rows()
    summary.seconds = time.perf_counter() - started
    return summary


def load_query_chain(run_dir: str | Path) -> list[ChainFit]:
    """The fits that turn per-model embeddings into this run's stored embedding: the base fit, then each
    extension step in order (for embedding queries the same way)."""
    run = Run(run_dir)
    meta = run.metadata()
    manifest = meta.get("fit_manifest") or {}
    fits = []
    base = run.fit_location(manifest, meta.get("config") or {})
    if base is not None:
        fits.append(load_fit(base)[0])
    for step in run.extension_steps(manifest):
        try:
            fits.append(load_fit(step)[0])
        except ArtifactError as err:
            raise ExtendError(f"extension step {step} of {run} cannot be read: {err}") from err
    return fits


def apply_chain(fits: Sequence[ChainFit], blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-model embeddings [h_1, ..., h_n] of some residues -> the run's stored embedding, through the base fit
    and then each extension step: z <- step.apply([z, h_next]). blocks: (L, k_i) each; returns (L, width)."""
    if not fits:
        return blocks[0].float()
    base = fits[0]
    m = len(base.widths)
    if len(blocks) != m + len(fits) - 1:
        raise ExtendError(f"{len(blocks)} model outputs for a chain of {m + len(fits) - 1} models")
    z = base.apply(list(blocks[:m]))  # (L, k_m) float32
    for step, h in zip(fits[1:], blocks[m:]):
        z = step.apply([z, h.to(z.dtype)])  # (L, k_next)
    return z
