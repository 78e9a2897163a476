"""`rdscale <verb>`: one verb per user task. Each reads one YAML config (`-c`), overridable by flags and by
`--set section.key=value`. `rdscale <verb> --help` is the documentation of record."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rdscale import __version__
from rdscale.cli.args import (
    add_fit_argument,
    add_global_flags,
    add_global_flags_everywhere,
    add_run_argument,
    check_output_location,
    resolve_run,
)

if TYPE_CHECKING:  # the config module (yaml, dataclasses) is imported when a verb runs, not for --help
    from rdscale.config import Config
    from rdscale.io.runs import Run

log = logging.getLogger("rdscale")

EPILOG = """packaged configs (-c NAME): demo (offline demo, tiny models), demo_s3 (the demo with input, checkpoints and
output on S3), single_gpu (real ESM-2 8M->650M on one GPU), uniref50_cluster (ray job submit on a GPU cluster); or
-c path/to/file.yaml. Locations may be local paths or s3:// gs:// az:// URIs. Docs: README.md, docs/cli.md."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the verb, like every other error (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CHAIN_HELP = "the chain, smallest first: ESM-2 names (esm2_t6_8M_UR50D or 8M) or checkpoint paths"
ONE_MODEL_HELP = ("the one model: an ESM-2 name (esm2_t33_650M_UR50D or 650M) or a checkpoint path (default: the "
                  "config's last, largest model, so -c demo or -c single_gpu work as they are)")


def _config_args(p: argparse.ArgumentParser, fasta: bool = True, out: bool = True, models_help: str = CHAIN_HELP) -> None:
    p.add_argument("-c", "--config", help="YAML config file, or the name of a packaged one (demo, single_gpu, "
                   "uniref50_cluster, demo_s3); flags below override it")
    if fasta:
        p.add_argument("--fasta", nargs="+", metavar="FILE",
                       help="input FASTA files (plain, .gz or BGZF; local paths or s3:// gs:// az:// URIs)")
    p.add_argument("--models", nargs="+", metavar="MODEL", help=models_help)
    if out:
        p.add_argument("-o", "--out", help="output directory or object-store prefix, e.g. s3://bucket/run (output.dir)")
    p.add_argument("--device", help="embedding.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small inputs, debugging)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set embedding.toks_per_batch=8192 (repeatable)")


def _resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redo-changed", action="store_true",
                   help="an input file changed under committed shards: redo exactly those shards (and shards whose "
                   "byte range moved) instead of refusing")
    p.add_argument("--restart", action="store_true",
                   help="delete the previous output in output.dir (tables; for run also the fit) and start over, "
                   "e.g. after changing the models")


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "fasta", None):
        overrides.append(f"input.paths={json.dumps(args.fasta)}")
    if getattr(args, "models", None):
        overrides.append(f"models={json.dumps(args.models)}")
    if getattr(args, "out", None):
        overrides.append(f"output.dir={json.dumps(args.out)}")
    if getattr(args, "device", None):
        overrides.append(f"embedding.device={args.device}")
    if getattr(args, "local", False):
        overrides.append("ray.address=local")
    from rdscale.config import load_config

    return load_config(args.config, overrides)


def _print_summary(summary, query_hint: bool = True) -> None:
    print("\n".join(summary.lines()))
    if query_hint:
        print(
            "\nnext: rdscale index {0} --width <level>   then   rdscale search {0} --id <protein id>\n"
            "      or in Python: lance.dataset('{1}').to_table()".format(summary.out_dir, summary.tables.get("proteins"))
        )


def cmd_extract(args, cfg: Config | None = None) -> int:
    from rdscale.run.pipeline import embed

    cfg = cfg if cfg is not None else _load(args)
    if len(cfg.models) != 1:
        from rdscale.config import ConfigError

        if getattr(args, "models", None):  # named on the command line: the user meant a chain, say so
            raise ConfigError(f"extract embeds with one model; got {len(cfg.models)} in --models "
                              "(use `rdscale run` for a chain)")
        # a packaged chain config (-c demo, -c single_gpu): its largest model, the one esm-extract users want
        import dataclasses

        log.info("extract: the config names a chain of %d models; embedding with its last one, %s (--models "
                 "picks another)", len(cfg.models), cfg.models[-1])
        cfg = dataclasses.replace(cfg, models=[cfg.models[-1]])
    _print_summary(embed(cfg, fit_dir=None, progress=not args.quiet))
    return 0


def cmd_fit(args, cfg: Config | None = None) -> int:
    from rdscale.run.pipeline import fit

    cfg = cfg if cfg is not None else _load(args)
    fit_dir = fit(cfg, out=args.fit)
    from rdscale.fit.artifact import load_fit

    _, manifest = load_fit(fit_dir)
    print(f"fit artifact: {fit_dir}")
    for step in manifest.get("steps", []):
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in step.items()))
    return 0


def cmd_embed(args, cfg: Config | None = None) -> int:
    from rdscale.run.pipeline import embed

    cfg = cfg if cfg is not None else _load(args)
    fit_dir = args.fit or cfg.fit.artifact
    if not fit_dir and len(cfg.models) > 1:
        from rdscale.io.runs import default_fit

        fit_dir = str(default_fit(cfg.output.dir))
    _print_summary(embed(cfg, fit_dir=fit_dir, progress=not args.quiet, redo_changed=args.redo_changed,
                         restart=args.restart))
    return 0


def cmd_run(args, cfg: Config | None = None) -> int:
    from rdscale.run.pipeline import run

    cfg = cfg if cfg is not None else _load(args)
    _print_summary(run(cfg, progress=not args.quiet, restart=args.restart, redo_changed=args.redo_changed))
    return 0


def cmd_info(args) -> int:
    from rdscale.io.runs import Run

    run = Run(args.out).require()
    meta = _table_info(run)
    print(f"levels (prefix widths): {meta.get('levels')}")
    models = (meta.get("fit_manifest") or {}).get("models", [])
    print("models: " + ", ".join(f"{m.get('name')} ({m.get('width')})" for m in models))
    from rdscale.run.update import release_lines

    for line in release_lines(run):
        print(line)
    for line in _cost_lines(run):
        print(line)
    return 0


def _cost_lines(run) -> list[str]:
    """Throughput, device-hours and an ETA from the ledger's provenance columns (none for older runs)."""
    from rdscale.io.runs import LEDGER
    from rdscale.run.provenance import cost_lines

    if not run.has_table(LEDGER):
        return []
    return cost_lines(run.dataset(LEDGER).to_table().to_pylist(), run.status()["planned"])


def _table_info(run: Run) -> dict:
    """Row counts of a run's committed shards (local or on an object store), with what is incomplete or damaged;
    returns its metadata."""
    from rdscale.io.runs import DATA_TABLES
    from rdscale.io.store import (
        incomplete_message,
        missing_data_files,
    )

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


def cmd_config(args) -> int:
    import yaml

    from rdscale.cli.checks import redacted

    cfg = _load(args)
    print(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False, default_flow_style=False), end="")
    return 0


def cmd_compact(args) -> int:
    from rdscale.run.compact import compact_run, compactable
    from rdscale.run.integrity import writing

    compactable(args.out)  # before the lease, which would create a mistyped directory
    with writing(args.out):  # the writer lease: never while a run writes into the same directory
        results = compact_run(args.out, cleanup=args.cleanup, target_rows=args.target_rows)
    for name, r in results.items():
        print(f"{name}: {r['fragments_before']} -> {r['fragments_after']} fragments, {r['rows']} rows")
    return 0


def cmd_make_tiny_family(args) -> int:
    from rdscale.model.loading import build_tiny_family

    layers = args.layers if args.layers is not None else [2 + i for i in range(len(args.widths))]
    paths = build_tiny_family(args.dir, widths=tuple(args.widths), layers=tuple(layers), seed=args.seed)
    for p in paths:
        print(p)
    return 0


# Verbs whose parsers live in another module (each exposes register(sub)); the module is imported only when its
# verb is the one being run, so `rdscale --help` never imports Lance, torch, Ray or the search stack.
_GROUPS = {"index": "search", "search": "search", "eval": "eval", "extend": "extend", "verify": "verify",
           "serve": "serve", "update": "update"}
_GROUP_HELP = {
    "index": "vector index on prefix widths (chain levels) of proteins or residues",
    "search": "nearest neighbours by protein id, FASTA query or vector; exact, ANN or funnel",
    "eval": "evaluate a chain: reconstruction R^2 per step, DMS Spearman, scaling report",
    "extend": "grow a run to a larger model: append the next chain level without running the smaller models",
    "verify": "check a run against its inputs: every record in exactly one of proteins/rejects, no duplicates",
    "serve": "HTTP query server for a run (Ray Serve): search by id, sequence or vector, JSON in and out",
    "update": "follow a database: bring a run to a new release, embedding only new and changed sequences",
}
_WRITERS = ("extract", "fit", "embed", "run")  # verbs that create an output directory


def _register_group(sub: argparse._SubParsersAction, group: str) -> None:
    import importlib

    importlib.import_module(f"rdscale.cli.{group}").register(sub)


def build_parser(verb: str | None = None, full: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser. With full=False only `verb`'s own module is imported (the others get a placeholder that
    carries their one-line help), which is what `main` uses; full=True builds every verb (tests, docs)."""
    parser = _Parser(
        prog="rdscale",
        description="Embed protein databases with the ESM-2 family and reverse distillation (nested, Matryoshka "
        "embeddings), store them in Lance, search them at any prefix width.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"rdscale {__version__}")
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("extract", help="one model over FASTA files -> per-residue + per-protein embeddings in Lance",
                       description="Like fair-esm's esm-extract, into Lance tables (proteins, residues, rejects). "
                       "Takes one model: --models MODEL, or the config's last (largest) model.")
    _config_args(p, models_help=ONE_MODEL_HELP)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("fit", help="fit pass: moments on a sample, solve the chain, write the fit artifact")
    _config_args(p)
    add_fit_argument(p, "where to write the artifact (default: <output.dir>/fit)", "--fit-out")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("embed", help="apply pass: reverse-distilled embeddings of every record into Lance (resumable)")
    _config_args(p)
    add_fit_argument(p, "fit artifact directory (default: fit.artifact, else <output.dir>/fit)")
    _resume_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("run", help="fit, then embed: the whole pipeline (resumable)")
    _config_args(p)
    _resume_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the effective config (file + flags + --set) as YAML; runs nothing",
                       description="Loads and validates the config exactly as `rdscale run` would, applies the "
                       "flags and every --set, and prints the result as YAML.")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("info", help="what a run directory holds")
    add_run_argument(p, "run directory or object-store prefix (s3://bucket/run)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compact", help="merge a finished run's small Lance fragments (runs no longer compact at "
                       "the end)", description="Compact the proteins, residues, rejects and ledger tables of a run "
                       "directory. Rows are unchanged. Holds the run's writer lease: refused while a run writes into the directory.")
    add_run_argument(p)
    p.add_argument("--cleanup", action="store_true",
                   help="also delete the data files of older table versions (frees disk; no time travel back)")
    p.add_argument("--target-rows", type=int, default=None, help="rows per compacted fragment (Lance default)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("make-tiny-family", help="write a tiny random ESM-2 family (offline demo and tests)")
    p.add_argument("dir", help="output directory for the checkpoints")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 48, 64],
                   help="embedding width of each model, smallest first; multiples of 8 (default 32 48 64)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="depth of each model, one per width (default 2, 3, 4, ...)")
    p.add_argument("--seed", type=int, default=0, help="same seed and arguments: the same files (default 0)")
    p.set_defaults(func=cmd_make_tiny_family)

    done: set[str] = set()
    wanted = set(_GROUPS.values()) if full else {_GROUPS.get(verb)}
    for name, group in _GROUPS.items():
        if group in wanted:
            if group not in done:
                _register_group(sub, group)
                done.add(group)
        elif name not in sub.choices:
            sub.add_parser(name, help=_GROUP_HELP[name], add_help=False)  # never parsed: main builds the real one
    add_global_flags_everywhere(parser)
    return parser


def _find_verb(argv: list[str]) -> str | None:
    """The first argument that is not a global flag (those take no value)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `rdscale` command itself (callers in Python pass argv and keep their interpreter)
        from rdscale.cli.process import exit_without_teardown, tune_malloc

        tune_malloc()
        exit_without_teardown(main(sys.argv[1:]))
    argv = list(argv)
    parser = build_parser(_find_verb(argv), full=False)
    args = parser.parse_args(argv)
    resolve_run(args, parser)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        from rdscale.progress import quiet_library_logs

        quiet_library_logs()
    targets, created = [], []
    try:
        if args.verb in _WRITERS:  # the config is loaded once, here, and handed to the checks and the verb
            cfg = _load(args)
            targets, created = _check_outputs(args, cfg)
            _quiet_ray(args, uses_ray=cfg.ray.address != "local")
            return args.func(args, cfg)
        return args.func(args)
    except BrokenPipeError:  # `rdscale search ... | head`: the reader has gone; what was written stays written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 141  # as a process killed by SIGPIPE (`cat`, `yes` in a pipe into head)
    except KeyboardInterrupt:
        print(f"rdscale {args.verb}: interrupted; committed shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one clear line, not a traceback
        from rdscale.errors import exit_code, user_facing

        message = user_facing(err, where=", ".join(map(str, targets)) or None)
        if message is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        _remove_if_empty(created)
        code = exit_code(err)
        kind = "configuration error" if code == 2 else "error"
        print(f"rdscale {args.verb}: {kind}: {message}", file=sys.stderr)
        return code


def _check_outputs(args: argparse.Namespace, cfg: Config) -> tuple[list[str], list[Path]]:
    """Before any pass starts: every location the verb will write (by `cfg`, the verb's loaded config) can be
    written. Returns those locations and the directories among them that did not exist yet, so that a failed
    command leaves no half-made output directory behind."""
    from rdscale.io.location import set_storage_options

    set_storage_options(cfg.storage.options)  # the checks below may read checkpoints on an object store
    targets = [cfg.output.dir]
    if getattr(args, "fit", None) and args.verb == "fit":
        targets.append(args.fit)
    _check_layer(cfg)
    fresh = []
    for target in targets:
        check_output_location(target)
        if "://" not in str(target) and not Path(target).exists():
            fresh.append(Path(target))
    return [str(t) for t in targets], fresh


def _check_layer(cfg: Config) -> None:
    """embedding.layer against each model's depth, from the checkpoint's config (no model is built)."""
    if not cfg.models:
        return
    from rdscale.config import ConfigError
    from rdscale.model.loading import describe_model

    layer = cfg.embedding.layer
    described = []
    for model in cfg.models:
        described.append(describe_model(model))
        layers = described[-1]["layers"]
        if not -(layers + 1) <= layer <= layers:
            raise ConfigError(f"embedding.layer must be in [{-(layers + 1)}, {layers}] for {model} ({layers} "
                              f"layers; 0 = token embeddings, -1 = last), got {layer}")
    from rdscale.cli.checks import check_chain

    check_chain(cfg, described)


def _quiet_ray(args: argparse.Namespace, uses_ray: bool | None = None) -> None:
    """A Ray run's terminal shows rdscale's progress and summary; Ray's own notices go to a log file (-v: both).
    uses_ray: whether the verb will start Ray (None: from its config's ray.address)."""
    if uses_ray is None:
        uses_ray = _load(args).ray.address != "local"
    if args.verbose or not uses_ray:
        return
    import tempfile
    import time

    from rdscale.progress import route_ray_notices

    path = Path(tempfile.gettempdir()) / f"rdscale-{args.verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.info("Ray's own messages: %s", route_ray_notices(path))


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the output directories this command created, when the failure left nothing committed in them."""
    import shutil

    from rdscale.io.runs import Run

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
