"""`stub:WIDTH` models: deterministic embeddings without a network, a benchmarking aid.

A model entry `stub:64` (in `models`, alone or as a chain of stubs of growing widths) stands for an ESM-2 model
of that width whose forward costs nothing: each residue's vector is read from fixed tables (its letter, its left
neighbour's letter, a sinusoid of its position), so the I/O, commit and driver costs of every verb can be measured
at sizes no CPU could embed (bench/bench_scale.py). The vectors are deterministic across processes and machines;
they carry no biology and must not be searched for meaning. A stub's checkpoint digest is `stub-v1`, so a fit made
from stubs is refused for real models and the other way round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from rdscale.errors import ConfigError

PREFIX = "stub:"
DIGEST = "stub-v1"
_LETTERS = 26  # A..Z; anything else counts as X


def is_stub(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def stub_width(name: str) -> int:
    match = re.fullmatch(r"stub:(\d+)", name)
    if not match or not 1 <= int(match.group(1)) <= 65536:
        raise ConfigError(f"a stub model is named stub:WIDTH with WIDTH in 1..65536, got {name!r}")
    return int(match.group(1))


def describe_stub(name: str) -> dict:
    return {"name": name, "source": name, "width": stub_width(name), "layers": 0, "sha256": DIGEST}


@dataclass
class StubSpec:
    name: str
    width: int
    layers: int = 0
    heads: int = 1
    params: int = 0


@dataclass
class StubModel:
    """What the chain encoder reads of a loaded model (rdscale.model.loading.LoadedModel's fields)."""

    spec: StubSpec
    source: str
    sha256: str = DIGEST
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    model: None = None


def load_stub(name: str) -> StubModel:
    return StubModel(StubSpec(name, stub_width(name)), name)


class StubEmbedder:
    """Embedder's interface (embed(sequences) -> per sequence (L_i, width) float32) from lookup tables."""

    def __init__(self, width: int, long_policy: str = "window", window: int = 1022):
        rng = np.random.default_rng(width)  # the same tables in every process: deterministic rows
        self.letter = torch.from_numpy(rng.standard_normal((_LETTERS + 1, width)).astype(np.float32))  # (27, w)
        self.left = torch.from_numpy(0.5 * rng.standard_normal((_LETTERS + 1, width)).astype(np.float32))
        self.freq = torch.from_numpy(rng.uniform(0.01, 0.5, width).astype(np.float32))  # (w,)
        self.long_policy = long_policy
        self.window = window
        self._wave = torch.zeros((0, width))  # (L_max, w) positional term, grown on demand: computed once

    def _positions(self, n: int) -> torch.Tensor:
        if n > len(self._wave):
            pos = torch.arange(max(n, 2 * len(self._wave), 1024), dtype=torch.float32)[:, None]  # (L, 1)
            self._wave = 0.1 * torch.sin(pos * self.freq)
        return self._wave[:n]

    def embed(self, sequences) -> list[torch.Tensor]:
        out = []
        for seq in sequences:
            if self.long_policy == "truncate":
                seq = seq[: self.window]
            codes = np.frombuffer(seq.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) - ord("A")
            codes = torch.from_numpy(np.where((codes >= 0) & (codes < _LETTERS), codes, _LETTERS))  # (L,)
            prev = torch.cat([torch.tensor([_LETTERS]), codes[:-1]])  # (L,) left neighbour, X at the start
            out.append(self.letter[codes] + self.left[prev] + self._positions(len(codes)))  # (L, w)
        return out
