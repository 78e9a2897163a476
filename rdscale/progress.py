"""Progress reporting for long work: a tqdm bar on a terminal, periodic log lines otherwise (Ray job logs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rdscale.progress")


class Progress:
    def __init__(self, total: int, unit: str, desc: str, enabled: bool = True, log_every_s: float = 30.0):
        self.total, self.unit, self.desc = total, unit, desc
        self.done = 0
        self.fields: dict[str, int] = {}
        self._bar = None
        self._last_log = time.monotonic()
        self._log_every = log_every_s
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._log()

    def postfix(self, **fields: int) -> None:
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:,}" for k, v in fields.items()}, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_log >= self._log_every:
            self._log()

    def _log(self) -> None:
        self._last_log = time.monotonic()
        extra = " ".join(f"{k}={v:,}" for k, v in self.fields.items())
        log.info("%s: %d/%d %ss %s", self.desc, self.done, self.total, self.unit, extra)
