"""The verbs `rdscale/cli/main.py` parses itself (extract, fit, embed, run, info, compact, make-tiny-family): what
each does once its arguments are parsed, and the checks a writing verb makes before any pass starts. Imported
only when one of these verbs runs (main.py's one lazy import), so `rdscale --help` never loads torch or Lance."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from rdscale.cli.checks import check_outputs
from rdscale.config import Config, ConfigError
from rdscale.fit.artifact import load_fit
from rdscale.io.runs import DATA_TABLES, LEDGER, Run, default_fit, incomplete_message
from rdscale.io.store import missing_data_files
from rdscale.model.loading import build_tiny_family
from rdscale.run.compact import compact_run, compactable
from rdscale.run.integrity import writing
from rdscale.run import pipeline
from rdscale.run.provenance import cost_lines
from rdscale.run.update import release_lines

log = logging.getLogger("rdscale")


def _print_summary(summary, query_hint: bool = True) -> None:
    print("\n".join(summary.lines()))
    if query_hint:
        print(
            "\nnext: rdscale index {0} --width <level>   then   rdscale search {0} --id <protein id>\n"
            "      or in Python: lance.dataset('{1}').to_table()".format(summary.out_dir, summary.tables.get("proteins"))
        )


def cmd_extract(args, cfg: Config) -> int:
    if len(cfg.models) != 1:
        if getattr(args, "models", None):  # named on the command line: the user meant a chain, say so
            raise ConfigError(f"extract embeds with one model; got {len(cfg.models)} in --models "
                              "(use `rdscale run` for a chain)")
        # a packaged chain config (-c demo, -c single_gpu): its largest model, the one esm-extract users want
        log.info("extract: the config names a chain of %d models; embedding with its last one, %s (--models "
                 "picks another)", len(cfg.models), cfg.models[-1])
        cfg = dataclasses.replace(cfg, models=[cfg.models[-1]])
    _print_summary(pipeline.embed(cfg, fit_dir=None, progress=not args.quiet))
    return 0


def cmd_fit(args, cfg: Config) -> int:
    fit_dir = pipeline.fit(cfg, out=args.fit)
    _, manifest = load_fit(fit_dir)
    print(f"fit artifact: {fit_dir}")
    for step in manifest.get("steps", []):
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in step.items()))
    return 0


def cmd_embed(args, cfg: Config) -> int:
    fit_dir = args.fit or cfg.fit.artifact
    if not fit_dir and len(cfg.models) > 1:
        fit_dir = str(default_fit(cfg.output.dir))
    _print_summary(pipeline.embed(cfg, fit_dir=fit_dir, progress=not args.quiet,
                                  redo_changed=args.redo_changed, restart=args.restart))
    return 0


def cmd_run(args, cfg: Config) -> int:
    _print_summary(pipeline.run(cfg, progress=not args.quiet, restart=args.restart, redo_changed=args.redo_changed))
    return 0


def cmd_info(args) -> int:
    run = Run(args.out).require()
    meta = _table_info(run)
    print(f"levels (prefix widths): {meta.get('levels')}")
    models = (meta.get("fit_manifest") or {}).get("models", [])
    print("models: " + ", ".join(f"{m.get('name')} ({m.get('width')})" for m in models))
    for line in release_lines(run):
        print(line)
    for line in _cost_lines(run):
        print(line)
    return 0


def _cost_lines(run) -> list[str]:
    """Throughput, device-hours and an ETA from the ledger's provenance columns (none for older runs)."""
    if not run.has_table(LEDGER):
        return []
    return cost_lines(run.dataset(LEDGER).to_table().to_pylist(), run.status()["planned"])


def _table_info(run: Run) -> dict:
    """Row counts of a run's committed shards (local or on an object store), with what is incomplete or damaged;
    returns its metadata."""
    status = run.status()
    tables = [name for name in DATA_TABLES if run.has_table(name)]
    missing = {name: missing_data_files(run.table(name)) for name in tables}
    where = None if any(missing.values()) else run.committed_filter(status)  # rows of committed shards only
    if incomplete_message(status):
        print(f"{incomplete_message(status)} (rerun the same command to finish; counts below are of those shards)")
    for name, gone in missing.items():
        if gone:
            print(f"{name}: damaged, {len(gone)} data file(s) missing  ({run.table_uri(name)})")
            print("\n".join(f"damaged: data file {g} is missing; run `rdscale verify {run}`" for g in gone[:3]))
        else:
            print(f"{name}: {run.dataset(name).count_rows(filter=where)} rows  ({run.table_uri(name)})")
    return run.metadata()


def cmd_compact(args) -> int:
    compactable(args.out)  # before the lease, which would create a mistyped directory
    with writing(args.out):  # the writer lease: never while a run writes into the same directory
        results = compact_run(args.out, cleanup=args.cleanup, target_rows=args.target_rows)
    for name, r in results.items():
        print(f"{name}: {r['fragments_before']} -> {r['fragments_after']} fragments, {r['rows']} rows")
    return 0


def cmd_make_tiny_family(args) -> int:
    layers = args.layers if args.layers is not None else [2 + i for i in range(len(args.widths))]
    paths = build_tiny_family(args.dir, widths=tuple(args.widths), layers=tuple(layers), seed=args.seed)
    for p in paths:
        print(p)
    return 0


def remove_if_empty(created: list[Path]) -> None:
    """Remove the output directories this command created, when the failure left nothing committed in them."""
    for path in created:
        if not path.is_dir():
            continue
        if Run(path).lease_file.exists():
            # another writer holds the run (ours is released before we get here): its directory, never ours to
            # remove, even when two commands created it at the same moment
            continue
        # worth keeping (resumable): a finished fit artifact or a committed shard (a ledger data file)
        committed = any(path.rglob("manifest.json")) or any(Path(Run(path).ledger).glob("data/*"))
        if not committed:
            shutil.rmtree(path, ignore_errors=True)


# verb -> what it does; the writers (extract, fit, embed, run) take the config main.py loaded and checked with
# check_outputs
COMMANDS = {"extract": cmd_extract, "fit": cmd_fit, "embed": cmd_embed, "run": cmd_run, "info": cmd_info,
            "compact": cmd_compact, "make-tiny-family": cmd_make_tiny_family}
