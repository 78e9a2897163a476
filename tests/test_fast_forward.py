"""The fast (packed, unpadded) ESM-2 forward equals fair-esm's forward.

fair-esm is the reference: its own loader on the same checkpoint files, its own `ESM2.forward`, one sequence at a
time and as padded batches. Float32, tolerance 1e-5, for every layer, for sequences longer than the window
(through windows), for each attention backend that runs on a CPU ("padded", the pure-PyTorch fallback CI
exercises, and "nested"); plus the batching and shape-bucketing rules.
"""

from __future__ import annotations

import random
import warnings

import esm
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.model.embed import Embedder, plan_windows, stitch_plan
from rdscale.model.fast_esm import (
    B_BUCKET,
    T_BUCKET,
    FastESM2,
    pack_by_tokens,
    resolve_attention,
)
from rdscale.model.loading import load_model

AA = "ACDEFGHIKLMNPQRSTVWYXBZUO"
TOL = 1e-5


def protein(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(AA) for _ in range(n))


@pytest.fixture(scope="module")
def fair_esm(tiny_family):
    """fair-esm's own loading path on the tiny family's files (tests only: our own files, weights_only=False)."""
    out = {}
    for path in tiny_family:
        data = torch.load(path, map_location="cpu", weights_only=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data)
        out[path.stem] = (model.eval(), alphabet)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_family):
    return [load_model(p, device="cpu", dtype="float32") for p in tiny_family]


def fair_esm_batch(fair_esm, lm, sequences, layer):
    """fair-esm on one padded batch of all the sequences -> [(L_i, k)]."""
    model, alphabet = fair_esm[lm.spec.name]
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    with torch.no_grad():
        rep = model(tokens, repr_layers=[layer])["representations"][layer]
    return [rep[i, 1 : len(s) + 1] for i, s in enumerate(sequences)]


def fair_esm_single(fair_esm, lm, sequence, layer):
    return fair_esm_batch(fair_esm, lm, [sequence], layer)[0]


@pytest.mark.parametrize("backend", ["padded", "nested"])
@pytest.mark.parametrize("member", [0, 2])
def test_packed_batches_equal_fair_esm_padded_batches_at_every_layer(fair_esm, loaded, member, backend):
    lm = loaded[member]
    rng = random.Random(member)
    sequences = [protein(rng, rng.randint(1, 90)) for _ in range(9)]
    for layer in range(lm.spec.layers + 1):
        ours = Embedder(lm, layer=layer, toks_per_batch=300, forward="fast", fast_attention=backend).embed(sequences)
        ref = fair_esm_batch(fair_esm, lm, sequences, layer)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_negative_layers_count_from_the_end(fair_esm, loaded):
    lm = loaded[1]
    seq = protein(random.Random(5), 40)
    for layer in (-1, -2, -(lm.spec.layers + 1)):
        ours = Embedder(lm, layer=layer, forward="fast").embed([seq])[0]
        torch.testing.assert_close(ours, fair_esm_single(fair_esm, lm, seq, layer % (lm.spec.layers + 1)),
                                   atol=TOL, rtol=0)


def test_long_sequences_through_windows_equal_fair_esm_on_each_window(fair_esm, loaded):
    lm = loaded[2]
    rng = random.Random(11)
    window, overlap = 50, 12
    sequences = [protein(rng, n) for n in (170, 49, 51, 8, 120)]
    fast = Embedder(lm, toks_per_batch=200, window=window, overlap=overlap, forward="fast").embed(sequences)
    plain = Embedder(lm, toks_per_batch=200, window=window, overlap=overlap, forward="plain").embed(sequences)
    for seq, got, other in zip(sequences, fast, plain):
        windows = plan_windows(len(seq), window, overlap)
        parts = [fair_esm_single(fair_esm, lm, seq[s:e], -1 % (lm.spec.layers + 1)) for s, e in windows]
        expected = torch.cat([parts[w][a - windows[w][0] : b - windows[w][0]] for w, a, b in stitch_plan(windows, len(seq))])
        assert got.shape == (len(seq), lm.spec.width)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(got, other, atol=TOL, rtol=0)


def test_windows_longer_than_the_first_rotary_table(loaded):
    """A window above 1022 residues needs rotary positions past the 1024 the tables start with (they grow); packed
    with short sequences of odd lengths, every output equals the plain forward's."""
    lm = loaded[0]
    rng = random.Random(13)
    sequences = [protein(rng, n) for n in (1300, 1, 3, 1101, 65)]
    fast = Embedder(lm, toks_per_batch=3000, window=1100, overlap=200, forward="fast").embed(sequences)
    plain = Embedder(lm, toks_per_batch=3000, window=1100, overlap=200, forward="plain").embed(sequences)
    for seq, a, b in zip(sequences, fast, plain):
        assert a.shape == (len(seq), lm.spec.width)
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=14), st.integers(20, 400))
def test_any_batching_gives_the_same_embeddings(loaded, lengths, budget):
    lm = loaded[0]
    rng = random.Random(sum(lengths))
    sequences = [protein(rng, n) for n in lengths]
    one_by_one = [Embedder(lm, forward="fast").embed([s])[0] for s in sequences]
    packed = Embedder(lm, toks_per_batch=budget, forward="fast").embed(sequences)
    for a, b in zip(packed, one_by_one):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=60), st.integers(1, 5000))
def test_pack_by_tokens_places_every_sequence_once_within_the_budget(lengths, budget):
    batches = pack_by_tokens(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] + 2 for i in b) <= budget


def test_padded_attention_plans_a_bounded_set_of_bucketed_shapes(loaded):
    lm = loaded[0]
    embedder = Embedder(lm, toks_per_batch=600, forward="fast", fast_attention="padded")
    rng = random.Random(3)
    for _ in range(6):
        embedder.embed([protein(rng, rng.randint(1, 250)) for _ in range(rng.randint(1, 12))])
    shapes = embedder._fast.attention_shapes
    # every attention call pads to a length bucket; sequences of <= 252 tokens give at most 4 of them, against one
    # shape per distinct longest sequence without bucketing (the batch size is bucketed on CUDA only)
    assert shapes and all(t % T_BUCKET == 0 for _, t in shapes)
    assert len({t for _, t in shapes}) <= 4
    assert B_BUCKET > 1


def test_fast_forward_leaves_the_model_weights_and_fair_esm_path_unchanged(fair_esm, tiny_family):
    lm = load_model(tiny_family[1], device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    FastESM2(lm.model)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    seq = protein(random.Random(0), 30)
    via_esm = Embedder(lm, attention="esm").embed([seq])[0]
    torch.testing.assert_close(via_esm, fair_esm_single(fair_esm, lm, seq, lm.spec.layers), atol=TOL, rtol=0)


def test_backends_that_need_a_gpu_are_refused_with_a_reason_on_cpu():
    assert resolve_attention("auto", torch.device("cpu"), torch.float32) == "padded"
    for backend in ("flash", "varlen"):
        with pytest.raises(ValueError, match="CUDA"):
            resolve_attention(backend, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention("xformers", torch.device("cpu"), torch.float32)


def test_varlen_backend_only_where_varlen_attn_takes_a_scale():
    """q reaches the attention pre-scaled (fair-esm's head_dim**-0.5 folded into the rotary tables), so a
    varlen_attn without `scale` (its first releases) would apply the default scale a second time: such a torch
    gets the nested backend instead ("auto") or a ValueError ("varlen")."""
    from rdscale.model.fast_esm import _accepts_scale, _varlen_attn

    def with_scale(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None):
        return q

    def without_scale(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        return q

    assert _accepts_scale(with_scale) and not _accepts_scale(without_scale)
    assert _accepts_scale(object()) is False  # no readable signature: not guessed
    found = _varlen_attn()
    assert found is None or _accepts_scale(found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("forward", ["fast", "plain"])
def test_batches_are_queued_without_a_host_synchronisation(tiny_family, forward):
    """On CUDA a blocking host-to-device copy (torch.tensor(..., device=cuda) included), .item() or a
    data-dependent shape would make the host wait for the previous batch's kernels; sync debug mode raises at
    the first one."""
    lm = load_model(tiny_family[1], device="cuda", dtype="bfloat16")
    embedder = Embedder(lm, toks_per_batch=300, forward=forward)
    rng = random.Random(4)
    sequences = [protein(rng, rng.randint(1, 200)) for _ in range(20)]
    embedder.embed(sequences[:2])  # first call: rotary tables and workspaces
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = embedder.embed(sequences)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [o.shape[0] for o in out] == [len(s) for s in sequences]


# ------------------------------------------------------------------------------------------ per-model budgets


def test_smaller_models_of_a_chain_take_larger_token_budgets():
    from rdscale.model.fast_esm import model_budgets

    assert model_budgets(16384, [320, 480, 640, 1280]) == [65536, 43690, 32768, 16384]
    assert model_budgets(1000, [8, 2560]) == [8000, 1000]  # at most 8x
    assert model_budgets(4096, [64]) == [4096]  # extract: one model, the budget as given
    assert model_budgets(4096, [32, 64], explicit=[100, 200]) == [100, 200]


def test_per_model_budgets_must_match_the_chain():
    from rdscale.config import ConfigError, load_config

    cfg = load_config(None, ["models=[a, b]", "embedding.toks_per_batch_per_model=[9000, 4000]"])
    assert cfg.embedding.toks_per_batch_per_model == [9000, 4000]
    with pytest.raises(ConfigError, match="one budget"):
        load_config(None, ["models=[a, b]", "embedding.toks_per_batch_per_model=[9000]"])
    with pytest.raises(ConfigError, match="embedding.forward"):
        load_config(None, ["embedding.forward=turbo"])


# ------------------------------------------------------------------------------------- the GPU benchmark's path

BARE_EXTRACT = """
import sys
sys.path.insert(0, "bench")
import bench_gpu
bench_gpu.refuse_unneeded_packages()  # ray, yaml, safetensors, scipy, ... now raise ModuleNotFoundError
from rdscale.config import Config, EmbeddingConfig, InputConfig, OutputConfig, RayConfig
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed
cfg = Config(models=[sys.argv[1]], input=InputConfig(paths=[sys.argv[2]]),
             embedding=EmbeddingConfig(device="cpu", toks_per_batch=256),
             output=OutputConfig(dir=sys.argv[3], storage_width=16), ray=RayConfig(address="local")).validate()
summary = embed(cfg, executor=LocalExecutor(), progress=False)
assert summary.proteins == 12 and summary.residues > 0, summary
assert sys.modules.get("ray") is None and sys.modules.get("yaml") is None and sys.modules.get("safetensors") is None
print("OK", summary.residues)
"""


def test_extract_runs_where_only_torch_numpy_pyarrow_lance_and_fair_esm_exist(tiny_family, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_pipeline import write_fasta

    fasta = write_fasta(tmp_path / "in.fasta", n=12, seed=2)
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", BARE_EXTRACT, str(tiny_family[0]), str(fasta), str(tmp_path / "out")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_compiled_fast_forward_equals_fair_esm(fair_esm, loaded):
    """torch.compile of the elementwise work (embedding.compile): same numbers; one compile serves every batch
    shape (dynamic token count). Compiling takes ~10-30 s on a CPU."""
    lm = loaded[1]
    rng = random.Random(8)
    sequences = [protein(rng, rng.randint(3, 120)) for _ in range(7)]
    embedder = Embedder(lm, toks_per_batch=300, forward="fast", compile=True)
    for batch in (sequences, sequences[:2]):
        ours = embedder.embed(batch)
        for a, b in zip(ours, fair_esm_batch(fair_esm, lm, batch, lm.spec.layers)):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
