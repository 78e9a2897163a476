"""Resubmit a `ray job submit` command until the job succeeds, a bounded number of times.

    python jobs/resubmit.py [--retries 3] [--delay 30] -- \
        ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/rdscale_job.py run -c uniref50_cluster

An rdscale job is resumable: submitting the same command again skips the shards already committed, so a job that
died with its driver (the head node or the driver's process lost, a preempted node, an out-of-memory kill) is
finished by resubmitting it. This wrapper does that, waiting `--delay` seconds (doubled each time, at most 10
minutes) between attempts, and stops at once on failures a retry cannot fix:

- exit code 2 of the job's entrypoint: a configuration or usage error (rdscale's own convention);
- the same one-line rdscale error (`rdscale VERB: error: ...`) from two attempts in a row: the job fails the same
  way each time (a run that is not this run's, a storage permission, ...);
- an interrupt of this wrapper (Ctrl-C), which is passed to `ray job submit` (the job goes on in the cluster).

The exit code is the last attempt's: 0 when the job succeeded. The wrapper needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import deque

JOB_EXIT = re.compile(r"failed with exit code (-?\d+)")
RDSCALE_ERROR = re.compile(r"^rdscale [a-z-]+: error: .*$", re.MULTILINE)
NO_RETRY_CODES = {2}  # rdscale's configuration / usage errors
MAX_DELAY = 600.0


def attempt(cmd: list[str]) -> tuple[int, str]:
    """Run the submit command once, its output passed through; returns (exit code, the output's last 200 lines).
    The exit code is the job entrypoint's when `ray job submit` reports one, else the command's own."""
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
        code = proc.wait()
    text = "".join(tail)
    reported = JOB_EXIT.findall(text)
    if code != 0 and reported:
        code = int(reported[-1])
    return code, text


def permanent(code: int, text: str, previous_error: str | None) -> str | None:
    """Why a retry cannot help, or None."""
    if code in NO_RETRY_CODES:
        return f"exit code {code}: a configuration or usage error"
    errors = RDSCALE_ERROR.findall(text)
    if errors and previous_error is not None and errors[-1] == previous_error:
        return "the same error twice in a row"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resubmit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--retries", type=int, default=3, help="resubmissions after the first attempt (default 3)")
    parser.add_argument("--delay", type=float, default=30.0, help="seconds before the first resubmission, doubled "
                        "each time (default 30)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the submit command, after --")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the submit command after --, e.g. -- ray job submit ... -- python jobs/rdscale_job.py run")
    if args.retries < 0 or args.delay < 0:
        parser.error("--retries and --delay must not be negative")
    delay, previous_error = args.delay, None
    for n in range(args.retries + 1):
        try:
            code, text = attempt(cmd)
        except KeyboardInterrupt:
            print("resubmit: interrupted; the job may still run in the cluster (`ray job list`)", file=sys.stderr)
            return 130
        except OSError as err:
            print(f"resubmit: error: cannot run {cmd[0]}: {err.strerror or err}", file=sys.stderr)
            return 127
        if code == 0:
            return 0
        why = permanent(code, text, previous_error)
        if why:
            print(f"resubmit: not resubmitting ({why}); exit code {code}", file=sys.stderr)
            return code
        errors = RDSCALE_ERROR.findall(text)
        previous_error = errors[-1] if errors else None
        if n == args.retries:
            print(f"resubmit: the job failed {n + 1} time(s); giving up (exit code {code})", file=sys.stderr)
            return code
        print(f"resubmit: attempt {n + 1} failed (exit code {code}); resubmitting in {delay:.0f} s "
              "(committed shards are kept)", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(MAX_DELAY, delay * 2)
    return 1


if __name__ == "__main__":
    sys.exit(main())
