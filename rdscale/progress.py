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
        self._closed = False
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the error is reported on its own, without a count line after it
            self._closed = True
        self.close()

    def close(self) -> None:
        """Ends the bar (or logs the final count); closing twice is harmless."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and not self._closed:
            self._log()
        self._closed = True

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
        extra = "".join(f" {k}={v:,}" for k, v in self.fields.items())
        log.info("%s: %d/%d %ss%s", self.desc, self.done, self.total, self.unit, extra)


# Libraries whose routine INFO lines say nothing a user acts on: botocore (where it found credentials and the
# endpoint, on every S3 writer lease), pylance (index build timings; lance.log resets the logger's own level when
# lance is imported, so a level set before that import does not hold: a handler filter does).
_CHATTY_LIBRARIES = ("botocore", "pylance")


class _LibraryInfoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] not in _CHATTY_LIBRARIES


def quiet_library_logs() -> None:
    """Keep the INFO lines of chatty libraries off the terminal (warnings and errors still show); without -v."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryInfoFilter())
