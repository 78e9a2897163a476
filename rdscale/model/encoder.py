"""The chain's models resident on one device (`ChainEncoder`): sequences -> per-model embeddings, or the
per-residue concatenation [h_1, ..., h_m] the fit's moments are taken over. Used by every pass that runs a model
(fit, apply, extend, query embedding)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from rdscale.config import Config
from rdscale.model.embed import Embedder
from rdscale.model.fast_esm import device_budget, model_budgets
from rdscale.model import loading  # looked up per call: tests count the models a pass loads
from rdscale.model.stub import StubEmbedder

log = logging.getLogger(__name__)


def device_properties(device: torch.device) -> tuple[str, int | None]:
    """(name, total memory in bytes or None) of a torch device: the GPU's own name ("NVIDIA H100 80GB HBM3") on
    CUDA, "cpu" (memory unknown: a CPU's budget is not a memory question) otherwise."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    return device.type, None


class ChainEncoder:
    """The chain's models, loaded once, on one device. `models` smallest first."""

    def __init__(self, models: Sequence[str], cfg: Config):
        e = cfg.embedding
        device = None if e.device == "auto" else e.device
        dtype = None if e.dtype == "auto" else e.dtype
        self.loaded = [loading.load_model(m, device=device, dtype=dtype) for m in models]
        self.device_name, memory = device_properties(self.loaded[0].device)
        weights = sum(p.numel() * p.element_size() for lm in self.loaded if lm.model is not None  # stubs: none
                      for p in lm.model.parameters())
        self.toks_per_batch = device_budget(self.device_name, memory, e.toks_per_batch, e.toks_per_batch_by_device,
                                            e.toks_per_gib, weights)
        if self.toks_per_batch != e.toks_per_batch:
            log.info("token budget %d on %s (embedding.toks_per_batch_by_device / toks_per_gib)",
                     self.toks_per_batch, self.device_name)
        self.budgets = model_budgets(self.toks_per_batch, [lm.spec.width for lm in self.loaded],
                                     e.toks_per_batch_per_model)
        self.embedders = [
            StubEmbedder(lm.spec.width, e.long_policy, e.window) if lm.model is None else Embedder(
                lm, layer=e.layer, toks_per_batch=budget, long_policy=e.long_policy,
                window=e.window, overlap=e.overlap, forward=e.forward, fast_attention=e.attention,
                compile=e.compile,
            )
            for lm, budget in zip(self.loaded, self.budgets)
        ]
        # Apply-stage chunk: the largest budget, so every model runs its own full batches on it.
        self.chunk_tokens = max(self.budgets)
        self.window = e.window
        self.long_policy = e.long_policy
        self.widths = [lm.spec.width for lm in self.loaded]

    @property
    def device(self) -> torch.device:
        return self.loaded[0].device

    def model_info(self) -> list[dict[str, Any]]:
        return [
            {"name": lm.spec.name, "source": lm.source, "width": lm.spec.width, "sha256": lm.sha256,
             "layers": lm.spec.layers}
            for lm in self.loaded
        ]

    def too_long(self, sequence: str) -> bool:
        return self.long_policy == "reject" and len(sequence) > self.window

    def blocks(self, sequences: Sequence[str]) -> list[list[torch.Tensor]]:
        """-> per sequence, per model: (L, k_i) float32 (float64 when the models run in float64) on the device."""
        per_model = [emb.embed(sequences) for emb in self.embedders]  # [model][seq] (L, k_i)
        dtype = torch.float64 if self.loaded[0].dtype == torch.float64 else torch.float32
        return [[per_model[m][s].to(dtype) for m in range(len(per_model))] for s in range(len(sequences))]

    def concatenated(self, sequences: Sequence[str]) -> torch.Tensor:
        """-> x: (sum L, K) float32 on the device, the per-residue concatenation [h_1, ..., h_m]."""
        return torch.cat([torch.cat(b, dim=1) for b in self.blocks(sequences)], dim=0)
