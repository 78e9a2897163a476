"""Evaluation: reconstruction R^2 of a chain fit, the DMS protocol over many files, and the scaling report.

- `r2_from_moments`: the linear reconstruction R^2 of model i's embedding from the smaller models (their
  concatenation, or the chain's accumulated representation acc_{i-1}), computed from the joint covariance alone.
  Equal to least squares on the stacked residues, without stacking them.
- `reconstruction_report`: one row per chain step from a ChainFit's diagnostics, a fit artifact's manifest, or the
  artifact directory (reads manifest.json; never unpickles anything).
- `run_dms`: rdscale.eval.dms.evaluate_dms over ProteinGym CSV files, then `write_report`.
- `write_report`: dms_results.json, report.md (mean Spearman, the paper's Tables 2 and 3 as win rates, per-dataset
  scores, reconstruction) and scaling.png (score against width, raw and reverse-distilled lines; needs the optional
  `plot` extra, matplotlib, and is skipped with a message without it).
- `write_reconstruction`: reconstruction.json and reconstruction.md for `rdscale eval reconstruction`.

The command line for all of this is rdscale/cli_eval.py (`rdscale eval reconstruction|dms`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rdscale.errors import RdscaleError
from rdscale.fit.chain import pcr_components
from rdscale.eval.dms import (
    DMSResult,
    EmbedFn,
    evaluate_dms,
    metric_sort_key,
    rd_vs_raw_table,
    read_dms_csv,
    scaling_table,
)

__all__ = [
    "EvaluationError",
    "format_reconstruction",
    "r2_from_moments",
    "reconstruction_lines",
    "reconstruction_report",
    "run_dms",
    "summarise",
    "write_reconstruction",
    "write_report",
]

log = logging.getLogger(__name__)

# Eigenvalues below this fraction of the largest are exact zeros for the pseudo-inverse (as in rdscale.chain).
_RCOND = 1e-12


class EvaluationError(RdscaleError, ValueError):
    """Inputs the evaluation cannot use (wrong widths, unknown step, unreadable manifest)."""


# ---------------------------------------------------------------------------------------------------------------
# reconstruction R^2 from moments


def _covariance_and_count(moments: Any) -> tuple[np.ndarray, int | None]:
    if isinstance(moments, np.ndarray):
        return np.asarray(moments, dtype=np.float64), None
    if isinstance(moments, Mapping):  # Moments.to_arrays() output
        count = int(np.asarray(moments["count"]))
        comoment = np.asarray(moments["comoment"], dtype=np.float64)
        if count < 1:
            raise EvaluationError("the moments are empty (count 0)")
        return comoment / count, count
    if hasattr(moments, "covariance"):
        return np.asarray(moments.covariance(), dtype=np.float64), int(moments.count)
    raise EvaluationError(
        f"expected rdscale.fit.moments.Moments, its to_arrays() dict or a (K, K) covariance, got {type(moments).__name__}"
    )


def r2_from_moments(
    moments: Any,
    widths: Sequence[int],
    step: int,
    *,
    fit: Any | None = None,
    regression: str = "ols",
    average: str = "variance",
) -> float:
    """Linear reconstruction R^2 of model `step`'s embedding h_i from the smaller models, from moments only.

    moments: Moments of x = [h_1; ...; h_m] (or its to_arrays() dict, or a (K, K) covariance for OLS).
    widths: (k_1, ..., k_m); `step` is the 1-based index i of the target model (2..m), as in StepDiagnostics.
    fit: None predicts from the concatenation [h_1, ..., h_{i-1}]; a ChainFit predicts from its accumulated
        representation acc_{i-1} (the first k_{i-1} columns of the rd embedding), which is what the chain regresses on.
    regression: "ols" (least squares; pseudo-inverse where the predictors are collinear) or "pcr" (only the
        principal components of the predictors above rdscale.chain's Johnstone noise edge; needs the count).
    average: "variance" = 1 - total residual variance / total variance of h_i (variance-weighted, the definition
        of StepDiagnostics.residual_r2); "uniform" = the mean over h_i's columns of each column's R^2 (sklearn's
        default), columns with no variance left out.

    Affine regression throughout: the covariance is centred, so the intercept is implicit.
    """
    cov, count = _covariance_and_count(moments)  # (K, K)
    widths = tuple(int(w) for w in widths)
    k_total = sum(widths)
    if cov.shape != (k_total, k_total):
        raise EvaluationError(f"covariance is {cov.shape} but widths {widths} sum to {k_total}")
    if not 2 <= step <= len(widths):
        raise EvaluationError(f"step must be the 1-based index of a target model, 2..{len(widths)}, got {step}")
    if regression not in ("ols", "pcr"):
        raise EvaluationError(f"regression must be 'ols' or 'pcr', got {regression!r}")
    if average not in ("variance", "uniform"):
        raise EvaluationError(f"average must be 'variance' or 'uniform', got {average!r}")
    starts = np.concatenate([[0], np.cumsum(widths)])
    target = slice(int(starts[step - 1]), int(starts[step]))
    if fit is None:
        predictors = np.zeros((k_total, int(starts[step - 1])))  # (K, p): selects [h_1 .. h_{i-1}]
        predictors[: starts[step - 1]] = np.eye(int(starts[step - 1]))
    else:
        if tuple(fit.widths) != widths:
            raise EvaluationError(f"the fit has widths {tuple(fit.widths)}, not {widths}")
        _, transform, _ = fit.affine()  # rd = (x - mean) @ transform + offset; transform: (K, k_m)
        predictors = transform[:, : widths[step - 2]]  # (K, k_{i-1}): acc_{i-1} = x_c @ predictors

    c_aa = predictors.T @ cov @ predictors  # (p, p) covariance of the predictors
    c_ah = predictors.T @ cov[:, target]  # (p, k_i) cross-covariance with h_i
    c_hh = cov[target, target]  # (k_i, k_i)
    eigvals, eigvecs = np.linalg.eigh(0.5 * (c_aa + c_aa.T))
    if regression == "pcr":
        if count is None:
            raise EvaluationError("PCR's noise edge depends on the residue count: pass Moments, not a covariance")
        keep, _, _ = pcr_components(eigvals, count, "pcr")
    else:
        keep = eigvals > _RCOND * max(float(eigvals.max(initial=0.0)), 0.0)
    u = eigvecs[:, keep]  # (p, c)
    coef = u @ ((u.T @ c_ah) / eigvals[keep][:, None])  # (p, k_i): W restricted to the kept components
    # cov(h - acc W) = C_hh - C_ah' W - W' C_ah + W' C_aa W (no shortcut: for PCR the cross terms do not cancel)
    resid = c_hh - c_ah.T @ coef - coef.T @ c_ah + coef.T @ c_aa @ coef  # (k_i, k_i)
    if average == "variance":
        total = float(np.trace(c_hh))
        return 1.0 - float(np.trace(resid)) / total if total > 0 else float("nan")
    var = np.diag(c_hh)
    live = var > _RCOND * max(float(var.max(initial=0.0)), 1e-300)
    return float(np.mean(1.0 - np.diag(resid)[live] / var[live])) if live.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# per-step report


def _read_manifest(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise EvaluationError(f"no fit manifest at {path} (a fit artifact directory holds manifest.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not valid JSON: {err}") from err


def _lookup(manifest: Mapping[str, Any], key: str) -> Any:
    """`key` at the top of a manifest or in its "fit"/"chain" section (artifact layouts nest it)."""
    if key in manifest:
        return manifest[key]
    for section in ("fit", "chain"):
        inner = manifest.get(section)
        if isinstance(inner, Mapping) and key in inner:
            return inner[key]
    return None


def _number(value: Any) -> float:
    # an artifact's manifest stores undefined (non-finite) diagnostics as null
    return float("nan") if value is None else float(value)


def reconstruction_report(fit_or_manifest: Any, moments: Any | None = None) -> list[dict[str, Any]]:
    """One row per chain step: which widths predict which, how, and how well.

    fit_or_manifest: a ChainFit, a fit manifest (dict, as in manifest.json), or a fit artifact directory / path.
    moments: optional Moments of the fit data, with a ChainFit only; adds "r2_ols_concat", the R^2 of least
        squares on the concatenated smaller models (an upper bound on what the chain's acc_{i-1} can explain).

    Row keys: step (1-based target model), from_widths (models whose information acc_{i-1} carries), to_width,
    input_width (k_{i-1}), new_directions, regression, components_kept, r2 (linear reconstruction R^2 of h_i from
    acc_{i-1}), captured_variance (fraction of the residual variance the new block keeps), leakage (max |corr| of a
    new column with acc_{i-1}; 0 up to round-off with OLS).
    """
    if isinstance(fit_or_manifest, (str, Path)):
        fit_or_manifest = _read_manifest(fit_or_manifest)
    if isinstance(fit_or_manifest, Mapping):
        steps = _lookup(fit_or_manifest, "steps")
        regression = _lookup(fit_or_manifest, "regression")
        if not isinstance(steps, list) or not steps:
            raise EvaluationError("the manifest has no per-step diagnostics ('steps'); was it written by save_fit?")
        steps = [dict(s) for s in steps]
        if moments is not None:
            raise EvaluationError("moments can only be checked against a ChainFit (the manifest has no matrices)")
    elif hasattr(fit_or_manifest, "steps") and hasattr(fit_or_manifest, "widths"):
        steps = [s.to_dict() if hasattr(s, "to_dict") else dict(vars(s)) for s in fit_or_manifest.steps]
        regression = getattr(fit_or_manifest, "regression", None)
    else:
        raise EvaluationError(f"expected a ChainFit, a manifest dict or an artifact path, got {type(fit_or_manifest)}")

    required = ("step", "input_width", "target_width", "components_kept", "residual_r2", "captured_variance", "leakage")
    widths = [int(steps[0].get("input_width", 0))]
    rows = []
    for s in steps:
        missing = [k for k in required if k not in s]
        if missing:
            raise EvaluationError(f"step diagnostics lack {missing} (found {sorted(s)})")
        widths.append(int(s["target_width"]))
        row = {
            "step": int(s["step"]),
            "from_widths": widths[: int(s["step"]) - 1],
            "to_width": int(s["target_width"]),
            "input_width": int(s["input_width"]),
            "new_directions": int(s.get("new_directions", int(s["target_width"]) - int(s["input_width"]))),
            "regression": regression,
            "components_kept": int(s["components_kept"]),
            "r2": _number(s["residual_r2"]),
            "captured_variance": _number(s["captured_variance"]),
            "leakage": _number(s["leakage"]),
        }
        if moments is not None:
            row["r2_ols_concat"] = r2_from_moments(moments, fit_or_manifest.widths, row["step"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# DMS over files, and the report


def run_dms(
    csv_paths: Sequence[str | Path],
    wild_types: str | Path | Mapping[str, str],
    embed_fn: EmbedFn,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    train_fraction: float = 0.8,
    batch_size: int = 64,
    reconstruction: Sequence[Mapping[str, Any]] | None = None,
) -> list[DMSResult]:
    """The DMS protocol on each CSV (dataset name = file stem), then `write_report` into out_dir if given.

    wild_types: one sequence or FASTA file for every CSV (a multi-record FASTA is matched by record id = dataset
    name, as ProteinGym names its datasets), or a mapping dataset name -> sequence or FASTA file.
    """
    results = []
    for csv_path in csv_paths:
        name = Path(csv_path).stem
        if isinstance(wild_types, Mapping):
            if name not in wild_types:
                raise EvaluationError(f"no wild type given for dataset {name!r} ({csv_path})")
            source = wild_types[name]
        else:
            source = wild_types
        dataset = read_dms_csv(csv_path, source, name=name)
        log.info("DMS %s: %d variants", name, len(dataset))
        results.append(
            evaluate_dms(dataset, embed_fn, train_fraction=train_fraction, seed=seed, batch_size=batch_size)
        )
    if out_dir is not None:
        write_report(results, out_dir, reconstruction=reconstruction)
    return results


def summarise(results: Sequence[DMSResult]) -> list[dict[str, Any]]:
    """Mean Spearman over datasets per representation and metric (NaN scores left out).

    Rows: {"representation", "kind", "width", <metric>: mean rho, "n_<metric>": datasets averaged}, by kind then width.
    """
    by_name: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for name, score in result.scores.items():
            by_name.setdefault(name, {"representation": name, "kind": score.kind, "width": score.width})
            for metric, rho in score.spearman.items():
                if not math.isnan(rho):
                    values.setdefault(name, {}).setdefault(metric, []).append(rho)
    metrics = _metrics(results)
    rows = []
    for name, row in sorted(by_name.items(), key=lambda item: (item[1]["kind"], item[1]["width"], item[0])):
        for metric in metrics:
            got = values.get(name, {}).get(metric, [])
            row[metric] = float(np.mean(got)) if got else float("nan")
            row[f"n_{metric}"] = len(got)
        rows.append(row)
    return rows


def _metrics(results: Sequence[DMSResult]) -> list[str]:
    return sorted({m for r in results for m in r.metrics}, key=metric_sort_key)


def _fmt(value: Any, pct: bool = False) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{100 * value:.0f}%" if pct else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _plot(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path) -> str | None:
    """Write the scaling plot; returns None on success, else why it was skipped."""
    try:
        from matplotlib.figure import (
            Figure,  # no pyplot: no global figure state, no GUI backend
        )
    except ImportError:
        return "matplotlib is not installed (pip install 'rdscale[plot]'); scaling.png was not written"
    shown = [m for m in metrics if any(r.get(f"n_{m}", 0) for r in summary)][:4]
    if not shown:
        return "no finite Spearman score to plot; scaling.png was not written"
    fig = Figure(figsize=(4.2 * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    styles = {"raw": {"marker": "o", "label": "raw ESM-2"}, "rd": {"marker": "s", "label": "reverse-distilled"}}
    for ax, metric in zip(axes, shown):
        for kind, style in styles.items():
            pts = sorted((r["width"], r[metric]) for r in summary if r["kind"] == kind and r.get(f"n_{metric}", 0))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        ax.set_xscale("log", base=2)
        widths = sorted({r["width"] for r in summary})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("embedding width")
        ax.set_ylabel("mean Spearman")
        ax.set_title("held-out single mutants" if metric == "singles" else f"{metric[6:]}-point mutants")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)
    return None


def write_report(
    results: Sequence[DMSResult | Mapping[str, Any]],
    out_dir: str | Path,
    *,
    reconstruction: Sequence[Mapping[str, Any]] | None = None,
    title: str = "rdscale scaling report",
) -> dict[str, Path]:
    """Write dms_results.json, report.md and (with matplotlib) scaling.png into out_dir; returns their paths.

    results: DMSResult objects or their to_dict() (as stored in dms_results.json, so a report can be redrawn).
    reconstruction: rows of `reconstruction_report`, shown as their own table.
    """
    results = [r if isinstance(r, DMSResult) else DMSResult.from_dict(r) for r in results]
    if not results and not reconstruction:
        raise EvaluationError("nothing to report: no DMS results and no reconstruction rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "dms_results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")

    metrics = _metrics(results)
    summary = summarise(results)
    lines = [f"# {title}", ""]
    if results:
        plot_problem = _plot(summary, metrics, out / "scaling.png")
        if plot_problem is None:
            paths["plot"] = out / "scaling.png"
            lines += ["![score against width](scaling.png)", ""]
        else:
            log.warning("%s", plot_problem)
            lines += [f"_Plot skipped: {plot_problem}._", ""]
        lines += [
            (f"DMS protocol on {len(results)} dataset(s): ridge (penalty by leave-one-out) on "
             "mutant-minus-wild-type embeddings at the mutated positions, trained on a seeded "
             f"{results[0].n_train}/{results[0].n_train + _n_test(results[0])} split of the single mutants "
             f"(first dataset; seed {results[0].seed}); Spearman on the held-out singles and on multiple "
             "mutants by number of substitutions."),
            "",
            "## Mean Spearman over datasets",
            "",
        ]
        lines += _table(
            ["representation", "width"] + [f"{m} (n)" for m in metrics],
            [[r["representation"], str(r["width"])] + [f"{_fmt(r[m])} ({r[f'n_{m}']})" for m in metrics]
             for r in summary],
        )
        table2 = rd_vs_raw_table(results, metrics)
        if table2:
            lines += ["", "## Reverse-distilled vs raw at the same width (Table 2)", "",
                      "Share of datasets where rd beats raw (ties count half; at the smallest width they are equal).",
                      ""]
            lines += _table(
                ["width", "raw", "rd"] + metrics,
                [[str(r["width"]), r["raw"], r["rd"]] + [f"{_fmt(r[m], True)} of {r[f'n_{m}']}" for m in metrics]
                 for r in table2],
            )
        table3 = scaling_table(results, metrics)
        if table3:
            lines += ["", "## Larger beats smaller (Table 3)", "",
                      "Share of datasets where the wider representation beats the next narrower one of its kind.", ""]
            lines += _table(
                ["from", "to"] + [f"{kind} {m}" for m in metrics for kind in ("rd", "raw")],
                [[str(r["from"]), str(r["to"])]
                 + [f"{_fmt(r[f'{kind}.{m}'], True)} of {r[f'n_{kind}.{m}']}"
                    for m in metrics for kind in ("rd", "raw")]
                 for r in table3],
            )
        lines += ["", "## Per dataset (held-out singles)", ""]
        names = [r["representation"] for r in summary]
        lines += _table(
            ["dataset", "variants"] + names,
            [[r.dataset, str(r.n_variants)]
             + [_fmt(r.scores[n].spearman.get("singles", math.nan)) if n in r.scores else "" for n in names]
             for r in results],
        )
    if reconstruction:
        lines += [""] + reconstruction_lines(reconstruction)
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


def _reconstruction_cells(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    with_concat = any("r2_ols_concat" in r for r in rows)
    header = ["step", "from widths", "to width", "regression", "components kept", "R^2", "captured", "leakage"]
    if with_concat:
        header.insert(6, "R^2 OLS concat")
    cells = []
    for r in rows:
        row = [str(r["step"]), _fmt(r["from_widths"]), str(r["to_width"]), str(r.get("regression")),
               str(r["components_kept"]), _fmt(r["r2"]), _fmt(r["captured_variance"]), f"{r['leakage']:.2e}"]
        if with_concat:
            row.insert(6, _fmt(r.get("r2_ols_concat", math.nan)))
        cells.append(row)
    return header, cells


def reconstruction_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Markdown section for rows of `reconstruction_report` (heading, legend, table)."""
    legend = ("R^2: linear reconstruction of the larger model from the accumulated smaller ones; captured: "
              "fraction of the residual variance kept by the new block; leakage: max |corr| of a new column "
              "with the prefix.")
    if any("r2_ols_concat" in r for r in rows):
        legend += (" R^2 OLS concat: least squares on all smaller models side by side, an upper bound on the "
                   "chain's R^2.")
    return ["## Reconstruction per chain step", "", legend, ""] + _table(*_reconstruction_cells(rows))


def format_reconstruction(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of `reconstruction_report` as an aligned plain-text table for a terminal."""
    header, cells = _reconstruction_cells(rows)
    sizes = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, sizes)) for line in [header, *cells])


def _json_ready(value: Any) -> Any:
    # strict JSON has no NaN: undefined diagnostics (e.g. R^2 of a constant block) become null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def write_reconstruction(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    about: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write reconstruction.json ({"about": ..., "steps": rows}) and reconstruction.md into out_dir.

    about: facts shown above the table (fit artifact, models, residues in the sample, ...).
    """
    if not rows:
        raise EvaluationError("nothing to report: no reconstruction rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "reconstruction.json", "markdown": out / "reconstruction.md"}
    about = dict(about or {})
    paths["json"].write_text(json.dumps(_json_ready({"about": about, "steps": list(rows)}), indent=1) + "\n")
    lines = ["# rdscale reconstruction report", ""]
    lines += [f"- {key}: {', '.join(map(str, value)) if isinstance(value, (list, tuple)) else _fmt(value)}"
              for key, value in about.items()]
    lines += ["", *reconstruction_lines(rows)]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


def _n_test(result: DMSResult) -> int:
    for score in result.scores.values():
        return int(score.n.get("singles", 0))
    return 0
