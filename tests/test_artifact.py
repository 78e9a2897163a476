"""The fit artifact (rdscale.artifact): exact round trips, and a clear ArtifactError for every way it can break."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_rd import correlated_blocks
from safetensors.numpy import save_file

from rdscale.fit.artifact import (
    ArtifactError,
    ArtifactMismatchError,
    load_fit,
    load_moments,
    save_fit,
)
from rdscale.fit.chain import ChainFit, fit_chain
from rdscale.fit.moments import Moments

WIDTHS = (3, 5, 8)
MODELS = [
    {"name": f"tiny_{k}", "width": k, "sha256": f"{i:064x}", "source": f"/ckpt/tiny_{k}.pt"}
    for i, k in enumerate(WIDTHS, start=1)
]


@functools.lru_cache(maxsize=None)
def _data() -> tuple[tuple[np.ndarray, ...], Moments]:
    blocks = tuple(correlated_blocks(np.random.default_rng(0), 2000, WIDTHS, latent=7))
    moments = Moments(sum(WIDTHS))
    moments.update(torch.from_numpy(np.concatenate(blocks, axis=1)))
    return blocks, moments


def _fit(regression: str = "pcr") -> ChainFit:
    return fit_chain(_data()[1], WIDTHS, regression)


def _apply(fit: ChainFit) -> torch.Tensor:
    return fit.apply([torch.from_numpy(b) for b in _data()[0]], dtype=torch.float64)


def _save(directory: Path, fit: ChainFit | None = None, moments: bool = True) -> Path:
    return save_fit(
        fit or _fit(), directory, models=MODELS,
        extra={"sequences": 40, "residues": 2000, "config": {"out": Path("/runs/x")}},
        moments=_data()[1] if moments else None,
    )


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- round trips -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_saved_fit_loads_back_and_applies_identically(tmp_path, regression):
    fit = _fit(regression)
    _save(tmp_path, fit)
    loaded, manifest = load_fit(tmp_path, expect_models=MODELS)
    assert loaded.widths == fit.widths and loaded.regression == regression and loaded.n_residues == 2000
    assert torch.equal(_apply(loaded), _apply(fit))  # bit-identical, not merely close
    for a, b in zip(loaded.predictors + loaded.directions, fit.predictors + fit.directions):
        np.testing.assert_array_equal(a, b)
    assert loaded.steps == fit.steps
    assert loaded.options == fit.options


def test_manifest_carries_the_fields_the_pipeline_and_evaluation_read(tmp_path):
    fit = _fit()
    _save(tmp_path, fit)
    text = (tmp_path / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda name: pytest.fail(f"manifest holds {name}: not strict JSON"))
    assert manifest["models"] == MODELS
    assert manifest["widths"] == list(WIDTHS) and manifest["levels"] == list(WIDTHS)
    assert manifest["n_residues"] == 2000 and manifest["n_sequences"] == 40
    assert manifest["regression"] == "pcr"
    assert isinstance(manifest["version"], str) and manifest["version"]
    assert manifest["tensors_sha256"] == manifest["files"]["tensors"]["sha256"]
    assert manifest["extra"]["config"] == {"out": "/runs/x"}  # paths stored as strings
    # rdscale.eval.evaluate.reconstruction_report reads these keys from every step.
    assert [s["step"] for s in manifest["steps"]] == [2, 3]
    for step, diag in zip(manifest["steps"], fit.steps):
        assert step == diag.to_dict()
        assert {"input_width", "target_width", "components_kept", "residual_r2", "captured_variance",
                "leakage"} <= set(step)


def test_non_finite_diagnostics_are_stored_as_null_and_read_back_as_nan(tmp_path):
    fit = _fit()
    fit.steps[0] = dataclasses.replace(fit.steps[0], residual_r2=float("nan"))
    _save(tmp_path, fit)
    assert json.loads((tmp_path / "manifest.json").read_text())["steps"][0]["residual_r2"] is None
    loaded, _ = load_fit(tmp_path)
    assert math.isnan(loaded.steps[0].residual_r2)
    assert loaded.steps[1] == fit.steps[1]


def test_moments_are_saved_and_reload_exactly(tmp_path):
    _save(tmp_path)
    moments = _data()[1]
    back = load_moments(tmp_path)
    assert back.count == moments.count and back.width == moments.width
    np.testing.assert_array_equal(back.mean, moments.mean)
    np.testing.assert_array_equal(back.comoment, moments.comoment)
    refit = fit_chain(back, WIDTHS, "ols")  # what a later refit with other options starts from
    np.testing.assert_array_equal(refit.projection, _fit("ols").projection)


def test_resaving_without_moments_replaces_the_old_artifact(tmp_path):
    _save(tmp_path, _fit("pcr"), moments=True)
    _save(tmp_path, _fit("ols"), moments=False)
    loaded, manifest = load_fit(tmp_path)
    assert loaded.regression == "ols" and "moments" not in manifest["files"]
    assert not (tmp_path / "moments.safetensors").exists()
    with pytest.raises(ArtifactError, match="saved without moments"):
        load_moments(tmp_path)


# -- broken artifacts ------------------------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, loader", [("fit.safetensors", load_fit), ("moments.safetensors", load_moments)])
def test_corrupted_matrix_file_is_detected(tmp_path, name, loader):
    _save(tmp_path)
    _flip_a_byte(tmp_path / name)
    with pytest.raises(ArtifactError, match=rf"{name} has sha256 .* modified or corrupted"):
        loader(tmp_path)


def test_unreadable_matrix_file_with_a_matching_hash_is_reported(tmp_path):
    _save(tmp_path)
    (tmp_path / "fit.safetensors").write_bytes(b"not a safetensors file")
    digest = hashlib.sha256(b"not a safetensors file").hexdigest()
    _edit_manifest(tmp_path, lambda m: m["files"]["tensors"].__setitem__("sha256", digest))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_fit(tmp_path)


def test_tensors_of_another_fit_are_rejected_by_shape(tmp_path):
    _save(tmp_path)
    other = fit_chain(_data()[1], (3, 6, 7), "ols")  # same K, different chain
    tensors = {"mean": other.mean, "projection": other.projection}
    for i, (w, v) in enumerate(zip(other.predictors, other.directions), start=2):
        tensors[f"W.{i}"], tensors[f"V.{i}"] = w, v
    save_file(tensors, str(tmp_path / "fit.safetensors"))
    digest = hashlib.sha256((tmp_path / "fit.safetensors").read_bytes()).hexdigest()
    _edit_manifest(tmp_path, lambda m: m["files"]["tensors"].__setitem__("sha256", digest))
    with pytest.raises(ArtifactError, match=r"tensor 'projection' .* has shape \(16, 4\), expected \(16, 5\)"):
        load_fit(tmp_path)


def test_truncated_manifest_is_reported(tmp_path):
    _save(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON"):
        load_fit(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("widths"), "lacks the field 'widths'"),
        (lambda m: m.pop("steps"), "lacks the field 'steps'"),
        (lambda m: m.__setitem__("format", "something.else"), "not an rdscale fit manifest"),
        (lambda m: m.__setitem__("format_version", 99), "format_version 99"),
        (lambda m: m.__setitem__("widths", [3, 5, 9]), "width 9"),
        (lambda m: m.__setitem__("widths", [3, True, 8]), "invalid widths"),
        (lambda m: m.__setitem__("regression", "ridge"), "regression 'ridge'"),
        (lambda m: m["steps"].pop(), "1 steps for 3 models"),
        (lambda m: m["steps"].__setitem__(0, "oops"), "step 0 .* not an object"),
        (lambda m: m["steps"][1].__setitem__("components_kept", "all"), r"step 1 .*'components_kept' is 'all'"),
        (lambda m: m["steps"][0].__setitem__("leakage", "small"), r"'leakage' is 'small', expected a number"),
        (lambda m: m["steps"][1].__setitem__("target_width", 7), r"'target_width' is 7 but the chain widths"),
        (lambda m: m["steps"][0].pop("leakage"), "lack fields"),
        (lambda m: m["files"].pop("tensors"), "tensors entry is malformed"),
        (lambda m: m["files"]["tensors"].__setitem__("file", "../elsewhere.safetensors"), "outside the artifact"),
        (lambda m: m["files"]["tensors"].__setitem__("sha256", "0" * 64), "modified or corrupted"),
        (lambda m: m["models"].pop(), "lists 2 models for widths"),
    ],
)
def test_edited_manifest_raises_a_clear_error(tmp_path, edit, message):
    _save(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        load_fit(tmp_path)


@pytest.mark.parametrize("missing", ["manifest.json", "fit.safetensors"])
def test_missing_file_is_reported(tmp_path, missing):
    _save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ArtifactError, match=rf"{missing} is missing"):
        load_fit(tmp_path)


def test_missing_moments_file_and_missing_directory_are_reported(tmp_path):
    _save(tmp_path)
    (tmp_path / "moments.safetensors").unlink()
    with pytest.raises(ArtifactError, match="moments.safetensors is missing"):
        load_moments(tmp_path)
    load_fit(tmp_path)  # the fit itself is still whole
    with pytest.raises(ArtifactError, match="is not a directory"):
        load_fit(tmp_path / "nowhere")


def test_invalid_moments_with_a_matching_hash_are_reported(tmp_path):
    _save(tmp_path)
    arrays = _data()[1].to_arrays()
    arrays["count"] = np.asarray([-5], dtype=np.int64)
    save_file(arrays, str(tmp_path / "moments.safetensors"))
    digest = hashlib.sha256((tmp_path / "moments.safetensors").read_bytes()).hexdigest()
    _edit_manifest(tmp_path, lambda m: m["files"]["moments"].__setitem__("sha256", digest))
    with pytest.raises(ArtifactError, match="holds invalid moments"):
        load_moments(tmp_path)


# -- models ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ms: ms[1].__setitem__("name", "other_48"), "name 'tiny_5'"),
        (lambda ms: ms[2].__setitem__("width", 9), "width 8"),
        (lambda ms: ms[0].__setitem__("sha256", "f" * 64), "weights changed"),
        (lambda ms: ms.pop(), "chains 3 models"),
    ],
)
def test_expected_models_that_differ_raise_a_mismatch(tmp_path, change, message):
    _save(tmp_path)
    expected = [dict(m) for m in MODELS]
    change(expected)
    with pytest.raises(ArtifactMismatchError, match=message):
        load_fit(tmp_path, expect_models=expected)


def test_expected_models_without_hashes_match_by_name_and_width(tmp_path):
    _save(tmp_path)
    fit, _ = load_fit(tmp_path, expect_models=[{"name": m["name"], "width": m["width"]} for m in MODELS])
    assert fit.widths == WIDTHS


def test_saving_with_models_that_do_not_fit_the_chain_is_refused(tmp_path):
    fit = _fit()
    with pytest.raises(ArtifactMismatchError, match="3 models .* 2 model descriptions"):
        save_fit(fit, tmp_path, models=MODELS[:2])
    wrong = [dict(m) for m in MODELS]
    wrong[1]["width"] = 6
    with pytest.raises(ArtifactMismatchError, match="model 1 .* width 6 .* block 1 is 5 wide"):
        save_fit(fit, tmp_path, models=wrong)
    with pytest.raises(ArtifactMismatchError, match="moments of width 7"):
        save_fit(fit, tmp_path, models=MODELS, moments=Moments(7))
    assert not (tmp_path / "manifest.json").exists()
