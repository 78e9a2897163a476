"""Properties of the closed-form chained fit (rdscale.chain) against the stacked in-memory reference."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_rd import correlated_blocks, reference_fit

from rdscale.fit.chain import ChainFitError, InsufficientDataError, fit_chain
from rdscale.fit.moments import Moments

WIDTH_SETS = [(3, 5, 8), (4, 6, 9)]


@functools.lru_cache(maxsize=None)
def _blocks(widths: tuple[int, ...], n: int = 3000, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(correlated_blocks(rng, n, widths, latent=widths[-1] - 1))


def _moments(blocks) -> Moments:
    m = Moments(sum(b.shape[1] for b in blocks))
    m.update(torch.from_numpy(np.concatenate(blocks, axis=1)))
    return m


def _apply(fit, blocks, dtype=torch.float64) -> np.ndarray:
    return fit.apply([torch.from_numpy(b) for b in blocks], dtype=dtype).numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|corr| between every column of a and every column of b: (a_cols, b_cols)."""
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    return np.abs(a.T @ b) / len(a)


def _cosines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of u and v (orthonormal columns)."""
    return np.linalg.svd(u.T @ v, compute_uv=False)


# -- equality with the stacked reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("widths", WIDTH_SETS)
@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_matches_in_memory_reference(widths, regression):
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, regression)
    ref = reference_fit(blocks, regression)
    z = _apply(fit, blocks)
    assert [s.components_kept for s in fit.steps] == ref["kept"]
    for i in range(1, len(widths)):
        acc = z[:, : widths[i - 1]]
        prediction = (acc - acc.mean(0)) @ fit.predictors[i - 1]
        scale = np.abs(ref["predictions"][i - 1]).max()
        np.testing.assert_allclose(prediction, ref["predictions"][i - 1], rtol=0, atol=1e-9 * scale)
        cosines = _cosines(fit.directions[i - 1], ref["directions"][i - 1])
        assert cosines.min() > 1 - 1e-8
    # Same sign convention on both sides, so the whole embedding agrees, not just its subspaces.
    np.testing.assert_allclose(z, ref["rd"], rtol=0, atol=1e-8 * np.abs(ref["rd"]).max())


@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_diagnostics_match_the_stacked_residuals(regression):
    widths = (4, 6, 9)
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, regression)
    ref = reference_fit(blocks, regression)
    for i, step in enumerate(fit.steps, start=1):
        residual = ref["residuals"][i - 1]
        target = blocks[i] - blocks[i].mean(0)
        assert step.residual_r2 == pytest.approx(1 - (residual**2).sum() / (target**2).sum(), abs=1e-10)
        sing = np.linalg.svd(residual, compute_uv=False)
        captured = (sing[: step.new_directions] ** 2).sum() / (sing**2).sum()
        assert step.captured_variance == pytest.approx(captured, abs=1e-10)
        assert 0 < step.residual_r2 < 1 and 0 < step.captured_variance <= 1


# -- Matryoshka ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefix_is_exactly_the_smallest_model(in_dtype):
    widths = (3, 5, 8)
    blocks = [torch.from_numpy(b).to(in_dtype) for b in _blocks(widths)]
    fit = fit_chain(_moments([b.double().numpy() for b in blocks]), widths, "pcr")
    z = fit.apply(blocks)
    assert z.dtype == torch.float32 and z.shape == (len(blocks[0]), widths[-1])
    assert torch.equal(z[:, : widths[0]], blocks[0].float())


@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_level_outputs_are_prefixes_of_the_full_output(regression):
    widths = (3, 5, 8)
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, regression)
    assert fit.levels == widths
    full = _apply(fit, blocks)
    for j in range(1, len(widths) + 1):
        level = _apply(fit, blocks[:j])  # needs only the first j models
        assert level.shape[1] == widths[j - 1]
        np.testing.assert_allclose(level, full[:, : widths[j - 1]], rtol=0, atol=1e-12)
    full32 = _apply(fit, blocks, dtype=torch.float32)
    np.testing.assert_allclose(full32, full, rtol=0, atol=1e-4 * np.abs(full).max())


# -- orthogonality, leakage, optimality ------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", WIDTH_SETS)
def test_ols_residual_blocks_are_uncorrelated_with_everything_before(widths):
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, "ols")
    z = _apply(fit, blocks)
    for i in range(1, len(widths)):
        new = z[:, widths[i - 1] : widths[i]]
        assert _corr(new, z[:, : widths[i - 1]]).max() < 1e-8
        assert fit.steps[i - 1].leakage < 1e-8


def test_pcr_residual_is_orthogonal_to_kept_components_and_leakage_is_reported():
    widths = (4, 6, 9)
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, "pcr")
    z = _apply(fit, blocks)
    saw_leak = False
    for i, step in enumerate(fit.steps, start=1):
        acc = z[:, : widths[i - 1]]
        new = z[:, widths[i - 1] : widths[i]]
        assert step.components_kept < step.input_width  # the default edge does drop components here
        eigvals, eigvecs = np.linalg.eigh(np.cov(acc.T, bias=True))
        kept = (acc - acc.mean(0)) @ eigvecs[:, ::-1][:, : step.components_kept]
        assert _corr(new, kept).max() < 1e-8
        measured = _corr(new, acc).max()
        assert step.leakage == pytest.approx(measured, abs=1e-9)
        saw_leak |= measured > 1e-6
    assert saw_leak  # dropped components did carry some of h_i, and the diagnostic shows it


def test_pcr_equals_ols_when_every_component_is_kept():
    widths = (4, 6, 9)
    blocks = _blocks(widths)
    moments = _moments(blocks)
    ols = fit_chain(moments, widths, "ols")
    pcr_all = fit_chain(moments, widths, "pcr", noise_variance=0.0)
    assert [s.components_kept for s in pcr_all.steps] == list(widths[:-1])
    np.testing.assert_allclose(pcr_all.projection, ols.projection, rtol=0, atol=1e-12)
    default = fit_chain(moments, widths, "pcr")
    assert not np.allclose(default.projection, ols.projection, atol=1e-6)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.0, 2.0), dependent=st.booleans())
def test_ols_step_is_optimal_among_prefix_preserving_representations(seed, noise, dependent):
    """Theorem 1: no [h_r, X] with X as wide as the new block reconstructs h_p with lower squared error."""
    widths = (4, 9)
    h_r, h_p = _blocks(widths, n=1500)
    fit = fit_chain(_moments([h_r, h_p]), widths, "ols")
    z = _apply(fit, [h_r, h_p])
    rng = np.random.default_rng(seed)
    d = widths[1] - widths[0]
    source = np.concatenate([h_r, h_p], axis=1)
    other = source @ rng.standard_normal((source.shape[1], d)) + noise * rng.standard_normal((len(h_r), d))
    if dependent:  # a competitor that partly repeats h_r wastes width; it must not win either
        other[:, 0] = h_r[:, 0]

    def error(rep):
        design = np.concatenate([rep, np.ones((len(rep), 1))], axis=1)
        coef = np.linalg.lstsq(design, h_p, rcond=None)[0]
        return ((h_p - design @ coef) ** 2).sum()

    best = error(z)
    assert best <= error(np.concatenate([h_r, other], axis=1)) * (1 + 1e-9)


# -- split invariance ------------------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(
    cuts=st.lists(st.integers(0, 2000), min_size=1, max_size=6),
    order_seed=st.integers(0, 2**32 - 1),
    regression=st.sampled_from(["ols", "pcr"]),
)
def test_fit_is_independent_of_how_residues_were_split(cuts, order_seed, regression):
    widths = (3, 5, 8)
    x = np.concatenate(_blocks(widths, n=2000), axis=1)
    reference = fit_chain(_moments([x]), widths, regression)
    rng = np.random.default_rng(order_seed)
    rows = rng.permutation(len(x))  # partitions need not be contiguous
    parts = []
    for start, stop in zip([0, *sorted(cuts)], [*sorted(cuts), len(x)]):
        part = Moments(x.shape[1])
        part.update(torch.from_numpy(x[rows[start:stop]]))
        parts.append(part)
    while len(parts) > 1:
        i, j = rng.choice(len(parts), size=2, replace=False)
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [parts[i].merge(parts[j])]
    fit = fit_chain(parts[0], widths, regression)
    assert [s.components_kept for s in fit.steps] == [s.components_kept for s in reference.steps]
    np.testing.assert_allclose(fit.projection, reference.projection, rtol=0, atol=1e-9)
    for a, b in zip(fit.directions + fit.predictors, reference.directions + reference.predictors):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)  # signs included


# -- PCR noise edge --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, rank", [(12, 5), (24, 10), (16, 3)])
def test_pcr_keeps_the_planted_rank(p, rank):
    """Planted rank-`rank` signal + isotropic unit noise in h_1: PCR keeps exactly the signal components.

    The edge sits where the largest noise eigenvalue is expected, so a noise component crosses it now and then
    (about 1% of draws at these sizes): over 20 draws all must keep at least the rank, and 18 exactly the rank.
    """
    n, kept, noise = 4000, [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        signal = (rng.standard_normal((n, rank)) * 3) @ rng.standard_normal((rank, p))
        h_1 = signal + rng.standard_normal((n, p)) + 5.0
        h_2 = np.concatenate([h_1, rng.standard_normal((n, 6))], axis=1) @ rng.standard_normal((p + 6, p + 6))
        step = fit_chain(_moments([h_1, h_2]), (p, p + 6), "pcr").steps[0]
        kept.append(step.components_kept)
        noise.append(step.noise_variance)
    assert min(kept) >= rank
    assert sum(k == rank for k in kept) >= 18, kept
    assert np.median(noise) == pytest.approx(1.0, rel=0.1)  # s^2 estimates the planted noise variance


def test_pcr_falls_back_to_variance_share_when_nothing_clears_the_edge():
    from rdscale.fit.chain import pcr_components

    eigvals = np.array([1.0, 1.0, 1.0, 1.0])  # flat spectrum: the noise median equals every eigenvalue
    keep, s2, cut = pcr_components(eigvals, n=1000, noise_variance=None, fallback_fraction=0.7)
    assert cut > 1.0 and keep.sum() == 3  # 3 of 4 equal components reach 70% of the variance


# -- the affine map and extension ------------------------------------------------------------------------------------


def test_affine_map_reproduces_apply():
    widths = (3, 5, 8)
    blocks = _blocks(widths)
    fit = fit_chain(_moments(blocks), widths, "pcr")
    mean, transform, offset = fit.affine()
    x = np.concatenate(blocks, axis=1)
    np.testing.assert_allclose((x - mean) @ transform + offset, _apply(fit, blocks), rtol=0, atol=1e-10)
    assert np.all(transform[widths[0] + widths[1] :, : widths[1]] == 0)  # level 2 ignores model 3


def _extension_versus_long_chain(blocks, widths, regression):
    """(long chain fit, 2-block extension fit on [z; h_3], z) for 3-block data, z = level-2 rd embedding stored."""
    long = fit_chain(_moments(blocks), widths, regression)
    short = fit_chain(_moments(blocks[:2]), widths[:2], regression)
    stored = _apply(short, blocks[:2])  # (n, k_2): what a run at level 2 stored, full width
    ext = fit_chain(_moments([stored, blocks[2]]), widths[1:], regression)
    return long, ext, stored


def _assert_extension_matches(long, ext, stored, blocks, widths):
    k_2 = widths[1]
    z = _apply(long, blocks)
    np.testing.assert_allclose(z[:, :k_2], stored, rtol=0, atol=1e-10 * np.abs(stored).max())  # acc_2 == z
    assert ext.steps[0].components_kept == long.steps[1].components_kept
    centred = stored - stored.mean(0)
    expected_prediction = centred @ long.predictors[1]  # (n, k_3): step 3 of the long chain
    prediction = centred @ ext.predictors[0]
    scale = np.abs(expected_prediction).max()
    np.testing.assert_allclose(prediction, expected_prediction, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(ext.directions[0], long.directions[1], rtol=0, atol=1e-8)  # V_3, signs included
    new = _apply(ext, [stored, blocks[2]])[:, k_2:]
    expected = z[:, k_2:]
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-8 * np.abs(expected).max())  # no sign fix-up


@pytest.mark.parametrize("regression", ["ols", "pcr"])
def test_extending_from_a_stored_prefix_equals_the_longer_chain(regression):
    widths = (3, 5, 8)
    blocks = _blocks(widths)
    long, ext, stored = _extension_versus_long_chain(blocks, widths, regression)
    _assert_extension_matches(long, ext, stored, blocks, widths)


@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**32 - 1),
    latent=st.integers(3, 12),
    noise=st.floats(0.1, 1.5),
    regression=st.sampled_from(["ols", "pcr"]),
)
def test_extension_fit_on_stored_embeddings_has_the_long_chains_signs(seed, latent, noise, regression):
    """The sign convention lives in h_i coordinates, so a 2-block fit on [z; h_3] and the long chain agree exactly."""
    widths = (4, 6, 9)
    blocks = correlated_blocks(np.random.default_rng(seed), 1500, widths, latent=latent, noise=noise)
    long, ext, stored = _extension_versus_long_chain(blocks, widths, regression)
    _assert_extension_matches(long, ext, stored, blocks, widths)


def test_sign_convention_makes_the_largest_entry_positive_and_breaks_ties_by_index():
    from rdscale.fit.chain import fix_signs

    v = np.array([[0.1, -0.6, 0.5], [-0.9, 0.6, -0.5], [0.3, 0.2, 0.5]])  # (3, 3)
    fixed = fix_signs(v)
    np.testing.assert_array_equal(fixed[:, 0], -v[:, 0])  # -0.9 is the largest magnitude
    np.testing.assert_array_equal(fixed[:, 1], -v[:, 1])  # tie -0.6 / 0.6: the lower index decides
    np.testing.assert_array_equal(fixed[:, 2], v[:, 2])  # three-way tie: the first entry is already positive
    nearly = v.copy()
    nearly[1, 1] = 0.6 * (1 + 1e-14)  # a round-off-sized difference is still a tie
    np.testing.assert_array_equal(fix_signs(nearly)[:, 1], -nearly[:, 1])
    np.testing.assert_array_equal(fix_signs(fixed), fixed)  # idempotent


# -- errors ----------------------------------------------------------------------------------------------------------


def test_bad_chains_and_moments_raise_clear_errors():
    blocks = _blocks((3, 5, 8))
    moments = _moments(blocks)
    with pytest.raises(ChainFitError, match="strictly grow"):
        fit_chain(moments, (5, 3, 8))
    with pytest.raises(ChainFitError, match="strictly grow"):
        fit_chain(moments, (4, 4, 8))
    with pytest.raises(ChainFitError, match="sum to"):
        fit_chain(moments, (3, 5, 9))
    with pytest.raises(ChainFitError, match="at least two"):
        fit_chain(Moments(3), (3,))
    with pytest.raises(ChainFitError, match="regression"):
        fit_chain(moments, (3, 5, 8), "ridge")


def test_too_few_residues_raise_and_few_residues_warn():
    widths = (3, 5, 8)
    x = np.concatenate(_blocks(widths), axis=1)
    tiny = Moments(16)
    tiny.update(torch.from_numpy(x[:10]))
    with pytest.raises(InsufficientDataError, match="needs at least 17"):
        fit_chain(tiny, widths)
    few = Moments(16)
    few.update(torch.from_numpy(x[:100]))
    with pytest.warns(RuntimeWarning, match="only 100 residues"):
        fit_chain(few, widths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_chain(_moments([x]), widths)  # 3000 residues >= 10 K: no warning


def test_apply_rejects_mismatched_blocks():
    widths = (3, 5, 8)
    blocks = [torch.from_numpy(b) for b in _blocks(widths)]
    fit = fit_chain(_moments([b.numpy() for b in blocks]), widths)
    with pytest.raises(ChainFitError, match=r"shape \(n, 5\)"):
        fit.apply([blocks[0], blocks[2]])
    with pytest.raises(ChainFitError, match="same n"):
        fit.apply([blocks[0], blocks[1][:10]])
    with pytest.raises(ChainFitError, match="1..3 blocks"):
        fit.apply(blocks + [blocks[2]])
    with pytest.raises(ChainFitError, match="sequence of per-model tensors"):
        fit.apply(torch.cat(blocks, dim=1))
    with pytest.raises(ChainFitError, match="float32 or float64"):
        fit.apply(blocks, dtype=torch.float16)


def test_dependent_larger_model_warns_about_null_directions():
    rng = np.random.default_rng(0)
    h_1 = rng.standard_normal((500, 3))
    h_2 = np.concatenate([h_1, h_1[:, :1] * 2.0, rng.standard_normal((500, 1))], axis=1)  # one new direction only
    with pytest.warns(RuntimeWarning, match="fewer than 2 non-null"):
        fit_chain(_moments([h_1, h_2]), (3, 5), "ols")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fit_holding_read_only_arrays_applies_without_sharing_them(dtype):
    """A fit read from the store (Arrow, memory maps) holds read-only arrays: applying it copies them once
    instead of handing torch memory it may not write (torch warned on every worker)."""
    widths = (8, 12)
    blocks = _blocks(widths, n=500)
    fit = fit_chain(_moments(blocks), widths, "ols")
    want = _apply(fit, blocks, dtype)
    frozen = dataclasses.replace(fit, mean=fit.mean.copy(), projection=fit.projection.copy())
    frozen.mean.flags.writeable = frozen.projection.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _apply(frozen, blocks, dtype)
    assert np.array_equal(got, want)
