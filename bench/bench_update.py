"""`rdscale update` against a full rerun, as the changed fraction of a release grows (1%, 5%, 20%).

Release A: N random sequences. Release B at fraction f: A with f*N/2 sequences edited (same id, one substitution
or a fresh sequence), f*N/4 records removed and f*N/4 added. For each f, on the same data and in one process:

- full rerun: `embed` of B into a new run with A's fit (what following a database costs without `update`);
- update: a copy of the run of A brought to B with `rdscale update` (compare, embed changed + new, delete, tag).

Reports seconds, residues embedded and the speed-up; writes bench/results/bench_update.json. LocalExecutor: the
ratio is about the work, not Ray's start-up. CPU by default with the tiny family (--widths for larger random
ESM-2 shapes).

    python bench/bench_update.py [--records N] [--widths 32 48 64] [--layers 2 3 4]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import benchkit
import torch
from benchkit import ROOT, timed, torch_machine, write_results

sys.path.insert(0, str(ROOT))

from rdscale.model.loading import build_tiny_family  # noqa: E402
from rdscale.run.executor import LocalExecutor  # noqa: E402
from rdscale.run.pipeline import embed, run  # noqa: E402
from rdscale.run.update import update  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


def seq(rng: random.Random) -> str:
    return "".join(rng.choice(AA) for _ in range(rng.randint(50, 400)))


def write(path: Path, records) -> Path:
    with open(path, "w") as f:
        f.writelines(f">{i} {d}\n{s}\n" for i, d, s in records)
    return path


def release_b(a, fraction: float, rng: random.Random):
    n = len(a)
    k = max(1, round(fraction * n))
    picks = rng.sample(range(n), k)
    changed, removed = set(picks[: k // 2 or 1]), set(picks[k // 2 or 1 : k // 2 + k // 4 + 1])
    b = []
    for j, (i, d, s) in enumerate(a):
        if j in removed:
            continue
        if j in changed:
            s = s[:10] + ("W" if s[10] != "W" else "Y") + s[11:] if j % 2 else seq(rng)
        b.append((i, d, s))
    b += [(f"NEW{j:06d}", "added", seq(rng)) for j in range(max(1, k - len(changed) - len(removed)))]
    return b


def cfg_for(tmp: Path, fasta: Path, models, out: str, **extra):
    return benchkit.cfg_for(tmp, fasta, models, out, **{"fit.sample_sequences": 200, **extra})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400, help="records of release A")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.20])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_update.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-update-"))
    try:
        models = build_tiny_family(tmp / "models", widths=tuple(args.widths), layers=tuple(args.layers))
        a = [(f"UR{j:06d}", f"protein {j}", seq(rng)) for j in range(args.records)]
        fa = write(tmp / "A.fasta", a)
        seconds_a, _ = timed(run, cfg_for(tmp, fa, models, "A"), LocalExecutor(), progress=False)
        rows = []
        for f in args.fractions:
            fb = write(tmp / f"B{f}.fasta", release_b(a, f, rng))
            full = cfg_for(tmp, fb, models, f"full{f}", **{"fit.artifact": str(tmp / "A" / "fit")})
            full_s, summary = timed(embed, full, str(tmp / "A" / "fit"), LocalExecutor(), progress=False)
            shutil.copytree(tmp / "A", tmp / f"upd{f}")
            upd_s, report = timed(update, tmp / f"upd{f}", [str(fb)], f"B{int(f * 100)}pct",
                                  overrides=["ray.address=local"], executor=LocalExecutor(), progress=False)
            rows.append({
                "fraction": f, "unchanged": report.unchanged, "changed": report.changed, "new": report.new,
                "removed": report.removed, "residues_full": summary.residues_embedded,
                "residues_update": report.residues_embedded, "seconds_full": full_s, "seconds_update": upd_s,
                "speedup": full_s / upd_s if upd_s else None,
            })
        print(f"release A: {args.records} records, run in {seconds_a:.1f} s (fit + embed)")
        print(f"{'changed':>8} {'embed+new':>10} {'removed':>8} {'residues full':>14} {'residues upd':>13} "
              f"{'full s':>8} {'update s':>9} {'speed-up':>9}")
        for r in rows:
            print(f"{100 * r['fraction']:>7.0f}% {r['changed'] + r['new']:>10} {r['removed']:>8} "
                  f"{r['residues_full']:>14} {r['residues_update']:>13} {r['seconds_full']:>8.2f} "
                  f"{r['seconds_update']:>9.2f} {r['speedup']:>8.1f}x")
        result = {
            **torch_machine(), "records": args.records, "widths": args.widths,
            "layers": args.layers, "seconds_release_a": seconds_a, "rows": rows,
        }
        write_results(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
