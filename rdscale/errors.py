"""Which exceptions are the user's to fix (bad input, bad config, bad artifact), and their one-line message.

Errors raised inside Ray workers arrive wrapped (RayTaskError, UserCodeException); the CLI unwraps them so a
corrupt FASTA file on a cluster reads the same as on a laptop."""

from __future__ import annotations

_USER_ERROR_NAMES = {
    "FastaFormatError",
    "StoreError",
    "ArtifactError",
    "CheckpointError",
    "UnknownModelError",
    "DeviceError",
    "MomentsError",
    "ChainFitError",
    "EvaluationError",
    "DMSError",
    "ConfigError",
    "SearchError",
    "DMSFormatError",
    "ExtendError",
    "FileNotFoundError",
}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__


def user_facing(err: BaseException) -> str | None:
    """The message to print for an error the user can act on, or None for a bug (show the traceback)."""
    for e in _chain(err):
        for cls in type(e).__mro__:
            if cls.__name__ in _USER_ERROR_NAMES:
                return str(e).strip().splitlines()[-1] if "RayTaskError" in type(e).__name__ else str(e)
    return None
