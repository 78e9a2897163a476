"""Argument helpers every verb shares, so the CLI reads the same everywhere: the positional RUN of the verbs that
read an existing run (`-o/--out` kept as an alias), one spelling `--fit` for a fit artifact (older spellings kept
as hidden aliases), the global flags `-v`/`-q` accepted before or after the verb, and the check that an output
location can be written before any pass starts.

Imports nothing heavy: `rdscale --help` must not pay for Lance, torch or Ray."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from rdscale.cluster.progress import route_ray_notices
from rdscale.errors import RdscaleError

log = logging.getLogger("rdscale")


class OutputLocationError(RdscaleError, ValueError):
    """An output location that cannot be written (a file, read-only, no permission)."""


def add_run_argument(p: argparse.ArgumentParser, help: str = "run directory (as written by `rdscale run`)") -> None:
    """The positional RUN of a verb that reads an existing run; `-o/--out RUN` is the older spelling."""
    p.add_argument("run", nargs="?", metavar="RUN", help=help)
    p.add_argument("-o", "--out", dest="run_option", metavar="RUN", help="same as RUN (older spelling)")
    p.set_defaults(_takes_run=True)


def resolve_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """args.out := RUN (positional or -o); exactly one, or both the same."""
    if not getattr(args, "_takes_run", False):
        return
    positional, option = args.run, args.run_option
    if positional and option and Path(positional) != Path(option):
        parser.error(f"two runs given: RUN {positional!r} and -o {option!r}; give one")
    run = positional or option
    if not run:
        parser.error(f"rdscale {args.verb}: the run directory RUN is required (e.g. rdscale {args.verb} runs/demo)")
    args.out = run


def add_fit_argument(p: argparse.ArgumentParser, help: str, *aliases: str) -> None:
    """`--fit DIR`, the one spelling of "a fit artifact" in every verb; `aliases` (e.g. --fit-out) stay accepted
    but are not shown in --help."""
    p.add_argument("--fit", metavar="DIR", help=help)
    for alias in aliases:
        p.add_argument(alias, dest="fit", metavar="DIR", help=argparse.SUPPRESS)


GLOBAL_FLAGS = (
    (("-v", "--verbose"), "debug logging; tracebacks for errors"),
    (("-q", "--quiet"), "no progress bars"),
)


def add_global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q on the top-level parser (default False) and on every verb (default: leave the top-level value), so
    they work before or after the verb."""
    for flags, text in GLOBAL_FLAGS:
        free = [f for f in flags if f not in p._option_string_actions]
        if free:
            p.add_argument(*free, dest=flags[1].lstrip("-"), action="store_true",
                           default=False if top else argparse.SUPPRESS, help=text)


def add_global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """Every (sub-)subparser below `parser` gets -v/-q."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for sub in action.choices.values():
                if id(sub) in seen or not sub.add_help:  # placeholders of verbs not built are never parsed
                    continue
                seen.add(id(sub))
                add_global_flags(sub, top=False)
                add_global_flags_everywhere(sub)


def _is_uri(location: str) -> bool:
    return "://" in location


def check_output_location(location: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse, before any work starts, an output location that is a file or cannot be written; creates nothing."""
    text = str(location)
    if _is_uri(text):  # object stores are checked by their own client when the first table is written
        return
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OutputLocationError(f"{what} {path} exists and is not a directory; choose another location")
        probe = path
    else:
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise OutputLocationError(f"{what} {path} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if _read_only(probe) else "is not writable by this user"
        raise OutputLocationError(f"{what} {path} cannot be written: {probe} {reason}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def quiet_ray(args: argparse.Namespace, uses_ray: bool) -> None:
    """A Ray run's terminal shows rdscale's progress and summary; Ray's own notices go to a log file (-v: both).
    uses_ray: whether the verb will start Ray."""
    if args.verbose or not uses_ray:
        return
    path = Path(tempfile.gettempdir()) / f"rdscale-{args.verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.info("Ray's own messages: %s", route_ray_notices(path))
