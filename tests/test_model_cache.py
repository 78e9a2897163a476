"""Checkpoint digests are computed once per file version and remembered across processes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from rdscale.model import loading
from rdscale.model.loading import checkpoint_sha256, digest_cache_dir, load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RDSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_SHA_CACHE", {})  # as in a fresh process
    monkeypatch.setattr(loading, "_SETTLED_NS", 0)  # files written by the test are remembered at once
    return tmp_path / "cache"


def test_digest_is_remembered_across_processes_and_invalidated_by_a_change(tmp_path, cache):
    path = tmp_path / "model.pt"
    path.write_bytes(b"w" * (2 << 20))
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_sha256(path) == true
    records = list(digest_cache_dir().glob("*.json"))
    assert len(records) == 1 and digest_cache_dir().parent == cache
    # A new process reads the record instead of the file: prove it by planting a recognisable digest.
    saved = json.loads(records[0].read_text())
    records[0].write_text(json.dumps({**saved, "sha256": "f" * 64}))
    loading._SHA_CACHE.clear()
    assert checkpoint_sha256(path) == "f" * 64
    # Same size, different mtime (a replaced file): the record no longer applies, the file is hashed again.
    # (Same mtime too: tests/test_input_accounting.py.)
    path.write_bytes(b"v" * (2 << 20))
    os.utime(path, ns=(1, 1))
    loading._SHA_CACHE.clear()
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unusable_cache_only_costs_a_rehash(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("RDSCALE_CACHE_DIR", str(blocker))
    monkeypatch.setattr(loading, "_SHA_CACHE", {})
    path = tmp_path / "m.pt"
    path.write_bytes(b"abc")
    assert checkpoint_sha256(path) == hashlib.sha256(b"abc").hexdigest()


def test_load_model_memory_maps_and_lands_in_the_target_dtype(tiny_family, cache):
    lm = load_model(tiny_family[0], device="cpu", dtype="float64")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float64}
    assert lm.sha256 == hashlib.sha256(tiny_family[0].read_bytes()).hexdigest()
    assert len(list(digest_cache_dir().glob("*.json"))) == 1


def test_a_file_changed_just_before_its_hash_is_not_remembered(tmp_path, monkeypatch):
    """Its next change could fall in the same tick of the file clock (same ctime): hashed again next time."""
    monkeypatch.setenv("RDSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_SHA_CACHE", {})
    path = tmp_path / "m.pt"
    path.write_bytes(b"abc")
    assert checkpoint_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    assert loading._SHA_CACHE == {} and not list(digest_cache_dir().glob("*.json"))
