"""`rdscale index` and `rdscale search`: the command-line face of rdscale.search.

`register(sub)` adds both verbs to the CLI's subparsers (rdscale/cli/main.py registers it when `index` or `search` is run). A run
directory (RUN, or `-o`) holds proteins.lance / residues.lance and the fit artifact; see rdscale/search/ for what widths,
indexes, modes and scores mean. User errors are `SearchError`s, which the CLI prints as one line (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rdscale import search as S
from rdscale.cli.args import add_run_argument
from rdscale.config import ConfigError, safe_yaml
from rdscale.errors import FastaFormatError
from rdscale.io.fasta import Reject, read_fasta
from rdscale.io.location import Location, is_remote
from rdscale.search.calibrate import describe
from rdscale.search.keys_index import ensure_id_index
from rdscale.search.names import DEFAULT_FAISS_INDEX_TYPE, FAISS_INDEX_TYPES
from rdscale.search.searcher import Searcher, index_is_fresh, num_queries

if TYPE_CHECKING:
    import numpy as np

INDEX_EPILOG = """examples:
  rdscale index runs/demo --width 32                 # cosine FAISS HNSW index on the 32-wide prefix
  rdscale index runs/demo --width 32 --backend lance # Lance IVF_HNSW_SQ index on column embedding_p32
  rdscale index runs/demo --table residues --width 16 --index-type IVF_PQ   # compact per-residue index
  rdscale index runs/demo --width 32 64 --metric l2 --backend lance --index-type IVF_PQ --param num_partitions=16
  rdscale index runs/demo --table residues --width 32
  rdscale index runs/demo --list"""

SEARCH_EPILOG = """examples:
  rdscale search runs/demo --id B0RED7 --width 32 --mode funnel -k 5
  rdscale search runs/demo --fasta queries.fa -k 10 --csv hits.csv
  rdscale search runs/demo --sequence MKTAYIAKQRQISFVKSHFSRQ -k 5
  rdscale search runs/demo --vector q.npy --mode ann --width 32 --filter "length > 100"
  rdscale search runs/demo --table residues --id B0RED7:10 -k 5     # one residue; --id B0RED7: all of them

scores are distances (smaller = closer): cosine -> 1 - cos, l2 -> squared Euclidean."""


def _param(text: str) -> tuple[str, object]:
    """`key=value` with the value parsed as YAML (so 16 -> int, 0.5 -> float)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r} must look like key=value, e.g. num_partitions=64")
    key, raw = text.split("=", 1)
    if key.strip() in _NAMED:  # would collide with build_index's own arguments
        raise argparse.ArgumentTypeError(f"--param {key.strip()}: use --{key.strip().replace('_', '-')}")
    try:
        return key.strip(), safe_yaml(raw, f"--param {key.strip()}")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_NAMED = {"metric", "index_type", "width", "table", "rebuild", "backend", "progress", "dataset_path"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="vector index on prefix widths (chain levels) of proteins or residues",
        description="Build a vector index on each requested prefix width. --backend faiss (default): a FAISS "
        "index (HNSW, IVF_FLAT or IVF_PQ) streamed from the table into <run>/indexes/ (relative to the run, so "
        "the run stays relocatable). --backend lance: materialise the prefix as its own column "
        "(embedding_p<width>; the stored width uses `embedding` itself) and build a Lance index on it. "
        "Idempotent: an index with the same settings that covers every row is kept.",
        epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_argument(p)
    p.add_argument("--table", nargs="+", choices=sorted(S.TABLES), default=["proteins"],
                   help="table(s) to index (default: proteins)")
    p.add_argument("--width", type=int, nargs="+",
                   help="prefix width(s) to index, chain levels (default: the narrowest level, for funnel search)")
    p.add_argument("--metric", choices=S.METRICS, default="cosine", help="distance (default: cosine)")
    p.add_argument("--backend", choices=S.BACKENDS, default=None,
                   help="faiss (default, also for a run on object storage, where the index is stored beside the "
                   "run and fetched once per node; faster at equal recall, see bench/results/bench_search*.json) "
                   "or lance (the index lives inside the table)")
    p.add_argument("--index-type", type=str.upper,
                   help=f"faiss: one of {', '.join(FAISS_INDEX_TYPES)} (default {DEFAULT_FAISS_INDEX_TYPE}); "
                   f"lance: one of {', '.join(S.INDEX_TYPES)} (default {S.DEFAULT_INDEX_TYPE})")
    p.add_argument("--param", dest="params", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="index parameter overriding the defaults derived from the row count; faiss: m, "
                   "ef_construction (HNSW), nlist, nprobe, pq_m, pq_bits (IVF); lance: passed to create_index "
                   "(num_partitions, num_sub_vectors, m, ef_construction, sample_rate, ...); repeatable")
    p.add_argument("--recall", type=float, default=0.95,
                   help="recall@10 the index is calibrated for on held-out rows of the table (default 0.95): "
                   "the cheapest search parameters (ef, nprobe, funnel shortlist) reaching it are stored with the "
                   "index and used by `search` unless it asks for another --recall; 0 skips calibration")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if an identical index exists")
    p.add_argument("--ray", metavar="ADDRESS", nargs="?", const="auto",
                   help="faiss IVF_FLAT / IVF_PQ: train in this process on a sample, add the rows in Ray tasks per "
                   "fragment group and merge them in one more (the Ray cluster at ADDRESS, default auto; `local` "
                   "starts one here)")
    p.add_argument("--id-index", action="store_true",
                   help="also a scalar (BTREE) index on each table's id column, kept if one exists: two-stage "
                   "residue search reads the shortlisted proteins' residues through it (--table residues)")
    p.add_argument("--list", action="store_true", help="list the existing indexes and exit")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "search",
        help="nearest neighbours by protein id, FASTA query or vector; exact, ANN or funnel",
        description="Top-k nearest rows of the proteins (or residues) table at any prefix width. exact: brute "
        "force, no index needed. ann: the vector index at --width. funnel: shortlist with the index at --width, "
        "re-rank the shortlist at --rerank-width (default: the full stored width).",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_argument(p)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--id", dest="ids", nargs="+", metavar="ID",
                       help="stored keys: protein ids; for --table residues ID:POS (one residue) or ID (all)")
    query.add_argument("--fasta", help="FASTA file of query sequences, embedded through the run's fitted chain")
    query.add_argument("--sequence", dest="sequences", nargs="+", metavar="SEQ",
                       help="query sequences on the command line (named seq0, seq1, ...), embedded as --fasta's")
    query.add_argument("--vector", help=".npy file of query vectors, (w,) or (q, w) with w >= the width searched")
    p.add_argument("--table", choices=sorted(S.TABLES), default="proteins",
                   help="search per protein (default) or per residue")
    p.add_argument("--mode", choices=S.MODES, default="exact", help="exact (default), ann or funnel")
    p.add_argument("--release", metavar="NAME",
                   help="search an earlier release of the run (a tag of `rdscale update`, or a table version "
                   "number); exact mode, as indexes belong to the latest version")
    p.add_argument("--width", type=int, help="prefix width, a chain level (default: the stored width for exact, "
                   "the narrowest indexed width for ann / funnel)")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--metric", choices=S.METRICS, default="cosine", help="distance (default: cosine)")
    p.add_argument("--filter", help='Lance SQL predicate on the table\'s columns, e.g. "length > 100"')
    p.add_argument("--shortlist", type=int, help="funnel: candidates taken from the index (default max(10k, 100))")
    p.add_argument("--rerank-width", type=int, help="funnel: width of the re-rank (default: the stored width)")
    p.add_argument("--nprobes", type=int, help="ann / funnel: IVF partitions probed (default: Lance's)")
    p.add_argument("--refine-factor", type=int, help="ann / funnel: re-rank refine_factor * k candidates exactly")
    p.add_argument("--ef", type=int, help="ann / funnel: HNSW search breadth")
    p.add_argument("--recall", type=float,
                   help="ann / funnel: the recall@k to reach; picks the cheapest point of the index's calibrated "
                   "curve that meets it (default: the point calibrated at `rdscale index`, recall 0.95); not "
                   "with --shortlist / --nprobes / --ef / --refine-factor")
    p.add_argument("--backend", choices=S.BACKENDS,
                   help="ann / funnel: the index to use (default: the narrowest for the metric; faiss first)")
    p.add_argument("--aggregate", choices=["proteins"],
                   help="with --table residues: aggregate residue hits to proteins (best residue score per "
                   "protein, and the number of its residues hit); --residue-hits residue hits per query residue")
    p.add_argument("--residue-hits", type=int,
                   help="with --aggregate: residue hits taken per query residue (default max(10k, 100))")
    p.add_argument("--residue-mode", choices=["two-stage", "global"],
                   help="with --table residues: two-stage (default for exact mode) shortlists proteins by their "
                   "per-protein embedding, then searches their residues exactly; global searches every residue "
                   "(exactly, or with the residues index for ann / funnel, their default)")
    p.add_argument("--protein-shortlist", type=int,
                   help="two-stage residue search: proteins shortlisted per query protein (default max(20k, 200))")
    p.add_argument("--exclude-self", action="store_true", help="with --id: drop the query row from its results")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="with --fasta or --sequence: the chain's checkpoints, if they moved since the run "
                   "(smallest first)")
    p.add_argument("--device", help="with --fasta or --sequence: where to embed the queries (cpu, cuda, cuda:N; "
                   "default auto)")
    p.add_argument("--csv", help="also write the results as CSV")
    p.add_argument("--arrow", help="also write the results as an Arrow IPC file")
    p.add_argument("--max-rows", type=int, default=50, help="rows printed to the terminal (default 50; 0: none)")
    p.set_defaults(func=cmd_search)


# ---------------------------------------------------------------------------------------------------------------
# index


def cmd_index(args: argparse.Namespace) -> int:
    if args.list:
        for table in args.table:
            _print_indexes(args.out, table)
        return 0
    params = dict(args.params)
    if args.ray:
        if args.backend == "lance":
            raise S.SearchError("--ray builds faiss indexes (--backend faiss)")
        from rdscale.cluster.index import ray_builder  # Ray only for --ray (on ALLOWED_LAZY)

        params["builder"] = ray_builder(address=args.ray)

    for table in args.table:
        if args.id_index:
            made = ensure_id_index(args.out, table)
            print(f"{table}: scalar BTREE index on id ({'built' if made else 'kept: it exists'})")
        widths = args.width or [S.chain_levels(S.open_table(args.out, table))[0]]
        for width in widths:
            started = time.perf_counter()
            info = S.build_index(args.out, table=table, width=width, index_type=args.index_type,
                                 metric=args.metric, rebuild=args.rebuild, backend=args.backend,
                                 progress=not args.quiet, recall=args.recall or None, **params)
            shown = ", ".join(f"{k}={v}" for k, v in sorted(info.params.items()))
            where = info.where
            print(f"{table}: {info.backend} {info.index_type} {info.metric} index on {where} (width {info.width}, "
                  f"{info.num_rows} rows; {shown}) in {time.perf_counter() - started:.1f} s")
            if info.calibration:
                for mode in ("ann", "funnel"):
                    print(f"{table}:   calibrated {describe(info.calibration, mode)}")
    return 0


def _print_indexes(run: str, table: str) -> None:
    infos = S.list_indexes(run, table)
    if not infos:
        print(f"{table}: no vector indexes")
    ds = S.open_table(run, table) if infos else None
    for info in infos:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(info.params.items()))
        where = info.index_name if info.backend == "faiss" else info.column
        stale = "" if index_is_fresh(ds, info) else "; STALE: the table changed since it was built, rerun `rdscale index` for it"
        print(f"{table}: width {info.width} {info.backend} {info.index_type} {info.metric} on {where} "
              f"({shown}){stale}")
        for mode in ("ann", "funnel"):
            print(f"{table}:   {describe(info.calibration, mode)}")
            curve = (info.calibration or {}).get(mode) or []
            if curve:
                points = ", ".join(f"{p['recall']:.3f}@" + "/".join(f"{k}={v}" for k, v in sorted(p["params"].items()))
                                   for p in curve)
                print(f"{table}:     curve (recall@{info.calibration['k']}@params, cheapest first): {points}")


# ---------------------------------------------------------------------------------------------------------------
# search


def parse_residue_key(text: str) -> str | tuple[str, int]:
    """`ID:POS` -> (ID, POS); a bare `ID` (or one whose last ':' is not followed by a number) -> ID."""
    head, sep, tail = text.rpartition(":")
    if sep and head and tail.isdigit():
        return head, int(tail)
    return text


def _local_query_file(path: str | Path, what: str) -> Path:
    """A query file, local or on an object store (fetched into the local cache, as run inputs are)."""
    if is_remote(path):
        loc = Location.parse(path)
        if not loc.is_file():
            raise S.SearchError(f"{what} {path} does not exist")
        return Path(loc.local_copy())
    path = Path(path)
    if not path.is_file():
        raise S.SearchError(f"{what} {path} does not exist")
    return path


def read_query_fasta(path: str | Path) -> dict[str, str]:
    """{id: sequence} of a query FASTA file; any record the pipeline would reject is an error naming it."""
    path = _local_query_file(path, "query FASTA")
    queries: dict[str, str] = {}
    try:
        for item in read_fasta([str(path)]):
            if isinstance(item, Reject):
                raise S.SearchError(f"{item.source}: query {item.id or '(no id)'} cannot be embedded: {item.reason}")
            queries[item.id] = item.sequence
    except FastaFormatError as err:
        raise S.SearchError(str(err)) from err
    if not queries:
        raise S.SearchError(f"{path} holds no FASTA records")
    return queries


def read_query_vectors(path: str | Path) -> np.ndarray:
    """(q, w) float32 from a .npy file (no pickles)."""
    import numpy as np

    path = _local_query_file(path, "query vector file")
    with path.open("rb") as f:
        if f.read(6) != b"\x93NUMPY":  # np.load would call it pickled data, whatever the file is
            raise S.SearchError(f"{path} is not a .npy file (write the query vectors with numpy.save)")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise S.SearchError(f"{path} is not a .npy array of numbers: {err}") from err
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.size == 0 or not np.issubdtype(vectors.dtype, np.number):
        raise S.SearchError(f"{path}: expected a numeric (w,) or (q, w) array, got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise S.SearchError(f"{path}: row {bad} holds NaN or inf")
    return vectors.astype(np.float32)


def cmd_search(args: argparse.Namespace) -> int:
    common = dict(
        table=args.table, width=args.width, k=args.k, mode=args.mode, metric=args.metric, filter=args.filter,
        shortlist=args.shortlist, rerank_width=args.rerank_width, nprobes=args.nprobes,
        refine_factor=args.refine_factor, ef=args.ef, backend=args.backend, recall=args.recall,
    )
    if args.residue_mode is not None or args.protein_shortlist is not None:
        common.update(residue_mode=args.residue_mode, protein_shortlist=args.protein_shortlist)
    if args.aggregate:
        common.update(aggregate=args.aggregate, residue_hits=args.residue_hits)
    elif args.residue_hits is not None:
        raise S.SearchError("--residue-hits only applies with --aggregate proteins")
    if (args.models or args.device) and not (args.fasta or args.sequences):
        raise S.SearchError("--models and --device only apply to --fasta and --sequence queries")
    if args.exclude_self and not args.ids:
        raise S.SearchError("--exclude-self only applies to --id queries")
    started = time.perf_counter()
    table = common.pop("table")
    # one searcher for all the queries: the table, its index and the chain are opened once; not resident, since
    # one command reads the table once anyway (streamed for exact search, candidate rows only for the funnel)
    searcher = Searcher(args.out, table, resident=False, models=args.models, device=args.device,
                        version=int(args.release) if (args.release or "").isdigit() else args.release)
    if args.ids:
        keys = [parse_residue_key(i) for i in args.ids] if table == "residues" else args.ids
        result = searcher.search(ids=keys, exclude_self=args.exclude_self, **common)
    elif args.fasta:
        result = searcher.search_sequences(read_query_fasta(args.fasta), **common)
    elif args.sequences:
        result = searcher.search_sequences(list(args.sequences), **common)
    else:
        result = searcher.search(read_query_vectors(args.vector), **common)
    took = time.perf_counter() - started

    n_queries = num_queries(result)
    print(f"{args.mode} search of {args.table} ({args.metric}, k={args.k}): {n_queries} queries, "
          f"{result.num_rows} rows in {took:.2f} s", file=sys.stderr)
    if args.max_rows > 0:
        print(S.format_results(result, max_rows=args.max_rows))
    for path, fmt in ((args.csv, "csv"), (args.arrow, "arrow")):
        if path:
            print(f"wrote {S.write_results(result, path, fmt)}", file=sys.stderr)
    return 0
