"""One-pass float64 moments of the concatenated per-residue embeddings (docs/method.md, "Why one pass is enough").

For every residue the chain sees x = [h_1; h_2; ...; h_m] (width K = sum of the model widths). The whole chained
fit is a function of three numbers of the fit sample: the residue count n, the mean of x and its centred co-moment
matrix sum_t (x_t - mean)(x_t - mean)^T. `Moments` accumulates them batch by batch on the device where the
embeddings already are (no per-residue copy to the host), always in float64, and merges partial accumulators with
Chan et al.'s pairwise update, so workers can accumulate disjoint shards and the driver can sum them in any order
or tree shape and get the same statistics to floating-point precision.

Memory is O(K^2) whatever the number of residues: 8 K^2 bytes for the co-moment (1.3 MB for the tiny 32/48/64 test
family, 59 MB for ESM-2 8M..650M with K = 2720, 865 MB for all six ESM-2 sizes with K = 10400).

Reference: T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances" (1979); the multivariate form below is the same update applied to the outer product.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from rdscale.errors import RdscaleError

__all__ = ["Moments", "MomentsError", "merge_all"]

_ARRAY_KEYS = ("count", "mean", "comoment")


class MomentsError(RdscaleError, ValueError):
    """Bad input to a moments accumulator (wrong width, non-finite values, malformed arrays)."""


class Moments:
    """Running count, mean and centred co-moment of rows x: (n, K).

    Attributes (read through the properties, which return host numpy copies):
        count: int                    number of rows seen
        mean: (K,) float64            mean of the rows
        comoment: (K, K) float64      sum over rows of (x - mean)(x - mean)^T

    `device=None` adopts the device of the first batch passed to `update`, so accumulation happens where the
    embeddings were computed. An explicit device moves each batch there (one transfer per batch, not per residue).
    """

    def __init__(self, width: int, device: str | torch.device | None = None):
        if int(width) != width or width < 1:
            raise MomentsError(f"width must be a positive integer, got {width!r}")
        self.width = int(width)
        self._device = None if device is None else torch.device(device)
        self.count = 0
        # Allocated lazily on the first update so that device=None can follow the data.
        self._mean: torch.Tensor | None = None  # (K,) float64
        self._comoment: torch.Tensor | None = None  # (K, K) float64

    # -- accumulation ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add the rows of x: (n, K), any float dtype, any device. Empty batches are ignored."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise MomentsError(f"update expects a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.width:
            raise MomentsError(
                f"update expects rows of width {self.width} (the concatenated chain embeddings), "
                f"got shape {tuple(x.shape)}"
            )
        if not (x.is_floating_point()):
            raise MomentsError(f"update expects a floating-point tensor, got dtype {x.dtype}")
        n_batch = x.shape[0]
        if n_batch == 0:
            return
        if self._device is None:
            self._device = x.device
        # float16/bfloat16/float32 -> float64 is exact; every later operation is float64. Always a copy, so the
        # centring below can work in place without touching the caller's tensor.
        xc = x.to(device=self._device, dtype=torch.float64, copy=True)  # (n, K)
        batch_mean = xc.mean(dim=0)  # (K,)
        # A NaN or inf anywhere in a column makes its mean non-finite, so checking K numbers screens n K of them.
        if not bool(torch.isfinite(batch_mean).all()):
            bad = int((~torch.isfinite(xc)).any(dim=1).sum())
            raise MomentsError(
                f"{bad} of {n_batch} rows contain NaN or infinite values; the embeddings are broken upstream "
                "(check the model dtype: fp16 overflow shows up as inf)"
                if bad
                else f"a batch of {n_batch} rows overflows float64 (column sums are infinite); rescale the input"
            )
        xc -= batch_mean
        self._merge_in(n_batch, batch_mean, _gram(xc))

    def _merge_in(self, n_b: int, mean_b: torch.Tensor, comoment_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of (count, mean, comoment) with another partial (n_b, mean_b, comoment_b)."""
        if n_b == 0:
            return
        if self.count == 0:
            if self._device is None:
                self._device = mean_b.device
            self.count = int(n_b)
            self._mean = mean_b.clone()
            self._comoment = comoment_b.clone()
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean  # (K,)
        # mean and co-moment of the union; the outer-product term is the between-group scatter.
        self._mean = self._mean + delta * (n_b / n)
        self._comoment = self._comoment + comoment_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "Moments") -> "Moments":
        """The accumulator of the union of both samples (a new object; neither input changes).

        Either side may be empty. The result lives on this accumulator's device.
        """
        if not isinstance(other, Moments):
            raise MomentsError(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.width != self.width:
            raise MomentsError(
                f"cannot merge moments of width {self.width} with moments of width {other.width}: "
                "they were accumulated for different chains"
            )
        out = Moments(self.width, device=self._device if self._device is not None else other._device)
        for part in (self, other):
            if part.count:
                out._merge_in(
                    part.count,
                    part._mean.to(out.device),
                    part._comoment.to(out.device),
                )
        return out

    def __add__(self, other: "Moments") -> "Moments":
        return self.merge(other)

    # -- results ----------------------------------------------------------------------------------------------------

    @property
    def mean(self) -> np.ndarray:
        """(K,) float64 mean of the rows (zeros while empty)."""
        if self._mean is None:
            return np.zeros(self.width)
        return self._mean.detach().cpu().numpy().copy()

    @property
    def comoment(self) -> np.ndarray:
        """(K, K) float64 sum of (x - mean)(x - mean)^T (zeros while empty)."""
        if self._comoment is None:
            return np.zeros((self.width, self.width))
        return self._comoment.detach().cpu().numpy().copy()

    def covariance(self) -> np.ndarray:
        """(K, K) float64 population covariance comoment / count, symmetrised (round-off makes it drift)."""
        if self.count < 1:
            raise MomentsError("covariance of an empty accumulator is undefined: no rows were added")
        cov = self.comoment / self.count
        return 0.5 * (cov + cov.T)

    # -- transport ----------------------------------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays {count: () int64, mean: (K,) float64, comoment: (K, K) float64}.

        For sending between Ray workers and for saving (npz / safetensors); `from_arrays` inverts it.
        """
        return {
            "count": np.asarray(self.count, dtype=np.int64),
            "mean": self.mean,
            "comoment": self.comoment,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], device: str | torch.device | None = None) -> "Moments":
        """Rebuild an accumulator from `to_arrays` output (validated: keys, shapes, finiteness, count >= 0)."""
        missing = [key for key in _ARRAY_KEYS if key not in arrays]
        if missing:
            raise MomentsError(f"moments arrays lack {missing}; expected keys {list(_ARRAY_KEYS)}")
        count_arr = np.asarray(arrays["count"])
        if count_arr.size != 1 or not np.issubdtype(count_arr.dtype, np.integer):
            raise MomentsError(f"moments 'count' must be one integer, got {count_arr!r}")
        count = int(count_arr.reshape(()))
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        comoment = np.asarray(arrays["comoment"], dtype=np.float64)
        if mean.ndim != 1:
            raise MomentsError(f"moments 'mean' must be 1-D, got shape {mean.shape}")
        width = mean.shape[0]
        if comoment.shape != (width, width):
            raise MomentsError(
                f"moments 'comoment' must be ({width}, {width}) to match 'mean', got {comoment.shape}"
            )
        if count < 0:
            raise MomentsError(f"moments 'count' must be >= 0, got {count}")
        if not (np.isfinite(mean).all() and np.isfinite(comoment).all()):
            raise MomentsError("moments arrays contain NaN or infinite values")
        out = cls(width, device=device)
        if count:
            dev = out.device
            out._merge_in(count, torch.from_numpy(mean.copy()).to(dev), torch.from_numpy(comoment.copy()).to(dev))
        return out

    def __repr__(self) -> str:
        return f"Moments(width={self.width}, count={self.count}, device={str(self.device)!r})"


def _gram(xc: torch.Tensor) -> torch.Tensor:
    """xc: (n, K) float64 -> xc' xc: (K, K) float64, the batch's centred co-moment.

    On CPU this goes through numpy (zero-copy): torch's CPU wheels use MKL, whose float64 GEMM ran about 2x slower
    than numpy's OpenBLAS on the AMD EPYC CI machine (bench/bench_fit.py); numpy also recognises x.T @ x and
    uses the symmetric rank-k update (half the flops). On GPU torch's cuBLAS path is the fast one.
    """
    if xc.device.type == "cpu":
        xc_np = xc.numpy()
        return torch.from_numpy(xc_np.T @ xc_np)
    return xc.T @ xc


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge many partial accumulators as a balanced pairwise tree (Chan et al.'s recommended order)."""
    level = list(parts)
    if not level:
        raise MomentsError("merge_all needs at least one accumulator")
    while len(level) > 1:
        level = [
            level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
        ]
    return level[0]
