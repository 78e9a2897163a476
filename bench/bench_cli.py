"""Benchmark the CLI's start-up: wall time of `rdscale --help` and `rdscale VERB --help` (target < 0.2 s each).

Each command runs `--repeat` times as a fresh process (`python -m rdscale ...`, as the `rdscale` script does);
the median is reported. Measured side by side in the same run, as references:

- `python -c pass`: the interpreter's own start-up, the floor no CLI can beat;
- the verb modules imported eagerly (rdscale.cli.search and with it Lance and the search stack, rdscale.config,
  ...): what `--help` cost before verbs were registered lazily.

Prints a table and writes JSON (default bench/results/bench_cli.json). Not a test: timings depend on the machine.

    python bench/bench_cli.py
    python bench/bench_cli.py --repeat 3 --verbs run search
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("extract", "fit", "embed", "run", "config", "info", "make-tiny-family", "index", "search", "eval",
         "extend", "verify", "compact", "serve")
TARGET_S = 0.2
# what `rdscale --help` imported when every verb module was registered at start-up
EAGER = "import rdscale.config, rdscale.cli.search, rdscale.cli.eval, rdscale.cli.extend"


def wall(argv: list[str], repeat: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of a fresh process. CPU time (user + sys of the child) is the figure that
    survives a busy machine; wall is what the user waits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--verbs", nargs="+", default=list(VERBS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_cli.json"))
    args = ap.parse_args()

    py = sys.executable
    rows = [("python -c pass (floor)", wall([py, "-c", "pass"], args.repeat), None),
            ("eager verb modules (what --help imported before)",
             wall([py, "-c", EAGER], args.repeat), None),
            ("rdscale --help", wall([py, "-m", "rdscale", "--help"], args.repeat), TARGET_S)]
    for verb in args.verbs:
        rows.append((f"rdscale {verb} --help", wall([py, "-m", "rdscale", verb, "--help"], args.repeat), TARGET_S))
    floor = rows[0][1][0]
    print(f"{'command':48} {'wall s':>8} {'cpu s':>7} {'x floor':>8}  target (wall)")
    for name, (seconds, cpu), target in rows:
        verdict = "" if target is None else ("ok" if seconds < target else f"OVER {target} s")
        print(f"{name:48} {seconds:8.3f} {cpu:7.3f} {seconds / floor:8.1f}  {verdict}")
    result = {
        "config": {"repeat": args.repeat, "target_s": TARGET_S, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "results": [{"command": n, "median_wall_s": round(s, 4), "median_cpu_s": round(c, 4),
                     "x_floor": round(s / floor, 2), "target_s": t, "meets_target": None if t is None else s < t}
                    for n, (s, c), t in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
