"""The DMS protocol: ProteinGym CSV parsing and checks, closed-form ridge LOO, the planted-signal protocol, win rates."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdscale.eval.dms import (
    AMINO_ACIDS,
    DMSDataset,
    DMSError,
    DMSFormatError,
    DMSResult,
    Mutation,
    RepresentationScore,
    apply_mutations,
    dms_features,
    evaluate_dms,
    fit_ridge_loo,
    parse_mutant,
    rd_vs_raw_table,
    read_dms_csv,
    read_wild_type,
    ridge_loo_residuals,
    scaling_table,
)

WT = "MKTAYIAKQRQISFVKSHFSRQ"  # 22 residues; position 1 is M, 4 is A, 22 is Q


def write_csv(path, rows, header=("mutant", "mutated_sequence", "DMS_score")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def row(mutant: str, score: float = 0.0, wild_type: str = WT):
    return (mutant, apply_mutations(wild_type, parse_mutant(mutant, wild_type)), score)


# ---------------------------------------------------------------------------------------------------------------
# parsing


def test_parse_multi_mutant_is_one_based_and_ordered():
    muts = parse_mutant("M1A:A4V:Q22D", WT)
    assert muts == (Mutation("M", 1, "A"), Mutation("A", 4, "V"), Mutation("Q", 22, "D"))
    seq = apply_mutations(WT, muts)
    assert seq[0] == "A" and seq[3] == "V" and seq[21] == "D"
    # nothing else moved
    assert [i for i, (a, b) in enumerate(zip(seq, WT)) if a != b] == [0, 3, 21]


def test_parse_without_wild_type_checks_syntax_only():
    assert parse_mutant("A23V:G45D") == (Mutation("A", 23, "V"), Mutation("G", 45, "D"))
    with pytest.raises(DMSFormatError, match="wild-type mismatch"):
        parse_mutant("A23V", "A" * 22 + "G")


@pytest.mark.parametrize(
    "mutant, message",
    [
        ("A4", "not a substitution"),
        ("4V", "not a substitution"),
        ("A4V;M1A", "not a substitution"),
        ("A4V:", "not a substitution"),
        ("A0V", "1-based"),
        ("A23V", "out of range"),
        ("K4V", "wild-type mismatch"),
        ("A4J", "20 amino acids"),
        ("A4V:A4G", "twice"),
        ("", "empty mutant"),
    ],
)
def test_bad_mutant_names_the_row(tmp_path, mutant, message):
    path = write_csv(tmp_path / "bad.csv", [row("M1A", 1.0), row("A4V", 2.0), (mutant, WT, 3.0)])
    with pytest.raises(DMSFormatError, match=message) as info:
        read_dms_csv(path, WT)
    assert "bad.csv row 3 (line 4)" in str(info.value)


def test_mutated_sequence_must_match_the_substitutions(tmp_path):
    wrong = apply_mutations(WT, parse_mutant("A4G", WT))  # the file says A4V but the sequence carries G
    path = write_csv(tmp_path / "seq.csv", [row("M1A"), ("A4V", wrong, 1.0)])
    with pytest.raises(DMSFormatError, match=r"seq.csv row 2 .*mutated_sequence.*position 4"):
        read_dms_csv(path, WT)
    path = write_csv(tmp_path / "short.csv", [("A4V", apply_mutations(WT, parse_mutant("A4V", WT))[:-1], 1.0)])
    with pytest.raises(DMSFormatError, match=r"row 1 .*lengths 21 and 22"):
        read_dms_csv(path, WT)


def test_bad_score_and_missing_columns_are_reported(tmp_path):
    path = write_csv(tmp_path / "score.csv", [row("M1A"), ("A4V", apply_mutations(WT, parse_mutant("A4V")), "n/a")])
    with pytest.raises(DMSFormatError, match=r"row 2 .*DMS_score 'n/a'"):
        read_dms_csv(path, WT)
    path = write_csv(tmp_path / "cols.csv", [("M1A", 1.0)], header=("mutant", "DMS_score"))
    with pytest.raises(DMSFormatError, match="missing column.*mutated_sequence"):
        read_dms_csv(path, WT)


def test_read_csv_and_wild_type_from_fasta(tmp_path):
    fasta = tmp_path / "wt.fa"
    fasta.write_text(f">OTHER_DMS\nMKV\n>MYDMS desc\n{WT[:10]}\n{WT[10:]}\n")
    path = write_csv(tmp_path / "MYDMS.csv", [row("M1A", 0.5), row("A4V:Q22D", -1.25)])
    data = read_dms_csv(path, fasta)  # the record named like the CSV's stem
    assert data.name == "MYDMS" and data.wild_type == WT
    assert data.n_mutations.tolist() == [1, 2]
    assert data.scores.tolist() == [0.5, -1.25]
    with pytest.raises(DMSError, match="name the one to use"):
        read_wild_type(fasta, dataset="UNKNOWN")
    with pytest.raises(DMSError, match="neither an existing FASTA file nor a protein sequence"):
        read_wild_type("no/such/file.fa")


# ---------------------------------------------------------------------------------------------------------------
# ridge with closed-form leave-one-out


def brute_force_loo(x, y, alpha):
    """Refit ridge (centred on the n-1 training points, intercept unpenalised) once per left-out point."""
    n, p = x.shape
    resid = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        xm, ym = x[keep].mean(axis=0), y[keep].mean()
        xc = x[keep] - xm
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(p), xc.T @ (y[keep] - ym))
        resid[i] = y[i] - (ym + (x[i] - xm) @ w)
    return resid


@given(
    n=st.integers(4, 14),
    p=st.integers(1, 10),
    log_alpha=st.floats(-3, 2),
    rank_deficient=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ridge_loo_closed_form_equals_refits(n, p, log_alpha, rank_deficient, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 10, size=p)
    if rank_deficient and p > 1:
        x[:, -1] = x[:, 0] * 2.0  # a collinear column: the closed form drops the null direction, ridge ignores it
    y = rng.normal(size=n) + x @ rng.normal(size=p)
    alpha = 10.0**log_alpha
    np.testing.assert_allclose(ridge_loo_residuals(x, y, alpha), brute_force_loo(x, y, alpha), rtol=1e-7, atol=1e-9)


def test_fit_ridge_loo_picks_the_brute_force_best_penalty_and_fits_it():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 12))
    y = x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=1.0, size=30)
    alphas = np.logspace(-3, 3, 13)
    fit = fit_ridge_loo(x, y, alphas)
    brute = np.array([np.mean(brute_force_loo(x, y, a) ** 2) for a in alphas])
    np.testing.assert_allclose(fit.loo_mse, brute, rtol=1e-8)
    assert fit.alpha == alphas[np.argmin(brute)]
    xm, ym = x.mean(axis=0), y.mean()
    w = np.linalg.solve((x - xm).T @ (x - xm) + fit.alpha * np.eye(12), (x - xm).T @ (y - ym))
    np.testing.assert_allclose(fit.coef, w, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fit.predict(x), ym + (x - xm) @ w, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# the protocol on synthetic embeddings

K_PLANTED, K_SMALL = 16, 6


def make_embed_fn(seed=0):
    """Per-residue embeddings: a residue-type vector plus a little of its neighbours' (so context matters).

    "rd:16" is that embedding; "raw:small" a 6-wide random projection of it (less informative, different width).
    """
    rng = np.random.default_rng(seed)
    table = {aa: rng.normal(size=K_PLANTED) for aa in AMINO_ACIDS}
    projection = rng.normal(size=(K_PLANTED, K_SMALL))
    calls = []

    def embed(seq: str) -> np.ndarray:
        own = np.stack([table[a] for a in seq])  # (L, 16)
        ctx = np.zeros_like(own)
        ctx[1:] += own[:-1]
        ctx[:-1] += own[1:]
        return own + 0.2 * ctx

    def embed_fn(sequences):
        calls.append(len(sequences))
        full = [embed(s) for s in sequences]
        return {"rd:16": full, "raw:small": [e @ projection for e in full]}

    embed_fn.embed = embed
    embed_fn.calls = calls
    return embed_fn


def synthetic_dataset(embed_fn, seed=0, length=80, n_double=400, n_triple=250, shuffle=False):
    """All 19 singles at every position plus random doubles/triples; score = planted w . (sum of diffs) + noise."""
    rng = np.random.default_rng(seed)
    wt = "".join(rng.choice(list(AMINO_ACIDS), size=length))
    mutants = [(Mutation(wt[p], p + 1, aa),) for p in range(length) for aa in AMINO_ACIDS if aa != wt[p]]
    for count, how_many in ((2, n_double), (3, n_triple)):
        for _ in range(how_many):
            positions = np.sort(rng.choice(length, size=count, replace=False))
            mutants.append(tuple(Mutation(wt[p], int(p) + 1, rng.choice([a for a in AMINO_ACIDS if a != wt[p]]))
                                 for p in positions))
    sequences = [apply_mutations(wt, m) for m in mutants]
    w = rng.normal(size=K_PLANTED)
    wt_emb = embed_fn.embed(wt)
    scores = []
    for m, seq in zip(mutants, sequences):
        idx = [x.pos - 1 for x in m]
        scores.append(float(((embed_fn.embed(seq)[idx] - wt_emb[idx]) @ w).sum()))
    scores = np.asarray(scores)
    scores += rng.normal(scale=0.1 * scores.std(), size=scores.size)
    if shuffle:
        scores = rng.permutation(scores)
    return DMSDataset("synthetic", wt, mutants, sequences, scores)


def test_features_are_mean_embedding_difference_at_mutated_positions():
    embed_fn = make_embed_fn()
    data = synthetic_dataset(embed_fn, length=12, n_double=5, n_triple=5)
    feats = dms_features(data, embed_fn, batch_size=7)
    assert max(embed_fn.calls) <= 7  # batched: never the whole dataset at once
    assert feats["rd:16"].shape == (len(data), 16) and feats["raw:small"].shape == (len(data), K_SMALL)
    i = int(np.flatnonzero(data.n_mutations == 3)[0])
    idx = [m.pos - 1 for m in data.mutants[i]]
    expected = (embed_fn.embed(data.sequences[i])[idx] - embed_fn.embed(data.wild_type)[idx]).mean(axis=0)
    np.testing.assert_allclose(feats["rd:16"][i], expected, rtol=1e-12)


def test_planted_linear_signal_is_recovered():
    embed_fn = make_embed_fn()
    result = evaluate_dms(synthetic_dataset(embed_fn), embed_fn, seed=1)
    planted = result.scores["rd:16"]
    assert planted.n["singles"] == round(0.2 * 80 * 19) and planted.n["multi_2"] == 400
    assert planted.width == 16 and planted.kind == "rd"
    for metric in ("singles", "multi_2", "multi_3"):
        assert planted.spearman[metric] > 0.9, (metric, planted.spearman)
    # the 6-wide projection loses most of the planted direction: still positive, clearly worse
    small = result.scores["raw:small"]
    assert small.kind == "raw" and small.spearman["singles"] < planted.spearman["singles"] - 0.05


def test_shuffled_scores_give_no_correlation():
    embed_fn = make_embed_fn()
    result = evaluate_dms(synthetic_dataset(embed_fn, shuffle=True), embed_fn, seed=1)
    for score in result.scores.values():
        for metric in ("singles", "multi_2", "multi_3"):
            assert abs(score.spearman[metric]) < 0.2, (score.name, metric, score.spearman)


def test_split_is_seeded_and_shared_by_representations():
    embed_fn = make_embed_fn()
    data = synthetic_dataset(embed_fn, length=30, n_double=40, n_triple=0)
    feats = dms_features(data, embed_fn)
    a = evaluate_dms(data, embed_fn, seed=5, features=feats)
    b = evaluate_dms(data, embed_fn, seed=5, features=feats)
    c = evaluate_dms(data, embed_fn, seed=6, features=feats)
    assert a.to_dict() == b.to_dict()
    assert a.scores["rd:16"].spearman != c.scores["rd:16"].spearman
    assert DMSResult.from_dict(a.to_dict()).to_dict() == a.to_dict()
    assert "multi_3" not in a.scores["rd:16"].spearman


def test_too_few_singles_and_bad_embeddings_are_clear_errors():
    embed_fn = make_embed_fn()
    data = synthetic_dataset(embed_fn, length=12, n_double=5, n_triple=0)
    few = DMSDataset("few", data.wild_type, data.mutants[:4], data.sequences[:4], data.scores[:4])
    with pytest.raises(DMSError, match="at least 3 of each"):
        evaluate_dms(few, embed_fn)

    def truncating(sequences):
        return {"rd:16": [embed_fn.embed(s)[1:] for s in sequences]}

    with pytest.raises(DMSError, match="BOS/EOS dropped"):
        dms_features(data, truncating)


# ---------------------------------------------------------------------------------------------------------------
# win rates


def fake_result(name, rho):
    """rho: {representation: (singles, multi_2)}; widths from the names (raw:w8 -> 8, rd:8 -> 8)."""
    scores = {}
    for rep, values in rho.items():
        width = int(rep.split(":")[1].lstrip("w"))
        spearman = dict(zip(("singles", "multi_2"), values))
        scores[rep] = RepresentationScore(rep, rep.split(":")[0], width, 1.0, spearman, {m: 10 for m in spearman})
    return DMSResult(name, 100, 40, 0, scores)


def test_win_rate_tables():
    nan = math.nan
    results = [
        # rd:16 beats raw:w16 on singles in datasets 0, 1, 2 (not 3); on multi_2 only where defined (0 and 1)
        fake_result("d0", {"raw:w8": (0.3, 0.2), "rd:8": (0.3, 0.2), "raw:w16": (0.2, 0.1), "rd:16": (0.4, 0.3)}),
        fake_result("d1", {"raw:w8": (0.1, 0.2), "rd:8": (0.1, 0.2), "raw:w16": (0.3, 0.4), "rd:16": (0.35, 0.1)}),
        fake_result("d2", {"raw:w8": (0.5, nan), "rd:8": (0.5, nan), "raw:w16": (0.4, nan), "rd:16": (0.6, nan)}),
        fake_result("d3", {"raw:w8": (0.2, nan), "rd:8": (0.2, nan), "raw:w16": (0.6, nan), "rd:16": (0.5, nan)}),
    ]
    table2 = {r["width"]: r for r in rd_vs_raw_table(results)}
    assert table2[8]["singles"] == 0.5 and table2[8]["n_singles"] == 4  # identical at the smallest width: ties
    assert table2[16]["singles"] == 0.75 and table2[16]["raw"] == "raw:w16" and table2[16]["rd"] == "rd:16"
    assert table2[16]["multi_2"] == 0.5 and table2[16]["n_multi_2"] == 2

    (table3,) = scaling_table(results)
    assert (table3["from"], table3["to"]) == (8, 16)
    assert table3["rd.singles"] == 1.0  # rd:16 > rd:8 everywhere
    assert table3["raw.singles"] == 0.5  # raw:w16 > raw:w8 in d1 and d3 only
    assert table3["rd.multi_2"] == 0.5 and table3["n_rd.multi_2"] == 2
