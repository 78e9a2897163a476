"""Checks a writing verb makes before any pass runs: its output locations can be written, and its chain and layer
fit the checkpoints (read from their configs, no model built), so a mistake that would otherwise surface after the
fit pass (minutes to hours on a real database) stops at once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rdscale.cli.args import check_output_location
from rdscale.config import Config, ConfigError
from rdscale.io.location import set_storage_options
from rdscale.model.loading import describe_model, resolve_device_dtype


def check_chain(cfg: Config, described: Sequence[dict]) -> None:
    """`described`: describe_model() of each of cfg.models, in order. Widths must strictly grow (the chain is
    smallest first); output.storage_width must not exceed the widest model's width."""
    widths = [int(d["width"]) for d in described]
    for i in range(1, len(widths)):
        if widths[i] <= widths[i - 1]:
            names = ", ".join(f"{d['name']} ({d['width']})" for d in described)
            raise ConfigError(f"models must be ordered smallest first with strictly growing widths; got {names}: "
                              f"model {i + 1} ({widths[i]}) is not wider than model {i} ({widths[i - 1]})")
    if cfg.ray.address == "local" and (cfg.embedding.device != "auto" or cfg.embedding.dtype != "auto"):
        # in this process: the device and dtype must work here (on a Ray cluster the workers' devices count, and
        # the driver may have no GPU at all)
        e = cfg.embedding
        resolve_device_dtype(None if e.device == "auto" else e.device, None if e.dtype == "auto" else e.dtype)
    width = cfg.output.storage_width
    if widths and width is not None and width > widths[-1]:
        raise ConfigError(f"output.storage_width={width} exceeds the embedding width {widths[-1]} of "
                          f"{described[-1]['name']}; use at most {widths[-1]} (or null for the full width)")


def check_outputs(args: argparse.Namespace, cfg: Config) -> tuple[list[str], list[Path]]:
    """Before any pass starts: every location the verb will write (by `cfg`, the verb's loaded config) can be
    written. Returns those locations and the directories among them that did not exist yet, so that a failed
    command leaves no half-made output directory behind."""
    set_storage_options(cfg.storage.options)  # the checks below may read checkpoints on an object store
    targets = [cfg.output.dir]
    if getattr(args, "fit", None) and args.verb == "fit":
        targets.append(args.fit)
    _check_layer(cfg)
    fresh = []
    for target in targets:
        check_output_location(target)
        if "://" not in str(target) and not Path(target).exists():
            fresh.append(Path(target))
    return [str(t) for t in targets], fresh


def _check_layer(cfg: Config) -> None:
    """embedding.layer against each model's depth, from the checkpoint's config (no model is built)."""
    if not cfg.models:
        return
    layer = cfg.embedding.layer
    described = []
    for model in cfg.models:
        described.append(describe_model(model))
        layers = described[-1]["layers"]
        if not -(layers + 1) <= layer <= layers:
            raise ConfigError(f"embedding.layer must be in [{-(layers + 1)}, {layers}] for {model} ({layers} "
                              f"layers; 0 = token embeddings, -1 = last), got {layer}")
    check_chain(cfg, described)
