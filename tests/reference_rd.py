"""In-memory reference of chained reverse distillation, for tests and benchmarks only.

It does what the authors' code does in spirit: stack every residue (L x k matrices), regress with lstsq (OLS) or a
full SVD of the stacked input (PCR), and take the residual directions from a full SVD of the stacked residuals.
It shares no code with rdscale.chain (the noise-edge rule is re-implemented here from the singular values), so
agreement between the two is evidence that the moment algebra is right.

Also: a generator of synthetic correlated chain embeddings that can be produced chunk by chunk (the same rows
whatever the chunking), so a one-pass benchmark never has to hold all residues.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def _kept_components(sing: np.ndarray, n: int, regression: str, noise_variance, fallback_fraction) -> np.ndarray:
    """Mask over the singular values of the centred stacked input (descending) that the regression keeps."""
    lam = sing**2 / n  # eigenvalues of the population covariance, descending
    floor = 1e-12 * lam[0] if lam.size else 0.0
    if regression == "ols":
        return lam > floor
    p = lam.size
    edge = (1 + np.sqrt(p / n)) ** 2
    if noise_variance is None:
        scaled = lam / lam.mean()
        noise = lam[scaled < edge]
        if noise.size == 0:
            noise = np.sort(lam)[: max(1, p // 4)]
        s2 = np.median(noise)
    else:
        s2 = noise_variance
    keep = lam > max(s2 * edge, floor)
    if not keep.any():
        share = np.cumsum(lam) / lam.sum()
        keep[: int(np.searchsorted(share, fallback_fraction - 1e-12)) + 1] = True
    return keep


def reference_fit(
    blocks: Sequence[np.ndarray],
    regression: str = "pcr",
    noise_variance: float | None = None,
    fallback_fraction: float = 0.95,
    fix_signs: bool = True,
) -> dict:
    """Chained fit on stacked residues.

    blocks: [h_1: (L, k_1), ..., h_m: (L, k_m)].
    Returns {"rd": (L, k_m) rd embedding, "predictions": [acc_{i-1} W_i: (L, k_i) centred],
    "residuals": [r_i: (L, k_i)], "directions": [V_i: (k_i, d_i)], "kept": [components kept]}.
    With fix_signs, each V_i column gets the sign convention of rdscale.chain: its largest-magnitude entry (in h_i
    coordinates) positive, entries within 1e-9 relative of the largest tied, lowest index first.
    """
    hs = [np.asarray(b, dtype=np.float64) for b in blocks]
    n = hs[0].shape[0]
    centred = [h - h.mean(axis=0) for h in hs]
    acc = centred[0]  # (L, k_1) centred acc_1
    out = {"predictions": [], "residuals": [], "directions": [], "kept": []}
    for i in range(1, len(hs)):
        target = centred[i]  # (L, k_i)
        u, sing, vt = np.linalg.svd(acc, full_matrices=False)
        keep = _kept_components(sing, n, regression, noise_variance, fallback_fraction)
        if regression == "ols":
            predictor = np.linalg.lstsq(acc, target, rcond=None)[0]
        else:
            predictor = vt[keep].T @ ((u[:, keep].T @ target) / sing[keep][:, None])
        prediction = acc @ predictor
        residual = target - prediction
        _, _, rvt = np.linalg.svd(residual, full_matrices=False)
        n_new = hs[i].shape[1] - hs[i - 1].shape[1]
        direction = rvt[:n_new].T  # (k_i, d_i)
        if fix_signs:
            direction = _positive_pivot(direction)
        out["predictions"].append(prediction)
        out["residuals"].append(residual)
        out["directions"].append(direction)
        out["kept"].append(int(keep.sum()))
        acc = np.concatenate([acc, residual @ direction], axis=1)
    out["rd"] = np.concatenate([hs[0], acc[:, hs[0].shape[1] :]], axis=1)
    return out


def _positive_pivot(direction: np.ndarray) -> np.ndarray:
    """Flip columns of direction: (k, d) so each one's first entry of (near-)largest magnitude is positive."""
    out = direction.copy()
    for j in range(out.shape[1]):
        column = out[:, j]
        top = np.abs(column).max()
        pivot = next(t for t in range(len(column)) if abs(column[t]) >= top * (1 - 1e-9))
        if column[pivot] < 0:
            out[:, j] = -column
    return out


def correlated_blocks(
    rng: np.random.Generator,
    n: int,
    widths: Sequence[int],
    latent: int | None = None,
    noise: float = 0.3,
    dtype=np.float64,
) -> list[np.ndarray]:
    """Per-model embeddings that share a latent signal, like a model family: h_i = z A_i + noise + offset.

    Each model sees a growing share of the latent factors (larger models know more), so later blocks are partly,
    not fully, predictable from earlier ones. Returns [(n, k_i)] arrays.
    """
    widths = list(widths)
    latent = latent or widths[-1]
    z = rng.standard_normal((n, latent)) * np.linspace(2.0, 0.3, latent)  # decaying factor scales
    out = []
    for i, k in enumerate(widths):
        seen = max(1, int(latent * (i + 1) / len(widths)))
        mix = rng.standard_normal((seen, k)) / np.sqrt(seen)
        block = z[:, :seen] @ mix + noise * rng.standard_normal((n, k)) + rng.standard_normal(k)
        out.append(block.astype(dtype))
    return out


class SyntheticChain:
    """Deterministic synthetic chain embeddings generated in chunks of `chunk` rows (for the benchmark).

    Row t's values depend only on (seed, t // chunk), so the stacked and the chunked views agree exactly.
    """

    def __init__(self, widths: Sequence[int], seed: int = 0, latent: int | None = None, noise: float = 0.3,
                 chunk: int = 8192):
        self.widths = list(widths)
        self.latent = latent or self.widths[-1]
        self.noise = noise
        self.chunk = chunk
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        self.scales = np.linspace(2.0, 0.3, self.latent)
        self.mixes = []
        for i, k in enumerate(self.widths):
            seen = max(1, int(self.latent * (i + 1) / len(self.widths)))
            mix = np.zeros((self.latent, k))
            mix[:seen] = rng.standard_normal((seen, k)) / np.sqrt(seen)
            self.mixes.append(mix)
        self.mix = np.concatenate(self.mixes, axis=1) * self.scales[:, None]  # (latent, K)
        self.offset = rng.standard_normal(sum(self.widths))

    def chunks(self, n: int, dtype=np.float32) -> Iterator[np.ndarray]:
        """Yield x chunks (rows, K) covering n rows in order."""
        for index, start in enumerate(range(0, n, self.chunk)):
            rows = min(self.chunk, n - start)
            rng = np.random.default_rng([self.seed, 1, index])
            z = rng.standard_normal((rows, self.latent), dtype=np.float32)
            x = z @ self.mix.astype(np.float32)
            x += self.noise * rng.standard_normal(x.shape, dtype=np.float32)
            x += self.offset.astype(np.float32)
            yield x.astype(dtype, copy=False)

    def stacked(self, n: int, dtype=np.float64) -> np.ndarray:
        """All n rows at once, (n, K) — what the in-memory reference needs."""
        out = np.empty((n, sum(self.widths)), dtype=dtype)
        for start, x in zip(range(0, n, self.chunk), self.chunks(n)):
            out[start : start + x.shape[0]] = x
        return out

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """(n, K) -> per-model blocks (views)."""
        bounds = np.cumsum([0] + self.widths)
        return [x[:, bounds[i] : bounds[i + 1]] for i in range(len(self.widths))]
