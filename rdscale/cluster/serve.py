"""``rdscale serve``: the query service (rdscale.search.service) as a Ray Serve deployment behind FastAPI.

Each replica holds its own long-lived Searchers (tables, indexes and matrices loaded once at start); Serve
spreads replicas over the cluster and routes requests among them. HTTP API (schema at /openapi.json, docs at
/docs):

- ``POST /search``: a JSON object, see ``SearchRequest``; answers ``{"queries": n, "hits": [...]}``, the rows
  ``rdscale search`` prints;
- ``GET /info``: the run's tables, widths and indexes; ``GET /health``.

A bad request gets a 4xx with ``{"error": "<one line>"}``: 400 for bad JSON or a bad search (wrong vector
width, bad filter, unknown width ...), 404 for an unknown id, 422 for fields of the wrong type. Never a 500 for
bad input.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdscale.search.tables import KeyNotFoundError, SearchError

log = logging.getLogger(__name__)
APP_NAME = "rdscale"


class SearchRequest(BaseModel):
    """One search: exactly one of ids, sequences or vectors, and the options of `rdscale search`."""

    model_config = ConfigDict(extra="forbid")
    table: str = Field("proteins", description="proteins or residues")
    ids: list[str] | None = Field(None, description="stored keys: protein ids; residues: ID:POS or ID (all)")
    sequences: dict[str, str] | None = Field(None, description="{name: sequence}, embedded through the run's chain")
    vectors: list[list[float]] | list[float] | None = Field(
        None, description="query vectors (q, w) or one vector (w,), w >= the width searched")
    k: StrictInt = Field(10, description="neighbours per query")
    mode: str = Field("exact", description="exact, ann or funnel")
    width: StrictInt | None = Field(None, description="prefix width, a chain level")
    metric: str = Field("cosine", description="cosine or l2")
    filter: str | None = Field(None, description="Lance SQL predicate on the table's columns")
    shortlist: StrictInt | None = None
    rerank_width: StrictInt | None = None
    nprobes: StrictInt | None = None
    refine_factor: StrictInt | None = None
    ef: StrictInt | None = None
    exclude_self: bool = False
    backend: str | None = Field(None, description="faiss or lance (ann / funnel)")
    aggregate: str | None = Field(None, description="proteins: residue hits aggregated to proteins")
    residue_hits: StrictInt | None = None
    recall: float | None = Field(None, description="ann / funnel: recall@k to reach, from the index's calibrated "
                                 "curve (default: the point calibrated at `rdscale index`)")


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


app = FastAPI(title="rdscale search", description="Nearest neighbours in an rdscale run at any prefix width.",
              version="1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


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


@serve.deployment(name="rdscale-search")
@serve.ingress(app)
class SearchDeployment:
    def __init__(self, run: str, tables: list[str] | None = None, models: list[str] | None = None,
                 device: str | None = None):
        from rdscale.search.service import SearchService

        self.service = SearchService(run, tables, models=models, device=device)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={400: {"description": "bad request"}, 404: {"description": "unknown id"}})
    def search(self, request: SearchRequest) -> Any:
        try:
            return self.service.search(request.model_dump(exclude_none=True))
        except KeyNotFoundError as err:
            return JSONResponse(status_code=404, content={"error": _one_line(err)})
        except SearchError as err:
            return JSONResponse(status_code=400, content={"error": _one_line(err)})

    @app.get("/info")
    def info(self) -> dict:
        return self.service.info()

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}


def start(run: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, num_cpus: float = 1.0,
          tables: list[str] | None = None, models: list[str] | None = None, device: str | None = None) -> str:
    """Start Serve's HTTP proxy (in the connected Ray cluster) and the deployment; returns the base URL.

    Blocks until every replica has loaded its searchers, so the first request is answered from memory."""
    serve.start(http_options={"host": host, "port": int(port)})
    deployment = SearchDeployment.options(num_replicas=int(replicas), ray_actor_options={"num_cpus": num_cpus})
    serve.run(deployment.bind(str(run), tables, models, device), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Remove the deployment and shut Serve down (the Ray session itself stays up)."""
    serve.shutdown()
