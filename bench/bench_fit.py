"""Benchmark the one-pass chain fit (rdscale.moments + rdscale.chain) against the in-memory reference.

For each chain family and number of residues L, on synthetic correlated chain embeddings drawn chunk by chunk from
one fixed latent model (tests/reference_rd.SyntheticChain: the same rows whatever the chunking):

- one-pass: Moments.update over batches of `--batch` rows, then fit_chain. It never holds more than one batch of
  residues; memory is O(K^2 + batch K).
- reference: tests/reference_rd.reference_fit, which stacks all L residues (float64) and takes full SVDs, as the
  authors' code does. Memory is O(L K). A reference whose estimated memory exceeds `--mem-limit-gb` is not run;
  the JSON records the estimate and "not run (would need X GB)".

Each measurement runs in its own subprocess, so peak memory is that process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the imports) minus its RSS before the measurement. Fit time excludes generating the
synthetic data (reported separately). After the reference runs, its rd embedding is compared with the one-pass
fit's on the first batch of rows (same fit, or the benchmark is meaningless).

Prints a table and writes JSON (default bench/results/bench_fit.json). CPU only, with OMP_NUM_THREADS=1 (and
torch/BLAS at one thread) unless --threads says otherwise; no GPU is used.

    python bench/bench_fit.py                 # families 32/48/64 and 320/480/640/1280, L = 1e5 and 1e6
    python bench/bench_fit.py --quick         # L = 2e4 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import ROOT, reset_peak, status_kb

FAMILIES = {"tiny": (32, 48, 64), "esm2-8M..650M": (320, 480, 640, 1280)}
GB = 1e9


# -- memory ---------------------------------------------------------------------------------------------------------


def onepass_bytes(widths, batch: int) -> int:
    """Estimated working set of the one-pass fit: the co-moment and the solver's K x K matrices, one batch."""
    k_total = sum(widths)
    # comoment + covariance + a few K x K temporaries in the merge and the solver, float64
    square = 5 * 8 * k_total**2
    # the float32 batch as generated, its float64 centred copy
    rows = batch * k_total * (4 + 8)
    return square + rows


def reference_bytes(widths, n: int) -> int:
    """Estimated peak of reference_fit on n residues: what it holds at its last step, float64.

    The stacked input and its centred copy (2 K columns); at the last step acc_{m-1} with its SVD's copy and U
    (3 k_{m-1}); the prediction, the residual, and the residual SVD's copy and U (4 k_m).
    """
    k_total = sum(widths)
    return 8 * n * (2 * k_total + 3 * widths[-2] + 4 * widths[-1])


# -- the measurements (each in its own subprocess) ------------------------------------------------------------------


def _worker(args) -> None:
    """Run one measurement and print its result as one JSON line on stdout."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from reference_rd import SyntheticChain, reference_fit

    from rdscale.fit.artifact import load_fit, save_fit
    from rdscale.fit.chain import fit_chain
    from rdscale.fit.moments import Moments

    widths = tuple(int(w) for w in args.widths.split(","))
    synth = SyntheticChain(widths, seed=args.seed, latent=args.latent, chunk=args.batch)
    models = [{"name": f"synthetic_{k}", "width": k} for k in widths]
    baseline = status_kb("VmRSS") * 1024
    reset_peak()  # the import-time peak drops out
    result = {"side": args.worker, "widths": list(widths), "n": args.n}

    if args.worker == "onepass":
        moments = Moments(sum(widths))
        generate_s = update_s = 0.0
        chunks = synth.chunks(args.n)
        while True:
            started = time.perf_counter()
            x = next(chunks, None)  # (batch, K) float32
            generate_s += time.perf_counter() - started
            if x is None:
                break
            started = time.perf_counter()
            moments.update(torch.from_numpy(x))
            update_s += time.perf_counter() - started
        started = time.perf_counter()
        fit = fit_chain(moments, widths, args.regression)
        solve_s = time.perf_counter() - started
        peak = status_kb("VmHWM") * 1024
        save_fit(fit, args.fit_dir, models=models)
        result.update(fit_s=update_s + solve_s, update_s=update_s, solve_s=solve_s, generate_s=generate_s,
                      kept=[s.components_kept for s in fit.steps])
    else:
        started = time.perf_counter()
        x = synth.stacked(args.n)  # (n, K) float64: the reference needs every residue at once
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        ref = reference_fit(synth.split(x), args.regression)
        fit_s = time.perf_counter() - started
        peak = status_kb("VmHWM") * 1024
        fit, _ = load_fit(args.fit_dir)
        head = synth.split(x[: args.batch])
        rd = fit.apply([torch.from_numpy(np.ascontiguousarray(b)) for b in head], dtype=torch.float64).numpy()
        expected = ref["rd"][: args.batch]
        result.update(fit_s=fit_s, generate_s=generate_s, kept=ref["kept"],
                      max_rel_diff=float(np.abs(rd - expected).max() / np.abs(expected).max()),
                      kept_agree=[s.components_kept for s in fit.steps] == ref["kept"])
    result.update(peak_bytes=peak - baseline, peak_rss_bytes=peak)
    print(json.dumps(result))


def _measure(side: str, widths, n: int, args, fit_dir: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", side, "--widths", ",".join(map(str, widths)), "--n", str(n),
           "--batch", str(args.batch), "--seed", str(args.seed), "--latent", str(_latent(widths, args)),
           "--regression", args.regression, "--threads", str(args.threads), "--fit-dir", fit_dir]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {widths} n={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _latent(widths, args) -> int:
    # Fewer latent factors than k_m only make generation cheaper: fit cost does not depend on the data's content.
    return min(widths[-1], args.max_latent)


# -- driver ---------------------------------------------------------------------------------------------------------


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _fmt_s(row: dict, key: str = "fit_s") -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def _fmt_gb(value) -> str:
    return f"{value / GB:.3f}" if isinstance(value, (int, float)) else "-"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="residue counts L, comma-separated")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"which of {list(FAMILIES)}")
    parser.add_argument("--batch", type=int, default=8192, help="rows per Moments.update batch")
    parser.add_argument("--max-latent", type=int, default=256, help="latent factors of the synthetic model (cap)")
    parser.add_argument("--regression", default="pcr", choices=["pcr", "ols"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="run a reference only if its estimated memory is below this (default: 60%% of "
                             "MemAvailable at start)")
    parser.add_argument("--budget-s", type=float, default=840.0,
                        help="skip a measurement whose time, projected linearly in L from the same side's previous "
                             "size, would end the run past this many seconds")
    parser.add_argument("--quick", action="store_true", help="L = 2e4 only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_fit.json"))
    # worker-only arguments
    parser.add_argument("--worker", choices=["onepass", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--widths", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fit-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    sizes = [20_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    families = [f.strip() for f in args.families.split(",")]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    available = _available_bytes()
    limit = args.mem_limit_gb * GB if args.mem_limit_gb else 0.6 * available
    started = time.perf_counter()
    rows = []
    print(f"OMP_NUM_THREADS={args.threads}, batch {args.batch}, {args.regression}, reference memory limit "
          f"{limit / GB:.1f} GB (MemAvailable {available / GB:.1f} GB)", flush=True)
    header = (f"{'family':>14} {'K':>5} {'L':>8} | {'1-pass s':>8} {'1-pass GB':>9} | {'ref s':>8} {'ref GB':>8} "
              f"{'ref est GB':>10} | {'time x':>7} {'mem x':>7} | {'rel diff':>8}")
    print(header)
    print("-" * len(header))
    last = {}  # (family, side) -> (n, wall s of that subprocess, s spent generating + fitting)

    def skip_reason(family: str, side: str, n: int) -> str | None:
        if (family, side) not in last:
            return None
        prev_n, prev_wall, prev_work = last[family, side]
        # start-up and imports do not grow with L; generating and fitting do
        projected = (prev_wall - prev_work) + prev_work * n / prev_n
        if time.perf_counter() - started + projected > args.budget_s:
            return f"not run (projected {projected:.0f} s from L={prev_n} exceeds the {args.budget_s:.0f} s budget)"
        return None

    def timed(family, side, widths, n, fit_dir):
        begun = time.perf_counter()
        out = _measure(side, widths, n, args, fit_dir)
        last[family, side] = (n, time.perf_counter() - begun, out["fit_s"] + out["generate_s"])
        return out

    for family in families:
        widths = FAMILIES[family]
        for n in sizes:
            estimate = reference_bytes(widths, n)
            row = {"family": family, "widths": list(widths), "K": sum(widths), "n": n,
                   "onepass_estimate_bytes": onepass_bytes(widths, args.batch), "reference_estimate_bytes": estimate}
            with tempfile.TemporaryDirectory() as fit_dir:
                reason = skip_reason(family, "onepass", n)
                one = {"status": reason} if reason else timed(family, "onepass", widths, n, fit_dir)
                if estimate >= limit:
                    ref = {"status": f"not run (would need {estimate / GB:.1f} GB)"}
                elif reason:
                    ref = {"status": "not run (the one-pass side did not run, nothing to compare)"}
                else:
                    reason = skip_reason(family, "reference", n)
                    ref = {"status": reason} if reason else timed(family, "reference", widths, n, fit_dir)
                if "fit_s" in one and "fit_s" in ref:
                    row["time_ratio"] = ref["fit_s"] / one["fit_s"]
                    row["memory_ratio"] = ref["peak_bytes"] / max(one["peak_bytes"], 1)
            row.update(onepass=one, reference=ref)
            rows.append(row)
            print(f"{family:>14} {row['K']:>5} {n:>8} | "
                  f"{_fmt_s(one) if 'fit_s' in one else 'skipped':>8} {_fmt_gb(one.get('peak_bytes')):>9} | "
                  f"{_fmt_s(ref) if 'fit_s' in ref else 'not run':>8} {_fmt_gb(ref.get('peak_bytes')):>8} "
                  f"{estimate / GB:>10.2f} | "
                  f"{row.get('time_ratio', float('nan')):>7.1f} {row.get('memory_ratio', float('nan')):>7.1f} | "
                  f"{ref.get('max_rel_diff', float('nan')):>8.1e}", flush=True)

    result = {
        "benchmark": "bench_fit",
        "what": "one-pass moments + closed-form chain fit vs stacked in-memory full-SVD reference",
        "device": "cpu",
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "env": {"OMP_NUM_THREADS": str(args.threads)},
        "python": platform.python_version(),
        "regression": args.regression,
        "batch": args.batch,
        "max_latent": args.max_latent,
        "reference_memory_limit_bytes": limit,
        "budget_s": args.budget_s,
        "mem_available_bytes": available,
        "notes": [
            "fit_s excludes generating the synthetic data (generate_s); peak_bytes = VmHWM - VmRSS before the "
            "measurement, in a fresh subprocess per measurement",
            "reference_estimate_bytes = 8 L (2 K + 3 k_(m-1) + 4 k_m); compare with the measured peak where run",
            "time_ratio = reference fit_s / one-pass fit_s, memory_ratio likewise, measured side by side in one run",
            "max_rel_diff: max |rd_onepass - rd_reference| / max |rd_reference| on the first batch of rows",
            "shared 2-core machine: absolute times are noisy, ratios less so",
        ],
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
