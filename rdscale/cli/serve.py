"""`rdscale serve RUN`: the query server (rdscale.cluster.serve) for a lab: HTTP JSON search on Ray Serve."""

from __future__ import annotations

import argparse
import errno
import socket

from rdscale.cli.args import add_run_argument, quiet_ray
from rdscale.cluster.serve import serve_until_interrupted
from rdscale.search.tables import SearchError, open_table

SERVE_EPILOG = """examples:
  rdscale serve runs/demo --port 8000
  curl -s localhost:8000/search -H 'content-type: application/json' \\
       -d '{"ids": ["B0RED7"], "k": 5, "mode": "funnel"}'
  curl -s localhost:8000/search -d '{"sequences": {"q1": "MKTAYIAKQR"}, "k": 10}'
  curl -s localhost:8000/search -d '{"vectors": [[0.1, 0.2, ...]], "width": 320, "mode": "ann"}'
  open http://localhost:8000/                            # the search page (for people)
  open http://localhost:8000/docs                        # the OpenAPI schema: /openapi.json

answers: {"queries": n, "hits": [{"query", "id", ["pos"], "score", "rank"}, ...]}, the rows `rdscale search`
prints; errors: 4xx with {"error": "<one line>"} (413: over --max-body-mb / --max-queries, 408: past
--timeout)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP query server over a run (Ray Serve): search by id, sequence or vector, JSON in and out",
        description="Start a Ray Serve deployment whose replicas each keep the run's tables, indexes and "
        "embedding matrices in memory, behind an HTTP endpoint (POST /search, GET /info, schema at /openapi.json "
        "and /docs). Runs until interrupted (Ctrl-C).",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_argument(p, "run directory (holds proteins.lance, residues.lance, indexes/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="searcher replicas across the cluster (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs reserved per replica for its sequence-query encoder (default 0; fractions share a "
                   "GPU); refused when no node of the cluster has that many")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences of concurrent requests embedded in one forward (default 16; 1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a sequence query waits for others to share its forward (default 5 ms)")
    p.add_argument("--table", nargs="+", choices=["proteins", "residues"],
                   help="tables to serve (default: every table the run has)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="for sequence queries: the chain's checkpoints, if they moved since the run")
    p.add_argument("--device", help="for sequence queries: where to embed them (cpu, cuda, cuda:N; default auto)")
    p.add_argument("--max-body-mb", type=float, default=16.0,
                   help="largest request body in MiB (default 16); larger requests get 413")
    p.add_argument("--max-queries", type=int, default=10000,
                   help="most queries (ids, sequences or vectors) in one request (default 10000); more get 413")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one request may compute (default 300); then it stops and gets 408, as it stops "
                   "when its client goes away")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. auto); default: a local Ray instance in this process")
    p.set_defaults(func=cmd_serve)


def _check_port(host: str, port: int) -> None:
    """A port out of range or taken is one line here, before Ray starts (Serve's proxy would fail with a
    traceback per retry)."""
    if not 1 <= port <= 65535:
        raise SearchError(f"--port {port} is not a TCP port (1-65535)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as err:
        hint = " (another server listens there: choose another --port)" if err.errno == errno.EADDRINUSE else ""
        raise SearchError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas < 1 or args.num_cpus < 0 or args.num_gpus < 0:
        raise SearchError("--replicas must be >= 1, --num-cpus and --num-gpus >= 0")
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        raise SearchError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
    if not (args.max_body_mb > 0 and args.max_queries >= 1 and args.timeout > 0):
        raise SearchError("--max-body-mb and --timeout must be > 0 and --max-queries >= 1")
    _check_port(args.host, args.port)
    for table in args.table or ["proteins"]:
        open_table(args.out, table)  # a wrong path is one line here, not a replica's traceback
    quiet_ray(args, uses_ray=True)  # the terminal keeps rdscale's lines; Serve's and the access log: the file
    serve_until_interrupted(args.out, address=args.address, host=args.host, port=args.port,
                            replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                            tables=args.table, models=args.models, device=args.device,
                            max_body_mb=args.max_body_mb, max_queries=args.max_queries, timeout_s=args.timeout,
                            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    return 0
