"""``rdscale serve``: the query service (rdscale.search.service) as a Ray Serve deployment behind FastAPI.

Each replica holds its own long-lived Searchers (tables, indexes and matrices loaded once at start); Serve
spreads replicas over the cluster and routes requests among them. HTTP API (schema at /openapi.json, docs at
/docs):

- ``POST /search``: a JSON object, see ``SearchRequest``; answers ``{"queries": n, "hits": [...]}``, the rows
  ``rdscale search`` prints;
- ``GET /info``: the run's tables, widths and indexes; ``GET /health``;
- ``GET /card``: the run's models, levels, row counts and releases; ``POST /records``: description and length of
  proteins; ``POST /explain``: one query's distances to given proteins at every chain level, and a sequence
  query's per-residue similarity to one of them;
- ``GET /``: a search page for people (rdscale/cluster/page/, shipped in the package: no CDN, works offline),
  which uses only the JSON API above.

A bad request gets a 4xx with ``{"error": "<one line>"}``: 400 for bad JSON or a bad search (wrong vector
width, bad filter, unknown width ...), 404 for an unknown id, 422 for fields of the wrong type, 413 for a body or
a query count over the server's limits, 408 for a search that ran past the server's time limit (it stops
computing, as it does when the client goes away). Never a 500 for bad input.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from importlib import resources
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdscale.cluster.executor import ray_log_file, route_worker_output
from rdscale.search.request import option_fields
from rdscale.search.service import BATCH_WAIT_MS, MAX_BATCH, RequestTooLarge, SearchCancelled, SearchService
from rdscale.search.tables import KeyNotFoundError, SearchError

log = logging.getLogger(__name__)
APP_NAME = "rdscale"
MAX_BODY_MB = 16.0  # default request body limit (rdscale serve --max-body-mb)
MAX_QUERIES = 10000  # default queries per request (--max-queries)
TIMEOUT_S = 300.0  # default time one request may compute (--timeout)
PAGE_ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
# The page loads nothing from anywhere but this server (and the browser enforces it).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")


def _http_type(kind: Any) -> Any:
    """A SearchRequest option's type over HTTP: integers strict (JSON 10.0 or "10" is not k=10)."""
    return {int: StrictInt, int | None: StrictInt | None}.get(kind, kind)


# One search: exactly one of ids, sequences or vectors, and the options of `rdscale search` (rdscale.search.request,
# where they are declared once; the service makes the SearchRequest that checks them).
SearchRequest = create_model(
    "SearchRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__="One search: exactly one of ids, sequences or vectors, and the options of `rdscale search`.",
    table=(str, Field("proteins", description="proteins or residues")),
    ids=(list[str] | None, Field(None, description="stored keys: protein ids; residues: ID:POS or ID (all)")),
    sequences=(dict[str, str] | None, Field(None, description="{name: sequence}, embedded through the run's chain")),
    vectors=(list[list[float]] | list[float] | None, Field(
        None, description="query vectors (q, w) or one vector (w,), w >= the width searched")),
    release=(str | None, Field(None, description="a release tag (GET /card lists them): search that version")),
    **{name: (_http_type(kind), Field(default, description=doc or None))
       for name, kind, default, doc in option_fields()},
)


class Hit(BaseModel):
    query: str | int
    id: str
    pos: int | None = None
    score: float
    rank: int
    hits: int | None = None


class SearchResponse(BaseModel):
    queries: int
    hits: list[Hit]


class RecordsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(..., description="protein ids")
    release: str | None = Field(None, description="a release tag: the proteins of that release")


class ExplainRequest(BaseModel):
    """One query (exactly one of ids, sequences, vectors, holding one entry) and the proteins to compare it with."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = Field(None, description="one stored protein id")
    sequences: dict[str, str] | None = Field(None, description="one {name: sequence}")
    vectors: list[list[float]] | list[float] | None = Field(None, description="one vector")
    targets: list[str] = Field(..., description="protein ids (at most 100), e.g. a search's hits")
    residues_of: str | None = Field(None, description="sequence queries: the protein whose residues are compared "
                                    "with the query's (default the first target)")
    release: str | None = Field(None, description="a release tag: compare with the proteins of that release")


app = FastAPI(title="rdscale search", description="Nearest neighbours in an rdscale run at any prefix width.",
              version="1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def _error(status: int, text: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": _one_line(text)})


class _BodyLimit:
    """A request body over the limit gets 413 before it is parsed: read (at most limit + 1 bytes, whatever the
    declared Content-Length says), then handed on as read.

    The limit is a class attribute, set by the replica's SearchDeployment: Serve serves a copy of ``app`` (so
    ``app.state`` set in the replica is not the served app's), but the class is the module's own."""

    max_body = int(MAX_BODY_MB * 2**20)

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.inner(scope, receive, send)
        limit = _BodyLimit.max_body
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, int(declared), limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._too_large(scope, receive, send, size, limit, more=True)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.inner(scope, replay, send)

    @staticmethod
    async def _too_large(scope, receive, send, size: int, limit: int, more: bool = False):
        what = f"more than {limit}" if more else str(size)
        response = _error(413, f"the request body is {what} bytes; this server takes at most {limit} bytes "
                               "(rdscale serve --max-body-mb): send the queries in several requests")
        await response(scope, receive, send)


app.add_middleware(_BodyLimit)


@app.middleware("http")
async def _body_is_json(request: Request, call_next):
    """POST /search takes a JSON body whatever its declared type: `curl -d '{...}'` (no -H) sends it as a form
    (application/x-www-form-urlencoded), which FastAPI would refuse with a baffling "valid dictionary" 422."""
    if request.method == "POST" and request.url.path.rstrip("/").endswith("/search"):
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
        request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(status_code=400, content={"error": f"bad JSON: {_one_line(first.get('msg', ''))}"})
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return JSONResponse(status_code=422, content={"error": _one_line(f"{where or 'request'}: {first.get('msg')}")})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors raised before a request reaches /search (a body that cannot be parsed, an unknown path) in the
    same {"error": ...} shape as every other bad request."""
    return JSONResponse(status_code=exc.status_code, content={"error": _one_line(exc.detail)},
                        headers=getattr(exc, "headers", None))


def _asset(name: str) -> str:
    return (resources.files("rdscale.cluster") / "page" / name).read_text(encoding="utf-8")


@serve.deployment(name="rdscale-search")
@serve.ingress(app)
class SearchDeployment:
    def __init__(self, run: str, tables: list[str] | None = None, models: list[str] | None = None,
                 device: str | None = None, limits: dict | None = None, service: str | None = None):
        limits = {"max_body": int(MAX_BODY_MB * 2**20), "timeout": TIMEOUT_S, "max_queries": MAX_QUERIES,
                  **(limits or {})}
        _BodyLimit.max_body = int(limits["max_body"])
        self.timeout = float(limits["timeout"])
        if service is None:
            factory = SearchService
        else:  # "module:Name", resolved here in the replica (the class travels by name, not by value)
            import importlib

            module, _, attr = service.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        self.service = factory(run, tables, models=models, device=device, max_queries=limits["max_queries"],
                               max_batch=int(limits.get("max_batch", MAX_BATCH)),
                               batch_wait_ms=float(limits.get("batch_wait_ms", BATCH_WAIT_MS)))

    async def _call(self, method, body: dict) -> Any:
        """``method(body, cancelled)`` on a worker thread, under the time limit. A client that goes away (Serve
        cancels its request) or a request past the limit sets ``stop``: the service stops at its next step."""
        stop = threading.Event()
        try:
            return await asyncio.wait_for(asyncio.to_thread(method, body, stop.is_set), self.timeout)
        except asyncio.TimeoutError:
            stop.set()
            return _error(408, f"the request ran past this server's time limit of {self.timeout:g} s (rdscale "
                               "serve --timeout); send fewer queries per request")
        except asyncio.CancelledError:
            stop.set()
            raise
        except KeyNotFoundError as err:
            return _error(404, err)
        except RequestTooLarge as err:
            return _error(413, err)
        except SearchCancelled as err:
            return _error(408, err)
        except SearchError as err:
            return _error(400, err)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={400: {"description": "bad request"}, 404: {"description": "unknown id"},
                         408: {"description": "past the time limit"}, 413: {"description": "too large"}})
    async def search(self, request: SearchRequest) -> Any:
        return await self._call(self.service.search, request.model_dump(exclude_none=True))

    @app.get("/info")
    def info(self) -> dict:
        return self.service.info()

    @app.get("/card")
    def card(self) -> dict:
        """The run's models, levels, row counts (proteins, residues, rejects) and releases."""
        return self.service.card()

    @app.post("/records")
    def records(self, request: RecordsRequest) -> Any:
        """id, description and length of stored proteins (ids the run does not hold are left out)."""
        try:
            return self.service.records(request.ids, request.release)
        except SearchError as err:
            return _error(413 if isinstance(err, RequestTooLarge) else 400, err)

    @app.post("/explain", responses={400: {"description": "bad request"}, 404: {"description": "unknown id"}})
    async def explain(self, request: ExplainRequest) -> Any:
        """One query's cosine distance to each target at every chain level; for a sequence query, its
        per-residue similarity to a target's residues."""
        return await self._call(self.service.explain, request.model_dump(exclude_none=True))

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(_asset("index.html"), headers={"Content-Security-Policy": PAGE_CSP,
                                                           "Cache-Control": "no-cache"})

    @app.get("/page/{name}", include_in_schema=False)
    def page_asset(self, name: str) -> Response:
        if name not in PAGE_ASSETS:
            return _error(404, "Not Found")
        return Response(_asset(name), media_type=PAGE_ASSETS[name], headers={"Cache-Control": "no-cache"})


def _cluster_gpus() -> list[float]:
    """GPUs of each alive node of the connected Ray cluster."""
    return [float((n.get("Resources") or {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def check_gpus(num_gpus: float) -> None:
    """Refuse, in one line, GPUs per replica that no node has (Serve would wait for such a replica forever). An
    autoscaling cluster adds GPU nodes on demand: RDSCALE_AUTOSCALER=1 lets the request through."""
    if num_gpus <= 0 or os.environ.get("RDSCALE_AUTOSCALER") == "1":
        return
    gpus = _cluster_gpus()
    most = max(gpus, default=0.0)
    if most <= 0:
        raise SearchError(f"--num-gpus {num_gpus:g}, but the Ray cluster has no GPU ({len(gpus)} node(s)); "
                          "serve on CPUs (--num-gpus 0), or join a cluster with GPU nodes (--address)")
    if most < num_gpus:
        raise SearchError(f"--num-gpus {num_gpus:g}, but the largest node has at most {most:g} GPU; lower it "
                          "(fractions share a GPU between replicas)")


def actor_options(num_cpus: float, num_gpus: float = 0.0, runtime_env: dict | None = None) -> dict[str, Any]:
    """A replica's Ray actor options: the CPUs and GPUs it reserves (a reserved GPU is the one its query encoder
    uses: Ray sets the replica's CUDA_VISIBLE_DEVICES), and its runtime environment."""
    return {"num_cpus": num_cpus, **({"num_gpus": float(num_gpus)} if num_gpus else {}),
            **({"runtime_env": runtime_env} if runtime_env else {})}


def start(run: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, num_cpus: float = 1.0,
          num_gpus: float = 0.0, tables: list[str] | None = None, models: list[str] | None = None,
          device: str | None = None, max_body_mb: float = MAX_BODY_MB, max_queries: int = MAX_QUERIES,
          timeout_s: float = TIMEOUT_S, max_batch: int = MAX_BATCH, batch_wait_ms: float = BATCH_WAIT_MS,
          service: str | None = None, runtime_env: dict | None = None) -> str:
    """Start Serve's HTTP proxy (in the connected Ray cluster) and the deployment; returns the base URL.

    Limits per request: ``max_body_mb`` (413), ``max_queries`` (413), ``timeout_s`` (408). ``num_gpus``: GPUs
    reserved per replica, for its query encoder (refused when no node has that many). ``max_batch`` /
    ``batch_wait_ms``: concurrent sequence queries share a forward of the encoder (rdscale.search.service.
    EmbedBatcher). ``service``: ``"module:Name"`` of a ``SearchService`` subclass to serve instead (importable in
    the replicas, e.g. through ``runtime_env``, Ray's per-actor environment). Blocks until every replica has
    loaded its searchers, so the first request is answered from memory."""
    check_gpus(float(num_gpus))
    serve.start(http_options={"host": host, "port": int(port)})
    actor = actor_options(num_cpus, num_gpus, runtime_env)
    deployment = SearchDeployment.options(num_replicas=int(replicas), ray_actor_options=actor)
    limits = {"max_body": int(max_body_mb * 2**20), "max_queries": int(max_queries), "timeout": float(timeout_s),
              "max_batch": int(max_batch), "batch_wait_ms": float(batch_wait_ms)}
    serve.run(deployment.bind(str(run), tables, models, device, limits, service), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Remove the deployment and shut Serve down (the Ray session itself stays up)."""
    serve.shutdown()


def route_serve_logger(log_file: str | None) -> None:
    """Serve's driver-side logger ("ray.serve") writes to the terminal through a handler of its own (it does not
    propagate to "ray"): when Ray's messages go to `log_file`, so do its."""
    if log_file is None:
        return
    logger = logging.getLogger("ray.serve")
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            to_file = logging.FileHandler(log_file)
            to_file.setFormatter(handler.formatter)
            to_file.setLevel(handler.level)
            for kept in handler.filters:
                to_file.addFilter(kept)
            logger.removeHandler(handler)
            logger.addHandler(to_file)


def serve_until_interrupted(run: str, *, address: str | None = None, **options: Any) -> None:
    """`rdscale serve`: join (or start) Ray at `address`, start the server (`start`'s options), say where it
    listens, and keep it up until Ctrl-C. A server that cannot start is one SearchError line."""
    log_file = ray_log_file()  # before ray.init, which replaces the "ray" logger's handlers
    ray.init(address=address, include_dashboard=False, configure_logging=False)
    route_worker_output(log_file)  # the proxy's, controller's and replicas' lines (the access log among them)
    route_serve_logger(log_file)
    try:
        url = start(run, **options)
    except ray.exceptions.RayError as err:  # the proxy could not bind, a replica failed to load the run, ...
        stop()
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise SearchError(f"the server did not start: {lines[-1] if lines else type(err).__name__}") from err
    print(f"rdscale serve: {run} at {url} (search page {url}/, POST /search, GET /info, schema {url}/docs); "
          "Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
