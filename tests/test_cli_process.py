"""The `rdscale` command's process settings (rdscale/cli/process.py): exit without teardown keeps a normal exit's
effects (exit code, atexit handlers, flushed output, joined non-daemon threads); malloc tuning is switchable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=False)


def test_exit_without_teardown_keeps_code_atexit_and_buffered_output(tmp_path):
    out = tmp_path / "log.txt"
    done = _run(f"""
        import atexit, sys
        from rdscale.cli.process import exit_without_teardown
        log = open({str(out)!r}, "w")
        atexit.register(log.close)  # a handler that flushes a file: it must run
        log.write("written")
        atexit.register(lambda: print("atexit ran"))
        print("buffered", end=" ")
        sys.stderr.write("err")
        exit_without_teardown(3)
        print("never")
    """)
    assert done.returncode == 3
    assert done.stdout == "buffered atexit ran\n"
    assert done.stderr == "err"
    assert out.read_text() == "written"


def test_a_live_non_daemon_thread_gets_the_normal_exit():
    done = _run("""
        import threading, time
        from rdscale.cli.process import exit_without_teardown
        t = threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished")))
        t.start()
        exit_without_teardown(0)
    """)
    assert done.returncode == 0
    assert done.stdout == "thread finished\n"


def test_malloc_tuning_is_switchable():
    code = "from rdscale.cli.process import tune_malloc; print(tune_malloc())"
    expected = "True" if sys.platform == "linux" and _glibc() else "False"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == expected
    assert _run(code, RDSCALE_MALLOC="default").stdout.strip() == "False"
    assert _run(code, MALLOC_ARENA_MAX="2").stdout.strip() == "False"  # the environment's own tuning wins


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
