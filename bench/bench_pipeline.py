"""End-to-end throughput of the pipeline against its parts, and of `extend` against re-running the chain.

Measured side by side in one process, on the same FASTA and checkpoints:

- `rdscale run`'s apply pass (every chain model + apply + Lance writes) vs `rdscale extract` with the largest model
  alone and with each model alone: the chain's overhead over the largest model, beside the FLOP bound of docs/method.md
  ("Cost": sum of parameters / largest);
- Lance write throughput (residues/s of writing the tables alone) vs embedding throughput;
- `rdscale extend` (new model only) vs re-running the whole chain, beside its FLOP expectation
  (params of the new model / sum of params).

Runs in-process (LocalExecutor) so the ratios are about the work, not Ray's start-up. On CPU the models are random
ESM-2s at the real 8M/35M/150M shapes by default (--small for the tiny 32/48/64 family). Writes a table to stdout
and JSON to bench/results/bench_pipeline.json.

    python bench/bench_pipeline.py [--fasta F] [--records N] [--small]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from benchkit import ROOT, cfg_for, timed, torch_machine, write_results

sys.path.insert(0, str(ROOT))

from rdscale.io.fasta import Record, read_fasta  # noqa: E402
from rdscale.model.loading import build_tiny_family, esm2_parameter_count  # noqa: E402
from rdscale.run.extend import extend  # noqa: E402
from rdscale.run.executor import LocalExecutor  # noqa: E402
from rdscale.run.pipeline import embed, fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fasta", default=str(ROOT / "examples" / "example.fasta"))
    ap.add_argument("--records", type=int, default=60, help="first N accepted records of the FASTA")
    ap.add_argument("--small", action="store_true", help="tiny 32/48/64 family instead of the real 8M/35M/150M shapes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_pipeline.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="rdscale_bench_"))
    try:
        records = [r for r in read_fasta(args.fasta) if isinstance(r, Record)][: args.records]
        fasta = tmp / "input.fasta"
        fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records))
        n_res = sum(len(r.sequence) for r in records)
        if args.small:
            shapes = [(2, 32, 4), (3, 48, 4), (4, 64, 4)]
        else:  # ESM-2 8M, 35M, 150M architectures (random weights: same FLOPs as the real ones)
            shapes = [(6, 320, 20), (12, 480, 20), (30, 640, 20)]
        models = []
        for layers, width, heads in shapes:
            models += build_tiny_family(tmp / "models", widths=(width,), layers=(layers,), heads=heads, seed=layers)
        params = [esm2_parameter_count(*s) for s in shapes]

        rows = {}
        fit_dir = fit(cfg_for(tmp, fasta, models, "fitrun"), LocalExecutor(), out=tmp / "fit")
        t_chain, s = timed(lambda: embed(cfg_for(tmp, fasta, models, "chain"), fit_dir, LocalExecutor(), False))
        rows["chain (apply pass, all models)"] = t_chain
        alone = []
        for m in models:
            t, _ = timed(lambda m=m: embed(cfg_for(tmp, fasta, [m], f"alone_{Path(m).stem}"), None,
                                          LocalExecutor(), False))
            rows[f"extract {Path(m).stem} alone"] = t
            alone.append(t)

        # Lance write alone: the chain's residue table rewritten from memory.
        import lance

        res = lance.dataset(str(tmp / "chain" / "residues.lance")).to_table()
        t_write, _ = timed(lambda: lance.write_dataset(res, str(tmp / "write_only.lance")))
        rows["Lance write of the residues table"] = t_write

        # extend: embed with the first two models, then grow with the third, vs the whole chain again.
        two_fit = fit(cfg_for(tmp, fasta, models[:2], "fit2"), LocalExecutor(), out=tmp / "fit2")
        embed(cfg_for(tmp, fasta, models[:2], "two"), two_fit, LocalExecutor(), False)
        t_extend, _ = timed(lambda: extend(tmp / "two", str(models[2]), from_fit=fit_dir, progress=False))
        rows["extend rd.2 -> rd.3 (largest model only)"] = t_extend

        result = {
            **torch_machine(),
            "models": [{"layers": l, "width": w, "heads": h, "params": p} for (l, w, h), p in zip(shapes, params)],
            "records": len(records), "residues": n_res,
            "seconds": rows,
            "residues_per_s": {k: n_res / v for k, v in rows.items()},
            "chain_over_largest": t_chain / alone[-1],
            "chain_over_sum_of_parts": t_chain / sum(alone),
            "flop_bound_chain_over_largest": sum(params) / params[-1],
            "lance_write_over_embedding_throughput": (n_res / t_write) / (n_res / t_chain),
            "extend_over_rerun": t_extend / t_chain,
            "flop_expectation_extend_over_rerun": params[-1] / sum(params),
        }
        print(f"{'stage':44s} {'seconds':>9s} {'residues/s':>12s}")
        for k, v in rows.items():
            print(f"{k:44s} {v:9.2f} {n_res / v:12,.0f}")
        print(f"\nchain / largest alone: {result['chain_over_largest']:.2f}x  "
              f"(FLOP bound {result['flop_bound_chain_over_largest']:.2f}x); "
              f"chain / sum of parts: {result['chain_over_sum_of_parts']:.2f}x")
        print(f"Lance write throughput / embedding throughput: {result['lance_write_over_embedding_throughput']:.0f}x")
        print(f"extend / re-run chain: {result['extend_over_rerun']:.2f}x "
              f"(FLOP expectation {result['flop_expectation_extend_over_rerun']:.2f}x)")
        write_results(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
