"""Benchmark the CLI's start-up: wall time of `rdscale --help` and `rdscale VERB --help` (target < 0.2 s each).

Each command runs `--repeat` times as a fresh process (`python -m rdscale ...`, as the `rdscale` script does);
the median is reported. Measured side by side in the same run, as references:

- `python -c pass`: the interpreter's own start-up, the floor no CLI can beat;
- `python -c "import rdscale.search, torch"`: what `--help` cost when every verb's module was imported eagerly.

Prints a table and writes JSON (default bench/results/bench_cli.json). Not a test: timings depend on the machine.

    python bench/bench_cli.py
    python bench/bench_cli.py --repeat 3 --verbs run search
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("extract", "fit", "embed", "run", "config", "info", "make-tiny-family", "index", "search", "eval",
         "extend")
TARGET_S = 0.2


def wall(argv: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--verbs", nargs="+", default=list(VERBS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_cli.json"))
    args = ap.parse_args()

    py = sys.executable
    rows = [("python -c pass (floor)", wall([py, "-c", "pass"], args.repeat), None),
            ("import rdscale.search, torch (eager, before)",
             wall([py, "-c", "import rdscale.search, torch"], args.repeat), None),
            ("rdscale --help", wall([py, "-m", "rdscale", "--help"], args.repeat), TARGET_S)]
    for verb in args.verbs:
        rows.append((f"rdscale {verb} --help", wall([py, "-m", "rdscale", verb, "--help"], args.repeat), TARGET_S))
    floor = rows[0][1]
    print(f"{'command':48} {'median s':>9} {'x floor':>8}  target")
    for name, seconds, target in rows:
        verdict = "" if target is None else ("ok" if seconds < target else f"OVER {target} s")
        print(f"{name:48} {seconds:9.3f} {seconds / floor:8.1f}  {verdict}")
    result = {
        "config": {"repeat": args.repeat, "target_s": TARGET_S, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count()},
        "results": [{"command": n, "median_s": round(s, 4), "x_floor": round(s / floor, 2),
                     "target_s": t, "meets_target": None if t is None else s < t} for n, s, t in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
