"""`rdscale <verb>`: one verb per user task. Each reads one YAML config (`-c`), overridable by flags and by
`--set section.key=value`. `rdscale <verb> --help` is the documentation of record."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from types import ModuleType

from rdscale import __version__, config
from rdscale.cli.args import (
    add_fit_argument,
    add_global_flags,
    add_global_flags_everywhere,
    add_run_argument,
    quiet_ray,
    resolve_run,
)
from rdscale.cli.process import exit_without_teardown, tune_malloc
from rdscale.config import Config
from rdscale.errors import exit_code, user_facing
from rdscale.progress import quiet_library_logs

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
    return config.load_config(args.config, overrides)


# storage.options keys whose values are credentials (Lance's / object_store's names and the clouds' own)
_SECRET_WORDS = ("secret", "token", "password", "account_key", "access_key", "sas", "credential", "private")


def redacted(cfg_dict: dict) -> dict:
    """The config as `rdscale config` prints it: credential values in storage.options shown as '***' (the
    output gets pasted into issues and logs; a run's metadata never records storage at all)."""
    out = dict(cfg_dict)
    storage = dict(out.get("storage") or {})
    options = storage.get("options")
    if isinstance(options, dict):
        storage["options"] = {k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else v
                              for k, v in options.items()}
        out["storage"] = storage
    return out


def cmd_config(args) -> int:
    import yaml  # with the config loader: not for --help

    cfg = _load(args)
    print(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False, default_flow_style=False), end="")
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


def _verb_module(group: str) -> ModuleType:
    """The CLI's one lazy import: the module of the verbs being run (or whose --help is asked), never the others.
    Each imports its whole stack (torch, Lance, Ray, the search stack) at its top, so `rdscale --help`, `rdscale
    config` and `rdscale info --help` import none of them. `group`: a value of _GROUPS, or "verbs" for the verbs
    whose parsers are built here (their commands live in rdscale.cli.verbs)."""
    if group == "search":
        from rdscale.cli import search as module
    elif group == "eval":
        from rdscale.cli import eval as module
    elif group == "extend":
        from rdscale.cli import extend as module
    elif group == "verify":
        from rdscale.cli import verify as module
    elif group == "serve":
        from rdscale.cli import serve as module
    elif group == "update":
        from rdscale.cli import update as module
    else:
        from rdscale.cli import verbs as module
    return module


def _register_group(sub: argparse._SubParsersAction, group: str) -> None:
    _verb_module(group).register(sub)


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
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["extract"], when it runs

    p = sub.add_parser("fit", help="fit pass: moments on a sample, solve the chain, write the fit artifact")
    _config_args(p)
    add_fit_argument(p, "where to write the artifact (default: <output.dir>/fit)", "--fit-out")
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["fit"], when it runs

    p = sub.add_parser("embed", help="apply pass: reverse-distilled embeddings of every record into Lance (resumable)")
    _config_args(p)
    add_fit_argument(p, "fit artifact directory (default: fit.artifact, else <output.dir>/fit)")
    _resume_args(p)
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["embed"], when it runs

    p = sub.add_parser("run", help="fit, then embed: the whole pipeline (resumable)")
    _config_args(p)
    _resume_args(p)
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["run"], when it runs

    p = sub.add_parser("config", help="print the effective config (file + flags + --set) as YAML; runs nothing",
                       description="Loads and validates the config exactly as `rdscale run` would, applies the "
                       "flags and every --set, and prints the result as YAML.")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("info", help="what a run directory holds")
    add_run_argument(p, "run directory or object-store prefix (s3://bucket/run)")
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["info"], when it runs

    p = sub.add_parser("compact", help="merge a finished run's small Lance fragments (runs no longer compact at "
                       "the end)", description="Compact the proteins, residues, rejects and ledger tables of a run "
                       "directory. Rows are unchanged. Holds the run's writer lease: refused while a run writes into the directory.")
    add_run_argument(p)
    p.add_argument("--cleanup", action="store_true",
                   help="also delete the data files of older table versions (frees disk; no time travel back)")
    p.add_argument("--target-rows", type=int, default=None, help="rows per compacted fragment (Lance default)")
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["compact"], when it runs

    p = sub.add_parser("make-tiny-family", help="write a tiny random ESM-2 family (offline demo and tests)")
    p.add_argument("dir", help="output directory for the checkpoints")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 48, 64],
                   help="embedding width of each model, smallest first; multiples of 8 (default 32 48 64)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="depth of each model, one per width (default 2, 3, 4, ...)")
    p.add_argument("--seed", type=int, default=0, help="same seed and arguments: the same files (default 0)")
    p.set_defaults(func=None)  # rdscale.cli.verbs.COMMANDS["make-tiny-family"], when it runs

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
        quiet_library_logs()
    targets, created = [], []
    try:
        if getattr(args, "func", None) is not None:  # a verb of another module (_GROUPS), imported to build its parser
            return args.func(args)
        verbs = _verb_module("verbs")
        if args.verb in _WRITERS:  # the config is loaded once, here, and handed to the checks and the verb
            cfg = _load(args)
            targets, created = verbs.check_outputs(args, cfg)
            quiet_ray(args, uses_ray=cfg.ray.address != "local")
            return verbs.COMMANDS[args.verb](args, cfg)
        return verbs.COMMANDS[args.verb](args)
    except BrokenPipeError:  # `rdscale search ... | head`: the reader has gone; what was written stays written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 141  # as a process killed by SIGPIPE (`cat`, `yes` in a pipe into head)
    except KeyboardInterrupt:
        print(f"rdscale {args.verb}: interrupted; committed shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one clear line, not a traceback
        message = user_facing(err, where=", ".join(map(str, targets)) or None)
        if message is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        if created:  # a writer's output checks ran: its verbs module is imported
            verbs.remove_if_empty(created)
        code = exit_code(err)
        kind = "configuration error" if code == 2 else "error"
        print(f"rdscale {args.verb}: {kind}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
