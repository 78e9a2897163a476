"""`rdscale update RUN --fasta NEW_RELEASE... --release NAME`: bring a run to a new database release by embedding
only the new and changed sequences (rdscale/run/update.py)."""

from __future__ import annotations

import argparse

from rdscale.cli.args import add_run_argument, quiet_ray
from rdscale.run.update import UpdateError, abort_update, update


def cmd_update(args) -> int:
    if args.abort:
        if args.fasta or args.release:
            raise UpdateError("--abort undoes the interrupted update; it takes no --fasta or --release")
        print(abort_update(args.out))
        return 0
    if not args.fasta or not args.release:
        raise UpdateError("--fasta and --release are required (or --abort, to undo an interrupted update)")
    overrides = list(args.overrides)
    if args.local:
        overrides.append("ray.address=local")
    if args.device:
        overrides.append(f"embedding.device={args.device}")
    quiet_ray(args, uses_ray="ray.address=local" not in (o.replace(" ", "") for o in overrides))
    report = update(args.out, args.fasta, args.release, overrides=overrides, progress=not args.quiet,
                    previous=args.previous)
    print("\n".join(report.lines()))
    print(f"\nearlier releases stay readable: rdscale info {args.out} lists them; "
          f"lance.dataset('<run>/proteins.lance', version='{report.previous}')")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "update",
        help="follow a database: bring a run to a new release, embedding only new and changed sequences",
        description="Compares every record of the new release with the run by id and sequence digest, embeds only "
        "the new and changed sequences with the run's own models and frozen fit (unchanged rows stay "
        "bit-identical), deletes the rows of ids that are gone and the old rows of changed ids, and tags the new "
        "table versions with the release name; the versions before the first update are tagged 'initial'. Holds "
        "the run's writer lease; resumable: rerun the same command after an interruption, or undo it with "
        "--abort.",
    )
    add_run_argument(p, help="run directory or object-store prefix (as written by `rdscale run`)")
    p.add_argument("--fasta", nargs="+", metavar="FILE",
                   help="the new release's FASTA files (plain, .gz or BGZF; local paths or URIs)")
    p.add_argument("--release", metavar="NAME",
                   help="name of the new release, the tag of its table versions (letters, digits, . - _; not "
                   "all digits, which would read as a table version), e.g. 2024_01")
    p.add_argument("--abort", action="store_true",
                   help="undo an interrupted update instead: the tables go back to their versions from before it")
    p.add_argument("--previous", default="initial", metavar="NAME",
                   help="tag for the run's versions before its first update (default: initial)")
    p.add_argument("--device", help="embedding.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small releases)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's recorded config (not its models, embedding or output settings), "
                   "e.g. --set input.shard_mb=256 or ray.address=auto")
    p.set_defaults(func=cmd_update)
