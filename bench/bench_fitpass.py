"""Benchmark the fit pass against the apply pass on the same sequences and models (CPU): residues/s and their ratio.

The fit pass is `rdscale.run.stages.FitWorker.run` (what `rdscale run` executes first): FASTA shard -> the chain's
forwards -> float64 moments of the concatenated embeddings (`Moments.update`, Gram mode `fit.gram`), timed for
each Gram mode (float64, float32 = exact 8-bit slices folded into float64). The apply pass is what
`ApplyStage.rd_embeddings` runs on each chunk of the apply stage (`chunk_rows` at the encoder's chunk size): the
chain's forwards plus the fitted rd map, without the table writing (bench/bench_extract.py measures writing). A
third row, `forwards only`, is the chain's forwards on the same chunks. Same process, same loaded models, same
sequences, same thread count; the variants run interleaved (the order rotates every repetition) and the medians
are compared, so machine load hits all of them alike. Target (issue 17): fit pass >= 0.80x the apply pass.

Chains: `tiny` (rdscale's test family, widths 32/48/64) and `small` (ESM-2 8M and 35M shapes, widths 320/480,
6 and 12 layers), random weights from `rdscale.model.loading.build_tiny_family` (throughput does not depend on
the values). Input: examples/example.fasta, the first `--residues` residues for `small`.

    python bench/bench_fitpass.py                 # writes bench/results/bench_fitpass.json
    python bench/bench_fitpass.py --reps 5 --chains small
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchkit import median, rates, write_results  # noqa: E402

import torch

from rdscale.config import Config, EmbeddingConfig, FitConfig, InputConfig
from rdscale.fit.chain import fit_chain
from rdscale.fit.moments import Moments
from rdscale.io.fasta import Record, plan_shards, read_fasta
from rdscale.model.loading import build_tiny_family
from rdscale.run.stages import FitWorker, chunk_rows

CHAINS = {  # name: (widths, layers, heads)
    "tiny": ((32, 48, 64), (2, 3, 4), 4),
    "small": ((320, 480), (6, 12), 20),
}
MODES = ("float64", "float32")


def subset_fasta(fasta: Path, residues: int | None, out: Path) -> tuple[Path, list[str]]:
    """The first records of `fasta` up to `residues` residues (all if None), written to `out`."""
    kept, total = [], 0
    for r in read_fasta(fasta):
        if not isinstance(r, Record):
            continue
        if residues is not None and total >= residues:
            break
        kept.append(r)
        total += len(r.sequence)
    out.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in kept))
    return out, [r.sequence for r in kept]


def bench_chain(name: str, args, scratch: Path) -> dict:
    widths, layers, heads = CHAINS[name]
    checkpoints = build_tiny_family(scratch / name, widths=widths, layers=layers, heads=heads, seed=0)
    fasta, sequences = subset_fasta(args.fasta, args.residues if name == "small" else None,
                                    scratch / f"{name}.fasta")
    cfg = Config(models=[str(c) for c in checkpoints], input=InputConfig(paths=[str(fasta)]),
                 embedding=EmbeddingConfig(toks_per_batch=args.toks_per_batch, device="cpu", dtype="float32"),
                 fit=FitConfig(sample_sequences=len(sequences))).validate()
    worker = FitWorker(cfg.models, cfg)
    worker.setup()  # loads the chain once; every variant below uses these models
    encoder = worker.encoder
    plan = [(shard, len(sequences)) for shard in plan_shards([str(fasta)], 1 << 40)]
    k_total = sum(encoder.widths)

    def fit_pass(mode: str) -> int:
        worker.moments = Moments(k_total, device=encoder.device, gram=mode)
        worker.sequences = worker.residues = 0
        worker.run(plan)
        return worker.residues

    rows = [{"sequence": s} for s in sequences]
    chunks = [[r["sequence"] for r in chunk] for chunk in chunk_rows(rows, encoder.chunk_tokens, encoder.window)]
    fit_pass("float64")  # warm-up, and the fit the apply pass uses
    with warnings.catch_warnings():  # a small sample's fit may be unstable; its throughput is what counts here
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_chain(worker.moments, encoder.widths)

    def apply_pass() -> int:  # ApplyStage.rd_embeddings on each chunk, no writing
        residues = 0
        for chunk in chunks:
            blocks = encoder.blocks(chunk)
            lengths = [b[0].shape[0] for b in blocks]
            stacked = [torch.cat([b[m] for b in blocks], dim=0) for m in range(len(blocks[0]))]
            rd = fit.apply(stacked)  # (sum L, k_m)
            residues += sum(t.shape[0] for t in torch.split(rd, lengths, dim=0))
        return residues

    def forwards_only() -> int:
        return sum(b[0].shape[0] for chunk in chunks for b in encoder.blocks(chunk))

    variants = {"apply pass (forwards + rd map)": apply_pass, "forwards only": forwards_only}
    for mode in MODES:
        variants[f"fit pass, gram={mode}"] = lambda mode=mode: fit_pass(mode)
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    residues: dict[str, int] = {}
    for rep in range(args.reps):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            residues[n] = variants[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
        print(f"  {name} rep {rep + 1}/{args.reps}: " + ", ".join(f"{n.split(' (')[0]} {wall[n][-1]:.2f}s"
                                                               for n in names), flush=True)
    results = []
    for n, r in rates(names, residues, wall, cpu).items():  # ratios to names[0], the apply pass
        results.append({"variant": n, "residues": residues[n], "seconds": wall[n], "cpu_seconds": cpu[n],
                        "residues_per_s": r["rate"], "residues_per_cpu_s": r["cpu_rate"],
                        "ratio_vs_apply": r["ratio"], "cpu_ratio_vs_apply": r["cpu_ratio"]})
    return {"chain": name, "widths": list(widths), "layers": list(layers), "heads": heads, "K": k_total,
            "sequences": len(sequences), "residues": sum(len(s) for s in sequences),
            "budgets": encoder.budgets, "chunk_tokens": encoder.chunk_tokens, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fasta", type=Path, default=REPO / "examples/example.fasta")
    p.add_argument("--chains", default=",".join(CHAINS), help=f"comma-separated, of {list(CHAINS)}")
    p.add_argument("--residues", type=int, default=6_000, help="input residues for the `small` chain")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--toks-per-batch", type=int, default=4096)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/bench_fitpass.json")
    args = p.parse_args(argv)
    chains = [c.strip() for c in args.chains.split(",") if c.strip()]
    if unknown := [c for c in chains if c not in CHAINS]:
        p.error(f"unknown chains {unknown}; choose from {list(CHAINS)}")
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be positive")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    out = []
    with tempfile.TemporaryDirectory(prefix="bench_fitpass_") as scratch:
        os.environ.setdefault("RDSCALE_CACHE_DIR", str(Path(scratch) / "cache"))
        for name in chains:
            out.append(bench_chain(name, args, Path(scratch)))
    print(f"\n{'chain':<6} {'variant':<32} {'residues':>9} {'wall s':>7} {'residues/s':>11} {'x apply':>8}"
          f" {'res/CPU s':>10} {'x apply':>8}")
    for chain in out:
        for r in chain["results"]:
            print(f"{chain['chain']:<6} {r['variant']:<32} {r['residues']:>9,} {median(r['seconds']):>7.2f} "
                  f"{r['residues_per_s']:>11,.0f} {r['ratio_vs_apply']:>7.2f}x {r['residues_per_cpu_s']:>10,.0f} "
                  f"{r['cpu_ratio_vs_apply']:>7.2f}x")
    report = {
        "benchmark": "bench_fitpass",
        "what": "fit pass (FitWorker.run: forwards + float64 moments, per Gram mode) vs apply pass (forwards + rd "
                "map, no writing) on the same sequences and loaded models, interleaved, medians",
        "device": "cpu",
        "gpu": None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "toks_per_batch": args.toks_per_batch,
        "reps": args.reps,
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "target": "fit pass residues/s >= 0.80x the apply pass's (ratio_vs_apply of the fit pass rows)",
        "seconds_total": time.perf_counter() - started,
        "chains": out,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
