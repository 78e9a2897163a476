"""`rdscale <verb>`: one verb per user task. Each reads one YAML config (`-c`), overridable by flags and by
`--set section.key=value`. `rdscale <verb> --help` is the documentation of record."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from rdscale import __version__
from rdscale.config import Config, ConfigError, load_config

log = logging.getLogger("rdscale")

EPILOG = """configs: conf/demo.yaml (offline demo, tiny models), conf/single_gpu.yaml (real ESM-2 8M->650M on one
GPU), conf/uniref50_cluster.yaml (ray job submit on a GPU cluster). Docs: README.md."""


def _config_args(p: argparse.ArgumentParser, fasta: bool = True, out: bool = True) -> None:
    p.add_argument("-c", "--config", help="YAML config (see conf/); flags below override it")
    if fasta:
        p.add_argument("--fasta", nargs="+", metavar="FILE", help="input FASTA files (plain, .gz or BGZF)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="the chain, smallest first: ESM-2 names (esm2_t6_8M_UR50D or 8M) or checkpoint paths")
    if out:
        p.add_argument("-o", "--out", help="output directory (output.dir)")
    p.add_argument("--device", help="embedding.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small inputs, debugging)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set embedding.toks_per_batch=8192 (repeatable)")


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
    return load_config(args.config, overrides)


def _print_summary(summary, query_hint: bool = True) -> None:
    print("\n".join(summary.lines()))
    if query_hint:
        print(
            "\nnext: rdscale index -o {0} --width <level>   then   rdscale search -o {0} --id <protein id>\n"
            "      or in Python: lance.dataset('{1}').to_table()".format(summary.out_dir, summary.tables.get("proteins"))
        )


def cmd_extract(args) -> int:
    from rdscale.run.pipeline import embed

    cfg = _load(args)
    if len(cfg.models) != 1:
        raise ConfigError(f"extract embeds with one model; got {len(cfg.models)} (use `rdscale run` for a chain)")
    _print_summary(embed(cfg, fit_dir=None, progress=not args.quiet))
    return 0


def cmd_fit(args) -> int:
    from rdscale.run.pipeline import fit

    cfg = _load(args)
    fit_dir = fit(cfg, out=args.fit_out)
    from rdscale.fit.artifact import load_fit

    _, manifest = load_fit(fit_dir)
    print(f"fit artifact: {fit_dir}")
    for step in manifest.get("steps", []):
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in step.items()))
    return 0


def cmd_embed(args) -> int:
    from rdscale.run.pipeline import embed

    cfg = _load(args)
    fit_dir = args.fit or cfg.fit.artifact
    if not fit_dir and len(cfg.models) > 1:
        fit_dir = str(Path(cfg.output.dir) / "fit")
    _print_summary(embed(cfg, fit_dir=fit_dir, progress=not args.quiet))
    return 0


def cmd_run(args) -> int:
    from rdscale.run.pipeline import run

    cfg = _load(args)
    _print_summary(run(cfg, progress=not args.quiet))
    return 0


def cmd_info(args) -> int:
    import lance

    from rdscale.io.store import read_metadata

    root = Path(args.out)
    if not (root / "proteins.lance").exists():
        raise ConfigError(f"{root} holds no rdscale run (no proteins.lance)")
    for name in ("proteins", "residues", "rejects"):
        path = root / f"{name}.lance"
        if path.exists():
            print(f"{name}: {lance.dataset(str(path)).count_rows()} rows  ({path})")
    meta = read_metadata(root / "proteins.lance")
    print(f"levels (prefix widths): {meta.get('levels')}")
    models = (meta.get("fit_manifest") or {}).get("models", [])
    print("models: " + ", ".join(f"{m.get('name')} ({m.get('width')})" for m in models))
    return 0


def cmd_make_tiny_family(args) -> int:
    from rdscale.model.loading import build_tiny_family

    paths = build_tiny_family(args.dir, widths=tuple(args.widths), layers=tuple(args.layers), seed=args.seed)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdscale",
        description="Embed protein databases with the ESM-2 family and reverse distillation (nested, Matryoshka "
        "embeddings), store them in Lance, search them at any prefix width.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"rdscale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("extract", help="one model over FASTA files -> per-residue + per-protein embeddings in Lance",
                       description="Like fair-esm's esm-extract, into Lance tables (proteins, residues, rejects).")
    _config_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("fit", help="fit pass: moments on a sample, solve the chain, write the fit artifact")
    _config_args(p)
    p.add_argument("--fit-out", help="where to write the artifact (default: <output.dir>/fit)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("embed", help="apply pass: reverse-distilled embeddings of every record into Lance (resumable)")
    _config_args(p)
    p.add_argument("--fit", help="fit artifact directory (default: fit.artifact, else <output.dir>/fit)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("run", help="fit, then embed: the whole pipeline (resumable)")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="what a run directory holds")
    p.add_argument("-o", "--out", required=True, help="run directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("make-tiny-family", help="write a tiny random ESM-2 family (offline demo and tests)")
    p.add_argument("dir", help="output directory for the checkpoints")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_family)

    for register in _EXTRA_VERBS:
        register(sub)
    return parser


def _extra_verbs() -> list[Callable[[argparse._SubParsersAction], None]]:
    # Verbs with their own argument sets live beside the modules they drive; each module exposes register(sub).
    from rdscale.cli.eval import register as register_eval
    from rdscale.cli.extend import register as register_extend
    from rdscale.cli.search import register as register_search
    from rdscale.cli.serve import register as register_serve

    return [register_search, register_eval, register_extend, register_serve]


_EXTRA_VERBS = _extra_verbs()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"rdscale {args.verb}: configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rdscale {args.verb}: interrupted; committed shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one clear line, not a traceback
        from rdscale.errors import user_facing

        message = user_facing(err)
        if message is None:
            raise
        print(f"rdscale {args.verb}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
