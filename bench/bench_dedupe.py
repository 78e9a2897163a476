"""Identical sequences embedded once (input.dedupe_sequences) against embedding every record, as the fraction of
repeated sequences grows (0%, 10%, 30%), and the cost of the grouping pass on its own.

For each fraction f, on the same input and in one process (LocalExecutor: the ratio is about the work):
- `embed` of N records (per-protein output) with dedupe off, then on; seconds, residues through the models,
  speed-up, and that both runs hold the same rows;
- the grouping pass alone (`plan_duplicates`) on a larger input: records/s and MB/s of FASTA, its share of a run.

CPU by default with a random ESM-2 of the 8M shape (6 layers, width 320). Writes bench/results/bench_dedupe.json.

    python bench/bench_dedupe.py [--records 600] [--pass-records 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rdscale.config import load_config  # noqa: E402
from rdscale.io.fasta import ValidationOptions  # noqa: E402
from rdscale.io.runs import Run  # noqa: E402
from rdscale.model.loading import build_tiny_family  # noqa: E402
from rdscale.run.dedupe import plan_duplicates  # noqa: E402
from rdscale.run.executor import LocalExecutor  # noqa: E402
from rdscale.run.pipeline import embed, plan  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


def records(n: int, repeated: float, rng: random.Random, lo: int = 50, hi: int = 400):
    """n records of which a fraction `repeated` reuse an earlier record's sequence."""
    out = []
    for i in range(n):
        if out and rng.random() < repeated:
            seq = rng.choice(out)[1]
        else:
            seq = "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi)))
        out.append((f"UP{i:07d}", seq))
    return out


def write(path: Path, items) -> Path:
    with open(path, "w") as f:
        f.writelines(f">{i} protein {i}\n{s}\n" for i, s in items)
    return path


def cfg_for(fasta: Path, model: Path, out: Path, dedupe: bool):
    return load_config(None, [f"input.paths=[{fasta}]", f"models=[{model}]", f"output.dir={out}",
                              "output.residues=false", f"input.dedupe_sequences={str(dedupe).lower()}",
                              "input.shard_mb=0.05", "ray.address=local", "embedding.toks_per_batch=4096"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--pass-records", type=int, default=200_000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_dedupe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedupe-"))
    model = build_tiny_family(tmp / "model", widths=(320,), layers=(6,), heads=20, seed=0)[0]
    rows = []
    load_before = os.getloadavg()
    warm = write(tmp / "warm.fasta", records(20, 0.0, random.Random(1)))
    embed(cfg_for(warm, model, tmp / "warm", False), executor=LocalExecutor(), progress=False)  # first-call costs
    for f in args.fractions:
        fasta = write(tmp / f"in_{f}.fasta", records(args.records, f, random.Random(7)))
        row = {"repeated_fraction": f, "records": args.records, "reps": args.reps}
        for rep in range(args.reps):
            for dedupe in ((False, True) if rep % 2 == 0 else (True, False)):  # alternate: load drifts
                out = tmp / f"run_{f}_{dedupe}"
                if out.exists():
                    shutil.rmtree(out)
                started = time.perf_counter()
                summary = embed(cfg_for(fasta, model, out, dedupe), executor=LocalExecutor(), progress=False)
                seconds = time.perf_counter() - started
                tag = "once" if dedupe else "every"
                row[f"seconds_{tag}"] = min(seconds, row.get(f"seconds_{tag}", seconds))
                row[f"residues_forwarded_{tag}"] = summary.residues_embedded
                row[f"copies_{tag}"] = summary.copies
        tables = [Run(str(tmp / f"run_{f}_{d}")).dataset("proteins").to_table(
            columns=["id", "embedding"]).sort_by("id") for d in (False, True)]
        row["same_rows"] = tables[0]["id"].equals(tables[1]["id"])
        row["max_abs_diff"] = float(np.max(np.abs(
            np.asarray(tables[0]["embedding"].combine_chunks().flatten())
            - np.asarray(tables[1]["embedding"].combine_chunks().flatten()))))
        row["speedup"] = row["seconds_every"] / row["seconds_once"]
        row["work_ratio"] = row["residues_forwarded_every"] / row["residues_forwarded_once"]
        rows.append(row)
        print(f"repeated {f:4.0%}: every {row['seconds_every']:6.1f} s ({row['residues_forwarded_every']:,} res)   "
              f"once {row['seconds_once']:6.1f} s ({row['residues_forwarded_once']:,} res, "
              f"{row['copies_once']} copies)   speed-up {row['speedup']:.2f}x   same rows {row['same_rows']}")
    # the grouping pass alone, on a larger input with 10% repeats
    big = write(tmp / "big.fasta", records(args.pass_records, 0.1, random.Random(3), 50, 400))
    shards = plan(cfg_for(big, model, tmp / "unused", True))
    started = time.perf_counter()
    found = plan_duplicates(shards, ValidationOptions())
    pass_s = time.perf_counter() - started
    size = big.stat().st_size
    grouping = {"records": args.pass_records, "bytes": size, "seconds": pass_s,
                "records_per_s": args.pass_records / pass_s, "mb_per_s": size / pass_s / 1e6,
                "copies": found.copies}
    first = rows[0]
    residues_per_s = first["residues_forwarded_every"] / first["seconds_every"]
    avg_len = 225
    # share of a run: the pass's time per record against the forward's time per record of this model
    grouping["share_of_run_8M_cpu"] = (1 / grouping["records_per_s"]) / (avg_len / residues_per_s)
    print(f"grouping pass: {grouping['records_per_s']:,.0f} records/s ({grouping['mb_per_s']:.1f} MB/s), "
          f"{100 * grouping['share_of_run_8M_cpu']:.2f}% of an 8M-shape CPU run's time per record")
    result = {
        "benchmark": "bench_dedupe", "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "threads": 1, "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "model": {"layers": 6, "width": 320, "heads": 20, "weights": "random (build_tiny_family, seed 0)"},
        "note": "per-protein output; LocalExecutor; seconds (best of reps, the two modes alternating) include the "
                "grouping pass for the dedupe runs; ratios measured side by side in one run on a shared 2-core "
                "machine; work_ratio = residues through the models without / with deduplication",
        "rows": rows, "grouping_pass": grouping,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
