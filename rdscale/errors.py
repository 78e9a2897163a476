"""The error contract: every exception meant for a user derives from `RdscaleError`, and the CLI prints it as one
line (naming the file, key, id or location at fault and what to do); `-v` shows the traceback.

Module-specific errors (ConfigError, FastaFormatError, StoreError, ...) subclass `RdscaleError` and, for
compatibility with callers that catch built-in types, ValueError or RuntimeError as well.

Errors raised inside Ray workers arrive wrapped (RayTaskError, UserCodeException); the CLI unwraps them so a
corrupt FASTA file on a cluster reads the same as on a laptop."""

from __future__ import annotations


class RdscaleError(Exception):
    """An error the user can act on: bad input, config, location, artifact or run. Its message is one line."""


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__


def user_facing(err: BaseException) -> str | None:
    """The message to print for an error the user can act on, or None for a bug (show the traceback)."""
    for e in _chain(err):
        if isinstance(e, (RdscaleError, FileNotFoundError)):
            text = str(e).strip()
            return text.splitlines()[-1] if "RayTaskError" in type(e).__name__ else text
    return None
