"""One-pass float64 moments of the concatenated per-residue embeddings (docs/method.md, "Why one pass is enough").

For every residue the chain sees x = [h_1; h_2; ...; h_m] (width K = sum of the model widths). The whole chained
fit is a function of three numbers of the fit sample: the residue count n, the mean of x and its centred co-moment
matrix sum_t (x_t - mean)(x_t - mean)^T. `Moments` accumulates them batch by batch on the device where the
embeddings already are (no per-residue copy to the host), always in float64, and merges partial accumulators with
Chan et al.'s pairwise update, so workers can accumulate disjoint shards and the driver can sum them in any order
or tree shape and get the same statistics to floating-point precision.

The batch's Gram (the O(n K^2) part, as costly per residue as a large model's layer) runs in one of two modes
(`gram=`, config key fit.gram). "float64": one float64 GEMM of the centred batch. "float32": the centred batch is
cut into four 8-bit integer slices per value and multiplied in float32 over blocks of 256 rows, where every
product and partial sum is an integer below 2^24 and so exact; the block sums are folded into float64. What
differs from the float64 path is only the slicing's remainder (below 2^-32 of a column's largest value, random),
whose share of the co-moment falls as 1/sqrt(n): about 1e-10 of sqrt(C_ii C_jj) at fit-sample sizes, so the fitted
chain matches the float64 fit to 1e-6 even where the fit amplifies the moments' error a thousandfold
(tests/test_moments_gram.py). It costs seven float32 GEMMs, so it pays where float64 runs at 1/32..1/64 of the
float32 rate (consumer and workstation GPUs): "auto" (the default) picks it there and float64 on the CPU and on
data-centre GPUs with full-rate float64 (P100, V100, A100, H100/H200, B200). Mean, co-moment and merges are float64
in both modes.

Memory is O(K^2) whatever the number of residues: 8 K^2 bytes for the co-moment (1.3 MB for the tiny 32/48/64 test
family, 59 MB for ESM-2 8M..650M with K = 2720, 865 MB for all six ESM-2 sizes with K = 10400).

Reference: T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances" (1979); the multivariate form below is the same update applied to the outer product.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from rdscale.config import GRAM_MODES
from rdscale.errors import RdscaleError

__all__ = ["GRAM_MODES", "Moments", "MomentsError", "merge_all"]

_ARRAY_KEYS = ("count", "mean", "comoment")
# The float32 Gram cuts values into 8-bit integer slices; products of two are below 2^16, so blocks of 2^8 rows
# sum to integers below 2^24, which float32 holds exactly (see _gram_sliced).
_SLICE_BITS = 8
_SLICES = 4
# Slice pairs (a, c), a <= c, multiplied: a + c <= S - 1, and a = c up to a = S / 2. A left-out square (q_a' q_a)
# would bias the diagonal (its terms are all positive), a left-out cross term only adds noise that averages out;
# pairs left out weigh 2^-32 (cross) or 2^-48 (squares) of q_0' q_0. As (a, stop): slice a against a .. stop - 1.
_SPANS = [(a, max(_SLICES - a, a + 1)) for a in range(_SLICES) if 2 * a <= _SLICES]
GRAM_BLOCK = 1 << (24 - 2 * _SLICE_BITS)
# Elements of the (g, K, S K) float32 stack of block products made at once: 64 MiB.
_STACK_ELEMENTS = 1 << 24
# Bytes of float64 and slice temporaries per chunk of rows (32 bytes per value).
_ROWS_BYTES = 1 << 28
# CUDA compute capabilities with full-rate float64 GEMM (P100, V100, A100, H100/H200, B200): "auto" keeps the
# float64 Gram there (one float64 GEMM beats seven float32 ones); every other GPU runs float64 at 1/32..1/64 rate.
_FULL_RATE_FP64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


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

    def __init__(self, width: int, device: str | torch.device | None = None, gram: str = "auto"):
        if int(width) != width or width < 1:
            raise MomentsError(f"width must be a positive integer, got {width!r}")
        if gram not in GRAM_MODES:
            raise MomentsError(f"gram must be one of {', '.join(GRAM_MODES)}, got {gram!r}")
        self.width = int(width)
        self.gram = gram
        self._device = None if device is None else torch.device(device)
        self.count = 0
        # Allocated lazily on the first update so that device=None can follow the data.
        self._mean: torch.Tensor | None = None  # (K,) float64
        self._comoment: torch.Tensor | None = None  # (K, K) float64

    # -- accumulation ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def gram_mode(self, x: torch.Tensor | None = None) -> str:
        """The Gram mode a batch x gets: `gram` unless "auto", which is float32 on a CUDA device whose float64
        GEMM runs at a fraction of its float32 rate (consumer and workstation GPUs) and float64 elsewhere (CPU,
        and the data-centre GPUs with full-rate float64)."""
        if self.gram != "auto":
            return self.gram
        device = self._device if self._device is not None else (x.device if x is not None else self.device)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) not in _FULL_RATE_FP64:
            return "float32"
        return "float64"

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
        if self.gram_mode(x) == "float32" and self._update_float32(x):
            return
        # float16/bfloat16/float32 -> float64 is exact; every later operation is float64. Always a copy, so the
        # centring below can work in place without touching the caller's tensor.
        xc = x.to(device=self._device, dtype=torch.float64, copy=True)  # (n, K)
        batch_mean = xc.mean(dim=0)  # (K,)
        _check_finite(batch_mean, xc, n_batch)
        xc -= batch_mean
        self._merge_in(n_batch, batch_mean, _gram(xc))

    def _update_float32(self, x: torch.Tensor) -> bool:
        """The batch's Gram from float32 products that are all exact (see `_gram_sliced`). False, with nothing
        added, for a batch it cannot take (non-finite values, exponents near float64's limits): the float64 path
        then takes it and says what is wrong, if anything."""
        n_batch = x.shape[0]
        x = x.to(device=self._device)  # (n, K) as given: float64 copies are made a bounded number of rows at a time
        batch_mean = x.sum(dim=0, dtype=torch.float64) / n_batch  # (K,)
        if not bool(torch.isfinite(batch_mean).all()):
            return False
        gram = _gram_sliced(x, batch_mean)  # (K, K) float64 or None
        if gram is None:
            return False
        self._merge_in(n_batch, batch_mean, gram)
        return True

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
        out = Moments(self.width, device=self._device if self._device is not None else other._device, gram=self.gram)
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


def _check_finite(mean: torch.Tensor, x: torch.Tensor, n_batch: int) -> None:
    # A NaN or inf anywhere in a column makes its mean non-finite, so checking K numbers screens n K of them.
    if bool(torch.isfinite(mean).all()):
        return
    bad = int((~torch.isfinite(x)).any(dim=1).sum())
    raise MomentsError(
        f"{bad} of {n_batch} rows contain NaN or infinite values; the embeddings are broken upstream "
        "(check the model dtype: fp16 overflow shows up as inf)"
        if bad
        else f"a batch of {n_batch} rows overflows float64 (column sums are infinite); rescale the input"
    )


def _gram_sliced(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
    """x: (n, K), mean: (K,) float64 -> y' y for y = x - mean (in float64): (K, K) float64, from float32 matrix products
    without rounding.

    Each column is scaled by a power of two so that |y| < 2^8 and cut into S = 4 slices of integers,
    y 2^(8 - e_j) = q1 + 2^-8 q2 + 2^-16 q3 + 2^-24 q4 + r with |q1| <= 2^8, |q2..q4| <= 2^7 and |r| <= 2^-25 (every
    step exact in float64). A product of two slices is an integer of at most 2^16, so a sum of GRAM_BLOCK = 2^8 of
    them is an integer of at most 2^24: float32 holds every partial sum exactly, whatever order the GEMM adds in
    (TF32 or bf16 inputs would too: a slice has at most 8 significant bits). Block sums are folded into float64
    (exact), then y' y = 2^(e_i + e_j - 16) sum over the pairs of _SPANS of 2^(-8 (a + c)) (q_a' q_c (+ its
    transpose for a < c)), 0-based slices. What is left out (r, below 2^-32 of the column's largest |y| per
    element, and the small pairs of _SPANS' comment) is noise whose share of the co-moment falls as 1 / sqrt(n).
    Seven float32 GEMMs of the batch against one float64 GEMM.
    Rows are centred and sliced `_ROWS_BYTES` / (32 K) at a time (a multiple of GRAM_BLOCK), so the float64 and
    slice temporaries stay near 256 MiB whatever the batch. None when a column's exponent is near float64's limits
    (left to the float64 path).
    """
    n, k = x.shape
    step = max(GRAM_BLOCK, _ROWS_BYTES // (32 * k) // GRAM_BLOCK * GRAM_BLOCK)  # rows per chunk: 32 bytes per value
    top = torch.zeros(k, dtype=torch.float64, device=x.device)  # (K,) largest |y| per column
    for r in range(0, n, step):
        top = torch.maximum(top, (x[r : r + step].to(torch.float64) - mean).abs().amax(dim=0))
    if not bool(torch.isfinite(top).all()):
        return None
    _, exponent = torch.frexp(top)  # (K,) int: |y_j| <= top_j < 2^e_j (e_j = 0 for an all-zero column)
    if int(exponent.abs().max()) > 900:
        return None
    shift = (_SLICE_BITS - exponent).to(torch.float64)  # (K,)
    sums = None  # per (a, stop) of _SPANS: q_a' [q_a .. q_(stop-1)], (K, (stop - a) K) float64
    for r in range(0, n, step):
        u = torch.ldexp(x[r : r + step].to(torch.float64) - mean, shift)  # (R, K) |u| < 2^8; 2^shift is exact
        slices = torch.empty(u.shape[0], _SLICES * k, dtype=torch.float32, device=x.device)  # [q1 | ... | qS]
        for i in range(_SLICES):
            q = torch.round(u)  # (R, K) integers
            slices[:, i * k : (i + 1) * k] = q  # exact: |q| <= 2^8
            u -= q  # exact, |u| <= 1/2
            u *= float(1 << _SLICE_BITS)  # exact
        del u, q
        part = _block_grams(slices, k)
        sums = part if sums is None else [acc + p for acc, p in zip(sums, part)]
    gram = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    for (a, _), products in zip(_SPANS, sums):  # q_a' [q_a .. q_(stop-1)]: (K, (stop-a) K)
        for j in range(products.shape[1] // k):
            c = a + j
            g = products[:, j * k : (j + 1) * k]  # (K, K) q_a' q_c
            gram += (g if c == a else g + g.T) * 2.0 ** (-_SLICE_BITS * (a + c))
    scale = torch.ldexp(torch.ones(k, dtype=torch.float64, device=x.device),
                        (exponent - _SLICE_BITS).to(torch.float64))  # (K,) 2^(e_j - 8)
    return gram * scale[:, None] * scale[None, :]


def _block_grams(slices: torch.Tensor, k: int) -> list[torch.Tensor]:
    """slices: (n, S K) float32 [q_0 | ... | q_(S-1)] -> for each (a, stop) of _SPANS: q_a' [q_a .. q_(stop-1)]
    as (K, (stop - a) K) float64, the sums of float32 products over blocks of GRAM_BLOCK rows (each exact, see
    `_gram_sliced`), g blocks per batched GEMM (g bounded so the stacks stay near 64 MiB); the last, shorter
    block on its own."""
    n = slices.shape[0]
    spans = _SPANS
    out = [torch.zeros(k, (stop - a) * k, dtype=torch.float64, device=slices.device) for a, stop in spans]
    full = n // GRAM_BLOCK
    g = max(1, _STACK_ELEMENTS // (_SLICES * k * k))  # the widest product is (g, K, S K)
    with _ieee_float32_matmul(slices.device):
        if full:
            stacked = slices[: full * GRAM_BLOCK].view(full, GRAM_BLOCK, _SLICES * k)  # (full, b, S K), a view
            for i in range(0, full, g):
                part = stacked[i : i + g]  # (g, b, S K)
                for acc, (a, stop) in zip(out, spans):
                    left = part[:, :, a * k : (a + 1) * k].transpose(1, 2)  # (g, K, b)
                    acc += torch.bmm(left, part[:, :, a * k : stop * k]).sum(dim=0, dtype=torch.float64)
        if full * GRAM_BLOCK < n:
            tail = slices[full * GRAM_BLOCK :]  # (< b, S K)
            for acc, (a, stop) in zip(out, spans):
                acc += (tail[:, a * k : (a + 1) * k].T @ tail[:, a * k : stop * k]).to(torch.float64)
    return out


def _tf32_may_be_on() -> bool:
    """Whether cuBLAS may run float32 products in TF32 in this process, read without touching any switch (torch's
    default is off). Reads the new per-backend switch first: where it was written, reading the legacy one raises
    in some torch releases."""
    matmul = torch.backends.cuda.matmul
    for switch in (matmul, torch.backends):
        precision = getattr(switch, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # a mix of the legacy and new switches: assume the worst
        return True


@contextmanager
def _ieee_float32_matmul(device: torch.device | None = None):
    """Full float32 products for the Gram even where the process allows TF32 (10-bit mantissas would break the
    1e-6 guarantee). Writes no switch where none is needed (CPU tensors, or TF32 off, torch's default): in some
    torch releases one write of the new per-backend switch makes every later read of the legacy one raise,
    torch.compile's included. Otherwise uses the new switch where torch has it, the legacy allow_tf32 before
    it; restores the caller's setting."""
    if (device is not None and device.type != "cuda") or not _tf32_may_be_on():
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        if previous == "ieee":
            yield
            return
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # torch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


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
