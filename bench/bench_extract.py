"""Benchmark per-residue extraction: rdscale against a plain fair-esm loop in the style of `esm-extract`.

Same checkpoint, same FASTA, same device, same token budget, same thread count. Variants, run interleaved
(the order rotates every repetition, so drift in machine load hits all of them alike):

- ``esm-extract loop`` (the baseline): fair-esm's ``scripts/extract.py`` minus the file writing:
  ``FastaBatchedDataset.from_file`` + ``get_batch_indices(toks_per_batch, extra_toks_per_seq=1)`` + a DataLoader
  with ``alphabet.get_batch_converter(1022)`` + ``model(toks, repr_layers=[last])`` under ``torch.no_grad()``,
  representations moved to the CPU and ``t[i, 1 : len + 1].clone()`` per sequence. Sequences over 1022
  residues are truncated to 1022, as esm-extract does by default. Per-sequence ``torch.save`` is left out
  (on both sides the tensors are made and then dropped), so the numbers compare the compute.
- ``rdscale Embedder, truncate``: ``rdscale.model.embed.Embedder(long_policy="truncate")`` on the sequences read with
  ``rdscale.io.fasta.read_fasta``: exactly the baseline's work.
- ``rdscale Embedder, window``: the default policy: long sequences are embedded in overlapping 1022-residue
  windows, so every residue gets a row (more work per residue returned when the input has long proteins).
- ``rdscale extract --local`` (end to end, a subprocess): FASTA -> shards -> embeddings -> Lance tables
  (proteins, residues, rejects) written to a fresh directory, with ``conf/demo.yaml`` and the same checkpoint
  and token budget. Timed as wall time of the whole command, interpreter and torch start-up included; the rate
  rdscale itself reports (embedding and writing, start-up excluded) is recorded too.

residues/s = residues returned (rows of per-residue output) / seconds; ratio = variant's residues/s over the
baseline's, measured in the same run. Two clocks: wall time (what a user waits) and CPU time of the process (its
children's for the subprocess), which on a machine shared with other jobs is the steadier of the two. Medians over
the repetitions.

The checkpoint is a randomly initialised ESM-2 of the 8M model's shape (6 layers, width 320, 20 heads) written by
``rdscale.model.loading.build_tiny_family`` and loaded with ``rdscale.model.loading.load_model``: the same arithmetic as
esm2_t6_8M_UR50D without a download. No GPU here: the JSON says ``"device": "cpu"``, ``"gpu": null``.

    python bench/bench_extract.py                                # examples/example.fasta, 3 repetitions
    python bench/bench_extract.py --fasta big.fasta --reps 5 --threads 2
    python bench/bench_extract.py --no-cli                       # in-process variants only
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchkit import median, rates, write_results  # noqa: E402

import esm  # noqa: E402
import torch  # noqa: E402

from rdscale.io.fasta import Record, read_fasta  # noqa: E402
from rdscale.model.embed import Embedder  # noqa: E402
from rdscale.model.loading import build_tiny_family, load_model  # noqa: E402

TRUNCATION = 1022  # esm-extract's --truncation_seq_length default, and ESM-2's window
CLI = "rdscale extract --local (end to end)"


# ------------------------------------------------------------------------------------------------- the variants


def esm_extract_loop(loaded, fasta: Path, toks_per_batch: int) -> tuple[int, list[torch.Tensor]]:
    """fair-esm's scripts/extract.py, per_tok only, without torch.save. Returns (residues, per-sequence rows)."""
    model, alphabet = loaded.model, loaded.alphabet
    last = model.num_layers
    dataset = esm.data.FastaBatchedDataset.from_file(str(fasta))
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(TRUNCATION), batch_sampler=batches
    )
    residues, rows = 0, {}
    with torch.no_grad():
        for labels, strs, toks in loader:
            toks = toks.to(loaded.device, non_blocking=True)
            out = model(toks, repr_layers=[last], return_contacts=False)
            representations = out["representations"][last].to(device="cpu")  # (B, T, k)
            for i, label in enumerate(labels):
                n = min(TRUNCATION, len(strs[i]))
                rows[label] = representations[i, 1 : n + 1].clone()  # (n, k)
                residues += n
    return residues, [rows[label] for label in dataset.sequence_labels]


def rdscale_embedder(loaded, fasta: Path, toks_per_batch: int, policy: str) -> tuple[int, list[torch.Tensor]]:
    sequences = [r.sequence for r in read_fasta(fasta) if isinstance(r, Record)]
    out = Embedder(loaded, layer=-1, toks_per_batch=toks_per_batch, long_policy=policy).embed(sequences)
    return sum(t.shape[0] for t in out), out


_RATE = re.compile(r"this run: (\d+) in ([\d.]+) s")


def rdscale_cli(checkpoint: Path, fasta: Path, toks_per_batch: int, threads: int, scratch: Path) -> dict:
    """One `rdscale extract --local` run into a fresh directory (a reused one would skip committed shards)."""
    out_dir = Path(tempfile.mkdtemp(dir=scratch))
    rdscale = Path(sys.executable).with_name("rdscale")
    command = [str(rdscale) if rdscale.exists() else "rdscale", "--quiet", "extract", "--local",
               "-c", str(REPO / "conf/demo.yaml"), "--models", str(checkpoint), "--fasta", str(fasta),
               "-o", str(out_dir), "--set", f"embedding.toks_per_batch={toks_per_batch}", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    m = _RATE.search(done.stdout)
    if m is None:
        raise RuntimeError(f"no 'this run: N in S s' line in the output of {' '.join(command)}:\n{done.stdout}")
    return {"seconds": seconds, "residues": int(m.group(1)), "reported_seconds": float(m.group(2))}


# ------------------------------------------------------------------------------------------------------ driver


def cpu_time() -> float:
    """User + system CPU seconds of this process and of its finished children (the CLI runs as a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def check_same_numbers(loaded, fasta: Path, toks_per_batch: int) -> float:
    """Largest |difference| between the baseline's rows and rdscale's (truncate): both must compute the same."""
    _, reference = esm_extract_loop(loaded, fasta, toks_per_batch)
    _, ours = rdscale_embedder(loaded, fasta, toks_per_batch, "truncate")
    if len(reference) != len(ours) or any(a.shape != b.shape for a, b in zip(reference, ours)):
        raise RuntimeError("rdscale and the esm-extract loop returned different shapes: not the same work")
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(reference, ours))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fasta", type=Path, default=REPO / "examples/example.fasta")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads, the same for every variant")
    p.add_argument("--toks-per-batch", type=int, default=4096, help="token budget (esm-extract's default 4096)")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end `rdscale extract` variant")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/bench_extract.json")
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be positive")

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        checkpoint = build_tiny_family(scratch / "ckpt", widths=(320,), layers=(6,), heads=20, seed=0)[0]
        loaded = load_model(checkpoint, device="cpu", dtype="float32")
        records = [r for r in read_fasta(args.fasta) if isinstance(r, Record)]
        lengths = [len(r.sequence) for r in records]
        print(f"{args.fasta}: {len(records)} sequences, {sum(lengths):,} residues "
              f"({sum(n > TRUNCATION for n in lengths)} longer than {TRUNCATION}); model {loaded.spec}; "
              f"{args.threads} thread(s), toks_per_batch {args.toks_per_batch}")

        # warm-up (allocator, kernels, page cache) and the check that the baseline and rdscale agree
        max_diff = check_same_numbers(loaded, args.fasta, args.toks_per_batch)
        print(f"max |rdscale - esm-extract| over all rows (truncate, float32): {max_diff:.2e}")

        variants = {
            "esm-extract loop (fair-esm)": lambda: esm_extract_loop(loaded, args.fasta, args.toks_per_batch)[0],
            "rdscale Embedder, truncate": lambda: rdscale_embedder(loaded, args.fasta, args.toks_per_batch,
                                                                    "truncate")[0],
            "rdscale Embedder, window": lambda: rdscale_embedder(loaded, args.fasta, args.toks_per_batch,
                                                                  "window")[0],
        }
        cli_extra: list[dict] = []
        if not args.no_cli:
            def cli():
                run = rdscale_cli(checkpoint, args.fasta, args.toks_per_batch, args.threads, scratch)
                cli_extra.append(run)
                return run["residues"]

            variants[CLI] = cli
        names = list(variants)
        samples: dict[str, list[float]] = {n: [] for n in names}
        cpu_seconds: dict[str, list[float]] = {n: [] for n in names}
        load_before = os.getloadavg()
        residues: dict[str, int] = {}
        failed: dict[str, str] = {}  # the end-to-end command depends on the whole pipeline; report, do not abort
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                if name in failed:
                    continue
                cpu_start, start = cpu_time(), time.perf_counter()
                try:
                    residues[name] = variants[name]()
                except RuntimeError as e:
                    failed[name] = str(e)
                    print(f"  {name} FAILED, left out: {str(e).splitlines()[-1]}")
                    continue
                samples[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(cpu_time() - cpu_start)
            print(f"  repetition {rep + 1}/{args.reps}: " + ", ".join(f"{n.split(' (')[0]} {samples[n][-1]:.1f}s"
                                                                   for n in names if n not in failed))
        names = [n for n in names if n not in failed]
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = names[0]
    measured = rates(names, residues, samples, cpu_seconds)  # ratios to the baseline, names[0]
    base_rate = measured[base]["rate"]
    rows = []
    for name, r in measured.items():
        rows.append({"variant": name, "residues": residues[name],
                     "seconds": samples[name], "median_seconds": median(samples[name]),
                     "residues_per_s": r["rate"], "ratio_vs_baseline": r["ratio"],
                     "cpu_seconds": cpu_seconds[name], "median_cpu_seconds": median(cpu_seconds[name]),
                     "residues_per_cpu_s": r["cpu_rate"], "cpu_ratio_vs_baseline": r["cpu_ratio"]})
    cli_row = next((r for r in rows if r["variant"] == CLI), None)
    if cli_row is not None:
        reported = median([r["reported_seconds"] for r in cli_extra])
        cli_row["reported_seconds"] = [r["reported_seconds"] for r in cli_extra]
        cli_row["reported_residues_per_s"] = cli_extra[-1]["residues"] / reported
        cli_row["reported_ratio_vs_baseline"] = cli_extra[-1]["residues"] / reported / base_rate

    # The target: end to end (FASTA -> Lance, a fresh process) against the forward alone, same run, same machine.
    target = {}
    by_name = {r["variant"]: r for r in rows}
    if cli_row is not None:
        for forward_only in ("rdscale Embedder, truncate", "rdscale Embedder, window"):
            f = by_name.get(forward_only)
            if f is None:
                continue
            target[forward_only] = {
                "wall": cli_row["residues_per_s"] / f["residues_per_s"],
                "wall_without_startup": cli_row["reported_residues_per_s"] / f["residues_per_s"],
                "cpu": cli_row["residues_per_cpu_s"] / f["residues_per_cpu_s"],
            }

    print(f"\n{'variant':<40} {'residues':>9} {'wall s':>8} {'residues/s':>11} {'ratio':>6}"
          f" {'CPU s':>8} {'res/CPU s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['variant']:<40} {r['residues']:>9,} {r['median_seconds']:>8.2f} {r['residues_per_s']:>11,.0f} "
              f"{r['ratio_vs_baseline']:>5.2f}x {r['median_cpu_seconds']:>8.2f} {r['residues_per_cpu_s']:>10,.0f} "
              f"{r['cpu_ratio_vs_baseline']:>5.2f}x")
        if "reported_residues_per_s" in r:
            print(f"{'  (as rdscale reports it, no start-up)':<40} {'':>9} {median(r['reported_seconds']):>8.2f} "
                  f"{r['reported_residues_per_s']:>11,.0f} {r['reported_ratio_vs_baseline']:>5.2f}x")

    report = {
        "benchmark": "bench_extract",
        "device": "cpu",
        "gpu": None,
        "note": "no GPU on the machine that ran this; CPU float32. Per-sequence tensors are made and dropped, not "
                "saved, on the in-process variants; `rdscale extract` writes its Lance tables.",
        "torch": torch.__version__,
        "fair_esm": getattr(esm, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # other jobs on the machine: CPU seconds well below wall seconds mean the run shared its cores
        "load_average_1_5_15_min": {"before": load_before, "after": load_after},
        "threads": args.threads,
        "toks_per_batch": args.toks_per_batch,
        "truncation": TRUNCATION,
        "model": {"layers": loaded.spec.layers, "width": loaded.spec.width, "heads": loaded.spec.heads,
                  "weights": "random (rdscale.model.loading.build_tiny_family, seed 0)"},
        "fasta": {"path": str(args.fasta.resolve().relative_to(REPO)) if args.fasta.resolve().is_relative_to(REPO)
                  else str(args.fasta), "sequences": len(records), "residues": sum(lengths),
                  "longer_than_window": sum(n > TRUNCATION for n in lengths)},
        "reps": args.reps,
        "max_abs_diff_vs_baseline": max_diff,
        "baseline": base,
        "results": rows,
        "failed": failed,
        "end_to_end_vs_forward_only": target,
    }
    for name, t in target.items():
        print(f"extract --local end to end / {name}: wall {t['wall']:.2f}x, wall without start-up "
              f"{t['wall_without_startup']:.2f}x, CPU {t['cpu']:.2f}x")
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
