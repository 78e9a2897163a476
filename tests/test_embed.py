"""rdscale.embed: token-budget batching, windows and stitching, and embeddings equal to fair-esm's forward."""

from __future__ import annotations

import random
import warnings

import esm
import numpy as np
import pytest
import torch
from esm.data import FastaBatchedDataset
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.model.embed import Embedder, pack_batches, plan_windows, stitch_plan
from rdscale.model.loading import load_model

LETTERS = "ACDEFGHIKLMNPQRSTVWYXBZUO"
TOL = 1e-5


def random_protein(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(length))


@pytest.fixture(scope="module")
def small(tiny_family):
    return load_model(tiny_family[0], device="cpu")


@pytest.fixture(scope="module")
def large(tiny_family):
    return load_model(tiny_family[2], device="cpu")


@pytest.fixture(scope="module")
def references(tiny_family):
    """fair-esm's own loading code path on our generated files (weights_only=False: tests only, own files)."""
    out = {}
    for path in tiny_family:
        data = torch.load(path, map_location="cpu", weights_only=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no contact-regression file, as intended
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data)
        out[path.stem] = (model.eval(), alphabet)
    return out


def reference_embedding(references, loaded, sequence: str, layer: int) -> torch.Tensor:
    """(L, k) from a plain single-sequence fair-esm forward, BOS/EOS dropped."""
    model, alphabet = references[loaded.spec.name]
    _, _, tokens = alphabet.get_batch_converter()([("x", sequence)])
    with torch.no_grad():
        return model(tokens, repr_layers=[layer])["representations"][layer][0, 1 : len(sequence) + 1]


# ---------------------------------------------------------------------------------------------------------------
# batching


@given(
    lengths=st.lists(st.integers(1, 300), max_size=60),
    budget=st.integers(1, 2000),
    max_batch=st.one_of(st.none(), st.integers(1, 8)),
)
def test_pack_batches_uses_every_index_once_within_budget(lengths, budget, max_batch):
    batches = pack_batches(lengths, budget, max_batch)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # length-sorted, shortest first
    for b in batches:
        assert b
        assert len(b) == 1 or (max(lengths[i] for i in b) + 2) * len(b) <= budget
        assert max_batch is None or len(b) <= max_batch


@given(lengths=st.lists(st.integers(1, 200), max_size=50), budget=st.integers(1, 1500))
def test_pack_batches_equals_fair_esm_get_batch_indices(lengths, budget):
    dataset = FastaBatchedDataset([str(i) for i in range(len(lengths))], ["A" * n for n in lengths])
    assert pack_batches(lengths, budget) == dataset.get_batch_indices(budget, extra_toks_per_seq=2)


def test_pack_batches_rejects_bad_budgets():
    with pytest.raises(ValueError, match="toks_per_batch"):
        pack_batches([3, 4], 0)
    with pytest.raises(ValueError, match="max_batch_size"):
        pack_batches([3, 4], 100, 0)


# ---------------------------------------------------------------------------------------------------------------
# windows and stitching


@given(length=st.integers(1, 5000), window=st.integers(2, 1100), data=st.data())
def test_windows_cover_the_sequence_with_the_requested_overlap(length, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    windows = plan_windows(length, window, overlap)
    if length <= window:
        assert windows == [(0, length)]
        return
    assert windows[0][0] == 0 and windows[-1][1] == length
    assert all(e - s == window for s, e in windows)
    for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
        assert s0 < s1 and e0 - s1 >= overlap  # consecutive windows overlap by at least `overlap`
    # the fewest windows: one fewer could not cover the sequence with that overlap
    assert (len(windows) - 1) * (window - overlap) + window < length + (window - overlap)


@given(length=st.integers(1, 3000), window=st.integers(2, 400), data=st.data())
def test_stitching_takes_each_residue_once_from_its_most_central_window(length, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    windows = plan_windows(length, window, overlap)
    plan = stitch_plan(windows, length)
    assert plan[0][1] == 0 and plan[-1][2] == length
    assert all(a < b for _, a, b in plan) and all(p[2] == q[1] for p, q in zip(plan, plan[1:]))

    def margin(w, pos):  # distance to the nearest edge that is not the sequence's own end
        s, e = windows[w]
        return min(pos - s if s > 0 else np.inf, e - 1 - pos if e < length else np.inf)

    for w, a, b in plan:
        s, e = windows[w]
        assert s <= a and b <= e
        for pos in {a, b - 1, (a + b) // 2}:
            best = max(margin(v, pos) for v, (s2, e2) in enumerate(windows) if s2 <= pos < e2)
            assert margin(w, pos) == best


def test_bad_window_settings_are_rejected(small):
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(100, 10, 10)
    with pytest.raises(ValueError, match="window must be positive"):
        Embedder(small, window=0)
    with pytest.raises(ValueError, match="long_policy"):
        Embedder(small, long_policy="split")


# ---------------------------------------------------------------------------------------------------------------
# embeddings against fair-esm


@pytest.mark.parametrize("attention", ["sdpa", "esm"])
@pytest.mark.parametrize("member", ["small", "large"])
def test_alone_in_a_batch_and_windowed_equal_fair_esm(request, references, attention, member):
    loaded = request.getfixturevalue(member)
    rng = random.Random(7)
    target = random_protein(rng, 57)
    others = [random_protein(rng, n) for n in (3, 120, 57, 20, 90)]
    expected = reference_embedding(references, loaded, target, loaded.spec.layers)

    alone = Embedder(loaded, attention=attention).embed([target])[0]
    mixed_embedder = Embedder(loaded, attention=attention, toks_per_batch=10_000)
    mixed = mixed_embedder.embed(others[:2] + [target] + others[2:])[2]
    assert mixed_embedder.stats.batches == 1  # really batched with padded neighbours
    # window == its length: the windowing code path, with genuinely windowed neighbours in the same call
    windowed_embedder = Embedder(loaded, attention=attention, window=57, overlap=10, toks_per_batch=10_000)
    windowed = windowed_embedder.embed(others + [target])[-1]
    assert windowed_embedder.stats.windows > len(others) + 1

    for got in (alone, mixed, windowed):
        assert got.shape == (57, loaded.spec.width) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@settings(max_examples=10)
@given(
    lengths=st.lists(st.integers(1, 80), min_size=1, max_size=12),
    budget=st.integers(40, 1500),
    seed=st.integers(0, 2**16),
)
def test_results_do_not_depend_on_batch_composition(large, references, lengths, budget, seed):
    rng = random.Random(seed)
    sequences = [random_protein(rng, n) for n in lengths]
    batched = Embedder(large, toks_per_batch=budget).embed(sequences)
    probe = rng.randrange(len(sequences))
    expected = reference_embedding(references, large, sequences[probe], large.spec.layers)
    assert [t.shape[0] for t in batched] == lengths
    torch.testing.assert_close(batched[probe], expected, atol=TOL, rtol=0)
    for got, seq in zip(batched, sequences):
        torch.testing.assert_close(got, Embedder(large).embed([seq])[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4, -1, -3, -5])
def test_any_layer_matches_fair_esm_representation(large, references, layer):
    sequence = random_protein(random.Random(layer + 10), 40)
    n_layers = large.spec.layers
    expected = reference_embedding(references, large, sequence, layer % (n_layers + 1))
    embedder = Embedder(large, layer=layer)
    torch.testing.assert_close(embedder.embed([sequence, sequence[:7]])[0], expected, atol=TOL, rtol=0)


def test_out_of_range_layer_is_rejected(large):
    with pytest.raises(ValueError, match=r"layer must be in \[-5, 4\]"):
        Embedder(large, layer=5)
    with pytest.raises(ValueError, match="layer must be"):
        Embedder(large, layer=-6)


# ---------------------------------------------------------------------------------------------------------------
# long sequences


def test_long_protein_gets_one_embedding_per_residue_from_its_windows(small):
    protein = random_protein(random.Random(1), 2500)
    embedder = Embedder(small, window=50, overlap=12)
    (out,) = embedder.embed([protein])
    assert out.shape == (2500, small.spec.width)
    windows = plan_windows(2500, 50, 12)
    assert embedder.stats.windows == len(windows)
    # each stitched run equals the rows of its own window embedded alone
    direct = Embedder(small, window=50).embed([protein[s:e] for s, e in windows])
    for w, a, b in stitch_plan(windows, 2500):
        s = windows[w][0]
        torch.testing.assert_close(out[a:b], direct[w][a - s : b - s], atol=TOL, rtol=0)


def test_real_esm2_window_on_a_2500_residue_protein(small):
    protein = random_protein(random.Random(2), 2500)
    embedder = Embedder(small)  # window=1022, ESM-2's 1024 positions with BOS/EOS
    out, short = embedder.embed([protein, protein[:300]])
    assert out.shape == (2500, small.spec.width) and short.shape == (300, small.spec.width)
    assert embedder.stats.windows == len(plan_windows(2500, 1022)) + 1 == 4
    assert torch.isfinite(out).all()


def test_truncate_keeps_the_first_window(small):
    protein = random_protein(random.Random(3), 130)
    embedder = Embedder(small, long_policy="truncate", window=50)
    out, short = embedder.embed([protein, protein[:30]])
    assert out.shape == (50, small.spec.width) and short.shape == (30, small.spec.width)
    torch.testing.assert_close(out, Embedder(small).embed([protein[:50]])[0], atol=TOL, rtol=0)
    assert embedder.stats.truncated == [0]


def test_reject_names_the_long_sequences(small):
    embedder = Embedder(small, long_policy="reject", window=50)
    sequences = ["ACDE" * 10, "A" * 51, "M" * 50, "W" * 200]
    assert [embedder.too_long(s) for s in sequences] == [False, True, False, True]
    with pytest.raises(ValueError, match=r"2 sequence\(s\) longer than the 50-residue window: 1 \(51 residues\), 3"):
        embedder.embed(sequences)
    assert len(embedder.embed([s for s in sequences if not embedder.too_long(s)])) == 2


# ---------------------------------------------------------------------------------------------------------------
# input handling and outputs


@given(st.text(alphabet=LETTERS, min_size=1, max_size=200))
def test_tokenize_agrees_with_fair_esm_alphabet(small, sequence):
    embedder = Embedder(small)
    assert embedder.tokenize(sequence).tolist() == small.alphabet.encode(sequence)


def test_bad_sequences_are_rejected_with_their_index(small):
    embedder = Embedder(small)
    with pytest.raises(ValueError, match=r"sequence 1: characters \['a', 'é'\]"):
        embedder.embed(["ACD", "MaKé"])
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        embedder.embed([""])
    with pytest.raises(TypeError, match="not one string"):
        embedder.embed("MKT")
    assert embedder.embed([]) == []


def test_outputs_are_ordinary_tensors_on_the_model_device(small):
    out = Embedder(small).embed(["MKTAYIAK", "MLE"])
    for t in out:
        assert t.device == small.device and not t.is_inference()
        t.add_(1.0)  # in-place works: not an inference-mode tensor, and not a view of a shared batch
    assert out[0].untyped_storage().data_ptr() != out[1].untyped_storage().data_ptr()


def test_bfloat16_embeddings_track_float32(tiny_family):
    with pytest.warns(UserWarning):
        half = load_model(tiny_family[1], device="cpu", dtype="bf16")
    full = load_model(tiny_family[1], device="cpu")
    sequence = random_protein(random.Random(4), 300)  # positions beyond bfloat16's exact integers (256)
    a = Embedder(half).embed([sequence])[0]
    b = Embedder(full).embed([sequence])[0]
    assert a.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a.float(), b, dim=-1)
    assert cos.min() > 0.98


# ---------------------------------------------------------------------------------------------------------------
# out-of-memory back-off


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=14), at=st.integers(2, 6),
       forward=st.sampled_from(["fast", "plain"]))
def test_oom_back_off_splits_batches_and_changes_no_number(small, lengths, at, forward):
    """A forward that fails for `at` or more sequences (as a smaller GPU would): every batch is split until it
    runs, the budget drops, and the embeddings are those of an Embedder that never failed."""
    from rdscale.model.embed import inject_oom

    rng = random.Random(sum(lengths) + at)
    seqs = [random_protein(rng, n) for n in lengths]
    clean = Embedder(small, toks_per_batch=400, forward=forward, window=60, overlap=15)
    faulty = Embedder(small, toks_per_batch=400, forward=forward, window=60, overlap=15)
    faulty.forward_wrapper = inject_oom(at_batch_size=at)
    want, got = clean.embed(seqs), faulty.embed(seqs)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    if clean.stats.batches and max(len(b) for b in clean._plan([len(s) for s in seqs])) >= at:
        assert faulty.stats.oom_splits > 0 and faulty.toks_per_batch < 400
    # The next call packs under the lowered budget: fewer or no failures.
    before = faulty.stats.oom_splits
    faulty.embed(seqs)
    assert faulty.stats.oom_splits - before <= before


def test_oom_on_one_long_sequence_windows_it_and_logs_one_line_per_event(small, caplog):
    from rdscale.model.embed import inject_oom

    rng = random.Random(7)
    seq = random_protein(rng, 100)
    emb = Embedder(small, toks_per_batch=4096, window=1022)
    emb.forward_wrapper = inject_oom(above_tokens=70)  # 102 tokens fail; windows of 50 residues (52 tokens) run
    with caplog.at_level("WARNING", logger="rdscale.model.embed"):
        (out,) = emb.embed([seq])
    assert out.shape == (100, small.spec.width) and torch.isfinite(out).all()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "out of memory on one sequence of 100 residues" in lines[0], lines
    # Stitched windows: residues far from the cut equal the first window's own embedding.
    (first,) = Embedder(small, toks_per_batch=4096).embed([seq[:50]])
    torch.testing.assert_close(out[:20], first[:20], rtol=0, atol=1e-5)
    # Nothing fits at all: the error is raised, not looped on.
    emb.forward_wrapper = inject_oom(above_tokens=3)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        emb.embed([seq])
