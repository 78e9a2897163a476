"""Provenance and cost of a run's shards: what wrote each ledger row (host, device, software, dtype) and how long
its embedding took on that device, and what a reader makes of them (residues/s, device-hours, an ETA, a warning
when a resumed run or an update writes with other software or another device type than the table's).

bf16 numerics differ across GPU generations and library versions: rows written months apart by different stacks
are not bit-comparable, so such a change is worth one line, never a refusal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch

from rdscale import __version__
from rdscale.io.lease import this_host

# Ledger columns (strings) naming what wrote a shard's rows; `seconds` (float64, the actors' time on the shard,
# summed: device-seconds) and `committed_at` (float64, Unix time of the commit) follow them in the ledger.
FIELDS = ("host", "device", "cuda", "torch", "esm", "rdscale", "dtype")
SOFTWARE = ("cuda", "torch", "esm", "rdscale")  # a change here (or in the device type) is warned about


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def collect(device_name: str, dtype: torch.dtype) -> dict[str, str]:
    """This process's provenance, for an actor whose models run on `device_name` in `dtype`."""
    return {
        "host": this_host(),  # RDSCALE_LEASE_HOST when set: nodes that share a host name each set their own
        "device": device_name,
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "esm": _version("fair-esm"),
        "rdscale": __version__,
        "dtype": str(dtype).removeprefix("torch."),
    }


def ledger_values(provenance: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The provenance columns of one ledger row (commit_shard's fingerprint entries)."""
    return {**{k: provenance.get(k) or None for k in FIELDS}, "seconds": float(seconds), "committed_at": time.time()}


def recorded(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The provenance of the most recent ledger row that has one (None: an old run without these columns)."""
    rows = [r for r in rows if r.get("device") or r.get("torch")]
    if not rows:
        return None
    return max(rows, key=lambda r: r.get("committed_at") or 0.0)


def change(before: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """One line naming what differs between the stack that wrote the table and this one, or None."""
    if before is None or not now:
        return None
    diffs = [f"{k} {before.get(k) or '?'} -> {now.get(k) or '?'}" for k in ("device", *SOFTWARE)
             if (before.get(k) or "") != (now.get(k) or "")]
    if not diffs:
        return None
    return ("this table was written by another device type or software (" + ", ".join(diffs) + "); the new rows' "
            "numbers may differ from the old ones' in the last bits (bf16 differs across GPUs and library versions)")


def cost(rows: Sequence[dict[str, Any]], planned: int | None) -> dict[str, Any]:
    """From ledger rows: residues embedded per device-second, device-hours so far, and an ETA (seconds) from the
    recent commit rate for the shards still to do (None when it cannot be told)."""
    timed = [r for r in rows if r.get("seconds") is not None]
    seconds = sum(float(r["seconds"]) for r in timed)
    residues = sum(int(r.get("residues") or 0) for r in timed)
    out: dict[str, Any] = {"device_hours": seconds / 3600.0, "residues_per_s": residues / seconds if seconds else None,
                           "timed_shards": len(timed), "eta_s": None}
    remaining = (planned - len(rows)) if planned is not None else 0
    # The commit rate of the latest stretch of commits (up to 50): how fast the fleet that runs now goes.
    times = sorted(float(r["committed_at"]) for r in rows if r.get("committed_at"))[-50:]
    if remaining > 0 and len(times) >= 2 and times[-1] > times[0]:
        out["eta_s"] = remaining * (times[-1] - times[0]) / (len(times) - 1)
    if remaining > 0 and timed:
        out["device_hours_left"] = remaining * seconds / len(timed) / 3600.0
    return out


def cost_lines(rows: Sequence[dict[str, Any]], planned: int | None) -> list[str]:
    """`rdscale info`'s lines about throughput and cost (none for an old run without timed rows)."""
    c = cost(rows, planned)
    if not c["timed_shards"]:
        return []
    lines = [f"device time: {c['device_hours']:.3f} device-hours over {c['timed_shards']} shard(s)"
             + (f", {c['residues_per_s']:,.0f} residues/s per device" if c["residues_per_s"] else "")]
    if "device_hours_left" in c:
        eta = f"ETA {_duration(c['eta_s'])} at the recent commit rate; " if c["eta_s"] is not None else ""
        lines.append(f"remaining: {planned - len(rows)} shard(s), {eta}about {c['device_hours_left']:.3f} "
                     "device-hours more")
    stacks = sorted({(r.get("device") or "?", r.get("dtype") or "?") for r in rows if r.get("device")})
    if stacks:
        lines.append("written on: " + ", ".join(f"{d} ({t})" for d, t in stacks))
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ChangeWatch:
    """Warns once (one log line) when the first result of a resumed run or an update comes from another device type
    or software than the table's latest recorded rows."""

    def __init__(self, ledger_rows: Sequence[dict[str, Any]], log):
        self.before = recorded(ledger_rows)
        self.log = log
        self.done = self.before is None

    def see(self, provenance: dict[str, Any]) -> str | None:
        if self.done or not provenance:
            return None
        self.done = True
        message = change(self.before, provenance)
        if message:
            self.log.warning("%s", message)
        return message
