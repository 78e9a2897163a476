"""Process-level settings of the `rdscale` command (not of rdscale used as a library): the C allocator's
thresholds at start, and an exit without the interpreter's teardown at the end.

Why: a short CPU extract spent about a tenth of its time outside the forward in these two places. glibc's
allocator starts out returning freed blocks above 128 KiB to the kernel and adapts its thresholds as it goes;
with the forward's many tensors of a few MiB, freed by the writer thread, it kept unmapping and the kernel kept
zeroing fresh pages (0.4-0.8 M page faults, 1-1.3 s of system time for 39 k residues; 0.1 M and 0.4 s with the
thresholds fixed, bench/bench_extract.py). And tearing torch, Arrow and Lance down at exit took about 0.4 s.
"""

from __future__ import annotations

import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB come from the heap (glibc's largest accepted value)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse instead of returning it to the kernel


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds (True when set). No-op elsewhere (macOS, musl), when the environment
    already tunes malloc (GLIBC_TUNABLES, MALLOC_*_ environment variables), or with RDSCALE_MALLOC=default."""
    if sys.platform != "linux" or os.environ.get("RDSCALE_MALLOC") == "default":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def exit_without_teardown(code: int) -> None:
    """End the process once the verb has returned, skipping the interpreter's teardown of torch, Arrow and Lance.
    Everything a verb writes is closed and committed before it returns; what a normal exit would still do is done
    here: a live non-daemon thread means a normal exit (which joins it), atexit handlers run (logging, Ray,
    temporary files), stdout/stderr are flushed. RDSCALE_NORMAL_EXIT=1 keeps the normal exit."""
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if others or os.environ.get("RDSCALE_NORMAL_EXIT") == "1":
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`rdscale ... | head`): nothing left to deliver
            pass
    os._exit(code if isinstance(code, int) else 1)
