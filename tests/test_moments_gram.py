"""The float32 Gram of rdscale.fit.moments (exact sliced products folded into float64) against the float64 path:
same moments (1e-8, scale-free) and same fitted chain (1e-6) on data with nonzero means and column scales spread
over six orders of magnitude; the mode is a switch."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.config import Config, ConfigError
from rdscale.fit.chain import fit_chain
from rdscale.fit.moments import GRAM_BLOCK, Moments, MomentsError

TOL = 1e-6  # the contract: fitted chain outputs (and moments) within 1e-6 of the float64 path
MOMENT_TOL = 1e-8  # what the moments actually keep (measured ~1e-10): the fit may amplify it 100-1000x


def _rows(n: int, width: int, seed: int, offset: float, spread: float) -> np.ndarray:
    """(n, width) float32 correlated rows; column j scaled by 10^(spread * u_j), mean offset x that scale."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** (spread * rng.uniform(-0.5, 0.5, width))  # (width,)
    mix = rng.standard_normal((width, width)) / np.sqrt(width) + np.eye(width)
    z = rng.standard_normal((n, width)) @ mix  # (n, width) correlated, unit-ish scale
    means = offset * rng.standard_normal(width)  # (width,) in units of the column's spread
    return ((z + means) * scales).astype(np.float32)


def _both(x: np.ndarray, cuts: list[int]) -> tuple[Moments, Moments]:
    exact, folded = Moments(x.shape[1], gram="float64"), Moments(x.shape[1], gram="float32")
    bounds = sorted({0, len(x), *[c for c in cuts if 0 < c < len(x)]})
    for start, stop in pairwise(bounds):
        exact.update(torch.from_numpy(x[start:stop]))
        folded.update(torch.from_numpy(x[start:stop]))
    return exact, folded


def _assert_close_moments(exact: Moments, folded: Moments) -> None:
    assert folded.count == exact.count
    c64, c32 = exact.comoment, folded.comoment  # (K, K) float64
    std = np.sqrt(np.diag(c64))  # (K,) sqrt(n) x column standard deviation
    scale = np.outer(std, std)  # every entry relative to sqrt(C_ii C_jj): scale-free, covers tiny columns too
    assert np.all(np.abs(c32 - c64) <= MOMENT_TOL * scale + 1e-300)
    sd = std / np.sqrt(exact.count)
    assert np.all(np.abs(folded.mean - exact.mean) <= 1e-12 * (sd + np.abs(exact.mean)))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=3 * GRAM_BLOCK + 17),
    width=st.integers(min_value=1, max_value=24),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    offset=st.sampled_from([0.0, 1.0, 30.0, 1e3, 1e5]),
    spread=st.floats(min_value=0.0, max_value=6.0),
    cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=4),
)
def test_float32_gram_folded_into_float64_matches_the_float64_path(n, width, seed, offset, spread, cuts):
    exact, folded = _both(_rows(n, width, seed, offset, spread), cuts)
    _assert_close_moments(exact, folded)


def _chain_rows(n: int, widths: tuple[int, ...], seed: int, offset: float, scale: float) -> np.ndarray:
    """Chain-like rows: every model sees more of one latent signal than the previous one, plus noise of distinct
    scales; columns scaled over two orders of magnitude. The fit is ill-conditioned on purpose (correlation
    condition numbers ~1e4-1e5): it turns a 1e-9 relative change of the moments into up to ~1e-7 of the output."""
    rng = np.random.default_rng(seed)
    k, latent = sum(widths), widths[-1]
    mix = np.zeros((latent, k))
    start = 0
    for i, w in enumerate(widths):
        seen = latent * (i + 1) // len(widths)
        mix[:seen, start : start + w] = rng.standard_normal((seen, w)) / np.sqrt(seen)
        start += w
    mix *= np.geomspace(4.0, 0.4, latent)[:, None]
    noise = np.geomspace(0.3, 0.03, k)[rng.permutation(k)]  # (K,)
    z = rng.standard_normal((n, latent)) @ mix + noise * rng.standard_normal((n, k))  # (n, K)
    col_scale = scale * 10.0 ** rng.uniform(-1.0, 1.0, k)  # (K,)
    return ((z + offset * rng.standard_normal(k)) * col_scale).astype(np.float32)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    offset=st.sampled_from([0.0, 5.0, 300.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    regression=st.sampled_from(["pcr", "ols"]),
)
def test_chain_fitted_from_folded_moments_equals_the_float64_fit(seed, offset, scale, regression):
    widths = (6, 10, 14)
    x = _chain_rows(8 * GRAM_BLOCK + 100, widths, seed, offset, scale)
    exact, folded = _both(x, [GRAM_BLOCK + 3, 5 * GRAM_BLOCK])
    _assert_close_moments(exact, folded)
    fit64, fit32 = fit_chain(exact, widths, regression), fit_chain(folded, widths, regression)
    assert [s.components_kept for s in fit32.steps] == [s.components_kept for s in fit64.steps]
    blocks = list(torch.split(torch.from_numpy(x[:500]), list(widths), dim=1))
    rd64 = fit64.apply(blocks, dtype=torch.float64).numpy()  # (500, k_m)
    rd32 = fit32.apply(blocks, dtype=torch.float64).numpy()
    col = np.abs(rd64).max(axis=0)  # (k_m,) relative per output column: columns differ in scale
    assert np.all(np.abs(rd32 - rd64) <= TOL * col)


def test_gram_mode_is_a_switch():
    x = torch.from_numpy(_rows(3 * GRAM_BLOCK + 5, 9, seed=3, offset=50.0, spread=2.0))
    assert Moments(9).gram_mode(x) == "float64"  # auto: float64 on the CPU
    assert Moments(9, gram="float32").gram_mode(x) == "float32"
    assert Moments(9, gram="float64", device="cpu").gram_mode(x) == "float64"
    exact, folded = _both(x.numpy(), [])
    # Both within the tolerance, and the switch really takes the other path (float32 rounding shows).
    _assert_close_moments(exact, folded)
    assert not np.array_equal(exact.comoment, folded.comoment)
    assert folded.merge(Moments(9)).gram == "float32"  # a merged accumulator keeps its mode
    with pytest.raises(MomentsError, match="gram must be one of"):
        Moments(9, gram="tf32")


def test_config_key_fit_gram_is_validated_and_reaches_the_fit_worker():
    assert Config().fit.gram == "auto"
    assert Config.from_dict({}, ["fit.gram=float32"]).fit.gram == "float32"
    with pytest.raises(ConfigError, match="fit.gram must be auto, float64 or float32"):
        Config.from_dict({}, ["fit.gram=half"])


def test_rows_sliced_a_chunk_at_a_time_give_the_same_bits(monkeypatch):
    from rdscale.fit import moments

    x = torch.from_numpy(_rows(5 * GRAM_BLOCK + 77, 6, seed=4, offset=20.0, spread=3.0))
    whole = Moments(6, gram="float32")
    whole.update(x)
    monkeypatch.setattr(moments, "_ROWS_BYTES", 32 * 6 * 2 * GRAM_BLOCK)  # two blocks of rows per chunk
    chunked = Moments(6, gram="float32")
    chunked.update(x)
    # every block sum is an exact integer and so is their float64 total, whatever the grouping
    np.testing.assert_array_equal(chunked.comoment, whole.comoment)


def test_float64_rows_beyond_float32_range_and_near_float64_limits():
    base = _rows(300, 3, seed=1, offset=4.0, spread=1.0).astype(np.float64)
    for factor in (1e60, 1e-60):  # outside float32's range: the slicing works on float64 values, exponents apart
        exact, folded = _both(base * factor, [100])
        _assert_close_moments(exact, folded)
    tiny = torch.from_numpy(base * 1e-290)  # exponents near float64's limit: left to the float64 path, bit for bit
    exact, folded = Moments(3, gram="float64"), Moments(3, gram="float32")
    exact.update(tiny)
    folded.update(tiny)
    np.testing.assert_array_equal(folded.comoment, exact.comoment)
    bad = torch.from_numpy(_rows(10, 3, seed=2, offset=1.0, spread=0.0))
    bad[4, 1] = float("nan")
    with pytest.raises(MomentsError, match="1 of 10 rows"):
        folded.update(bad)
    assert folded.count == 300


def test_half_precision_rows_in_float32_mode():
    x = torch.from_numpy(_rows(700, 8, seed=5, offset=3.0, spread=1.0)).to(torch.bfloat16)
    exact, folded = Moments(8, gram="float64"), Moments(8, gram="float32")
    exact.update(x)
    folded.update(x)
    _assert_close_moments(exact, folded)


def test_the_callers_tf32_setting_is_restored():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: no per-backend fp32_precision")
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        Moments(5, gram="float32").update(torch.from_numpy(_rows(300, 5, seed=8, offset=2.0, spread=1.0)))
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous


def test_no_precision_switch_is_written_while_tf32_is_off():
    """With TF32 off (torch's default) the float32 Gram writes no switch: in some torch releases one write of the
    per-backend fp32_precision makes every later read of the legacy allow_tf32 raise (torch.compile's too). Where
    TF32 is on, the products are IEEE inside and the caller's setting is back after."""
    from rdscale.fit.moments import _ieee_float32_matmul, _tf32_may_be_on

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: no per-backend fp32_precision")
    cuda = torch.device("cuda")  # the switches exist without a GPU; nothing runs on the device here
    previous = matmul.fp32_precision
    try:
        if previous == "none" and torch.get_float32_matmul_precision() == "highest":  # a fresh process
            assert not _tf32_may_be_on()
            with _ieee_float32_matmul(cuda):
                assert matmul.fp32_precision == "none"  # not written
        matmul.fp32_precision = "ieee"
        assert not _tf32_may_be_on()
        with _ieee_float32_matmul(cuda):
            assert matmul.fp32_precision == "ieee"
        matmul.fp32_precision = "tf32"
        assert _tf32_may_be_on()
        with _ieee_float32_matmul(torch.device("cpu")):  # CPU products never use cuBLAS: left alone
            assert matmul.fp32_precision == "tf32"
        with _ieee_float32_matmul(cuda):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float32_gram_on_cuda_within_tolerance_even_with_tf32_allowed():
    from rdscale.fit.moments import _FULL_RATE_FP64

    matmul = torch.backends.cuda.matmul
    attr, tf32 = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, attr)
    setattr(matmul, attr, tf32)  # a process that allows TF32 must not change the moments
    try:
        x = _rows(20 * GRAM_BLOCK + 11, 40, seed=7, offset=100.0, spread=4.0)
        exact, folded = Moments(40, gram="float64"), Moments(40, gram="float32")
        exact.update(torch.from_numpy(x))
        folded.update(torch.from_numpy(x).cuda())
        assert folded.device.type == "cuda"
        _assert_close_moments(exact, folded)
        assert getattr(matmul, attr) == tf32  # restored
    finally:
        setattr(matmul, attr, previous)
    auto = Moments(40, device="cuda")
    slow_fp64 = torch.cuda.get_device_capability() not in _FULL_RATE_FP64
    assert auto.gram_mode() == ("float32" if slow_fp64 else "float64")


def test_fit_worker_accumulates_with_the_configured_gram(tiny_family, tmp_path):
    from rdscale.config import EmbeddingConfig, FitConfig, InputConfig
    from rdscale.io.fasta import plan_shards
    from rdscale.run.stages import FitWorker

    rng = np.random.default_rng(0)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), size=int(rng.integers(30, 90))))}\n"
                             for i in range(40)))
    plan = [(shard, 40) for shard in plan_shards([str(fasta)], 1 << 30)]
    moments = {}
    for gram in ("float64", "float32"):
        cfg = Config(models=[str(p) for p in tiny_family], input=InputConfig(paths=[str(fasta)]),
                     embedding=EmbeddingConfig(device="cpu", toks_per_batch=512), fit=FitConfig(gram=gram)).validate()
        worker = FitWorker(cfg.models, cfg)
        worker.setup()
        assert worker.moments.gram == gram
        worker.run(plan)
        moments[gram] = worker.moments
    assert moments["float32"].count == moments["float64"].count > 1000
    _assert_close_moments(moments["float64"], moments["float32"])
