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


# ------------------------------------------------------------------------------------------------ sequence batching


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, tiny_family):
    """A real run of the tiny three-model chain (sequence queries embed through it), and its sequences."""
    from helpers import AA, make_cfg, write_fasta

    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run as run_pipeline

    tmp = tmp_path_factory.mktemp("chain_run")
    fasta = write_fasta(tmp / "in.fasta", n=24, seed=3)
    run_pipeline(make_cfg(tmp, fasta, tiny_family, "run"), LocalExecutor(), progress=False)
    rng = np.random.default_rng(5)
    # 12 distinct sequences of different lengths (a batch pads them to its longest)
    return tmp / "run", ["".join(rng.choice(list(AA), size=20 + 5 * i)) for i in range(12)]


def _alone(out, sequences, **options):
    """Each sequence searched on its own, one request after another (a fresh service: nothing kept)."""
    service = SearchService(out, ["proteins"], max_batch=1)
    answers = [service.search({"sequences": {f"q{i}": s}, "k": 5, **options}) for i, s in enumerate(sequences)]
    assert service.batcher.forwards == len(sequences)
    return answers


def test_concurrent_sequence_queries_share_forwards_and_equal_one_by_one(chain_run):
    import threading

    out, sequences = chain_run
    want = _alone(out, sequences)
    service = SearchService(out, ["proteins"], max_batch=16, batch_wait_ms=200)
    barrier = threading.Barrier(len(sequences))

    def ask(i):
        barrier.wait()
        return service.search({"sequences": {f"q{i}": sequences[i]}, "k": 5})

    with ThreadPoolExecutor(len(sequences)) as pool:
        got = list(pool.map(ask, range(len(sequences))))
    assert service.batcher.forwards < len(sequences)  # grouped: fewer forwards than requests
    for g, w in zip(got, want):
        assert g["queries"] == 1 and same_rows(g["hits"], w["hits"]), (g, w)
    # A batch one of whose sequences is refused: the others still get their answers, the bad one its own error.
    service = SearchService(out, ["proteins"], max_batch=16, batch_wait_ms=200)
    barrier = threading.Barrier(3)

    def ask_or_error(name_seq):
        barrier.wait()
        try:
            return service.search({"sequences": dict([name_seq]), "k": 5})
        except S.SearchError as err:
            return str(err)

    with ThreadPoolExecutor(3) as pool:
        mixed = list(pool.map(ask_or_error, [("q0", sequences[0]), ("bad", "MK1J"), ("q1", sequences[1])]))
    assert same_rows(mixed[0]["hits"], want[0]["hits"]) and same_rows(mixed[2]["hits"], want[1]["hits"])
    assert isinstance(mixed[1], str) and "\n" not in mixed[1]


def test_serve_batches_concurrent_sequence_queries_over_http(ray_session, chain_run, tmp_path):
    """Real HTTP clients at once: their sequence queries are embedded in fewer forwards than requests (the slow
    test service logs one line per forward) and answered as one-by-one queries are. (Last in this module: it
    restarts Serve on another run.)"""
    from pathlib import Path

    from rdscale.cluster import serve as rs

    out, sequences = chain_run
    want = _alone(out, sequences)
    log = tmp_path / "embed.log"
    rs.stop()
    port = free_port()
    url = rs.start(str(out), port=port, num_cpus=0, service="slow_service:SlowSearchService", max_batch=16,
                   batch_wait_ms=5, runtime_env={"env_vars": {"RDSCALE_TEST_EMBED_DELAY": "0.5",
                                                              "RDSCALE_TEST_EMBED_LOG": str(log),
                                                              "PYTHONPATH": str(Path(__file__).parent)}})
    try:
        with httpx.Client(timeout=120) as client:
            def ask(i):
                r = client.post(f"{url}/search", json={"sequences": {f"q{i}": sequences[i]}, "k": 5})
                return r.status_code, r.json()

            with ThreadPoolExecutor(len(sequences)) as pool:
                got = list(pool.map(ask, range(len(sequences))))
    finally:
        rs.stop()
    for (status, body), w in zip(got, want):
        assert status == 200 and same_rows(body["hits"], w["hits"]), (body, w)
    forwards = [int(line) for line in log.read_text().split()]
    assert sum(forwards) == len(sequences) and len(forwards) < len(sequences), forwards


def test_num_gpus_reaches_the_replicas_options(monkeypatch):
    from rdscale.cluster import serve as rs

    assert rs.actor_options(0.0, 0.5)["num_gpus"] == 0.5
    assert "num_gpus" not in rs.actor_options(1.0, 0.0)  # the default: CPUs only
    assert rs.actor_options(2.0, 1.0, {"env_vars": {}}) == {"num_cpus": 2.0, "num_gpus": 1.0,
                                                           "runtime_env": {"env_vars": {}}}
    monkeypatch.setattr(rs, "_cluster_gpus", lambda: [0.0, 0.0])
    with pytest.raises(S.SearchError, match="no GPU"):
        rs.check_gpus(1.0)
    monkeypatch.setattr(rs, "_cluster_gpus", lambda: [0.0, 1.0])
    rs.check_gpus(0.5)
    rs.check_gpus(0.0)
    with pytest.raises(S.SearchError, match="at most 1"):
        rs.check_gpus(2.0)
