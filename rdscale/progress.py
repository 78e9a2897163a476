"""Progress reporting for long work: a tqdm bar on a terminal, periodic log lines otherwise (Ray job logs)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

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


# Ray's own notices, harmless for an rdscale run, that would otherwise fill the terminal above the summary.
RAY_NOTICES = (
    "Token authentication is enabled",  # local clusters enable token auth by default
    "Progress bars disabled",  # rdscale draws its own per-shard progress
    "lance is not fork-safe",  # Ray forks its helper processes before any Lance work starts
)


_RERAISED = "An exception was raised from a task of operator"


class _TerminalFilter(logging.Filter):
    """On the terminal: Ray's warnings and errors, except the known notices; everything goes to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ray.data.exceptions") or record.getMessage().startswith(_RERAISED):
            return False  # Ray Data's tracebacks of a task's error: rdscale reports the error itself, in one line
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in RAY_NOTICES)


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


def route_ray_notices(log_file: str | Path) -> Path:
    """Send Ray's INFO lines (execution plans, "Starting execution") and its known notices to `log_file` instead of
    the terminal, so a Ray run's terminal shows rdscale's progress and summary. Call before ray.init."""
    import ray
    import ray.data  # configures the ray.data loggers, which are then filtered below

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.setLevel(logging.INFO)
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_TerminalFilter())
        logger.addHandler(to_file)
    # logged before Ray has a handler of its own (Python's last-resort handler would print it): to the file only
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notices.addHandler(to_file)
    notices.propagate = False
    for notice in RAY_NOTICES:
        warnings.filterwarnings("ignore", message=notice)
    # worker processes inherit the environment: the same warnings stay out of their forwarded output
    extra = ",".join(f"ignore:{n}" for n in RAY_NOTICES)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), extra]))
    ray.data.DataContext.get_current().print_on_execution_start = False
    return log_file
