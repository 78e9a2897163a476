"""rdscale.models: the family table, safe checkpoint loading, tiny families, device/dtype resolution."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import warnings

import esm
import pytest
import torch
from esm.model.esm2 import ESM2

from rdscale.model import loading as models
from rdscale.model.loading import (
    ESM2_ALIASES,
    ESM2_FAMILY,
    CheckpointError,
    build_tiny_family,
    checkpoint_sha256,
    esm2_parameter_count,
    load_model,
    resolve_device_dtype,
    resolve_name,
)


def reference_load(path):
    """fair-esm's own loader on our own generated file (weights_only=False is acceptable only here)."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Regression weights not found": expected, no contact head
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data)
    return model.eval(), alphabet


class Payload:
    """A harmless custom class: pickled into a checkpoint, it must be refused, not constructed."""

    def __init__(self):
        self.x = 1


# ---------------------------------------------------------------------------------------------------------------
# family table


def test_family_grows_in_width_layers_and_parameters():
    specs = list(ESM2_FAMILY.values())
    assert [s.width for s in specs] == [320, 480, 640, 1280, 2560, 5120]
    for small, big in zip(specs, specs[1:]):
        assert small.width < big.width and small.layers < big.layers and small.params < big.params
    for s in specs:
        assert s.width % s.heads == 0 and (s.width // s.heads) % 2 == 0  # rotary needs even head dims
        assert s.name == f"esm2_t{s.layers}_{s.name.split('_')[2]}_UR50D"


@pytest.mark.parametrize("alias", ["8M", "35M", "150M", "650M", "3B", "15B"])
def test_aliases_resolve_to_the_named_member(alias):
    spec = resolve_name(alias)
    assert spec is ESM2_FAMILY[ESM2_ALIASES[alias]]
    assert f"_{alias}_" in spec.name
    assert resolve_name(alias.lower()) is spec and resolve_name(spec.name) is spec
    # the nominal size in the name is within 25% of the exact count
    nominal = float(alias[:-1]) * (1e6 if alias.endswith("M") else 1e9)
    assert abs(spec.params - nominal) / nominal < 0.25


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="esm2_t33_650M_UR50D"):
        resolve_name("esm2_t99_1T_UR50D")


@pytest.mark.parametrize("layers,width,heads", [(6, 320, 20), (2, 32, 4), (3, 48, 4)])
def test_parameter_count_formula_matches_fair_esm_module(layers, width, heads):
    with torch.device("meta"):
        module = ESM2(num_layers=layers, embed_dim=width, attention_heads=heads)
    assert esm2_parameter_count(layers, width, heads) == sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# tiny families


def test_tiny_checkpoints_have_fair_esm_format(tiny_family):
    assert [p.name for p in tiny_family] == ["esm2_t2_32_tiny.pt", "esm2_t3_48_tiny.pt", "esm2_t4_64_tiny.pt"]
    for path, (layers, width) in zip(tiny_family, [(2, 32), (3, 48), (4, 64)]):
        data = torch.load(path, map_location="cpu", weights_only=False)
        assert set(data) == {"model", "cfg"}
        cfg = data["cfg"]["model"]
        assert isinstance(cfg, argparse.Namespace)
        assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.token_dropout) == (layers, width, True)
        keys = list(data["model"])
        assert all(k.startswith(("encoder.sentence_encoder.", "encoder.lm_head.")) for k in keys)
        assert "encoder.sentence_encoder.embed_tokens.weight" in keys
        assert not any("contact_head.regression" in k for k in keys)


def test_tiny_family_is_deterministic_and_seeded(tmp_path, tiny_family):
    again = build_tiny_family(tmp_path / "a", widths=(32, 48, 64), layers=(2, 3, 4), seed=0)
    other = build_tiny_family(tmp_path / "b", widths=(32,), layers=(2,), seed=1)
    assert [checkpoint_sha256(p) for p in again] == [checkpoint_sha256(p) for p in tiny_family]
    w0 = torch.load(tiny_family[0], weights_only=False)["model"]["encoder.sentence_encoder.layers.0.fc1.weight"]
    w1 = torch.load(other[0], weights_only=False)["model"]["encoder.sentence_encoder.layers.0.fc1.weight"]
    assert not torch.equal(w0, w1)


def test_tiny_family_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_family(tmp_path, widths=(32,), layers=(2,), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_family_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        build_tiny_family(tmp_path, widths=(32, 48), layers=(2,))
    with pytest.raises(ValueError, match="heads"):
        build_tiny_family(tmp_path, widths=(30,), layers=(2,), heads=4)


# ---------------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("member", [0, 2])
def test_load_round_trip_matches_fair_esm(tiny_family, member):
    path = tiny_family[member]
    loaded = load_model(path, device="cpu")
    reference, alphabet = reference_load(path)
    assert loaded.spec.layers == reference.num_layers and loaded.spec.width == reference.embed_dim
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.source == str(path) and loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training
    ours = {k: v for k, v in loaded.model.state_dict().items() if "contact_head.regression" not in k}
    theirs = reference.state_dict()
    assert ours.keys() <= theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    _, _, tokens = alphabet.get_batch_converter()([("a", "MKTAYIAKQRQISFVKSHFSRQ"), ("b", "MLEP")])
    with torch.no_grad():
        a = loaded.model(tokens, repr_layers=[loaded.spec.layers])
        b = reference(tokens, repr_layers=[loaded.spec.layers])
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["representations"][loaded.spec.layers], b["representations"][loaded.spec.layers])


def test_load_accepts_str_and_pathlike(tiny_family):
    a = load_model(str(tiny_family[0]))
    b = load_model(tiny_family[0])
    assert a.sha256 == b.sha256 and a.spec == b.spec


def test_load_in_bfloat16_on_cpu_warns_and_converts(tiny_family):
    with pytest.warns(UserWarning, match="bfloat16 on CPU"):
        loaded = load_model(tiny_family[0], device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_checkpoint_with_os_system_payload_is_refused_without_running_it(tmp_path, tiny_family):
    sentinel = tmp_path / "payload_ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    data = torch.load(tiny_family[0], weights_only=False)
    data["cfg"]["extra"] = Exploit()
    evil = tmp_path / "esm2_t2_32_evil.pt"
    torch.save(data, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system"):
        load_model(evil)
    assert not sentinel.exists()


def test_checkpoint_with_custom_class_is_refused_and_named(tmp_path, tiny_family, monkeypatch):
    constructed = []
    monkeypatch.setattr(Payload, "__setstate__", lambda self, state: constructed.append(state), raising=False)
    data = torch.load(tiny_family[0], weights_only=False)
    data["payload"] = Payload()
    bad = tmp_path / "esm2_t2_32_custom.pt"
    torch.save(data, bad)
    with pytest.raises(CheckpointError, match=r"Payload") as info:
        load_model(bad)
    assert "weights_only=False" not in str(info.value)  # never suggest the unsafe way out
    assert constructed == []


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")


def test_non_checkpoint_files_are_rejected_clearly(tmp_path, tiny_family):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(text)

    bare = tmp_path / "bare_state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="expected a dict with 'model' and 'cfg'"):
        load_model(bare)

    data = torch.load(tiny_family[0], weights_only=False)
    del data["model"]["encoder.sentence_encoder.layers.1.fc1.weight"]
    truncated = tmp_path / "esm2_t2_32_missing.pt"
    torch.save(data, truncated)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.fc1.weight'\]"):
        load_model(truncated)

    data = torch.load(tiny_family[0], weights_only=False)
    data["cfg"]["model"].encoder_embed_dim = 48  # config disagrees with the weights
    wrong = tmp_path / "esm2_t2_48_wrong.pt"
    torch.save(data, wrong)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(wrong)


def test_hub_name_reuses_torch_hub_cache_and_downloads_from_fair_esm_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    wrong_size = build_tiny_family(tmp_path / "src", widths=(32,), layers=(2,))[0]
    requested = []

    def fake_download(url, dst, progress=True):
        requested.append(url)
        shutil.copy(wrong_size, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(CheckpointError, match="does not hold esm2_t6_8M_UR50D"):
        load_model("8M")
    assert requested == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]

    # a correct 8M-shaped file already in the cache is used without any download
    real_shape = build_tiny_family(tmp_path / "src8m", widths=(320,), layers=(6,), heads=20)[0]
    shutil.copy(real_shape, models.hub_checkpoint_path("esm2_t6_8M_UR50D"))
    loaded = load_model("esm2_t6_8M_UR50D")
    assert requested == [requested[0]]
    assert loaded.spec == ESM2_FAMILY["esm2_t6_8M_UR50D"] and loaded.source == "esm2_t6_8M_UR50D"


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="copy esm2_t12_35M_UR50D.pt to"):
        load_model("35M")


def test_sha256_is_streamed_correctly_and_tracks_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * (3 << 20) + b"tail")
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"changed")
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    assert checkpoint_sha256(path) == hashlib.sha256(b"changed").hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# device and dtype


def test_cpu_defaults_to_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(torch.device("cpu"), torch.float32) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_defaults_to_half_precision(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_device_dtype() == (torch.device("cuda"), expected)
    assert resolve_device_dtype("cuda:1", "fp32") == (torch.device("cuda:1"), torch.float32)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device_dtype("cuda:2")


def test_bad_device_and_dtype_requests(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device_dtype("cuda")
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device_dtype("gpu0")
    with pytest.raises(ValueError, match="invalid dtype"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(ValueError, match="float16 on CPU"):
        resolve_device_dtype("cpu", "fp16")
    with pytest.warns(UserWarning, match="bfloat16 on CPU"):
        assert resolve_device_dtype("cpu", "bf16")[1] == torch.bfloat16
