"""Checks of a writing verb's chain made before any pass runs (from the checkpoints' configs, no model built), so
a mistake that would otherwise surface after the fit pass (minutes to hours on a real database) stops at once."""

from __future__ import annotations

from collections.abc import Sequence

from rdscale.config import Config, ConfigError


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
        from rdscale.model.loading import resolve_device_dtype

        e = cfg.embedding
        resolve_device_dtype(None if e.device == "auto" else e.device, None if e.dtype == "auto" else e.dtype)
    width = cfg.output.storage_width
    if widths and width is not None and width > widths[-1]:
        raise ConfigError(f"output.storage_width={width} exceeds the embedding width {widths[-1]} of "
                          f"{described[-1]['name']}; use at most {widths[-1]} (or null for the full width)")


# storage.options keys whose values are credentials (Lance's / object_store's names and the clouds' own)
_SECRET_WORDS = ("secret", "token", "password", "account_key", "access_key", "sas", "credential", "private")


def redacted(cfg_dict: dict) -> dict:
    """The config as `rdscale config` prints it: credential values in storage.options shown as '***' (the
    output gets pasted into issues and logs; a run's metadata never records storage at all)."""
    out = dict(cfg_dict)
    storage = dict(out.get("storage") or {})
    options = storage.get("options")
    if isinstance(options, dict):
        storage["options"] = {k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else v
                              for k, v in options.items()}
        out["storage"] = storage
    return out
