"""Fit artifact: a directory holding a fitted chain (DESIGN.md section 5).

Layout:
    manifest.json         format, versions, models, chain order, regression, sample size, per-step diagnostics,
                          tensor names and shapes, sha256 of each tensor file
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import rdscale
from rdscale.chain import REGRESSIONS, ChainFit, ChainFitError, StepDiagnostics
from rdscale.moments import Moments, MomentsError

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


class ArtifactError(ValueError):
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
    """Floats that JSON cannot hold (NaN, inf) become None; numpy scalars become Python numbers."""
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
    extra: free-form JSON-able facts about the run (e.g. n_sequences, config); `n_sequences` is lifted into the
        manifest's top level.
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

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():  # the old manifest must not vouch for new tensor files while they are written
        manifest_path.unlink()

    tensors = _fit_tensors(fit)
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
        "rdscale_version": rdscale.__version__,
        "models": models,
        "chain": [m["name"] for m in models],
        "widths": list(fit.widths),
        "levels": list(fit.levels),
        "regression": fit.regression,
        "options": fit.options,
        "n_residues": fit.n_residues,
        "n_sequences": extra.get("n_sequences"),
        "steps": [step.to_dict() for step in fit.steps],
        "files": files,
        "extra": extra,
    }
    text = json.dumps(_json_safe(manifest), indent=2, sort_keys=False)
    _write_atomic(manifest_path, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return out


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass the fit artifact directory written by save_fit")
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
            f"{FORMAT_VERSION}: use the rdscale version that wrote it (rdscale_version "
            f"{manifest.get('rdscale_version')!r}) or refit"
        )
    for key, kind in (("models", list), ("widths", list), ("regression", str), ("n_residues", int),
                      ("steps", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{path} lacks the field {key!r} (or it is not a {kind.__name__}); the artifact is corrupted, "
                "rerun the fit"
            )
    if not all(isinstance(w, int) and w > 0 for w in manifest["widths"]):
        raise ArtifactError(f"{path} has invalid widths {manifest['widths']!r}; rerun the fit")
    return manifest


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
    directory = Path(directory)
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
        steps = [StepDiagnostics.from_dict(_nan_for_none(s)) for s in steps_meta]
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
    directory = Path(directory)
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


def _nan_for_none(step: Any) -> Any:
    # _json_safe stored non-finite floats as null; the diagnostics that can be None by design are PCR's.
    if not isinstance(step, Mapping):
        raise ArtifactError("a manifest step is not an object; the artifact is corrupted, rerun the fit")
    out = dict(step)
    for key in ("residual_r2", "residual_variance", "captured_variance", "leakage"):
        if key in out and out[key] is None:
            out[key] = float("nan")
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
