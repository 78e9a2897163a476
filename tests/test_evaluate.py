"""Reconstruction R^2 from moments vs stacked residues, the per-step report, the scaling report, and one run of the
DMS protocol through real (tiny) ESM-2 models and a chain fit."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rdscale.eval.dms import (
    AMINO_ACIDS,
    DMSResult,
    RepresentationScore,
    apply_mutations,
    dms_features,
    evaluate_dms,
    make_embed_fn,
    parse_mutant,
)
from rdscale.eval.evaluate import (
    EvaluationError,
    r2_from_moments,
    reconstruction_report,
    run_dms,
    write_report,
)
from rdscale.fit.chain import fit_chain
from rdscale.fit.moments import Moments


def stacked_blocks(seed: int, widths, n: int, collinear: bool = False):
    """Per-model blocks where each model partly predicts the next: h_i = [h_1..h_{i-1}] A_i + noise + offset.

    The first block has a few strong directions and many weak ones (so PCR has noise components to drop).
    """
    rng = np.random.default_rng(seed)
    k1 = widths[0]
    scales = np.where(np.arange(k1) < max(1, k1 // 3), 5.0, 1.0)
    blocks = [rng.normal(size=(n, k1)) * scales + rng.normal(size=k1)]
    for k in widths[1:]:
        prev = np.concatenate(blocks, axis=1)
        h = prev @ rng.normal(scale=0.4, size=(prev.shape[1], k)) + rng.normal(size=(n, k)) + rng.normal(size=k)
        if collinear:
            h[:, -1] = 2.0 * h[:, 0]  # an exactly collinear column: the predictors of the next step are singular
        blocks.append(h)
    return blocks


def moments_of(blocks, chunks: int = 3) -> Moments:
    x = np.concatenate(blocks, axis=1)  # (n, K)
    parts = []
    for piece in np.array_split(x, chunks):
        m = Moments(x.shape[1])
        m.update(piece)
        parts.append(m)
    out = parts[0]
    for m in parts[1:]:
        out = out.merge(m)
    return out


def lstsq_r2(pred: np.ndarray, target: np.ndarray, average: str = "variance", components: int | None = None):
    """Affine least squares of target on pred (optionally on pred's top principal components), on stacked rows.

    Singular values below 1e-6 of the largest are exact zeros, the same cut as r2_from_moments' 1e-12 on
    eigenvalues. It matters for real ESM-2 output: the final LayerNorm makes every residue satisfy one linear
    constraint, so each block has a direction holding only float32 rounding (singular value ~4e-8 of the largest),
    and lstsq's default cut (~1e-13) would fit that noise (R^2 up by ~1/n of the residual variance).
    """
    p = pred - pred.mean(axis=0)
    t = target - target.mean(axis=0)
    if components is not None:
        eigvals, eigvecs = np.linalg.eigh(p.T @ p)
        p = p @ eigvecs[:, np.argsort(eigvals)[::-1][:components]]
    coef, *_ = np.linalg.lstsq(p, t, rcond=1e-6)
    resid = t - p @ coef
    if average == "variance":
        return 1.0 - (resid**2).sum() / (t**2).sum()
    return float(np.mean(1.0 - (resid**2).sum(axis=0) / (t**2).sum(axis=0)))


# ---------------------------------------------------------------------------------------------------------------
# R^2 from moments


@given(
    k1=st.integers(1, 4),
    increments=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    extra_rows=st.integers(2, 60),
    collinear=st.booleans(),
    average=st.sampled_from(["variance", "uniform"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_r2_from_moments_equals_least_squares_on_stacked_residues(k1, increments, extra_rows, collinear, average, seed):
    widths = [k1]
    for inc in increments:
        widths.append(widths[-1] + inc)
    blocks = stacked_blocks(seed, widths, sum(widths) + extra_rows, collinear)
    moments = moments_of(blocks)
    for step in range(2, len(widths) + 1):
        expected = lstsq_r2(np.concatenate(blocks[: step - 1], axis=1), blocks[step - 1], average)
        got = r2_from_moments(moments, widths, step, average=average)
        assert got == pytest.approx(expected, abs=1e-9)
        assert -1e-12 <= got <= 1 + 1e-12


@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_r2_from_the_chain_matches_stacked_acc_and_step_diagnostics(regression):
    widths = (6, 9, 14)
    blocks = stacked_blocks(11, widths, 3000)
    moments = moments_of(blocks)
    fit = fit_chain(moments, widths, regression)
    tensors = [torch.from_numpy(b) for b in blocks]
    for diag in fit.steps:
        step = diag.step
        acc = fit.apply(tensors[: step - 1], dtype=torch.float64).numpy()  # (n, k_{i-1}) = acc_{i-1}
        kept = diag.components_kept if regression == "pcr" else None
        expected = lstsq_r2(acc, blocks[step - 1], components=kept)
        got = r2_from_moments(moments, widths, step, fit=fit, regression=regression)
        assert got == pytest.approx(expected, abs=1e-9)
        assert got == pytest.approx(diag.residual_r2, abs=1e-9)
        # the chain regresses on acc_{i-1}, a linear function of the smaller models: never above the concatenation
        assert got <= r2_from_moments(moments, widths, step) + 1e-9
    if regression == "pcr":
        assert fit.steps[0].components_kept < widths[0]  # the weak directions of h_1 were dropped as noise


def test_r2_from_moments_rejects_bad_arguments():
    widths = (3, 5)
    moments = moments_of(stacked_blocks(0, widths, 50))
    with pytest.raises(EvaluationError, match="step must be"):
        r2_from_moments(moments, widths, 1)
    with pytest.raises(EvaluationError, match="sum to 9"):
        r2_from_moments(moments, (3, 6), 2)
    with pytest.raises(EvaluationError, match="residue count"):
        r2_from_moments(moments.covariance(), widths, 2, regression="pcr")
    arrays = moments.to_arrays()
    assert r2_from_moments(arrays, widths, 2) == pytest.approx(r2_from_moments(moments, widths, 2), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# per-step report


def test_reconstruction_report_from_fit_manifest_and_directory(tmp_path):
    widths = (4, 7, 11)
    blocks = stacked_blocks(5, widths, 2000)
    moments = moments_of(blocks)
    fit = fit_chain(moments, widths, "ols")
    rows = reconstruction_report(fit, moments=moments)
    assert [r["step"] for r in rows] == [2, 3]
    assert rows[0]["from_widths"] == [4] and rows[1]["from_widths"] == [4, 7]
    assert [r["to_width"] for r in rows] == [7, 11] and all(r["regression"] == "ols" for r in rows)
    assert rows[0]["components_kept"] == 4
    assert rows[0]["r2"] == pytest.approx(rows[0]["r2_ols_concat"], abs=1e-9)  # acc_1 = h_1: same predictors
    assert rows[1]["r2"] <= rows[1]["r2_ols_concat"] + 1e-9
    assert all(r["leakage"] < 1e-6 for r in rows)  # OLS residuals are uncorrelated with the prefix

    manifest = {"models": [{"width": w} for w in widths], "regression": "ols",
                "steps": [s.to_dict() for s in fit.steps]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for source in (manifest, tmp_path, tmp_path / "manifest.json"):
        again = reconstruction_report(source)
        assert [{k: v for k, v in r.items() if k != "r2_ols_concat"} for r in rows] == again
    with pytest.raises(EvaluationError, match="no per-step diagnostics"):
        reconstruction_report({"models": []})
    with pytest.raises(EvaluationError, match="no fit manifest"):
        reconstruction_report(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# the scaling report


def fake_results():
    results = []
    for d, (raw, rd) in enumerate([((0.30, 0.35, 0.33), (0.30, 0.38, 0.42)), ((0.20, 0.22, 0.21), (0.20, 0.25, 0.30))]):
        scores = {}
        for name, kind, width, rho in [
            ("raw:m8", "raw", 8, raw[0]), ("raw:m16", "raw", 16, raw[1]), ("raw:m32", "raw", 32, raw[2]),
            ("rd:8", "rd", 8, rd[0]), ("rd:16", "rd", 16, rd[1]), ("rd:32", "rd", 32, rd[2]),
        ]:
            scores[name] = RepresentationScore(name, kind, width, 1.0, {"singles": rho, "multi_2": rho / 2},
                                               {"singles": 20, "multi_2": 30})
        results.append(DMSResult(f"dataset{d}", 130, 80, 0, scores))
    return results


def test_write_report_writes_plot_markdown_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    recon = [{"step": 2, "from_widths": [8], "to_width": 16, "regression": "pcr", "components_kept": 7,
              "r2": 0.422, "captured_variance": 0.9, "leakage": 1e-3}]
    paths = write_report(fake_results(), tmp_path / "report", reconstruction=recon)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert "(Table 2)" in text and "(Table 3)" in text and "scaling.png" in text
    # rd beats raw at widths 16 and 32 in both datasets; equal at 8
    assert "| 16 | raw:m16 | rd:16 | 100% of 2 | 100% of 2 |" in text
    assert "| 8 | raw:m8 | rd:8 | 50% of 2 | 50% of 2 |" in text
    assert "| 2 | 8 | 16 | pcr | 7 | 0.422 |" in text
    reloaded = json.loads(paths["json"].read_text())
    assert [DMSResult.from_dict(r).to_dict() for r in reloaded] == [r.to_dict() for r in fake_results()]
    # the JSON redraws the same report
    again = write_report(reloaded, tmp_path / "again", reconstruction=recon)
    assert again["markdown"].read_text() == text


def test_write_report_without_matplotlib_still_writes_markdown(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    paths = write_report(fake_results(), tmp_path)
    assert "plot" not in paths and not (tmp_path / "scaling.png").exists()
    assert "matplotlib is not installed" in paths["markdown"].read_text()
    assert "matplotlib is not installed" in caplog.text


def write_dms_csv(path, wild_type, mutants, scores):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mutant", "mutated_sequence", "DMS_score"])
        for mutant, score in zip(mutants, scores):
            writer.writerow([mutant, apply_mutations(wild_type, parse_mutant(mutant, wild_type)), score])


def small_dms(seed: int, length: int = 30, per_position: int = 3, doubles: int = 12, value=None):
    """Mutant strings and scores where the score is a per-residue-type value of the new minus the old letter.

    value: letter -> float; None draws one at random (20 free values: not linear in any narrower embedding).
    """
    rng = np.random.default_rng(seed)
    wild_type = "".join(rng.choice(list(AMINO_ACIDS), size=length))
    drawn = dict(zip(AMINO_ACIDS, rng.normal(size=20)))
    value = drawn if value is None else value
    mutants = []
    for pos in range(length):
        for aa in rng.choice([a for a in AMINO_ACIDS if a != wild_type[pos]], size=per_position, replace=False):
            mutants.append(f"{wild_type[pos]}{pos + 1}{aa}")
    for _ in range(doubles):
        p, q = sorted(rng.choice(length, size=2, replace=False))
        mutants.append(f"{wild_type[p]}{p + 1}{'A' if wild_type[p] != 'A' else 'G'}:"
                       f"{wild_type[q]}{q + 1}{'W' if wild_type[q] != 'W' else 'Y'}")
    scores = [sum(value[m.mt] - value[m.wt] for m in parse_mutant(text)) for text in mutants]
    return wild_type, mutants, scores


def test_run_dms_over_files_writes_the_report(tmp_path):
    rng = np.random.default_rng(0)
    table = {aa: rng.normal(size=5) for aa in AMINO_ACIDS}
    # Plant the score in the span of the 5-wide embedding: value(aa) = table[aa] . w, so a single mutant's score
    # is exactly w . (mutant - wild type) of rd:5. (20 free per-letter values would not be linear in 5 columns.)
    w = rng.normal(size=5)
    value = {aa: float(table[aa] @ w) for aa in AMINO_ACIDS}

    def embed_fn(sequences):
        per_residue = [np.stack([table[a] for a in s]) for s in sequences]  # (L, 5)
        return {"raw:toy": [e[:, :3] for e in per_residue], "rd:5": per_residue}

    paths, fasta = [], []
    for d in range(2):
        wild_type, mutants, scores = small_dms(d, value=value)
        write_dms_csv(tmp_path / f"DS{d}.csv", wild_type, mutants, scores)
        paths.append(tmp_path / f"DS{d}.csv")
        fasta.append(f">DS{d}\n{wild_type}\n")
    (tmp_path / "wt.fa").write_text("".join(fasta))
    results = run_dms(paths, tmp_path / "wt.fa", embed_fn, tmp_path / "out", seed=3)
    assert [r.dataset for r in results] == ["DS0", "DS1"]
    for r in results:
        assert r.scores["rd:5"].spearman["singles"] > 0.9, r.scores["rd:5"].spearman  # linear in rd:5
        # a double's score is the sum of two planted singles; its feature their mean: still linear in rd:5
        assert r.scores["rd:5"].spearman["multi_2"] > 0.9, r.scores["rd:5"].spearman
        # the 3-wide prefix misses w's last two coordinates
        assert r.scores["raw:toy"].spearman["singles"] < r.scores["rd:5"].spearman["singles"]
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "dms_results.json").is_file()
    with pytest.raises(EvaluationError, match="no wild type given for dataset 'DS1'"):
        run_dms(paths, {"DS0": str(tmp_path / "wt.fa")}, embed_fn)


# ---------------------------------------------------------------------------------------------------------------
# through the real contracts: tiny ESM-2 family -> Embedder -> Moments -> fit_chain -> DMS


@pytest.fixture(scope="module")
def tiny_chain(tiny_family):
    from rdscale.model.embed import Embedder
    from rdscale.model.loading import load_model

    models = [load_model(path, device="cpu") for path in tiny_family]
    widths = tuple(m.spec.width for m in models)
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(40, 80)))) for _ in range(30)]
    blocks = [torch.cat(Embedder(m).embed(sequences)) for m in models]  # each (n_res, k_i) float32
    moments = Moments(sum(widths))
    moments.update(torch.cat(blocks, dim=1))
    return models, widths, blocks, moments, fit_chain(moments, widths, "pcr")


def test_reconstruction_on_tiny_esm2_matches_stacked_residues(tiny_chain):
    _, widths, blocks, moments, fit = tiny_chain
    h = [b.double().numpy() for b in blocks]
    for step in (2, 3):
        expected = lstsq_r2(np.concatenate(h[: step - 1], axis=1), h[step - 1])
        assert r2_from_moments(moments, widths, step) == pytest.approx(expected, abs=1e-8)
        acc = fit.apply(blocks[: step - 1], dtype=torch.float64).numpy()
        expected_pcr = lstsq_r2(acc, h[step - 1], components=fit.steps[step - 2].components_kept)
        got = r2_from_moments(moments, widths, step, fit=fit, regression="pcr")
        assert got == pytest.approx(expected_pcr, abs=1e-8)
    rows = reconstruction_report(fit, moments=moments)
    assert [r["from_widths"] for r in rows] == [[32], [32, 48]]
    assert all(0 < r["r2"] <= r["r2_ols_concat"] + 1e-9 for r in rows)


def test_dms_protocol_through_tiny_esm2_and_chain_fit(tiny_chain, tmp_path):
    models, widths, _, _, fit = tiny_chain
    embed_fn = make_embed_fn(models, fit, toks_per_batch=2048)
    wild_type, mutants, scores = small_dms(7)
    write_dms_csv(tmp_path / "TINY.csv", wild_type, mutants, scores)
    from rdscale.eval.dms import read_dms_csv

    dataset = read_dms_csv(tmp_path / "TINY.csv", wild_type)
    features = dms_features(dataset, embed_fn, batch_size=32)
    raw_names = [f"raw:{m.spec.name}" for m in models]
    assert set(features) == set(raw_names) | {f"rd:{w}" for w in widths}
    # the first level of the rd embedding is the smallest model, exactly
    np.testing.assert_array_equal(features["rd:32"], features[raw_names[0]])
    assert [features[f"rd:{w}"].shape[1] for w in widths] == list(widths)
    result = evaluate_dms(dataset, embed_fn, features=features, seed=0)
    assert all(np.isfinite(s.spearman["singles"]) for s in result.scores.values())
    assert {s.width for s in result.scores.values() if s.kind == "rd"} == set(widths)
    paths = write_report([result], tmp_path / "report", reconstruction=reconstruction_report(fit))
    assert "Reconstruction per chain step" in paths["markdown"].read_text()


# ---------------------------------------------------------------------------------------------------------------
# `rdscale eval`, end to end in this process

EXAMPLE_DMS = Path(__file__).resolve().parents[1] / "examples" / "dms"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rdscale_main():
    """The rdscale CLI's entry point, called in-process."""
    from rdscale.cli.main import main

    return main


def random_fasta(path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    path.write_text("".join(f">p{i}\n{''.join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(40, 70))))}\n"
                            for i in range(n)))
    return path


def test_eval_cli_fits_fresh_then_runs_dms_and_writes_the_reports(rdscale_main, tiny_family, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    models = [str(p) for p in tiny_family]
    fasta = random_fasta(tmp_path / "sample.fa", 30)  # ~1,600 residues for K = 144
    recon = tmp_path / "recon"
    assert rdscale_main(["eval", "reconstruction", "--fasta", str(fasta), "--models", *models, "--sample", "30",
                         "-o", str(recon)]) == 0
    printed = capsys.readouterr().out
    assert "R^2 OLS concat" in printed and "reconstruction.md" in printed
    from rdscale.fit.artifact import load_fit

    fit, manifest = load_fit(recon / "fit")
    assert manifest["extra"]["sequences"] == 30
    steps = json.loads((recon / "reconstruction.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [2, 3] and [s["from_widths"] for s in steps] == [[32], [32, 48]]
    for row, diag in zip(steps, fit.steps):
        assert row["r2"] == pytest.approx(diag.residual_r2) and row["components_kept"] == diag.components_kept
        assert 0 < row["r2"] <= row["r2_ols_concat"] + 1e-9  # the chain never beats OLS on the concatenation
    assert "| 3 | 32+48 | 64 | pcr |" in (recon / "reconstruction.md").read_text()

    # from the artifact, without --out: the same table, printed only
    assert rdscale_main(["eval", "reconstruction", "--fit", str(recon / "fit")]) == 0
    assert "32+48" in capsys.readouterr().out

    report = tmp_path / "dms"
    assert rdscale_main(["eval", "dms", "--csv", str(EXAMPLE_DMS / "TOY_SYNTH.csv"), "--wild-type",
                         str(EXAMPLE_DMS / "wild_types.fasta"), "--models", *models, "--fit", str(recon / "fit"),
                         "-o", str(report), "--set", "embedding.toks_per_batch=2048"]) == 0
    printed = capsys.readouterr().out
    assert "rd:64" in printed and f"plot: {report / 'scaling.png'}" in printed
    assert (report / "scaling.png").read_bytes()[:8] == PNG_MAGIC
    text = (report / "report.md").read_text()
    assert "(Table 2)" in text and "(Table 3)" in text and "Reconstruction per chain step" in text
    assert "| 48 | esm2_t3_48_tiny" not in text  # raw names carry their kind
    assert "| 48 | raw:esm2_t3_48_tiny | rd:48 |" in text
    (result,) = [DMSResult.from_dict(r) for r in json.loads((report / "dms_results.json").read_text())]
    assert result.dataset == "TOY_SYNTH" and result.n_variants == 150 and result.n_train == 96
    assert set(result.scores) == {f"raw:{p.stem}" for p in tiny_family} | {"rd:32", "rd:48", "rd:64"}
    assert set(result.metrics) == {"singles", "multi_2", "multi_3"}
    # level 1 of the chain is the smallest model itself
    assert result.scores["rd:32"].spearman == result.scores[f"raw:{tiny_family[0].stem}"].spearman


def bad_copy(tmp_path, row: int, column: str, value: str):
    """The example CSV with one field of one data row (1-based) replaced."""
    with open(EXAMPLE_DMS / "TOY_SYNTH.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[row - 1][column] = value
    path = tmp_path / "TOY_SYNTH.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("mutant", "V1", "'V1' is not a substitution"),
        ("mutant", "G1A", "wild-type mismatch at position 1"),
        ("mutated_sequence", "VPMG", "mutated_sequence is not the wild type"),
    ],
)
def test_eval_dms_bad_row_is_one_line_naming_the_row(rdscale_main, tiny_family, tmp_path, capsys, column, value,
                                                     message):
    path = bad_copy(tmp_path, 3, column, value)
    code = rdscale_main(["eval", "dms", "--csv", str(path), "--wild-type", str(EXAMPLE_DMS / "wild_types.fasta"),
                         "--models", str(tiny_family[0]), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"rdscale eval: error: {path} row 3 (line 4): ") and message in err, err
    assert not (tmp_path / "out" / "report.md").exists()


def test_eval_cli_refuses_unusable_arguments(rdscale_main, tiny_family, tmp_path, capsys):
    # nothing to evaluate, or two sources at once: configuration errors (exit 2)
    assert rdscale_main(["eval", "reconstruction"]) == 2
    assert "give --fit" in capsys.readouterr().err
    assert rdscale_main(["eval", "reconstruction", "--fit", str(tmp_path), "--fasta", "x.fa"]) == 2
    # not an artifact; a fit of other models: the user's to fix (exit 1, one line)
    assert rdscale_main(["eval", "reconstruction", "--fit", str(tmp_path)]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
    widths = (32, 48)
    blocks = stacked_blocks(0, widths, 1000)
    from rdscale.fit.artifact import save_fit

    save_fit(fit_chain(moments_of(blocks), widths, "ols"), tmp_path / "fit",
             models=[{"name": "other_a", "width": 32}, {"name": "other_b", "width": 48}])
    code = rdscale_main(["eval", "dms", "--csv", str(EXAMPLE_DMS / "TOY_SYNTH.csv"), "--wild-type",
                         str(EXAMPLE_DMS / "wild_types.fasta"), "--models", *map(str, tiny_family[:2]),
                         "--fit", str(tmp_path / "fit"), "-o", str(tmp_path / "out")])
    assert code == 1 and "the fit was made with name 'other_a'" in capsys.readouterr().err
    assert rdscale_main(["eval", "dms", "--csv", str(tmp_path / "missing.csv"), "--wild-type", "ACD",
                         "--models", str(tiny_family[0]), "-o", str(tmp_path / "out")]) == 1
    assert "not found" in capsys.readouterr().err
