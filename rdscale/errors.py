"""The error contract: every exception meant for a user derives from `RdscaleError`, and the CLI prints it as one
line (naming the file, key, id or location at fault and what to do); `-v` shows the traceback.

Module-specific errors (ConfigError, FastaFormatError, StoreError, ...) subclass `RdscaleError` and, for
compatibility with callers that catch built-in types, ValueError or RuntimeError as well.

Errors raised inside Ray workers arrive wrapped (RayTaskError, UserCodeException); the CLI unwraps them so a
corrupt FASTA file on a cluster reads the same as on a laptop."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class RdscaleError(Exception):
    """An error the user can act on: bad input, config, location, artifact or run. Its message is one line."""


# The errors below are raised by more than one layer; each lives here, the bottom of the import graph, so that the
# modules raising it never import one another for it.


class ConfigError(RdscaleError, ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""


class FastaFormatError(RdscaleError, ValueError):
    """The input is not FASTA or its compressed stream is damaged; names the file and where it broke (raised by the
    FASTA reader, rdscale.io.fasta, and by the gzip seek-point index, rdscale.io.gzindex)."""

    def __init__(self, path: str | os.PathLike, where: str, detail: str):
        self.path = str(path)
        self.where = where
        self.detail = detail
        super().__init__(f"{self.path}: {detail} (at {where})")

    def __reduce__(self):  # raised in Ray workers: rebuilt on the driver from the same three parts
        return (type(self), (self.path, self.where, self.detail))


def error_chain(err: BaseException):
    """`err`, then what caused it (a Ray error's `cause`, `__cause__`, `__context__`), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__


# OS errors a user causes by where they point rdscale (not bugs): named path + what to do.
_OS_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long",
}
# Arrow and Lance re-raise OS failures as OSError subclasses without an errno; their text still says which.
_OS_TEXTS = {
    "No space left on device": "no space left on device",
    "Read-only file system": "read-only file system",
    "Permission denied": "permission denied",
    "Disk quota exceeded": "disk quota exceeded",
}


_MISSING_TABLE_FILE = re.compile(r"Not found: (\S+?\.lance)\b")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (Lance, safetensors) report an errno
_HINTS = {
    errno.EACCES: "check its permissions or choose another location",
    errno.EPERM: "check its permissions or choose another location",
    errno.EROFS: "choose a writable location",
    errno.ENOSPC: "free space or choose another location; rerun the same command to resume",
    errno.EDQUOT: "free space or choose another location; rerun the same command to resume",
}


def _os_message(err: BaseException, where: str | None = None) -> str | None:
    """One line for an OS failure the user caused: an OSError with an errno, or any library error whose text
    carries one ("(os error 28)", "No space left on device"). `where`: the location being written, named when
    the error itself names no path."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err)
    if code is None:
        rust = _RUST_OS_ERROR.search(text)
        code = int(rust.group(1)) if rust else None
    reason = _OS_REASONS.get(code) if code is not None else None
    if reason is None:
        reason = next((why for marker, why in _OS_TEXTS.items() if marker in text), None)
        if reason is None or not isinstance(err, OSError) and code is None:
            return None
    path = getattr(err, "filename", None)
    if path is not None:
        place = f"{path}: "
        if getattr(err, "filename2", None) is not None:
            place = f"{path} -> {err.filename2}: "
    elif where:
        place = f"writing {where}: "
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
        place = f"{first}: " if reason.lower() not in first.lower() else ""
    hint = _HINTS.get(code) or next((h for c, h in _HINTS.items() if _OS_REASONS[c] == reason), None)
    return f"{place}{reason}" + (f" ({hint})" if hint else "")


_WRITE_PROBLEMS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def write_problem(err: BaseException, where: str | Path) -> str | None:
    """One line for a failure to write `where` that the user can fix (disk full, quota, permissions, read-only),
    found anywhere in the cause chain (also inside Ray's wrappers); None for anything else."""
    for e in error_chain(err):
        code = getattr(e, "errno", None)
        if code is None:
            rust = _RUST_OS_ERROR.search(str(e))
            code = int(rust.group(1)) if rust else None
        if code is None:
            code = next((c for c in _WRITE_PROBLEMS if _OS_REASONS[c] in str(e).lower()), None)
        if code in _WRITE_PROBLEMS:
            return f"writing {where}: {_OS_REASONS[code]} ({_HINTS[code]})"
    return None


# How a remote traceback names one of rdscale's errors: "rdscale.model.loading.CheckpointError: <message>"
_REMOTE_ERROR = re.compile(r"^(?:\S*\) )?(rdscale(?:\.\w+)+)\.(\w+): (.*)$")


def _remote_rdscale_error(err: BaseException) -> tuple[type, str] | None:
    """(class, message) of an rdscale error that reached the driver as text only: Ray Data wraps an error of a
    map_batches actor as RayTaskError(UserCodeException) whose cause, the UserCodeException, lost its own
    __cause__ on the way (only the remote traceback's text names it)."""
    import importlib

    for e in error_chain(err):
        if not type(e).__module__.startswith("ray."):
            continue
        found = None
        lines = str(e).splitlines()
        for i, line in enumerate(lines):
            match = _REMOTE_ERROR.match(line.strip())
            if not match:
                continue
            try:
                cls = getattr(importlib.import_module(match.group(1)), match.group(2))
            except (ImportError, AttributeError):
                continue
            if isinstance(cls, type) and issubclass(cls, RdscaleError):
                rest = [ln for ln in lines[i + 1:i + 3] if ln.startswith(("\t", "  ")) and ln.strip()
                        and not ln.strip().startswith(("File ", "^"))]
                found = (cls, " ".join([match.group(3).strip(), *(ln.strip() for ln in rest)]))
        if found:  # the last one named: the innermost, where the remote traceback ends
            return found
    return None


def user_facing(err: BaseException, where: str | None = None) -> str | None:
    """The message to print for an error the user can act on, or None for a bug (show the traceback).
    `where`: the output location the command writes, named in OS errors that name no path themselves."""
    ours = [e for e in error_chain(err) if isinstance(e, RdscaleError)]
    if not ours:
        remote = _remote_rdscale_error(err)
        if remote is not None:
            return _one_line(remote[1])
    if ours:
        # Not Ray's wrappers: Ray re-raises a worker's error as a RayTaskError subclass of it (and Ray Data wraps
        # that again) whose text is a traceback; the outermost of rdscale's own errors says the most.
        plain = [e for e in ours if "RayTaskError" not in type(e).__name__]
        if plain:
            return _one_line(str(plain[0]).strip())
        text = str(ours[-1]).strip()
        return _one_line(text.splitlines()[-1])
    for e in error_chain(err):  # Lance (as OSError or ArrowInvalid): a data file its manifest lists is gone
        missing = _MISSING_TABLE_FILE.search(str(e))
        if missing:
            return (f"/{missing.group(1).lstrip('/')} is missing: the table is damaged (a file deleted or "
                    "half-copied); restore it, or run again into a new output directory")
    for e in error_chain(err):  # an OS error the user caused, only if no RdscaleError explains it better
        if isinstance(e, FileNotFoundError) and e.errno is None:  # raised by rdscale with its own message
            return _one_line(str(e))
        message = _os_message(e, where)
        if message is not None:
            return _one_line(message)
    return None


def exit_code(err: BaseException) -> int:
    """2 for a configuration or usage error, 1 for any other user error."""
    if any(isinstance(e, ConfigError) for e in error_chain(err)):
        return 2
    remote = None if any(isinstance(e, RdscaleError) for e in error_chain(err)) else _remote_rdscale_error(err)
    return 2 if remote is not None and issubclass(remote[0], ConfigError) else 1


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."
