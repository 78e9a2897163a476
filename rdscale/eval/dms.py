"""The paper's deep-mutational-scanning (DMS) protocol on ProteinGym-format CSV files.

Per dataset (one CSV with columns `mutant`, `mutated_sequence`, `DMS_score`, plus the wild-type sequence given
separately):

1. Every row is parsed and checked: `mutant` is one or more substitutions `<wt><pos><mt>` joined by ':'
   (`A23V:G45D`), positions 1-based; the wild-type letter must match the wild-type sequence at that position and
   `mutated_sequence` must equal the wild type with the substitutions applied. A bad row raises `DMSFormatError`
   naming the file and the row.
2. Features: for each representation (raw model or reverse-distilled level), the difference between the mutant's
   and the wild type's per-residue embeddings at the mutated positions, averaged over the positions of a multiple
   mutant. Embeddings come from an injected `embed_fn(sequences) -> {representation: [(L, k) array, ...]}`, so the
   protocol runs on synthetic embeddings in tests and on ESM-2 + a ChainFit via `make_embed_fn` for real.
3. Ridge regression with its penalty chosen by exact leave-one-out cross-validation (closed form through the SVD of
   the centred design; no refits), trained on a seeded 80% of the single mutants, the same split for every
   representation.
4. Spearman correlation of predictions and scores on the held-out 20% of singles ("singles") and, for the same
   model, on the multiple mutants grouped by number of substitutions ("multi_2", "multi_3", ...).

Across datasets, `rd_vs_raw_table` and `scaling_table` give the win rates of the paper's Tables 2 and 3.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from rdscale.errors import FastaFormatError, RdscaleError
from rdscale.io.fasta import Reject, read_fasta
from rdscale.model.embed import Embedder

__all__ = [
    "AMINO_ACIDS",
    "DMSDataset",
    "DMSError",
    "DMSFormatError",
    "DMSResult",
    "EmbedFn",
    "Mutation",
    "RepresentationScore",
    "RidgeFit",
    "apply_mutations",
    "dms_features",
    "evaluate_dms",
    "fit_ridge_loo",
    "make_embed_fn",
    "metric_sort_key",
    "parse_mutant",
    "rd_vs_raw_table",
    "read_dms_csv",
    "read_wild_type",
    "representation_kind",
    "ridge_loo_residuals",
    "scaling_table",
    "spearman",
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Letters fair-esm's alphabet accepts in a wild-type sequence (the 20 above plus ambiguity/rare codes).
_SEQUENCE_LETTERS = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
_MUTATION = re.compile(r"^([A-Z])([0-9]+)([A-Z])$")

# Ridge penalties tried by default, as multiples of the mean non-zero eigenvalue of the centred Gram matrix, so the
# grid is independent of the embeddings' scale (ESM-2 widths differ in norm by an order of magnitude).
RELATIVE_ALPHAS = np.logspace(-5, 3, 33)

# representation name -> per-sequence (L, k) embeddings, in the order of the input sequences
EmbedFn = Callable[[list[str]], Mapping[str, Sequence[np.ndarray]]]


class DMSError(RdscaleError, ValueError):
    """A DMS dataset that cannot be evaluated (too few variants, inconsistent embeddings, bad wild type)."""


class DMSFormatError(DMSError):
    """A malformed row of a DMS CSV file; the message names the file, the row and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------
# parsing and checking


@dataclass(frozen=True, slots=True)
class Mutation:
    wt: str  # wild-type residue letter
    pos: int  # 1-based position in the wild-type sequence
    mt: str  # substituted residue letter

    def __str__(self) -> str:
        return f"{self.wt}{self.pos}{self.mt}"


def parse_mutant(text: str, wild_type: str | None = None) -> tuple[Mutation, ...]:
    """`"A23V:G45D"` -> (Mutation("A", 23, "V"), Mutation("G", 45, "D")), checked against `wild_type` if given.

    Raises DMSFormatError (without a row; `read_dms_csv` adds it) for bad syntax, letters outside the 20 amino
    acids, position 0, a position past the end of the wild type, a wild-type letter that differs from the wild type
    at that position, or the same position twice.
    """
    text = str(text).strip()
    if not text:
        raise DMSFormatError("empty mutant string")
    mutations = []
    seen: set[int] = set()
    for part in text.split(":"):
        match = _MUTATION.match(part.strip())
        if match is None:
            raise DMSFormatError(
                f"mutant {text!r}: {part!r} is not a substitution like 'A23V' "
                "(wild-type letter, 1-based position, new letter; several joined by ':')"
            )
        wt, pos_text, mt = match.groups()
        pos = int(pos_text)
        for letter in (wt, mt):
            if letter not in AMINO_ACIDS:
                raise DMSFormatError(f"mutant {text!r}: {letter!r} in {part!r} is not one of the 20 amino acids")
        if pos < 1:
            raise DMSFormatError(f"mutant {text!r}: position {pos} in {part!r}; positions are 1-based")
        if wild_type is not None:
            if pos > len(wild_type):
                raise DMSFormatError(
                    f"mutant {text!r}: position {pos} is out of range for the wild type of length {len(wild_type)}"
                )
            if wild_type[pos - 1] != wt:
                raise DMSFormatError(
                    f"mutant {text!r}: wild-type mismatch at position {pos}: the mutant says {wt!r}, the wild-type "
                    f"sequence has {wild_type[pos - 1]!r} (is the wild type the right one, and are positions "
                    "1-based and unoffset?)"
                )
        if pos in seen:
            raise DMSFormatError(f"mutant {text!r}: position {pos} is substituted twice")
        seen.add(pos)
        mutations.append(Mutation(wt, pos, mt))
    return tuple(mutations)


def apply_mutations(wild_type: str, mutations: Sequence[Mutation]) -> str:
    """The wild type with the substitutions applied (positions 1-based, checked against the wild type)."""
    residues = list(wild_type)
    for m in mutations:
        if not 1 <= m.pos <= len(residues) or residues[m.pos - 1] != m.wt:
            raise DMSFormatError(f"{m} does not apply to the wild type (length {len(wild_type)})")
        residues[m.pos - 1] = m.mt
    return "".join(residues)


def read_wild_type(source: str | Path, dataset: str | None = None) -> str:
    """The wild-type sequence from a FASTA file or a literal sequence string.

    A FASTA file with one record gives that record; with several, the record whose id equals `dataset` (e.g. the
    CSV's stem, as ProteinGym names its datasets).
    """
    path = Path(str(source)).expanduser()
    is_file = False
    try:
        is_file = path.is_file()
    except OSError:  # a long sequence string is not a valid file name on some systems
        pass
    if not is_file:
        sequence = str(source).strip().upper()
        if not sequence or set(sequence) - _SEQUENCE_LETTERS:
            raise DMSError(
                f"wild type {str(source)[:40]!r} is neither an existing FASTA file nor a protein sequence"
            )
        return sequence
    records: dict[str, str] = {}  # id -> sequence, validated by the pipeline's own FASTA reader
    refused: dict[str, str] = {}  # id -> why the reader rejected it
    try:
        for item in read_fasta([str(path)]):
            if isinstance(item, Reject):
                refused.setdefault(item.id, item.reason)
            else:
                records[item.id] = item.sequence
    except FastaFormatError as err:
        raise DMSError(f"wild type: {err}") from err
    ids = list(dict.fromkeys([*records, *refused]))
    if not ids:
        raise DMSError(f"{path} holds no FASTA record for the wild type")
    if len(ids) == 1:
        chosen = ids[0]
    elif dataset is not None and dataset in ids:
        chosen = dataset
    else:
        raise DMSError(
            f"{path} holds {len(ids)} records; name the one to use: a record id must equal the dataset name "
            f"{dataset!r} (ids: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
        )
    if chosen not in records:
        raise DMSError(f"{path} record {chosen!r} is not a protein sequence ({refused[chosen]})")
    sequence = records[chosen]
    bad = set(sequence) - _SEQUENCE_LETTERS
    if not sequence or bad:
        raise DMSError(f"{path} record {chosen!r} is not a protein sequence (bad letters: {sorted(bad)})")
    return sequence


@dataclass
class DMSDataset:
    """One validated DMS dataset: variants in file order."""

    name: str
    wild_type: str
    mutants: list[tuple[Mutation, ...]]
    sequences: list[str]  # mutated sequences
    scores: np.ndarray  # (n,) float64 DMS_score

    def __post_init__(self) -> None:
        if not (len(self.mutants) == len(self.sequences) == len(self.scores)):
            raise DMSError(
                f"dataset {self.name}: {len(self.mutants)} mutants, {len(self.sequences)} sequences and "
                f"{len(self.scores)} scores; they must match"
            )

    def __len__(self) -> int:
        return len(self.mutants)

    @property
    def n_mutations(self) -> np.ndarray:
        """(n,) int number of substitutions per variant."""
        return np.array([len(m) for m in self.mutants], dtype=np.int64)


_REQUIRED_COLUMNS = ("mutant", "mutated_sequence", "DMS_score")


def read_dms_csv(path: str | Path, wild_type: str | Path, name: str | None = None) -> DMSDataset:
    """Read and validate a ProteinGym-format substitution CSV against its wild-type sequence.

    `wild_type` is a sequence or a FASTA file (see read_wild_type). Rows are numbered from 1 after the header
    (row 1 is the file's line 2, unless quoted fields span lines); every error names the file, the row and the
    line.
    """
    path = Path(path)
    name = name or path.stem
    wild_type = read_wild_type(wild_type, dataset=name)
    mutants: list[tuple[Mutation, ...]] = []
    sequences: list[str] = []
    scores: list[float] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DMSFormatError(
                f"{path}: missing column(s) {missing}; a ProteinGym substitution file has "
                f"{', '.join(_REQUIRED_COLUMNS)} (found: {', '.join(columns) or 'no header'})"
            )
        for row_number, row in enumerate(reader, start=1):
            where = f"{path} row {row_number} (line {reader.line_num})"
            try:
                mutations = parse_mutant(row["mutant"] or "", wild_type)
            except DMSFormatError as err:
                raise DMSFormatError(f"{where}: {err}") from None
            expected = apply_mutations(wild_type, mutations)
            observed = (row["mutated_sequence"] or "").strip().upper()
            if observed != expected:
                diff = [i + 1 for i, (a, b) in enumerate(zip(observed, expected)) if a != b]
                detail = (
                    f"lengths {len(observed)} and {len(expected)}"
                    if len(observed) != len(expected)
                    else f"first difference at position {diff[0]}"
                )
                raise DMSFormatError(
                    f"{where}: mutated_sequence is not the wild type with {row['mutant']!r} applied ({detail})"
                )
            try:
                score = float(row["DMS_score"])
            except (TypeError, ValueError):
                raise DMSFormatError(f"{where}: DMS_score {row['DMS_score']!r} is not a number") from None
            if not math.isfinite(score):
                raise DMSFormatError(f"{where}: DMS_score is {score}; every variant needs a finite score")
            mutants.append(mutations)
            sequences.append(expected)
            scores.append(score)
    if not mutants:
        raise DMSFormatError(f"{path}: no variant rows after the header")
    return DMSDataset(name, wild_type, mutants, sequences, np.asarray(scores, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------
# features


def _check_embeddings(out: Mapping[str, Sequence[np.ndarray]], sequences: Sequence[str]) -> dict[str, list]:
    if not out:
        raise DMSError("embed_fn returned no representation")
    checked = {}
    for name, embeddings in out.items():
        if len(embeddings) != len(sequences):
            raise DMSError(f"embed_fn gave {len(embeddings)} embeddings for {len(sequences)} sequences ({name})")
        arrays = []
        for seq, emb in zip(sequences, embeddings):
            emb = np.asarray(emb)
            if emb.ndim != 2 or emb.shape[0] != len(seq):
                raise DMSError(
                    f"embed_fn's {name} embedding has shape {emb.shape} for a sequence of length {len(seq)}; "
                    "expected (L, k) per residue with BOS/EOS dropped"
                )
            arrays.append(emb)
        checked[name] = arrays
    return checked


def dms_features(dataset: DMSDataset, embed_fn: EmbedFn, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{representation: (n_variants, k) float64}: mean over mutated positions of mutant minus wild-type embedding.

    Sequences go to `embed_fn` `batch_size` at a time, and each batch is reduced to the mutated positions at once,
    so memory holds one batch of per-residue embeddings, not the whole dataset's.
    """
    if batch_size < 1:
        raise DMSError(f"batch_size must be at least 1, got {batch_size}")
    wt_out = _check_embeddings(embed_fn([dataset.wild_type]), [dataset.wild_type])
    wt_embeddings = {name: embs[0] for name, embs in wt_out.items()}  # name -> (L, k)
    features: dict[str, np.ndarray] = {
        name: np.empty((len(dataset), emb.shape[1]), dtype=np.float64) for name, emb in wt_embeddings.items()
    }
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        batch = dataset.sequences[start:stop]
        out = _check_embeddings(embed_fn(list(batch)), batch)
        if set(out) != set(features):
            raise DMSError(
                f"embed_fn returned representations {sorted(out)} for a batch but {sorted(features)} for the wild type"
            )
        for name, embeddings in out.items():
            wt_emb = wt_embeddings[name]  # (L, k)
            for i, (emb, mutations) in enumerate(zip(embeddings, dataset.mutants[start:stop])):
                idx = np.fromiter((m.pos - 1 for m in mutations), dtype=np.int64)
                diff = emb[idx].astype(np.float64) - wt_emb[idx].astype(np.float64)  # (n_mut, k)
                features[name][start + i] = diff.mean(axis=0)
    return features


# ---------------------------------------------------------------------------------------------------------------
# ridge with closed-form leave-one-out


@dataclass
class RidgeFit:
    alpha: float  # chosen penalty (absolute)
    coef: np.ndarray  # (p,) float64
    intercept: float
    alphas: np.ndarray  # (a,) penalties tried
    loo_mse: np.ndarray  # (a,) leave-one-out mean squared error per penalty

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept


def _centred_svd(x: np.ndarray, y: np.ndarray):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise DMSError(f"ridge needs x: (n, p) and y: (n,), got {x.shape} and {y.shape}")
    if x.shape[0] < 3:
        raise DMSError(f"ridge with leave-one-out needs at least 3 samples, got {x.shape[0]}")
    x_mean, y_mean = x.mean(axis=0), y.mean()
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)  # u: (n, r), s: (r,), vt: (r, p)
    keep = s > s[0] * max(x.shape) * np.finfo(np.float64).eps if s.size and s[0] > 0 else np.zeros_like(s, bool)
    return x_mean, y_mean, u[:, keep], s[keep], vt[keep], y - y_mean


def _loo_from_svd(u, s, yc, n, alpha) -> np.ndarray:
    """(n,) leave-one-out residuals y_i - yhat_{-i} of ridge with an unpenalised intercept.

    The fit is a linear smoother yhat = H y with H = 11'/n + U diag(s^2 / (s^2 + alpha)) U' (centred design
    X_c = U S V'), and for any fixed quadratic penalty the leave-one-out residual is (y_i - yhat_i) / (1 - H_ii).
    """
    shrink = s**2 / (s**2 + alpha)  # (r,)
    uty = u.T @ yc  # (r,)
    resid = yc - u @ (shrink * uty)  # (n,) y - yhat (the intercept term cancels against centring)
    leverage = 1.0 / n + (u**2) @ shrink  # (n,) H_ii
    return resid / (1.0 - leverage)


def ridge_loo_residuals(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """(n,) exact leave-one-out residuals of ridge(alpha) with intercept, from one SVD (no refits)."""
    if not alpha > 0:
        raise DMSError(f"ridge penalty must be positive, got {alpha}")
    _, _, u, s, _, yc = _centred_svd(x, y)
    return _loo_from_svd(u, s, yc, len(yc), float(alpha))


def fit_ridge_loo(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] | None = None) -> RidgeFit:
    """Ridge regression (intercept unpenalised) with the penalty minimising exact leave-one-out MSE.

    `alphas=None` tries RELATIVE_ALPHAS times the mean non-zero eigenvalue of X_c' X_c. Ties go to the larger
    penalty (the smoother model).
    """
    x_mean, y_mean, u, s, vt, yc = _centred_svd(x, y)
    n = len(yc)
    if alphas is None:
        scale = float(np.mean(s**2)) if s.size else 1.0
        grid = RELATIVE_ALPHAS * scale
    else:
        grid = np.asarray(alphas, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 0):
            raise DMSError(f"alphas must be a non-empty list of positive penalties, got {alphas!r}")
    loo_mse = np.array([np.mean(_loo_from_svd(u, s, yc, n, a) ** 2) for a in grid])  # (a,)
    tied = np.flatnonzero(loo_mse <= loo_mse.min() * (1 + 1e-12))
    alpha = float(grid[tied].max())
    coef = vt.T @ ((s / (s**2 + alpha)) * (u.T @ yc))  # (p,)
    intercept = float(y_mean - x_mean @ coef)
    return RidgeFit(alpha=alpha, coef=coef, intercept=intercept, alphas=grid, loo_mse=loo_mse)


# ---------------------------------------------------------------------------------------------------------------
# the protocol


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho, NaN for fewer than 3 pairs or a constant side (where it is undefined)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(a, b).statistic)


def representation_kind(name: str) -> str:
    """"raw:esm2_t6_8M_UR50D" -> "raw", "rd:320" -> "rd"; names without a known prefix are "other"."""
    kind = name.split(":", 1)[0]
    return kind if kind in ("raw", "rd") and ":" in name else "other"


@dataclass
class RepresentationScore:
    name: str  # e.g. "raw:esm2_t6_8M_UR50D", "rd:320"
    kind: str  # "raw" | "rd" | "other"
    width: int
    alpha: float  # ridge penalty chosen by leave-one-out
    spearman: dict[str, float]  # metric ("singles", "multi_2", ...) -> rho (NaN where undefined)
    n: dict[str, int]  # metric -> number of variants scored


@dataclass
class DMSResult:
    dataset: str
    n_variants: int
    n_train: int
    seed: int
    scores: dict[str, RepresentationScore] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        names = {m for s in self.scores.values() for m in s.spearman}
        return sorted(names, key=metric_sort_key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n_variants": self.n_variants,
            "n_train": self.n_train,
            "seed": self.seed,
            "scores": {
                name: {
                    "kind": s.kind,
                    "width": s.width,
                    "alpha": s.alpha,
                    "spearman": {m: (None if math.isnan(v) else v) for m, v in s.spearman.items()},
                    "n": dict(s.n),
                }
                for name, s in self.scores.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DMSResult:
        scores = {
            name: RepresentationScore(
                name=name,
                kind=s["kind"],
                width=int(s["width"]),
                alpha=float(s["alpha"]),
                spearman={m: float("nan") if v is None else float(v) for m, v in s["spearman"].items()},
                n={m: int(v) for m, v in s["n"].items()},
            )
            for name, s in data["scores"].items()
        }
        return cls(data["dataset"], int(data["n_variants"]), int(data["n_train"]), int(data["seed"]), scores)


def metric_sort_key(metric: str) -> tuple[int, str]:
    """Order metrics as singles, multi_2, multi_3, ..., then anything else by name."""
    if metric == "singles":
        return (1, "")
    if metric.startswith("multi_") and metric[6:].isdigit():
        return (int(metric[6:]), "")
    return (10**9, metric)


def split_singles(n_mutations: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of the single mutants: a seeded random `train_fraction` / rest split."""
    if not 0 < train_fraction < 1:
        raise DMSError(f"train_fraction must be in (0, 1), got {train_fraction}")
    singles = np.flatnonzero(n_mutations == 1)
    order = np.random.default_rng(seed).permutation(singles)
    n_train = round(train_fraction * singles.size)
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    if train.size < 3 or test.size < 3:
        raise DMSError(
            f"{singles.size} single mutants give {train.size} to train and {test.size} to test; the protocol needs "
            "at least 3 of each"
        )
    return train, test


def evaluate_dms(
    dataset: DMSDataset,
    embed_fn: EmbedFn,
    *,
    train_fraction: float = 0.8,
    seed: int = 0,
    alphas: Sequence[float] | None = None,
    batch_size: int = 64,
    features: Mapping[str, np.ndarray] | None = None,
) -> DMSResult:
    """Run the protocol on one dataset for every representation `embed_fn` returns (or precomputed `features`)."""
    if features is None:
        features = dms_features(dataset, embed_fn, batch_size=batch_size)
    n_mut = dataset.n_mutations
    train, test = split_singles(n_mut, train_fraction, seed)
    groups = {"singles": test}
    for count in sorted(set(n_mut.tolist()) - {1}):
        groups[f"multi_{count}"] = np.flatnonzero(n_mut == count)
    result = DMSResult(dataset.name, len(dataset), int(train.size), seed)
    y = dataset.scores
    for name, x in features.items():
        if x.shape[0] != len(dataset):
            raise DMSError(f"features {name} have {x.shape[0]} rows for {len(dataset)} variants")
        ridge = fit_ridge_loo(x[train], y[train], alphas)
        pred = ridge.predict(x)  # (n,)
        result.scores[name] = RepresentationScore(
            name=name,
            kind=representation_kind(name),
            width=int(x.shape[1]),
            alpha=ridge.alpha,
            spearman={m: spearman(pred[idx], y[idx]) for m, idx in groups.items()},
            n={m: int(idx.size) for m, idx in groups.items()},
        )
    return result


# ---------------------------------------------------------------------------------------------------------------
# win-rate tables (the paper's Tables 2 and 3)


def _win_rate(wins: Sequence[float]) -> float:
    return float(np.mean(wins)) if wins else float("nan")


def _compare(a: float, b: float) -> float | None:
    """1 if a > b, 0 if a < b, 0.5 for a tie; None if either is undefined (the dataset does not count)."""
    if math.isnan(a) or math.isnan(b):
        return None
    return 1.0 if a > b else 0.0 if a < b else 0.5


def _by_kind_and_width(results: Sequence[DMSResult], kind: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for result in results:
        for name, score in result.scores.items():
            if score.kind != kind:
                continue
            if names.setdefault(score.width, name) != name:
                raise DMSError(f"two {kind} representations of width {score.width}: {names[score.width]} and {name}")
    return dict(sorted(names.items()))


def rd_vs_raw_table(results: Sequence[DMSResult], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Table 2: per width with both a raw model and an rd level, the fraction of datasets where rd beats raw.

    Rows: {"width", "raw", "rd", <metric>: win rate in [0, 1] (ties count half, NaN if no dataset has both),
    "n_<metric>": datasets compared}. At the smallest width rd equals raw, so its rate is 0.5 by construction.
    """
    metrics = list(metrics) if metrics is not None else _all_metrics(results)
    raw, rd = _by_kind_and_width(results, "raw"), _by_kind_and_width(results, "rd")
    rows = []
    for width in sorted(set(raw) & set(rd)):
        row: dict[str, Any] = {"width": width, "raw": raw[width], "rd": rd[width]}
        for metric in metrics:
            wins = _pairwise(results, rd[width], raw[width], metric)
            row[metric], row[f"n_{metric}"] = _win_rate(wins), len(wins)
        rows.append(row)
    return rows


def scaling_table(results: Sequence[DMSResult], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Table 3: per pair of consecutive widths, how often the larger beats the smaller, for rd and for raw.

    Rows: {"from", "to", "rd.<metric>", "raw.<metric>", "n_rd.<metric>", "n_raw.<metric>"}; a kind missing at
    either width gives NaN with n 0.
    """
    metrics = list(metrics) if metrics is not None else _all_metrics(results)
    by_kind = {kind: _by_kind_and_width(results, kind) for kind in ("rd", "raw")}
    widths = sorted(set(by_kind["rd"]) | set(by_kind["raw"]))
    rows = []
    for small, large in itertools.pairwise(widths):
        row: dict[str, Any] = {"from": small, "to": large}
        for kind, names in by_kind.items():
            for metric in metrics:
                wins = (
                    _pairwise(results, names[large], names[small], metric)
                    if small in names and large in names
                    else []
                )
                row[f"{kind}.{metric}"], row[f"n_{kind}.{metric}"] = _win_rate(wins), len(wins)
        rows.append(row)
    return rows


def _pairwise(results: Sequence[DMSResult], a: str, b: str, metric: str) -> list[float]:
    wins = []
    for result in results:
        if a in result.scores and b in result.scores:
            outcome = _compare(
                result.scores[a].spearman.get(metric, float("nan")),
                result.scores[b].spearman.get(metric, float("nan")),
            )
            if outcome is not None:
                wins.append(outcome)
    return wins


def _all_metrics(results: Sequence[DMSResult]) -> list[str]:
    return sorted({m for r in results for m in r.metrics}, key=metric_sort_key)


# ---------------------------------------------------------------------------------------------------------------
# embeddings from real models


def make_embed_fn(models: Sequence[Any], fit: Any | None = None, **embedder_options: Any) -> EmbedFn:
    """An `EmbedFn` over loaded ESM-2 models (rdscale.model.loading.LoadedModel, smallest first) and optionally a ChainFit.

    Keys: "raw:<model name>" for every model and, with a fit, "rd:<level width>" for every level of the chain
    (the rd level at the smallest width equals the smallest raw model, by construction). `embedder_options` go to
    rdscale.model.embed.Embedder (toks_per_batch, long_policy, ...). Arrays are float32 on the host.
    """
    import torch

    models = list(models)
    if not models:
        raise DMSError("make_embed_fn needs at least one model")
    embedders = [Embedder(m, **embedder_options) for m in models]
    widths = tuple(int(m.spec.width) for m in models)
    if fit is not None and tuple(fit.widths) != widths:
        raise DMSError(f"the fit was made for widths {tuple(fit.widths)}, the models have widths {widths}")

    def embed_fn(sequences: list[str]) -> dict[str, list[np.ndarray]]:
        lengths = [len(s) for s in sequences]
        out: dict[str, list[np.ndarray]] = {}
        blocks = []  # per model: (sum L, k_i) on the model's device
        for model, embedder in zip(models, embedders):
            per_seq = embedder.embed(sequences)
            out[f"raw:{model.spec.name}"] = [t.detach().float().cpu().numpy() for t in per_seq]
            blocks.append(torch.cat(list(per_seq), dim=0))
        if fit is not None:
            device = blocks[0].device
            rd = fit.apply([b.to(device) for b in blocks]).detach().float().cpu()  # (sum L, k_m)
            parts = torch.split(rd, lengths, dim=0)
            for level in fit.levels:
                out[f"rd:{int(level)}"] = [p[:, : int(level)].numpy() for p in parts]
        return out

    return embed_fn
