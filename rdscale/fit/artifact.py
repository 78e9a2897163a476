"""Fit artifact: a directory holding a fitted chain (docs/architecture.md, "moments / chain / artifact").

Layout:
    manifest.json         format and format_version (what the reader checks), version (the rdscale that wrote it),
                          models (name, width, sha256, source), chain order, widths, levels, regression, options,
                          n_residues, n_sequences, steps (per-step diagnostics, StepDiagnostics.to_dict()),
                          tensors_sha256, files (name, sha256 and shapes of each tensor file), extra
    fit.safetensors       float64 matrices: mean (K,), projection (K, k_m - k_1), W.<i> (k_(i-1), k_i),
                          V.<i> (k_i, k_i - k_(i-1)) for target model i = 2..m
    moments.safetensors   optional: count (1,) int64, mean (K,), comoment (K, K) float64 — the merged fit-pass
                          statistics, so a later step can refit (other regression/options) or extend the chain
                          without re-embedding. Size 8 K^2 bytes: 166 KB for the 32/48/64 test family,
                          59 MB for ESM-2 8M..650M (K = 2720), 865 MB for all six ESM-2 sizes (K = 10400).

Loading parses JSON and safetensors only; nothing is unpickled or executed. Anything wrong with an artifact raises
an `ArtifactError` (a ValueError) that says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import rdscale
from rdscale.errors import RdscaleError
from rdscale.fit.chain import REGRESSIONS, ChainFit, ChainFitError, StepDiagnostics
from rdscale.fit.extension import ExtendError
from rdscale.fit.moments import Moments, MomentsError
from rdscale.io.location import Location, is_remote
from rdscale.io.runs import Run

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArtifactError",
    "ArtifactMismatchError",
    "load_fit",
    "load_moments",
    "save_fit",
]

FORMAT = "rdscale.fit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "fit.safetensors"
MOMENTS = "moments.safetensors"


class ArtifactError(RdscaleError, ValueError):
    """A fit artifact is missing, corrupted, or from an unsupported format version."""


class ArtifactMismatchError(ArtifactError):
    """A valid fit artifact that does not match the models it is being used with."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become None; numpy scalars become Python numbers; paths strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fit_tensors(fit: ChainFit) -> dict[str, np.ndarray]:
    tensors = {"mean": fit.mean, "projection": fit.projection}
    for step, w, v in zip(fit.steps, fit.predictors, fit.directions):
        tensors[f"W.{step.step}"] = w
        tensors[f"V.{step.step}"] = v
    return {name: np.ascontiguousarray(arr, dtype=np.float64) for name, arr in tensors.items()}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_fit(
    fit: ChainFit,
    directory: str | os.PathLike,
    models: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
    moments: Moments | None = None,
) -> Path:
    """Write `fit` to `directory` (created if needed; an earlier artifact there is replaced).

    models: one dict per chain model, smallest first: name, width, sha256 (of the checkpoint), source.
    extra: free-form JSON-able facts about the run (e.g. sequences, residues, config, seconds); the sequence
        count (`n_sequences`, or `sequences` as the pipeline passes it) is lifted into the manifest's top level.
    moments: the merged fit-pass moments, saved alongside when given (8 K^2 bytes, see the module doc).
    The manifest is written last, so a directory with a manifest.json is a complete artifact.
    """
    if not isinstance(fit, ChainFit):
        raise TypeError(f"save_fit expects a ChainFit, got {type(fit).__name__}")
    extra = dict(extra or {})
    models = [dict(m) for m in models]
    if len(models) != len(fit.widths):
        raise ArtifactMismatchError(
            f"the fit chains {len(fit.widths)} models (widths {list(fit.widths)}) but {len(models)} model "
            "descriptions were given; pass one dict (name, width, sha256, source) per model, smallest first"
        )
    for i, (model, width) in enumerate(zip(models, fit.widths)):
        if "name" not in model:
            raise ArtifactMismatchError(f"model {i} has no 'name'; each model dict needs name, width, sha256, source")
        if int(model.get("width", width)) != width:
            raise ArtifactMismatchError(
                f"model {i} ({model['name']}) has width {model['width']} but the fit's block {i} is {width} wide"
            )
        model["width"] = width
        model.setdefault("sha256", None)
        model.setdefault("source", None)
    if moments is not None and moments.width != fit.input_width:
        raise ArtifactMismatchError(
            f"moments of width {moments.width} do not belong to a fit of input width {fit.input_width}"
        )
    if is_remote(directory):
        return _save_remote(Location.parse(directory), fit, models, extra, moments)

    out = Path(Location.parse(directory).path) if isinstance(directory, (str, Location)) else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():  # the old manifest must not vouch for new tensor files while they are written
        manifest_path.unlink()

    tensors = _fit_tensors(fit)
    from safetensors.numpy import save_file  # here: extraction (no fit) runs without safetensors installed

    _write_atomic(out / TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    files = {"tensors": {"file": TENSORS, "sha256": _sha256(out / TENSORS),
                         "shapes": {name: list(arr.shape) for name, arr in tensors.items()}}}
    if moments is not None:
        arrays = moments.to_arrays()
        arrays["count"] = arrays["count"].reshape(1)
        _write_atomic(out / MOMENTS, lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))
        files["moments"] = {"file": MOMENTS, "sha256": _sha256(out / MOMENTS), "width": moments.width,
                            "bytes": (out / MOMENTS).stat().st_size}
    elif (out / MOMENTS).exists():
        (out / MOMENTS).unlink()

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": rdscale.__version__,
        "models": models,
        "chain": [m["name"] for m in models],
        "widths": list(fit.widths),
        "levels": list(fit.levels),
        "regression": fit.regression,
        "options": fit.options,
        "n_residues": fit.n_residues,
        "n_sequences": extra.get("n_sequences", extra.get("sequences")),
        "steps": [step.to_dict() for step in fit.steps],
        # Identifies the fit's numbers: a resumed run must not mix embeddings from two fits (pipeline.run_key).
        "tensors_sha256": files["tensors"]["sha256"],
        "files": files,
        "extra": extra,
    }
    text = json.dumps(_json_safe(manifest), indent=2, sort_keys=False, allow_nan=False)
    _write_atomic(manifest_path, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return out


def _save_remote(loc: Location, fit: ChainFit, models, extra, moments) -> Location:
    """Write the artifact locally, then upload it: data files first, the manifest last (object stores have no
    rename; a location with a manifest.json is a complete artifact, as on disk)."""
    with tempfile.TemporaryDirectory(prefix="rdscale-fit-") as tmp:
        save_fit(fit, tmp, models, extra, moments)
        manifest = loc.join(MANIFEST)
        if manifest.exists():
            manifest.delete()
        for name in (TENSORS, MOMENTS):
            if (Path(tmp) / name).is_file():
                loc.join(name).write_bytes((Path(tmp) / name).read_bytes())
            elif loc.join(name).exists():
                loc.join(name).delete()
        manifest.write_bytes((Path(tmp) / MANIFEST).read_bytes())
    return loc


@contextmanager
def _local_copy(directory) -> Iterator[Path]:
    """The artifact as a local directory: itself, or a temporary copy of a remote one (manifest and the files it
    names), with error messages naming the remote location."""
    if not is_remote(directory):
        yield Path(Location.parse(directory).path) if isinstance(directory, (str, Location)) else Path(directory)
        return
    loc = Location.parse(directory)
    with tempfile.TemporaryDirectory(prefix="rdscale-fit-") as tmp:
        manifest = loc.join(MANIFEST)
        if not manifest.is_file():
            raise ArtifactError(f"{manifest} is missing: {loc} is not a fit artifact, or saving it was interrupted; "
                                "rerun the fit")
        data = manifest.read_bytes()
        (Path(tmp) / MANIFEST).write_bytes(data)
        try:
            files = json.loads(data).get("files") or {}
        except (ValueError, AttributeError):
            files = {}
        for entry in files.values() if isinstance(files, dict) else []:
            name = entry.get("file") if isinstance(entry, Mapping) else None
            if isinstance(name, str) and name and "/" not in name and name not in (".", "..") \
                    and loc.join(name).is_file():
                (Path(tmp) / name).write_bytes(loc.join(name).read_bytes())
        try:
            yield Path(tmp)
        except ArtifactError as err:
            raise type(err)(str(err).replace(tmp, loc.uri)) from None


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory: no fit artifact there; pass --fit DIR, a fit artifact "
                            "written by `rdscale fit` (or `rdscale run`, in <run>/fit)")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: {directory} is not a fit artifact, or saving it was interrupted; rerun the fit"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupted, rerun the fit") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an rdscale fit manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this rdscale ({rdscale.__version__}) reads version "
            f"{FORMAT_VERSION}: use the rdscale version that wrote it ({manifest.get('version')!r}) or refit"
        )
    for key, kind in (("models", list), ("widths", list), ("regression", str), ("n_residues", int),
                      ("steps", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{path} lacks the field {key!r} (or it is not a {kind.__name__}); the artifact is corrupted, "
                "rerun the fit"
            )
    if not all(_is_int(w) and w > 0 for w in manifest["widths"]):
        raise ArtifactError(f"{path} has invalid widths {manifest['widths']!r}; rerun the fit")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_checked(directory: Path, entry: Any, what: str) -> dict[str, np.ndarray]:
    """Load a safetensors file named by a manifest entry after checking its sha256."""
    if not isinstance(entry, Mapping) or "file" not in entry or "sha256" not in entry:
        raise ArtifactError(f"the manifest's {what} entry is malformed; the artifact is corrupted, rerun the fit")
    path = directory / str(entry["file"])
    if path.parent.resolve() != directory.resolve():
        raise ArtifactError(f"the manifest's {what} file {entry['file']!r} points outside the artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete, copy it again or rerun the fit")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        raise ArtifactError(
            f"{path} has sha256 {digest} but the manifest records {entry['sha256']}: the file was modified or "
            "corrupted; copy the artifact again or rerun the fit"
        )
    from safetensors import SafetensorError  # here: extraction (no fit) runs without safetensors installed
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}); rerun the fit") from exc


def load_fit(
    directory: str | os.PathLike, expect_models: Sequence[Mapping[str, Any]] | None = None
) -> tuple[ChainFit, dict]:
    """Read a fit artifact -> (ChainFit, manifest dict).

    expect_models: optional model dicts (name, width, sha256) the caller is about to run; any disagreement with the
        artifact's models (count, order, name, width, or a checkpoint hash when both sides have one) raises
        ArtifactMismatchError.
    """
    with _local_copy(directory) as local:
        return _load_fit(local, expect_models)


def _load_fit(directory: Path, expect_models) -> tuple[ChainFit, dict]:
    manifest = _read_manifest(directory)
    widths = tuple(int(w) for w in manifest["widths"])
    models = manifest["models"]
    if len(models) != len(widths):
        raise ArtifactError(f"the manifest lists {len(models)} models for widths {list(widths)}; rerun the fit")
    for i, (model, width) in enumerate(zip(models, widths)):
        if not isinstance(model, Mapping) or model.get("width") != width:
            raise ArtifactError(f"manifest model {i} does not have width {width} like the chain; rerun the fit")
    if manifest["regression"] not in REGRESSIONS:
        raise ArtifactError(f"the manifest's regression {manifest['regression']!r} is not one of {REGRESSIONS}")
    if expect_models is not None:
        _check_expected(models, expect_models)

    tensors = _load_checked(directory, manifest["files"].get("tensors"), "tensors")
    steps_meta = manifest["steps"]
    if len(steps_meta) != len(widths) - 1:
        raise ArtifactError(f"the manifest has {len(steps_meta)} steps for {len(widths)} models; rerun the fit")
    k_total, k_first, k_last = sum(widths), widths[0], widths[-1]
    expected = {"mean": (k_total,), "projection": (k_total, k_last - k_first)}
    for i in range(1, len(widths)):
        expected[f"W.{i + 1}"] = (widths[i - 1], widths[i])
        expected[f"V.{i + 1}"] = (widths[i], widths[i] - widths[i - 1])
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{directory / TENSORS} lacks the tensor {name!r}; the artifact is corrupted, rerun the fit")
        if tensors[name].shape != shape:
            raise ArtifactError(
                f"tensor {name!r} in {directory / TENSORS} has shape {tensors[name].shape}, expected {shape} for "
                f"widths {list(widths)}; the artifact is corrupted or mixes two fits, rerun the fit"
            )
        if not np.isfinite(tensors[name]).all():
            raise ArtifactError(f"tensor {name!r} in {directory / TENSORS} holds NaN or inf; rerun the fit")
    try:
        steps = [StepDiagnostics.from_dict(_step_from_manifest(i, s, widths)) for i, s in enumerate(steps_meta)]
        fit = ChainFit(
            widths=widths,
            regression=manifest["regression"],
            mean=tensors["mean"].astype(np.float64),
            projection=tensors["projection"].astype(np.float64),
            predictors=[tensors[f"W.{i + 1}"].astype(np.float64) for i in range(1, len(widths))],
            directions=[tensors[f"V.{i + 1}"].astype(np.float64) for i in range(1, len(widths))],
            steps=steps,
            n_residues=int(manifest["n_residues"]),
            options=dict(manifest.get("options") or {}),
        )
    except (ChainFitError, TypeError) as exc:
        raise ArtifactError(f"{directory} does not describe a valid chain fit ({exc}); rerun the fit") from exc
    return fit, manifest


def load_moments(directory: str | os.PathLike, device=None) -> Moments:
    """The merged fit-pass moments saved with an artifact (save_fit(..., moments=...))."""
    with _local_copy(directory) as local:
        return _load_moments(local, device)


def _load_moments(directory: Path, device) -> Moments:
    manifest = _read_manifest(directory)
    entry = manifest["files"].get("moments")
    if entry is None:
        raise ArtifactError(f"{directory} was saved without moments; refit with save_fit(..., moments=...)")
    arrays = _load_checked(directory, entry, "moments")
    try:
        moments = Moments.from_arrays(arrays, device=device)
    except MomentsError as exc:
        raise ArtifactError(f"{directory / MOMENTS} holds invalid moments ({exc}); rerun the fit") from exc
    if moments.width != sum(int(w) for w in manifest["widths"]):
        raise ArtifactError(f"{directory / MOMENTS} has width {moments.width}, not the chain's; rerun the fit")
    return moments


_STEP_INTS = ("step", "input_width", "target_width", "new_directions", "components_kept")
_STEP_FLOATS = ("residual_r2", "residual_variance", "captured_variance", "leakage")  # null = non-finite
_STEP_OPTIONAL = ("noise_variance", "threshold")  # null by design for OLS


def _step_from_manifest(index: int, step: Any, widths: tuple[int, ...]) -> dict[str, Any]:
    """Validate manifest step `index` (0-based; target model index + 2) and undo _json_safe's null-for-NaN."""
    where = f"manifest step {index} (target model {index + 2})"
    if not isinstance(step, Mapping):
        raise ArtifactError(f"{where} is not an object; the artifact is corrupted, rerun the fit")
    out = dict(step)
    for key in _STEP_INTS:
        if key in out and not _is_int(out[key]):
            raise ArtifactError(f"{where}: {key!r} is {out[key]!r}, expected an integer; rerun the fit")
    for key in _STEP_FLOATS + _STEP_OPTIONAL:
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ArtifactError(f"{where}: {key!r} is {value!r}, expected a number; rerun the fit")
        if key in out:
            out[key] = float("nan") if value is None and key in _STEP_FLOATS else value
    expected = {"step": index + 2, "input_width": widths[index], "target_width": widths[index + 1]}
    for key, want in expected.items():
        if key in out and out[key] != want:
            raise ArtifactError(
                f"{where}: {key!r} is {out[key]!r} but the chain widths {list(widths)} imply {want}; "
                "the manifest was edited or mixes two fits, rerun the fit"
            )
    return out


def _check_expected(stored: list, expected: Sequence[Mapping[str, Any]]) -> None:
    names = [m.get("name") for m in stored]
    if len(expected) != len(stored):
        raise ArtifactMismatchError(
            f"the fit chains {len(stored)} models {names} but {len(expected)} were given; use the fit's models"
        )
    for i, (have, want) in enumerate(zip(stored, expected)):
        for key in ("name", "width"):
            if key in want and want[key] != have.get(key):
                raise ArtifactMismatchError(
                    f"model {i}: the fit was made with {key} {have.get(key)!r}, the run uses {want[key]!r}; "
                    f"use the fit's models {names} in that order, or refit"
                )
        if want.get("sha256") and have.get("sha256") and want["sha256"] != have["sha256"]:
            raise ArtifactMismatchError(
                f"model {i} ({have.get('name')}): checkpoint sha256 {want['sha256']} differs from the one the fit "
                f"was made with ({have['sha256']}); the weights changed, refit the chain"
            )


def load_query_chain(run_dir: str | Path | Run) -> list[ChainFit]:
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
