"""`rdscale extend`: move an embedded run up one chain level with a larger model, without re-embedding."""

from __future__ import annotations

import argparse

from rdscale.cli.args import add_fit_argument, add_run_argument, quiet_ray
from rdscale.config import REGRESSIONS
from rdscale.run.extend import extend, storage_overrides
from rdscale.run.integrity import writing


def cmd_extend(args) -> int:
    quiet_ray(args, uses_ray=not args.local)
    storage_overrides(args.overrides)  # the lease below is on the run's store already
    with writing(args.out):  # the run's writer lease: never beside a `run`/`embed` into the same folder
        summary = extend(
            args.out, args.model, from_fit=args.fit, sample_sequences=args.sample, regression=args.regression,
            overrides=args.overrides, progress=not args.quiet, local=args.local,
        )
    print("\n".join(summary.lines()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extend",
        help="grow a run to a larger model: append the next chain level without running the smaller models",
        description="Fits the next chain step from the stored full-width embeddings and the new model (or takes "
        "it from --fit), then writes the wider embedding as a new version of each table's embedding column. "
        "Resumable: rerun the same command after an interruption.",
    )
    add_run_argument(p, help="run directory (holds proteins.lance, residues.lance, fit/)")
    p.add_argument("--model", required=True, help="the larger model: ESM-2 name (e.g. 3B) or checkpoint path")
    add_fit_argument(p, "take the new step from this fit of the longer chain (fitted together with this run's fit) "
                     "instead of fitting it", "--from-fit")
    p.add_argument("--sample", type=int, default=1000, help="proteins whose residues fit the new step (default 1000)")
    p.add_argument("--regression", choices=REGRESSIONS, default="pcr")
    p.add_argument("--local", action="store_true",
                   help="run the new model in this process instead of in Ray actors over the run's fragments")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's recorded config for the new model, e.g. embedding.device=cuda:1")
    p.set_defaults(func=cmd_extend)
