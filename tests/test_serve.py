"""`rdscale serve`: a real Ray Serve deployment in the session's Ray cluster, queried over real HTTP (httpx).

Serve is started on a free port inside the shared Ray session (tests/conftest.py) and shut down at the end of the
module, so the Ray session stays usable for the other tests.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_search import clustered, write_proteins, write_residues

from rdscale import search as S
from rdscale.search.service import SearchService

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_run")
    prot = clustered(2000, 32, 40, spread=0.15, seed=1)
    res = clustered(1500, 32, 30, spread=0.3, seed=2)[:, :16].astype(np.float16)
    write_proteins(out / "proteins.lance", prot)
    write_residues(out / "residues.lance", res)
    S.build_index(out, width=8, backend="faiss")
    S.build_index(out, width=8, backend="lance")
    return out, prot


@pytest.fixture(scope="module")
def server(ray_session, run):
    from rdscale.cluster import serve as rs

    out, _ = run
    port = free_port()
    url = rs.start(str(out), port=port, num_cpus=0)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        rs.stop()


def cli_rows(out, request: dict) -> list[dict]:
    """What `rdscale search` answers for the same request (its Searcher, one-shot)."""
    request = dict(request)
    table = request.pop("table", "proteins")
    if "ids" in request:
        ids = request.pop("ids")
        keys = [tuple(i.split(":")[:1]) + (int(i.split(":")[1]),) if ":" in i else i for i in ids]
        result = S.search(out, ids=keys, table=table, **request)
    else:
        result = S.search(out, np.array(request.pop("vectors"), np.float32), table=table, **request)
    return result.to_pylist()


def same_rows(got: list[dict], want: list[dict]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if {k: v for k, v in g.items() if k != "score"} != {k: v for k, v in w.items() if k != "score"}:
            return False
        if abs(g["score"] - w["score"]) > 1e-6:
            return False
    return True


def test_openapi_schema_and_info(server):
    schema = httpx.get(f"{server}/openapi.json", timeout=10).json()
    assert "/search" in schema["paths"] and "SearchRequest" in json.dumps(schema)
    assert httpx.get(f"{server}/docs", timeout=10).status_code == 200
    info = httpx.get(f"{server}/info", timeout=10).json()
    assert info["tables"]["proteins"]["rows"] == 2000 and info["tables"]["residues"]["width"] == 16
    (hnsw,) = [i for i in info["tables"]["proteins"]["indexes"] if i["backend"] == "faiss" and i["width"] == 8]
    assert (hnsw["metric"], hnsw["index_type"]) == ("cosine", "HNSW")
    # its calibrated recall curve (rdscale index calibrates every index), the cheapest point first
    assert hnsw["recall"]["target"] == 0.95 and hnsw["recall"]["curves"]["funnel"][0]["cost"] > 0
    body = {"vectors": [[1.0] * 32], "mode": "funnel", "width": 8, "backend": "faiss", "recall": 0.99, "k": 3}
    assert len(httpx.post(f"{server}/search", json=body, timeout=30).json()["hits"]) == 3


def test_concurrent_clients_get_the_cli_answers(server, run):
    out, prot = run
    rng = np.random.default_rng(0)
    requests = []
    for i in range(160):  # 8 threads x 20 queries, a mix of kinds and modes
        kind = i % 4
        if kind == 0:
            requests.append({"ids": [f"P{rng.integers(2000):05d}"], "k": 5})
        elif kind == 1:
            requests.append({"vectors": (prot[rng.integers(2000)] + 0.01).tolist(), "k": 3, "mode": "funnel"})
        elif kind == 2:
            requests.append({"ids": [f"P{rng.integers(2000):05d}"], "k": 4, "mode": "ann", "backend": "lance",
                             "exclude_self": True})
        else:
            requests.append({"table": "residues", "ids": [f"P{rng.integers(150):05d}:{rng.integers(10)}"], "k": 3,
                             "width": 8, "filter": "pos > 2"})

    with httpx.Client(timeout=60) as client:
        def ask(req):
            r = client.post(f"{server}/search", json=req)
            return r.status_code, r.json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, requests))
    for req, (status, body) in zip(requests, answers):
        assert status == 200, body
        vreq = dict(req)
        if "vectors" in vreq:
            vreq["vectors"] = [vreq["vectors"]]
        want = cli_rows(out, vreq)
        assert body["queries"] == 1
        assert same_rows(body["hits"], want), (req, body["hits"], want)


def test_bad_requests_get_a_one_line_4xx_never_a_500(server):
    cases = [
        ({"ids": ["nope"]}, 404, "not in the proteins table: nope"),
        ({"vectors": [[0.1] * 5]}, 400, "query vectors are 5 wide"),
        ({"vectors": [[0.1] * 32, [0.2] * 31]}, 400, "one length"),
        ({"ids": ["P00001"], "filter": "nope > 1"}, 400, "bad filter"),
        ({"ids": ["P00001"], "width": 12}, 400, "not a chain level"),
        ({"ids": ["P00001"], "mode": "ann", "width": 16}, 400, "no cosine vector index at width 16"),
        ({"ids": ["P00001"], "table": "genes"}, 400, "unknown table"),
        ({"ids": ["P00001"], "k": "many"}, 422, "k"),
        ({"ids": ["P00001"], "colour": "red"}, 422, "colour"),
        ({}, 400, "exactly one of"),
    ]
    with httpx.Client(timeout=30) as client:
        for body, status, message in cases:
            r = client.post(f"{server}/search", json=body)
            assert r.status_code == status, (body, r.status_code, r.text)
            error = r.json()["error"]
            assert message in error and "\n" not in error and "Traceback" not in error, (body, error)
        r = client.post(f"{server}/search", content=b'{"ids": ["P00001"', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"].startswith("bad JSON"), r.text
        # `curl -d '{...}'` without -H declares a form body: still read as JSON (the --help examples do this)
        for ctype in ("application/x-www-form-urlencoded", "text/plain"):
            r = client.post(f"{server}/search", content=b'{"ids": ["P00001"], "k": 2}', headers={"content-type": ctype})
            assert r.status_code == 200 and r.json()["queries"] == 1, (ctype, r.text)
        r = client.post(f"{server}/search", content=b'ids=P00001', headers={"content-type": "application/x-www-form"
                                                                                          "-urlencoded"})
        assert r.status_code == 400 and r.json()["error"].startswith("bad JSON"), r.text
        # JSON true is not k=1, 2.0 is not a width; a body nested too deep to parse, an unknown path: {"error"}
        for body, field in (({"ids": ["P00001"], "k": True}, "k"), ({"ids": ["P00001"], "width": 8.0}, "width")):
            r = client.post(f"{server}/search", json=body)
            assert r.status_code == 422 and r.json()["error"].startswith(field), r.text
        r = client.post(f"{server}/search", content=b"[" * 100000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), r.text
        r = client.get(f"{server}/nope")
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}, r.text


def test_service_in_process_equals_the_cli(run):
    """The same service object the replicas hold, without HTTP: same rows, and it aggregates residues."""
    out, _ = run
    service = SearchService(out)
    body = service.search({"ids": ["P00042", "P00007"], "k": 5, "mode": "funnel"})
    assert body["queries"] == 2 and same_rows(body["hits"], cli_rows(out, {"ids": ["P00042", "P00007"], "k": 5,
                                                                          "mode": "funnel"}))
    agg = service.search({"table": "residues", "ids": ["P00012"], "k": 3, "aggregate": "proteins"})
    assert agg["hits"][0]["id"] == "P00012" and agg["hits"][0]["hits"] >= 10
