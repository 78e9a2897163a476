"""Properties of the one-pass moments accumulator (rdscale.moments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.fit.moments import Moments, MomentsError, merge_all

WIDTH = 7


def _data(n: int = 600, width: int = WIDTH, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((width, width))
    return (rng.standard_normal((n, width)) @ mix + offset).astype(np.float32)


def _exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    centred = x64 - mean
    return mean, centred.T @ centred


def _accumulate(x: np.ndarray, cuts: list[int]) -> Moments:
    m = Moments(x.shape[1])
    for start, stop in zip([0, *cuts], [*cuts, len(x)]):
        m.update(torch.from_numpy(x[start:stop]))
    return m


def test_batches_give_the_exact_mean_and_comoment():
    x = _data()
    m = _accumulate(x, [1, 50, 51, 333])
    mean, comoment = _exact(x)
    assert m.count == len(x)
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.comoment, comoment, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.covariance(), comoment / len(x), rtol=1e-12, atol=1e-12)


def test_large_offset_does_not_destroy_the_covariance():
    # A naive sum-of-squares accumulator loses ~all digits when |mean| >> std; centred updates must not.
    x = _data(offset=0.0).astype(np.float64) * 1e-3 + 1e5
    m = _accumulate(x, [100, 200, 300])
    _, comoment = _exact(x)
    np.testing.assert_allclose(m.comoment, comoment, rtol=1e-6, atol=1e-12)


@settings(max_examples=20)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
    order_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_merging_any_partition_in_any_order_matches_one_pass(cuts, order_seed):
    x = _data()
    cuts = sorted(cuts)
    parts = []
    for start, stop in zip([0, *cuts], [*cuts, len(x)]):
        part = Moments(WIDTH)
        part.update(torch.from_numpy(x[start:stop]))  # empty slices included: they must be neutral
        parts.append(part)
    # A random merge tree: repeatedly merge two randomly chosen accumulators.
    rng = np.random.default_rng(order_seed)
    while len(parts) > 1:
        i, j = rng.choice(len(parts), size=2, replace=False)
        merged = parts[i].merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    mean, comoment = _exact(x)
    assert parts[0].count == len(x)
    np.testing.assert_allclose(parts[0].mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(parts[0].comoment, comoment, rtol=1e-12, atol=1e-10)


def test_merge_all_balanced_tree_matches_sequential_merge():
    x = _data()
    parts = [_accumulate(chunk, []) for chunk in np.array_split(x, 9)]
    tree = merge_all(parts)
    chain = parts[0]
    for part in parts[1:]:
        chain = chain + part
    np.testing.assert_allclose(tree.comoment, chain.comoment, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(tree.mean, chain.mean, rtol=0, atol=1e-12)


def test_merge_with_empty_is_identity_and_leaves_inputs_untouched():
    x = _data()
    full = _accumulate(x, [])
    empty = Moments(WIDTH)
    for merged in (full.merge(empty), empty.merge(full)):
        assert merged.count == full.count
        np.testing.assert_array_equal(merged.mean, full.mean)
        np.testing.assert_array_equal(merged.comoment, full.comoment)
    assert empty.count == 0
    both_empty = empty.merge(Moments(WIDTH))
    assert both_empty.count == 0
    with pytest.raises(MomentsError, match="empty"):
        both_empty.covariance()


def test_arrays_round_trip_exactly():
    m = _accumulate(_data(), [200])
    arrays = m.to_arrays()
    assert set(arrays) == {"count", "mean", "comoment"}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    back = Moments.from_arrays(arrays)
    assert back.count == m.count and back.width == m.width
    np.testing.assert_array_equal(back.comoment, m.comoment)
    np.testing.assert_array_equal(back.mean, m.mean)
    empty = Moments.from_arrays(Moments(WIDTH).to_arrays())
    assert empty.count == 0 and empty.width == WIDTH


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("comoment"), "lack"),
        (lambda d: d.__setitem__("comoment", np.zeros((WIDTH, WIDTH + 1))), "comoment"),
        (lambda d: d.__setitem__("mean", np.zeros((WIDTH, 1))), "1-D"),
        (lambda d: d.__setitem__("count", np.asarray(-3)), ">= 0"),
        (lambda d: d.__setitem__("count", np.asarray(2.5)), "integer"),
        (lambda d: d["mean"].__setitem__(0, np.nan), "NaN"),
    ],
)
def test_from_arrays_rejects_malformed_input(mutate, message):
    arrays = _accumulate(_data(), []).to_arrays()
    mutate(arrays)
    with pytest.raises(MomentsError, match=message):
        Moments.from_arrays(arrays)


def test_width_mismatch_is_a_clear_error():
    m = Moments(WIDTH)
    with pytest.raises(MomentsError, match=f"width {WIDTH}"):
        m.update(torch.zeros(4, WIDTH + 1))
    with pytest.raises(MomentsError, match="different chains"):
        m.merge(Moments(WIDTH + 1))
    with pytest.raises(MomentsError, match="floating-point"):
        m.update(torch.zeros(4, WIDTH, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected_and_state_is_kept(bad):
    m = _accumulate(_data(), [])
    before = m.comoment
    x = torch.from_numpy(_data(n=10, seed=1))
    x[3, 2] = bad
    with pytest.raises(MomentsError, match="1 of 10 rows"):
        m.update(x)
    np.testing.assert_array_equal(m.comoment, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_accumulated_in_float64(dtype):
    x = torch.from_numpy(_data()).to(dtype)
    m = Moments(WIDTH)
    m.update(x[:250])
    m.update(x[250:])
    mean, comoment = _exact(x.to(torch.float64).numpy())  # the half values are exact in float64
    np.testing.assert_allclose(m.comoment, comoment, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=1e-12)


def test_accumulator_follows_the_device_of_the_first_batch():
    m = Moments(WIDTH)
    m.update(torch.from_numpy(_data()))
    assert m.device.type == "cpu"
    assert m._comoment.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_accumulate_on_the_gpu():
    x = _data()
    m = Moments(WIDTH, gram="float64")  # the float32 Gram: tests/test_moments_gram.py
    m.update(torch.from_numpy(x).cuda().half())
    assert m._comoment.device.type == "cuda"
    _, comoment = _exact(torch.from_numpy(x).half().double().numpy())
    np.testing.assert_allclose(m.comoment, comoment, rtol=1e-10, atol=1e-8)
    merged = Moments(WIDTH).merge(m)  # an empty CPU-less accumulator adopts the other side's device
    np.testing.assert_allclose(merged.comoment, m.comoment)


def test_update_leaves_the_callers_float64_batch_untouched():
    # update centres its batch in place; that must be on its own copy, never on the caller's tensor.
    x = torch.from_numpy(_data().astype(np.float64))
    before = x.clone()
    m = Moments(WIDTH)
    m.update(x)
    assert torch.equal(x, before)
    mean, comoment = _exact(before.numpy())
    np.testing.assert_allclose(m.comoment, comoment, rtol=1e-12, atol=1e-10)
