"""Ray's own log lines on a Ray run's terminal: routed to a log file, so that the terminal shows rdscale's progress
and summary (rdscale.progress draws those). Lives in cluster/ because it configures Ray's loggers."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

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
