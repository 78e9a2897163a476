"""Closed-form chained reverse distillation from moments (docs/method.md), and its application.

Notation (one residue): x = [h_1; ...; h_m] is the concatenation of the chain's per-residue embeddings, widths
k_1 < ... < k_m, K = sum k_i; x_c = x - mean. S = cov(x): (K, K). E_i: (K, k_i) selects block i of x.

Every accumulated representation is a linear map of the centred input, acc_{i-1} = x_c T with T: (K, k_{i-1}):

    T = E_1
    step i = 2..m:
        C_aa = T' S T                          (k_{i-1}, k_{i-1})  covariance of acc_{i-1}
        C_ah = T' S E_i                        (k_{i-1}, k_i)      cross-covariance of acc_{i-1} with h_i
        W_i  = C_aa^+ C_ah                     OLS (pseudo-inverse), or PCR: C_aa^+ restricted to the kept
                                               principal components of C_aa (Johnstone noise edge, below)
        Q    = E_i - T W_i                     (K, k_i)            r_i = h_i - acc_{i-1} W_i = x_c Q (centred)
        V_i  = top (k_i - k_{i-1}) eigenvectors of Q' S Q = cov(r_i), signs fixed (below)
        T   <- [T, Q V_i]

The rd embedding at level j is acc_j. Its first k_1 columns are h_1 itself (not centred); the rest is x_c M with
M = T[:, k_1:]: (K, k_m - k_1), the `projection` stored in a `ChainFit`. So the whole output is affine in x:

    z = (x - mean) @ T + offset,     T = [E_1, M]: (K, k_m),   offset = [mean_1, 0, ..., 0]: (k_m,)

(`ChainFit.affine()`). The columns of M for level j have zero rows for blocks > j, so level j needs only the first
j models. Extending a fitted chain with model m+1 later needs only stored full-width rd embeddings z and h_{m+1}:
acc_m = z, so the next step is `fit_chain` on the moments of [z; h_{m+1}] with widths (k_m, k_{m+1}) — its first
block is z itself, exactly like h_1 here, and its step is the same formula as step m+1 of the long chain.

Sign convention: an eigenvector's sign is arbitrary, so each column of V_i: (k_i, d_i) is flipped to make its
largest-magnitude entry positive (entries equal up to round-off count as tied; ties go to the lowest index). The
sign depends only on V_i in h_i coordinates, not on how r_i is written in terms of x: extending a stored dataset
fits step m+1 as a 2-block chain on [z; h_{m+1}], whose x coordinates differ from the long chain's while r_{m+1}
and V_{m+1} are the same, so both give the same new columns, signs included. V_i does not depend on the
eigensolver (for distinct eigenvalues), so fits of the same data agree on any machine and any split of the residues.

PCR noise edge (Johnstone 2001; the authors' estimate): with p = k_{i-1} and n residues, eigenvalues of C_aa scaled
by their mean that fall below (1 + sqrt(p/n))^2 are taken as noise; s^2 is the median of those (unscaled), or of
the smallest quarter if there are none; components with eigenvalue > s^2 (1 + sqrt(p/n))^2 are kept. If none
passes, the fewest leading components that reach `fallback_fraction` (95%) of the variance are kept.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from rdscale.config import REGRESSIONS
from rdscale.errors import RdscaleError
from rdscale.fit.moments import Moments

__all__ = [
    "ChainFit",
    "ChainFitError",
    "InsufficientDataError",
    "StepDiagnostics",
    "fit_chain",
    "fix_signs",
    "johnstone_threshold",
    "pcr_components",
    "residual_directions",
    "solve_step",
]

# Eigenvalues below RCOND * largest are treated as exact zeros (the pseudo-inverse floor). Covariances of float32
# embeddings carry round-off of order 1e-14 relative in truly dependent directions; real signal sits far above.
RCOND = 1e-12
# Relative tolerance under which two entries of a direction count as equal in magnitude for the sign convention.
SIGN_TIE_TOL = 1e-9


class ChainFitError(RdscaleError, ValueError):
    """The chain cannot be fitted or applied as asked (bad widths, mismatched moments, wrong inputs)."""


class InsufficientDataError(ChainFitError):
    """Too few residues in the fit sample for a determined fit."""


@dataclass(frozen=True)
class StepDiagnostics:
    """What one chain step did; recorded in the fit artifact's manifest."""

    step: int  # 1-based index of the target model i (2..m)
    input_width: int  # p = k_{i-1}, width of acc_{i-1}
    target_width: int  # k_i
    new_directions: int  # k_i - k_{i-1}, width of the new block r_i V_i
    components_kept: int  # principal components of acc_{i-1} the regression used (p for full-rank OLS)
    noise_variance: float | None  # PCR's s^2 (None for OLS)
    threshold: float | None  # PCR's eigenvalue cut s^2 (1 + sqrt(p/n))^2 (None for OLS)
    residual_r2: float  # 1 - tr cov(r_i) / tr cov(h_i): linear reconstruction R^2 of h_i from acc_{i-1}
    residual_variance: float  # tr cov(r_i)
    captured_variance: float  # fraction of tr cov(r_i) carried by the kept directions V_i
    leakage: float  # max |corr| between a column of r_i V_i and a column of acc_{i-1} on the fit data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepDiagnostics":
        names = [f for f in cls.__dataclass_fields__]
        missing = [name for name in names if name not in d]
        if missing:
            raise ChainFitError(f"step diagnostics lack fields {missing}")
        return cls(**{name: d[name] for name in names})


@dataclass
class ChainFit:
    """A fitted chain: everything needed to apply it, plus per-step diagnostics.

    widths:      (k_1, ..., k_m), smallest model first
    mean:        (K,) float64, fit-data mean of x = [h_1; ...; h_m]
    projection:  (K, k_m - k_1) float64, M: residual columns of the output are (x - mean) @ M
    predictors:  W_i: (k_{i-1}, k_i) float64 for i = 2..m; centred acc_{i-1} @ W_i predicts centred h_i
    directions:  V_i: (k_i, k_i - k_{i-1}) float64 for i = 2..m; orthonormal columns, signs fixed
    steps:       StepDiagnostics for i = 2..m
    """

    widths: tuple[int, ...]
    regression: str
    mean: np.ndarray
    projection: np.ndarray
    predictors: list[np.ndarray]
    directions: list[np.ndarray]
    steps: list[StepDiagnostics]
    n_residues: int
    options: dict[str, Any] = field(default_factory=dict)
    _device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        _check_widths(self.widths)
        if self.regression not in REGRESSIONS:
            raise ChainFitError(f"regression must be one of {REGRESSIONS}, got {self.regression!r}")
        k_total, k_first, k_last = sum(self.widths), self.widths[0], self.widths[-1]
        n_steps = len(self.widths) - 1
        expected = {"mean": (k_total,), "projection": (k_total, k_last - k_first)}
        for name, shape in expected.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != shape:
                raise ChainFitError(f"{name} must be a {shape} array for widths {self.widths}, got {_shape(arr)}")
        for name, shapes in (
            ("predictors", [(self.widths[i - 1], self.widths[i]) for i in range(1, n_steps + 1)]),
            ("directions", [(self.widths[i], self.widths[i] - self.widths[i - 1]) for i in range(1, n_steps + 1)]),
        ):
            arrs = getattr(self, name)
            if len(arrs) != n_steps:
                raise ChainFitError(f"{name} must hold {n_steps} matrices for widths {self.widths}, got {len(arrs)}")
            for i, (arr, shape) in enumerate(zip(arrs, shapes)):
                if not isinstance(arr, np.ndarray) or arr.shape != shape:
                    raise ChainFitError(f"{name}[{i}] must be {shape} for widths {self.widths}, got {_shape(arr)}")
        if len(self.steps) != n_steps:
            raise ChainFitError(f"expected {n_steps} step diagnostics, got {len(self.steps)}")

    # -- shape facts --------------------------------------------------------------------------------------------------

    @property
    def levels(self) -> tuple[int, ...]:
        """Prefix widths of the output: level j (0-based) is the first levels[j] columns (= widths[j])."""
        return self.widths

    @property
    def width(self) -> int:
        """k_m, the width of the full rd embedding."""
        return self.widths[-1]

    @property
    def input_width(self) -> int:
        """K = sum of the model widths."""
        return sum(self.widths)

    def affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean: (K,), transform T: (K, k_m), offset: (k_m,)) with rd embedding z = (x - mean) @ T + offset.

        T = [E_1, projection] and offset = [mean of h_1, zeros]; all float64. This is the full linear map a later
        extension step needs to relate stored rd embeddings to the per-model embeddings they came from.
        """
        k_total, k_first = self.input_width, self.widths[0]
        transform = np.zeros((k_total, self.width))
        transform[:k_first, :k_first] = np.eye(k_first)
        transform[:, k_first:] = self.projection
        offset = np.zeros(self.width)
        offset[:k_first] = self.mean[:k_first]
        return self.mean.copy(), transform, offset

    # -- application -------------------------------------------------------------------------------------------------

    def apply(self, blocks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-model embeddings -> rd embedding.

        blocks: [h_1: (n, k_1), ..., h_j: (n, k_j)], any float dtype, all on one device, j <= m. Given all m
        blocks the result is (n, k_m); given the first j it is the level-j embedding (n, k_j), identical to the
        first k_j columns of the full one.
        Returns `dtype` (float32 or float64) on the blocks' device. The first k_1 columns are h_1 copied (cast to
        `dtype`, exact for fp16/bf16/fp32 inputs); the rest is one matrix product (x - mean) @ M.
        """
        if dtype not in (torch.float32, torch.float64):
            raise ChainFitError(f"apply computes in float32 or float64, got {dtype}")
        if isinstance(blocks, torch.Tensor) or not isinstance(blocks, Sequence):
            raise ChainFitError("apply expects a sequence of per-model tensors [h_1, ..., h_j], smallest model first")
        n_blocks = len(blocks)
        if not 1 <= n_blocks <= len(self.widths):
            raise ChainFitError(f"apply expects 1..{len(self.widths)} blocks (one per model), got {n_blocks}")
        device = blocks[0].device
        n_rows = blocks[0].shape[0] if blocks[0].ndim == 2 else -1
        for i, block in enumerate(blocks):
            if not isinstance(block, torch.Tensor) or not block.is_floating_point():
                raise ChainFitError(f"block {i} must be a floating-point torch.Tensor, got {_describe(block)}")
            if block.ndim != 2 or block.shape != (n_rows, self.widths[i]):
                raise ChainFitError(
                    f"block {i} must have shape (n, {self.widths[i]}) with the same n as block 0 "
                    f"({n_rows}), got {tuple(block.shape)}"
                )
            if block.device != device:
                raise ChainFitError(f"all blocks must be on one device: block 0 on {device}, block {i} on {block.device}")
        k_first, out_width = self.widths[0], self.widths[n_blocks - 1]
        k_used = sum(self.widths[:n_blocks])
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            prefix = blocks[0].to(dtype=dtype, copy=True)  # (n, k_1), exactly h_1
            if n_blocks == 1:
                return prefix
            mean, projection = self._device_tensors(device, dtype)
            x_c = torch.cat([b.to(dtype) for b in blocks], dim=1) - mean[:k_used]  # (n, K_j)
            residual = x_c @ projection[:k_used, : out_width - k_first]  # (n, k_j - k_1)
            return torch.cat([prefix, residual], dim=1)

    def _device_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached so that applying batch after batch moves M to the device once.
        key = (str(device), dtype)
        if key not in self._device_cache:
            # a fit read from the store holds read-only arrays: torch would share them (and warn) on the CPU
            self._device_cache[key] = (
                torch.as_tensor(np.array(self.mean), dtype=dtype, device=device),
                torch.as_tensor(np.array(self.projection), dtype=dtype, device=device).contiguous(),
            )
        return self._device_cache[key]


# -- the solver ---------------------------------------------------------------------------------------------------


def johnstone_threshold(eigvals: np.ndarray, n: int, noise_variance: float | None = None) -> tuple[float, float]:
    """(s^2, eigenvalue cut s^2 (1 + sqrt(p/n))^2) for the eigenvalues of a p x p sample covariance of n rows.

    s^2 is `noise_variance` if given; otherwise the authors' estimate: scale the eigenvalues by their mean, call
    those below the edge factor (1 + sqrt(p/n))^2 noise, and take the median of the noise eigenvalues (unscaled);
    with no such eigenvalue, the median of the smallest quarter.
    """
    lam = np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None)  # (p,), round-off can make them < 0
    p = lam.shape[0]
    edge_factor = (1.0 + math.sqrt(p / n)) ** 2
    if noise_variance is not None:
        s2 = float(noise_variance)
    else:
        scale = lam.mean() if p else 0.0
        if scale <= 0.0:
            return 0.0, 0.0
        noise = lam[lam / scale < edge_factor]
        if noise.size == 0:
            noise = np.sort(lam)[: max(1, p // 4)]
        s2 = float(np.median(noise))
    return s2, s2 * edge_factor


def pcr_components(
    eigvals: np.ndarray,
    n: int,
    regression: str = "pcr",
    noise_variance: float | None = None,
    fallback_fraction: float = 0.95,
) -> tuple[np.ndarray, float | None, float | None]:
    """Boolean mask of the principal components a regression keeps, with PCR's (s^2, cut) or (None, None).

    OLS keeps every component above the pseudo-inverse floor; PCR also drops those at or below the noise edge.
    """
    lam = np.asarray(eigvals, dtype=np.float64)  # (p,)
    if lam.size == 0:
        return np.zeros(0, dtype=bool), None, None
    floor = RCOND * max(float(lam.max()), 0.0)
    if regression == "ols":
        return lam > floor, None, None
    s2, cut = johnstone_threshold(lam, n, noise_variance)
    keep = lam > max(cut, floor)
    if not keep.any() and lam.max() > floor:
        # Nothing clears the edge (e.g. an isotropic spectrum): keep the fewest leading components that carry
        # `fallback_fraction` of the variance rather than regress on nothing.
        order = np.argsort(lam)[::-1]
        share = np.cumsum(np.clip(lam[order], 0.0, None)) / np.clip(lam, 0.0, None).sum()
        n_keep = int(np.searchsorted(share, fallback_fraction - 1e-12) + 1)
        keep[order[:n_keep]] = True
    return keep, s2, cut


def solve_step(
    cov: np.ndarray,
    transform: np.ndarray,
    block: slice,
    n: int,
    regression: str,
    noise_variance: float | None = None,
    fallback_fraction: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One chain step on the joint covariance.

    cov: (K, K) S; transform: (K, p) T with acc = x_c T; block: the columns of x holding h_i (width k).
    Returns (W: (p, k), Q: (K, k) with r = x_c Q, info) where info holds the regression diagnostics.
    """
    c_aa = transform.T @ cov @ transform  # (p, p) covariance of acc
    c_aa = 0.5 * (c_aa + c_aa.T)
    c_ah = transform.T @ cov[:, block]  # (p, k) cross-covariance of acc with h_i
    eigvals, eigvecs = np.linalg.eigh(c_aa)  # ascending; (p,), (p, p)
    keep, s2, cut = pcr_components(eigvals, n, regression, noise_variance, fallback_fraction)
    u_kept = eigvecs[:, keep]  # (p, c)
    # W = U_c diag(1/lambda_c) U_c' C_ah: the pseudo-inverse restricted to the kept components.
    predictor = u_kept @ ((u_kept.T @ c_ah) / eigvals[keep][:, None])  # (p, k)
    q_map = -transform @ predictor  # (K, k)
    q_map[block, :] += np.eye(block.stop - block.start)
    info = {"components_kept": int(keep.sum()), "noise_variance": s2, "threshold": cut}
    return predictor, q_map, info


def residual_directions(cov: np.ndarray, q_map: np.ndarray, n_new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top `n_new` eigenvectors of cov(r) = Q' S Q with deterministic signs.

    Returns (V: (k, n_new) orthonormal, their eigenvalues (n_new,) descending, all eigenvalues (k,) descending).
    Signs follow `fix_signs` (in h_i coordinates, so an extension fit on [z; h_i] agrees with the long chain).
    """
    cov_r = q_map.T @ cov @ q_map  # (k, k)
    cov_r = 0.5 * (cov_r + cov_r.T)
    eigvals, eigvecs = np.linalg.eigh(cov_r)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    directions = fix_signs(eigvecs[:, :n_new])  # (k, n_new)
    return directions, eigvals[:n_new].copy(), eigvals


def fix_signs(vectors: np.ndarray, tie_tol: float = SIGN_TIE_TOL) -> np.ndarray:
    """vectors: (k, d) -> a copy whose every column has its largest-magnitude entry positive.

    Entries within `tie_tol` (relative) of a column's largest magnitude are tied, and the lowest index among them
    decides: without the tolerance, a structural tie (two entries equal in exact arithmetic) would be broken by
    round-off, differently on different machines.
    """
    vectors = np.array(vectors, dtype=np.float64, copy=True)  # (k, d)
    if vectors.size == 0:
        return vectors
    magnitude = np.abs(vectors)  # (k, d)
    top = magnitude.max(axis=0)  # (d,)
    pivot = (magnitude >= top * (1.0 - tie_tol)).argmax(axis=0)  # (d,) first index that reaches the (tied) top
    signs = np.where(vectors[pivot, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)  # (d,)
    return np.ascontiguousarray(vectors * signs)


def _leakage(cov: np.ndarray, transform: np.ndarray, new_cols: np.ndarray) -> float:
    """max |corr(acc_{i-1} column, new column)| on the fit data, from S alone."""
    # Products with S first, then elementwise: a 3-operand einsum runs as a naive K x K x p loop (seconds at K=2720).
    s_old = cov @ transform  # (K, p)
    s_new = cov @ new_cols  # (K, d)
    cross = transform.T @ s_new  # (p, d)
    var_old = (transform * s_old).sum(axis=0)  # (p,) diag of T' S T
    var_new = (new_cols * s_new).sum(axis=0)  # (d,)
    scale = np.sqrt(np.outer(np.clip(var_old, 0, None), np.clip(var_new, 0, None)))
    # Columns with no variance (constant on the fit data) correlate with nothing.
    tiny = RCOND * max(float(np.diag(cov).max()), 1e-300)
    corr = np.divide(np.abs(cross), scale, out=np.zeros_like(cross), where=scale > tiny)
    return float(corr.max()) if corr.size else 0.0


def fit_chain(
    moments: Moments | Mapping[str, np.ndarray],
    widths: Sequence[int],
    regression: str = "pcr",
    *,
    noise_variance: float | None = None,
    fallback_fraction: float = 0.95,
    min_residues: int | None = None,
) -> ChainFit:
    """Fit the chained reverse distillation from merged moments of x = [h_1; ...; h_m].

    moments: a `Moments` (or its `to_arrays()` dict) of width K = sum(widths).
    widths: the chain's per-model widths, strictly increasing (progressive and direct chains are just
        different lists, e.g. (320, 480, 640, 1280) or (320, 1280)).
    regression: "pcr" (principal component regression with the Johnstone noise edge; default) or "ols"
        (pseudo-inverse least squares, robust to a singular covariance).
    noise_variance: PCR only; a fixed s^2 instead of the estimate (0 keeps every non-null component = OLS).
    fallback_fraction: PCR only; variance share kept when no component clears the edge.
    min_residues: refuse fits from fewer residues (default K + 1: below that the joint covariance is singular
        by construction). A warning is issued below 10 K.
    """
    _check_options(regression, noise_variance, fallback_fraction)
    widths = tuple(int(w) for w in widths)
    _check_widths(widths)
    moments = _chain_moments(moments, widths)
    n = moments.count
    _check_sample(n, widths, min_residues)

    cov = moments.covariance()  # (K, K) float64
    starts = np.concatenate([[0], np.cumsum(widths)])
    transform = np.zeros((sum(widths), widths[0]))  # (K, k_1): acc_1 = x_c E_1
    transform[: widths[0], :] = np.eye(widths[0])
    predictors, directions, steps = [], [], []
    for i in range(1, len(widths)):
        block = slice(int(starts[i]), int(starts[i + 1]))
        predictor, direction, new_cols, step = _fit_step(cov, transform, block, i, widths, n, regression,
                                                         noise_variance, fallback_fraction)
        steps.append(step)
        predictors.append(predictor)
        directions.append(direction)
        transform = np.concatenate([transform, new_cols], axis=1)  # (K, k_i)

    options = {"noise_variance": noise_variance, "fallback_fraction": fallback_fraction, "rcond": RCOND}
    return ChainFit(
        widths=widths,
        regression=regression,
        mean=moments.mean,
        projection=np.ascontiguousarray(transform[:, widths[0] :]),
        predictors=predictors,
        directions=directions,
        steps=steps,
        n_residues=n,
        options=options,
    )


def _check_options(regression: str, noise_variance: float | None, fallback_fraction: float) -> None:
    if regression not in REGRESSIONS:
        raise ChainFitError(f"regression must be one of {REGRESSIONS}, got {regression!r}")
    if not 0.0 < fallback_fraction <= 1.0:
        raise ChainFitError(f"fallback_fraction must be in (0, 1], got {fallback_fraction}")
    if noise_variance is not None and not noise_variance >= 0.0:
        raise ChainFitError(f"noise_variance must be >= 0, got {noise_variance}")


def _chain_moments(moments: Moments | Mapping[str, np.ndarray], widths: tuple[int, ...]) -> Moments:
    """`moments` as Moments of width K = sum(widths), the concatenation [h_1, ..., h_m] in chain order."""
    if isinstance(moments, Mapping):
        moments = Moments.from_arrays(moments)
    if not isinstance(moments, Moments):
        raise ChainFitError(f"fit_chain expects Moments or their to_arrays() dict, got {type(moments).__name__}")
    k_total = sum(widths)
    if moments.width != k_total:
        raise ChainFitError(
            f"moments have width {moments.width} but the chain widths {widths} sum to {k_total}: "
            "accumulate moments of the concatenation [h_1, ..., h_m] in chain order"
        )
    return moments


def _check_sample(n: int, widths: tuple[int, ...], min_residues: int | None) -> None:
    """Refuses fewer than min_residues (default K + 1) residues; warns below 10 K."""
    k_total = sum(widths)
    needed = k_total + 1 if min_residues is None else int(min_residues)
    if n < max(needed, 2):
        raise InsufficientDataError(
            f"the fit sample has {n} residues; a chain of widths {widths} (K = {k_total}) needs at least "
            f"{max(needed, 2)} (ideally >= {10 * k_total}): embed more sequences for the fit pass"
        )
    if n < 10 * k_total:
        warnings.warn(
            f"fitting a chain with K = {k_total} from only {n} residues (< 10 K); the fit may be unstable",
            RuntimeWarning,
            stacklevel=3,  # fit_chain's caller
        )


def _fit_step(cov: np.ndarray, transform: np.ndarray, block: slice, i: int, widths: tuple[int, ...], n: int,
              regression: str, noise_variance: float | None, fallback_fraction: float):
    """Step i + 1 of the chain: (predictor, (n_new, n_new) direction, (K, n_new) new columns of the transform,
    StepDiagnostics). cov: (K, K); transform: (K, k_i) the accumulated embedding's loadings on x_c; block: model
    i + 1's columns of x."""
    n_new = widths[i] - widths[i - 1]
    predictor, q_map, info = solve_step(cov, transform, block, n, regression, noise_variance, fallback_fraction)
    direction, kept_eig, all_eig = residual_directions(cov, q_map, n_new)
    residual_var = float(np.clip(all_eig, 0, None).sum())
    if kept_eig[-1] <= RCOND * max(float(all_eig[0]), 1e-300):
        warnings.warn(
            f"step {i + 1}: the residual has fewer than {n_new} non-null directions on the fit data; "
            "the trailing new columns are arbitrary (is the larger model a function of the smaller ones?)",
            RuntimeWarning,
            stacklevel=3,  # fit_chain's caller
        )
    new_cols = q_map @ direction  # (K, n_new): loadings of r_i V_i on x_c
    total_var = float(np.trace(cov[block, block]))
    step = StepDiagnostics(
        step=i + 1,
        input_width=widths[i - 1],
        target_width=widths[i],
        new_directions=n_new,
        components_kept=info["components_kept"],
        noise_variance=info["noise_variance"],
        threshold=info["threshold"],
        residual_r2=1.0 - residual_var / total_var if total_var > 0 else float("nan"),
        residual_variance=residual_var,
        captured_variance=float(np.clip(kept_eig, 0, None).sum() / residual_var) if residual_var > 0 else 0.0,
        leakage=_leakage(cov, transform, new_cols),
    )
    return predictor, direction, new_cols, step


# -- helpers ------------------------------------------------------------------------------------------------------


def _check_widths(widths: tuple[int, ...]) -> None:
    if len(widths) < 2:
        raise ChainFitError(f"a chain needs at least two models, got widths {widths}")
    if any(w < 1 for w in widths):
        raise ChainFitError(f"model widths must be positive, got {widths}")
    for i in range(1, len(widths)):
        if widths[i] <= widths[i - 1]:
            raise ChainFitError(
                f"chain widths must strictly grow (each step adds k_i - k_(i-1) > 0 new directions), got {widths}: "
                f"model {i + 1} ({widths[i]}) is not wider than model {i} ({widths[i - 1]}); order models smallest first"
            )


def _shape(arr: Any) -> Any:
    return getattr(arr, "shape", type(arr).__name__)


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of dtype {obj.dtype}"
    return type(obj).__name__
