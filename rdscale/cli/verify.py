"""`rdscale verify RUN`: check a finished run against its inputs (exit 0), or list what is wrong (exit 1)."""

from __future__ import annotations

import argparse

from rdscale.cli.args import add_run_argument
from rdscale.run.verify import verify


def cmd_verify(args) -> int:
    problems = verify(args.out, progress=not args.quiet)
    if problems:
        for line in problems:
            print(line)
        print(f"rdscale verify: {args.out}: {len(problems)} problem(s)")
        return 1
    print(f"rdscale verify: {args.out}: ok (every input record in exactly one of proteins or rejects)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a run against its inputs: every record in exactly one of proteins/rejects, no duplicates",
        description="Re-reads the input files named in the run's recorded config and checks that every input record "
        "is in exactly one of proteins or rejects (by source file:offset, id and sequence digest), that no protein "
        "id and no residue (id, pos) is stored twice, that every planned shard is committed and unchanged, and "
        "that the tables' metadata matches the fit artifact. Exit 0 when all holds, else 1 with one line per "
        "problem. Run it after a large job.",
    )
    add_run_argument(p)
    p.set_defaults(func=cmd_verify)
