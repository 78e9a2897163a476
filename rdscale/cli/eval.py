"""`rdscale eval reconstruction` and `rdscale eval dms`: the evaluation verbs (issue 6).

`register(sub)` adds the verb `eval` to the CLI's subparsers (rdscale/cli/main.py registers it when `eval` is run). Both
sub-verbs read the same YAML config as every other verb (`-c`, overridable by flags and `--set`), and raise the
errors rdscale/errors.py lists as the user's to fix, so the CLI prints one line and exits 1.

- reconstruction: per chain step, the linear reconstruction R^2 of the larger model from the accumulated smaller
  ones, the PCR components kept and the variance each residual block captures; from a fit artifact (`--fit`), or
  from a fresh fit on a FASTA sample (`-c` / `--fasta --models --sample`, in this process, no Ray).
- dms: the paper's DMS protocol (rdscale/dms.py) on ProteinGym CSV files for every raw model of the chain and,
  with a fit, every reverse-distilled level; writes dms_results.json, report.md and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdscale.cli.args import check_output_location
from rdscale.config import REGRESSIONS, Config, ConfigError, load_config
from rdscale.eval.dms import make_embed_fn
from rdscale.eval.evaluate import (
    format_reconstruction,
    reconstruction_report,
    run_dms,
    summarise,
    write_reconstruction,
    write_report,
)
from rdscale.fit.artifact import load_fit, load_moments
from rdscale.io.location import Location, is_remote
from rdscale.io.runs import Run, default_fit
from rdscale.model.loading import load_model
from rdscale.fit.extension import apply_chain
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import fit

log = logging.getLogger(__name__)

_EPILOG_RECON = """examples:
  rdscale eval reconstruction --fit runs/demo/fit -o runs/demo/eval
  rdscale eval reconstruction -c demo --sample 200 -o runs/recon
  rdscale eval reconstruction --fasta db.fa --models 8M 35M 150M --sample 500 --regression ols -o runs/recon
writes <out>/reconstruction.json and <out>/reconstruction.md (and, when fitting fresh, the artifact in <out>/fit)."""

_EPILOG_DMS = """examples:
  rdscale eval dms --csv examples/dms/TOY_SYNTH.csv --wild-type examples/dms/wild_types.fasta \\
      --models models/tiny/esm2_t2_32_tiny.pt models/tiny/esm2_t3_48_tiny.pt models/tiny/esm2_t4_64_tiny.pt \\
      --fit runs/demo/fit -o runs/dms
  rdscale eval dms -c single_gpu --csv ProteinGym/*.csv --wild-type ProteinGym_wild_types.fasta -o runs/dms
CSV columns: mutant (e.g. A23V:G45D, 1-based), mutated_sequence, DMS_score. --wild-type: one FASTA record for
all files, or one record per file whose id is the file's stem (the ProteinGym DMS_id), or a literal sequence.
writes <out>/dms_results.json, <out>/report.md (Tables 2 and 3 as win rates) and <out>/scaling.png."""


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file or packaged config name (demo, single_gpu, ...): models, embedding options; flags override it")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="the chain, smallest first: ESM-2 names (esm2_t6_8M_UR50D or 8M) or checkpoint paths")
    p.add_argument("--device", help="embedding.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set embedding.toks_per_batch=8192 (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` with its sub-verbs `reconstruction` and `dms` to the CLI's subparsers."""
    p = sub.add_parser("eval", help="evaluate a chain: reconstruction R^2 per step, DMS Spearman, scaling report",
                       description="Evaluate reverse distillation: how well each chain step reconstructs the "
                       "larger model, and how raw and reverse-distilled embeddings score on DMS data.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    r = what.add_parser("reconstruction", help="per step: R^2, PCR components kept, variance captured",
                        description="Per chain step: linear reconstruction R^2 of the larger model from the "
                        "accumulated smaller ones, the principal components the regression kept, and the share of "
                        "the residual variance the new block captures. Reads a fit artifact (--fit), or fits one "
                        "on a FASTA sample in this process (-c and/or --fasta --models).",
                        epilog=_EPILOG_RECON, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run", nargs="?", metavar="RUN", help="a run directory: evaluate its fit artifact (RUN/fit)")
    r.add_argument("--fit", metavar="DIR", help="fit artifact directory (written by `rdscale fit`)")
    r.add_argument("--fasta", nargs="+", metavar="FILE", help="fit fresh on a sample of these FASTA files")
    r.add_argument("--sample", type=int, metavar="N", help="fresh fit: sequences in the sample (fit.sample_sequences)")
    r.add_argument("--regression", choices=REGRESSIONS, help="fresh fit: fit.regression")
    _common_args(r)
    r.add_argument("-o", "--out", help="where to write reconstruction.json/.md (fresh fit: also the artifact, "
                   "in <out>/fit; default <output.dir>/eval-reconstruction). Without it, --fit only prints")
    r.set_defaults(func=cmd_reconstruction)

    d = what.add_parser("dms", help="DMS protocol on ProteinGym CSVs: raw models vs rd levels, scaling report",
                        description="Ridge (penalty by leave-one-out) on mutant-minus-wild-type embeddings at the "
                        "mutated positions, trained on a seeded share of the single mutants; Spearman on the "
                        "held-out singles and on multiple mutants by number of substitutions; for every raw model "
                        "of the chain and, with --fit, every reverse-distilled level.",
                        epilog=_EPILOG_DMS, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--csv", nargs="+", required=True, metavar="FILE",
                   help="ProteinGym substitution CSVs (dataset name = file stem)")
    d.add_argument("--wild-type", required=True, metavar="FASTA",
                   help="wild-type FASTA (one record, or one per dataset named by its file stem) or a sequence")
    d.add_argument("run", nargs="?", metavar="RUN", help="a run directory: score its chain (models and fit "
                   "recorded in RUN/fit) unless --models / --fit say otherwise")
    d.add_argument("--fit", metavar="DIR", help="fit artifact of the same models: adds the rd levels (default: "
                   "RUN/fit, else fit.artifact, else <output.dir>/fit if it exists)")
    _common_args(d)
    d.add_argument("-o", "--out", required=True, help="report directory")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/test split of the singles (default 0)")
    d.add_argument("--train-fraction", type=float, default=0.8, help="share of singles to train on (default 0.8)")
    d.add_argument("--batch-size", type=int, default=64,
                   help="variants embedded at a time (bounds host memory; default 64)")
    d.set_defaults(func=cmd_dms)


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The config with flags applied, as every rdscale verb reads it (see rdscale.cli.main._load)."""
    overrides = list(args.overrides) + list(extra)
    if getattr(args, "fasta", None):
        overrides.append(f"input.paths={json.dumps(args.fasta)}")
    if args.models:
        overrides.append(f"models={json.dumps(args.models)}")
    if args.device:
        overrides.append(f"embedding.device={args.device}")
    return load_config(args.config, overrides)


def _local_report_dir(out: str | None) -> None:
    """Reports go to a local directory (a Path of s3://b/x is a local folder 's3:/b/x', written 'successfully')."""
    if out and is_remote(out):
        raise ConfigError(f"-o {out}: eval writes its report to a local directory; give a local path (and copy "
                          "it to the object store afterwards)")


def _apply_run(args: argparse.Namespace, models: bool = False) -> None:
    """RUN (a run directory) -> --fit RUN/fit, and with models=True its chain's checkpoints as --models."""
    if not args.run:
        return
    fit_loc = default_fit(args.run)
    fit_dir = Path(fit_loc.path) if fit_loc.is_local else fit_loc.uri
    manifest_path = fit_loc.join("manifest.json")
    if not manifest_path.is_file():
        raise ConfigError(f"{args.run} holds no fit artifact ({manifest_path} is missing); give --fit DIR instead")
    if args.fit and str(args.fit).rstrip("/") != str(fit_dir).rstrip("/"):
        raise ConfigError(f"two fits given: RUN {args.run} (its fit/) and --fit {args.fit}; give one")
    args.fit = str(fit_dir)
    if models and not args.models and not args.config:
        try:
            recorded = json.loads(manifest_path.read_text())["models"]
            args.models = [m.get("source") or m["name"] for m in recorded]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{manifest_path} does not list the chain's models ({err}); pass --models") from err


def cmd_reconstruction(args: argparse.Namespace) -> int:
    _local_report_dir(args.out)
    _apply_run(args)
    fresh = bool(args.config or args.fasta)
    if args.fit and fresh:
        raise ConfigError("--fit reads an existing artifact and -c/--fasta fit a fresh one; give one of the two")
    if not args.fit and not fresh:
        raise ConfigError("nothing to evaluate: give --fit <artifact dir>, or -c <config> / --fasta FILE --models "
                          "M1 M2 ... to fit on a sample")
    if args.fit:
        if args.fasta or args.sample or args.regression or args.models:
            raise ConfigError("--models, --sample and --regression describe a fresh fit; --fit reads a finished one")
        fit_dir = args.fit if is_remote(args.fit) else Path(args.fit)
        out = Path(args.out) if args.out else None
        if out is not None:
            check_output_location(out, "report directory")
    else:
        if args.sample is not None and args.sample < 1:
            raise ConfigError(f"--sample must be at least 1, got {args.sample}")
        extra = [f"fit.sample_sequences={args.sample}"] if args.sample else []
        extra += [f"fit.regression={args.regression}"] if args.regression else []
        cfg = _load(args, extra)
        check_output_location(args.out or Path(cfg.output.dir) / "eval-reconstruction", "report directory")
        # never <output.dir>/fit itself: that artifact belongs to the run whose embeddings were made with it
        if not args.out and is_remote(cfg.output.dir):
            raise ConfigError(f"output.dir is {cfg.output.dir}: pass -o with a local directory for the report")
        fit_dir, out = _fresh_fit(cfg, Path(args.out) if args.out else Path(cfg.output.dir) / "eval-reconstruction")

    fit, manifest = load_fit(fit_dir)
    # the moments add the OLS-on-the-concatenation bound; artifacts saved without them still report the rest
    moments = load_moments(fit_dir) if "moments" in manifest["files"] else None
    rows = reconstruction_report(fit, moments=moments)
    models = [f"{m.get('name')} ({m.get('width')})" for m in manifest["models"]]
    if args.run:  # a run grown by `rdscale extend`: its chain goes on with each extension step
        rows, models = _with_extensions(args.run, rows, models)
    about = {
        "fit artifact": str(fit_dir),
        "models": models,
        "regression": manifest["regression"],
        "residues in the fit sample": manifest["n_residues"],
    }
    sequences = (manifest.get("extra") or {}).get("sequences")
    if sequences is not None:
        about["sequences in the fit sample"] = sequences
    print("\n".join(f"{key}: {', '.join(v) if isinstance(v, list) else v}" for key, v in about.items()))
    print(format_reconstruction(rows))
    if out is not None:
        paths = write_reconstruction(rows, out, about=about)
        print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def _extension_steps(run_dir: str) -> list:
    run = Run(run_dir)
    return run.extension_steps() if run.has_table("proteins") else []


class _ExtendedChain:
    """The base fit followed by extension steps, shaped like a ChainFit for the DMS embedder: widths of every
    model, one level per width, apply = the run's stored embedding (rdscale.fit.extension.apply_chain)."""

    def __init__(self, fits: list, loaded: list):
        self.fits = fits
        self.widths = tuple(int(m.spec.width) for m in loaded)
        self.levels = [*fits[0].levels, *(int(f.widths[-1]) for f in fits[1:])]
        if len(self.widths) != len(fits[0].widths) + len(fits) - 1:
            raise ConfigError(f"{len(loaded)} models for a chain of {len(fits[0].widths)} + {len(fits) - 1} steps")

    def apply(self, blocks):
        return apply_chain(self.fits, blocks)


def _with_extensions(run_dir: str, rows: list[dict], models: list[str]) -> tuple[list[dict], list[str]]:
    """The base fit's rows followed by one row per extension step of the run (`rdscale extend`), numbered on
    along the run's chain; each step regresses the new model on the whole stored prefix."""
    steps = _extension_steps(run_dir)
    widths = [*rows[0]["from_widths"], *(r["to_width"] for r in rows)] if rows else []
    for step in steps:
        manifest = json.loads(step.join("manifest.json").read_text())
        for row in reconstruction_report(manifest):
            row.update(step=len(rows) + 2, from_widths=list(widths))
            rows.append(row)
            widths.append(row["to_width"])
        new = manifest["models"][-1]
        models.append(f"{new.get('name')} ({new.get('width')}; extension step {step.name})")
    return rows, models


def _fresh_fit(cfg: Config, out: Path) -> tuple[Path, Path]:
    """Fit the chain on the config's sample in this process -> (artifact dir, report dir)."""
    log.info("fitting %s on up to %d sequences of %s", " -> ".join(cfg.models), cfg.fit.sample_sequences,
             ", ".join(cfg.input.paths))
    return fit(cfg, LocalExecutor(), out=out / "fit"), out


def cmd_dms(args: argparse.Namespace) -> int:
    _local_report_dir(args.out)
    chain_of_run = bool(args.run) and not args.models and not args.config  # the run's own chain, extensions too
    _apply_run(args, models=True)
    steps = _extension_steps(args.run) if chain_of_run else []
    n_base = len(args.models or [])
    args.models = [*(args.models or []), *(json.loads(st.join("manifest.json").read_text())["models"][-1]["source"]
                                           for st in steps)] or args.models

    # DMS inputs on an object store are fetched once into the local cache (they are small)
    args.csv = [Location.parse(p).local_copy() if is_remote(p) else p for p in args.csv]
    if args.wild_type and is_remote(args.wild_type):
        args.wild_type = Location.parse(args.wild_type).local_copy()
    missing = [p for p in args.csv if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"DMS CSV file(s) not found: {', '.join(missing)}")
    if not 0 < args.train_fraction < 1:
        raise ConfigError(f"--train-fraction must be between 0 and 1, got {args.train_fraction}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed < 0:  # numpy's generators take no negative seed
        raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}")
    check_output_location(args.out, "report directory")
    cfg = _load(args)
    if not cfg.models:
        raise ConfigError("no models: pass --models M1 M2 ... (smallest first) or set `models` in the config")
    e = cfg.embedding
    device = None if e.device == "auto" else e.device
    dtype = None if e.dtype == "auto" else e.dtype
    loaded = [load_model(m, device=device, dtype=dtype) for m in cfg.models]

    fit, reconstruction = None, None
    fit_dir = args.fit or cfg.fit.artifact
    output_fit = default_fit(cfg.output.dir)
    if not fit_dir and len(loaded) > 1 and (output_fit / "manifest.json").is_file():
        fit_dir = output_fit  # where `rdscale run` / `rdscale fit` put it, as `rdscale embed` looks
        log.info("using the fit artifact %s (output.dir/fit)", fit_dir)
    if fit_dir:
        # the rd levels only mean something for the checkpoints the chain was fitted on: names, widths, hashes
        base_models = loaded[:n_base] if steps else loaded
        expect = [{"name": m.spec.name, "width": m.spec.width, "sha256": m.sha256} for m in base_models]
        fit, _ = load_fit(fit_dir, expect_models=expect)
        reconstruction = reconstruction_report(fit)
        if steps:  # a run grown by `rdscale extend`: score its whole chain, base fit then each extension step
            fit = _ExtendedChain([fit, *(load_fit(st)[0] for st in steps)], loaded)
            reconstruction, _ = _with_extensions(args.run, reconstruction, [])
    else:
        log.info("no fit artifact (--fit): scoring the raw models only")
    embed_fn = make_embed_fn(loaded, fit, layer=e.layer, toks_per_batch=e.toks_per_batch,
                             long_policy=e.long_policy, window=e.window, overlap=e.overlap)
    results = run_dms(args.csv, args.wild_type, embed_fn, seed=args.seed, train_fraction=args.train_fraction,
                      batch_size=args.batch_size)
    paths = write_report(results, args.out, reconstruction=reconstruction)
    _print_summary(summarise(results))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def _print_summary(rows: list[dict[str, Any]]) -> None:
    metrics = [k for k in rows[0] if k not in ("representation", "kind", "width") and not k.startswith("n_")]
    header = ["representation", "width"] + metrics
    lines = [[r["representation"], str(r["width"])] + [f"{r[m]:.3f}" for m in metrics] for r in rows]
    sizes = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    print("mean Spearman over datasets")
    for line in [header, *lines]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, sizes))))
