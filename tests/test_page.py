"""The search page of `rdscale serve` (GET /), driven in a real headless Chromium (Debian's chromium and
chromedriver, Selenium) against a real Ray Serve deployment of a real run (the tiny ESM-2 family over UniProt
records of examples/example.fasta).

One served run is shared by the module; later tests restart it (a plain restart, a slow query encoder through
the supported `service=` hook, two replicas on the SeaweedFS S3 server). The browser resolves no host name but
127.0.0.1's (--host-resolver-rules), so the page is loaded with outbound network blocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from test_searchuser import upload

from rdscale import search as S

httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.ray
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N_RECORDS = 40
SLOW_S = 3.0  # the slow encoder's seconds per embedding step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_records(n: int) -> dict[str, tuple[str, str]]:
    """id -> (header, sequence) of the first n records of the bundled UniProt sample."""
    out, name = {}, None
    for line in (ROOT / "examples" / "example.fasta").read_text().splitlines():
        if line.startswith(">"):
            if len(out) == n:
                break
            name = line[1:].split()[0]
            out[name] = [line[1:], ""]
        elif name:
            out[name][1] += line.strip()
    return {k: (h, s) for k, (h, s) in out.items()}


@pytest.fixture(scope="module")
def page_run(tmp_path_factory, tiny_family):
    """A real run (proteins, residues, rejects) of 40 UniProt records, then `rdscale update` to a release
    "2024_02" that drops two records and adds two (so "initial" is a past release), and a FAISS index at width
    32. Returns (run, {id: sequence} of the current release)."""
    from rdscale.config import load_config
    from rdscale.run.pipeline import run
    from rdscale.run.update import update

    root = tmp_path_factory.mktemp("page_run")
    records = first_records(N_RECORDS + 2)
    first, release = list(records)[:N_RECORDS], list(records)[:N_RECORDS - 2] + list(records)[N_RECORDS:]
    for name, keep in (("db.fa", first), ("db2.fa", release)):
        (root / name).write_text("".join(f">{records[k][0]}\n{records[k][1]}\n" for k in keep))
    cfg = load_config(None, [
        "ray.address=local", f"output.dir={root / 'run'}", f"input.paths={json.dumps([str(root / 'db.fa')])}",
        f"models={json.dumps([str(p) for p in tiny_family])}", "embedding.window=200", "embedding.overlap=32",
        "fit.sample_sequences=40", "output.residue_dtype=float32",
    ])
    run(cfg, progress=False)
    out = root / "run"
    update(out, [str(root / "db2.fa")], "2024_02", overrides=["ray.address=local"], progress=False)
    S.build_index(out, width=32, backend="faiss")
    return out, {k: records[k][1] for k in release}


class Server:
    """`rdscale serve`'s deployment in the session's Ray cluster, on one port across restarts."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, run, **options):
        from rdscale.cluster import serve as rs

        rs.start(str(run), port=self.port, num_cpus=0, **options)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("the server did not come up")

    def stop(self):
        from rdscale.cluster import serve as rs

        rs.stop()

    def search(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/search", json=body, timeout=60)


@pytest.fixture(scope="module")
def server(ray_session, page_run):
    srv = Server().start(page_run[0])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium / chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rdscale-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1360,1000",
                # outbound network blocked: no host resolves but this one (the server at 127.0.0.1)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------------------
# driving the page


def open_page(driver, url: str, query: str = ""):
    driver.get(url + "/" + query)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def settle(driver, before: int, timeout: float = 60) -> None:
    """Wait until a search newer than ``before`` has started and the newest one has ended."""
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "const b = document.body.dataset; return Number(b.started || 0) > arguments[0] && b.done === b.started",
        before))


def started(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.started || 0"))


def search(driver, text: str | None = None, *, table=None, width=None, mode=None, k=None, filter=None,
           release=None, enter=True) -> None:
    before = started(driver)
    for name, value in (("table", table), ("width", width), ("mode", mode), ("release", release)):
        if value is not None:
            Select(driver.find_element(By.ID, name)).select_by_value(str(value))
    for name, value in (("k", k), ("filter", filter)):
        if value is not None:
            box = driver.find_element(By.ID, name)
            box.clear()
            box.send_keys(str(value))
    box = driver.find_element(By.ID, "query")
    if text is not None:
        box.clear()
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                              box, text)
    if enter:
        box.send_keys(Keys.ENTER)  # Enter submits
    else:
        driver.find_element(By.ID, "go").click()
    settle(driver, before)


def shown_rows(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#hits tbody tr')].map(tr => {
          const d = tr.dataset, r = {query: d.query, id: d.id, rank: Number(d.rank), score: Number(d.score)};
          if (d.pos !== undefined) r.pos = Number(d.pos);
          if (d.hits !== undefined) r.hits = Number(d.hits);
          r.cells = [...tr.cells].map(c => c.textContent);
          return r;
        });""")


def error_text(driver) -> str | None:
    err = driver.find_element(By.ID, "error")
    return err.text if err.is_displayed() else None


def assert_rows_equal_api(driver, srv: Server, body: dict) -> list[dict]:
    assert error_text(driver) is None, error_text(driver)
    r = srv.search(body)
    assert r.status_code == 200, r.text
    want = r.json()["hits"]
    got = shown_rows(driver)
    assert [(str(w["query"]), w["id"], w["rank"], w.get("pos"), w.get("hits")) for w in want] == \
        [(g["query"], g["id"], g["rank"], g.get("pos"), g.get("hits")) for g in got], (body, got, want)
    for g, w in zip(got, want):
        assert abs(g["score"] - w["score"]) < 1e-6
        assert f"{w['score']:.4f}" in g["cells"]  # the distance shown is the API's, to 4 decimals
    return got


def api_error(srv: Server, body: dict) -> str:
    r = srv.search(body)
    assert 400 <= r.status_code < 500, r.text
    return r.json()["error"]


# -------------------------------------------------------------------------------------------------------------------


def test_page_ships_in_the_package_and_names_no_other_host(server):
    from importlib import resources

    for name in ("index.html", "page.js", "page.css"):
        assert (resources.files("rdscale.cluster") / "page" / name).is_file()
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, ctype in (("page.js", "javascript"), ("page.css", "css")):
        r = httpx.get(f"{server.url}/page/{name}", timeout=10)
        assert r.status_code == 200 and ctype in r.headers["content-type"]
        # no asset from anywhere else: the only absolute URL is the UniProt link target (a link, not an asset)
        assert {u for u in _urls(r.text)} <= {"https://www.uniprot.org/uniprotkb/", "http://www.w3.org/2000/svg"}, \
            _urls(r.text)
    assert _urls(page.text) == set()
    assert httpx.get(f"{server.url}/page/../serve.py", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 200  # /docs stays


def _urls(text: str) -> set[str]:
    """Absolute URLs in code (comment lines left out), cut before any ${...} template part."""
    import re

    code = "\n".join(line for line in text.splitlines() if not line.strip().startswith(("//", "/*", "*")))
    return {m.split("${")[0] for m in re.findall(r"https?://[^\s\"'`)]+", code)}


def test_service_card_records_explain_and_limits(page_run):
    """The API the page is built on, in-process: /card, /records, /explain agree with /search; limits and
    cancellation are one-line errors."""
    import numpy as np

    from rdscale.search.service import RequestTooLarge, SearchCancelled, SearchService
    from rdscale.search.tables import KeyNotFoundError, SearchError

    out, seqs = page_run
    ids = list(seqs)
    service = SearchService(out, max_queries=5)
    card = service.card()
    assert [m["width"] for m in card["models"]] == [32, 48, 64] and card["levels"] == [32, 48, 64]
    assert card["counts"]["proteins"] == N_RECORDS and card["counts"]["rejects"] == 0
    assert card["counts"]["residues"] == sum(len(v) for v in seqs.values())
    assert [(r["name"], r["current"]) for r in card["releases"]] == [("initial", False), ("2024_02", True)]
    got = service.records([ids[0], "nope", ids[1]])["records"]
    assert [(r["id"], r["length"]) for r in got] == [(ids[0], len(seqs[ids[0]])), (ids[1], len(seqs[ids[1]]))]
    assert all(r["description"].startswith("GO:") for r in got)

    # explain's distances at each level are the search's distances at that width
    hits = service.search({"ids": [ids[2]], "k": 5})["hits"]
    targets = [h["id"] for h in hits]
    explained = service.explain({"ids": [ids[2]], "targets": targets})
    assert explained["levels"] == [32, 48, 64] and "residues" not in explained
    for level, width in enumerate(explained["levels"]):
        at = service.search({"ids": [ids[2]], "k": N_RECORDS, "width": width})["hits"]
        want = {h["id"]: h["score"] for h in at}
        for t in explained["targets"]:
            assert abs(t["scores"][level] - want[t["id"]]) < 1e-5, (width, t)
    # a sequence query: per-residue similarity to its own protein is 1 along the whole sequence
    seq = seqs[ids[2]]
    explained = service.explain({"sequences": {"q": seq}, "targets": [ids[2], ids[3]]})
    res = explained["residues"]
    assert res["of"] == ids[2] and len(res["similarity"]) == len(seq) and res["sequence"] == seq
    assert min(res["similarity"]) > 0.999 and res["best_match"] == list(range(len(seq)))
    assert explained["targets"][0]["scores"][-1] < 1e-4
    for bad, error in (({"ids": [ids[0], ids[1]], "targets": [ids[0]]}, SearchError),
                       ({"ids": [ids[0]], "targets": ["nope"]}, KeyNotFoundError),
                       ({"ids": [ids[0]], "targets": []}, SearchError),
                       ({"vectors": [0.1] * 8, "targets": [ids[0]]}, SearchError)):
        with pytest.raises(error):
            service.explain(bad)

    # limits: more queries than max_queries; a cancelled request stops before embedding
    with pytest.raises(RequestTooLarge, match="6 ids in one request; this server takes at most 5"):
        service.search({"ids": ids[:6]})
    with pytest.raises(SearchCancelled):
        service.search({"sequences": {"a": "MKTAYIAKQRW"}}, cancelled=lambda: True)
    # the same sequence twice in a request, or asked again, is embedded once
    calls = []
    embedder = service.searchers["proteins"].embedder()
    real = embedder.embed
    embedder.embed = lambda s, n=None, width=None: calls.append(len(s)) or real(s, n, width=width)
    twice = service.search({"sequences": {"a": "MKTAYIAKQRW", "b": "mktayiakqrw*"}, "k": 2})["hits"]
    again = service.search({"sequences": {"c": "MKTAYIAKQRW"}, "k": 2})["hits"]
    assert calls == [1]
    assert [h["id"] for h in twice[:2]] == [h["id"] for h in twice[2:]] == [h["id"] for h in again]
    np.testing.assert_allclose([h["score"] for h in twice[:2]], [h["score"] for h in again], atol=1e-6)


def test_search_by_id_sequence_and_fasta_with_widths_and_modes(server, browser, page_run):
    out, seqs = page_run
    ids = list(seqs)
    open_page(browser, server.url)
    card = browser.find_element(By.ID, "card").text
    assert "esm2_t2_32_tiny" in card.replace("-", "_") or "32" in card
    assert f"{N_RECORDS} proteins" in card and "residues" in card and "rejects" in card
    assert "proteins @ 32" in card and "faiss" in card and "initial" in card and "2024_02" in card

    # by id, Enter in the query box
    search(browser, ids[0])
    got = assert_rows_equal_api(browser, server, {"ids": [ids[0]], "k": 10})
    assert got[0]["id"] == ids[0] and len(got) == 10
    link = browser.find_element(By.CSS_SELECTOR, "#hits tbody tr a")
    assert link.get_attribute("href") == f"https://www.uniprot.org/uniprotkb/{ids[0]}"
    assert got[0]["cells"][2] and int(got[0]["cells"][3]) == len(seqs[ids[0]])  # description, length
    assert "q=" + ids[0] in browser.current_url  # the permalink
    assert len(browser.find_elements(By.CSS_SELECTOR, "#levels-chart polyline")) == 10
    assert "hits for 1 query in" in browser.find_element(By.ID, "status").text

    # width and mode (the button, not Enter)
    search(browser, width=32, mode="funnel", k=5, enter=False)
    assert_rows_equal_api(browser, server, {"ids": [ids[0]], "k": 5, "width": 32, "mode": "funnel"})
    search(browser, width="", mode="ann")
    assert_rows_equal_api(browser, server, {"ids": [ids[0]], "k": 5, "mode": "ann"})
    search(browser, width=48, mode="exact", filter="length > 100")
    assert_rows_equal_api(browser, server, {"ids": [ids[0]], "k": 5, "width": 48, "filter": "length > 100"})

    # a pasted sequence (wrapped, lower case): its own protein first, and a per-residue picture
    seq = seqs[ids[3]]
    pasted = "\n".join(seq[i : i + 60].lower() for i in range(0, len(seq), 60))
    search(browser, pasted, width="", filter="")
    got = assert_rows_equal_api(browser, server, {"sequences": {"query": pasted}, "k": 5})
    assert got[0]["id"] == ids[3]
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "residues-figure").is_displayed())
    assert ids[3] in browser.find_element(By.ID, "residues-caption").text

    # a two-record FASTA: two queries
    fasta = f">first\n{seqs[ids[5]]}\n>second some words\n{seqs[ids[7]]}\n"
    search(browser, fasta, k=3)
    got = assert_rows_equal_api(browser, server, {"sequences": {"first": seqs[ids[5]], "second": seqs[ids[7]]},
                                                  "k": 3})
    assert {g["query"] for g in got} == {"first", "second"} and len(got) == 6

    # residues, and residues aggregated to proteins
    search(browser, f"{ids[2]}:5", table="residues")
    assert_rows_equal_api(browser, server, {"ids": [f"{ids[2]}:5"], "table": "residues", "k": 3})
    search(browser, ids[2], table="residues-proteins")
    assert_rows_equal_api(browser, server, {"ids": [ids[2]], "table": "residues", "aggregate": "proteins", "k": 3})

    # the recall box shows (and `recall` is sent) only where the server's schema takes a recall target
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    takes_recall = "recall" in schema["components"]["schemas"]["SearchRequest"]["properties"]
    assert browser.find_element(By.ID, "recall-label").is_displayed() == takes_recall
    if takes_recall:
        box = browser.find_element(By.ID, "recall")
        box.clear()
        box.send_keys("0.9")
        search(browser, ids[0], table="proteins", mode="ann", k=5, release="")
        assert_rows_equal_api(browser, server, {"ids": [ids[0]], "k": 5, "mode": "ann", "recall": 0.9})
        assert "recall=0.9" in browser.current_url
        box.clear()

    # a past release by its tag (exact mode)
    search(browser, ids[1], table="proteins", mode="exact", k=3, release="initial")
    assert_rows_equal_api(browser, server, {"ids": [ids[1]], "k": 3, "release": "initial"})

    # the permalink, opened afresh, shows the same search
    url = browser.current_url
    assert "release=initial" in url
    before = shown_rows(browser)
    browser.get("about:blank")
    browser.get(url)
    settle(browser, 0)
    assert shown_rows(browser) == before

    # CSV / TSV of the rows shown
    browser.execute_script("window._blobs = []; URL.createObjectURL = b => { window._blobs.push(b); return 'blob:x'; }")
    browser.find_element(By.ID, "dl-csv").click()
    browser.find_element(By.ID, "dl-tsv").click()
    csv_text, tsv_text = browser.execute_async_script(
        "const done = arguments[0]; Promise.all(window._blobs.map(b => b.text())).then(done)")
    assert csv_text.splitlines()[0] == "query,rank,id,description,length,score"
    assert len(csv_text.splitlines()) == 1 + len(before)
    assert tsv_text.splitlines()[1].split("\t")[2] == before[0]["id"]


def test_bad_inputs_show_the_api_one_line_error(server, browser, page_run):
    _, seqs = page_run
    open_page(browser, server.url)
    cases = [
        ("NOPE12", {"ids": ["NOPE12"]}),
        ("MKTAYJJJQR", {"sequences": {"query": "MKTAYJJJQR"}}),
        ("[0.1, 0.2, 0.3]", {"vectors": [[0.1, 0.2, 0.3]]}),
        (">only\n", {"sequences": {"only": ""}}),
    ]
    for text, body in cases:
        search(browser, text)
        shown = error_text(browser)
        assert shown == api_error(server, body), (text, shown)
        assert "\n" not in shown and "Traceback" not in shown
    search(browser, "   ")
    assert error_text(browser).startswith("empty query")
    search(browser, "[0.1, oops]")
    assert error_text(browser).startswith("bad JSON vector")
    # a good search clears the error; a narrow window (a phone) keeps the page usable
    browser.set_window_size(390, 900)
    try:
        search(browser, list(seqs)[4])
        assert error_text(browser) is None and shown_rows(browser)[0]["id"] == list(seqs)[4]
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert browser.find_element(By.ID, "go").is_displayed()
    finally:
        browser.set_window_size(1360, 1000)


def test_loads_with_the_network_blocked_and_no_asset_off_host(server, browser, page_run):
    open_page(browser, server.url, "?q=" + list(page_run[1])[0])
    settle(browser, 0)
    origin = server.url
    loaded = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    assert len(loaded) >= 4  # the page, its script and style, and the API calls
    assert all(u.startswith(origin + "/") for u in loaded), loaded
    refs = browser.execute_script(
        "return [...document.querySelectorAll('[src], link[href], script, img, iframe, object, embed')]"
        ".map(e => e.src || e.href || e.data || '').filter(Boolean)")
    assert refs and all(u.startswith(origin + "/") for u in refs), refs


def test_screenshot_after_a_real_query(server, browser, page_run):
    """docs/search-page.png: the page after a real query (written when RDSCALE_SCREENSHOT is set)."""
    target = os.environ.get("RDSCALE_SCREENSHOT")
    if not target:
        pytest.skip("set RDSCALE_SCREENSHOT=docs/search-page.png to write the screenshot")
    _, seqs = page_run
    ids = list(seqs)
    browser.set_window_size(1360, 1180)
    open_page(browser, server.url)
    # a database protein with residues 61-100 swapped for another's: its top hit, and a dip where they differ
    query = seqs[ids[3]][:60] + seqs[ids[20]][:40] + seqs[ids[3]][100:]
    search(browser, query, k=8)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "residues-figure").is_displayed())
    browser.save_screenshot(target)


def test_the_page_still_works_after_the_server_restarts(server, browser, page_run):
    out, seqs = page_run
    ids = list(seqs)
    open_page(browser, server.url)
    search(browser, ids[6])
    server.stop()
    search(browser, ids[8])  # the server is down: one line, not a blank page
    assert "did not answer" in (error_text(browser) or ""), error_text(browser)
    server.start(out)
    search(browser, ids[8])
    assert_rows_equal_api(browser, server, {"ids": [ids[8]], "k": 10})


def test_a_slow_query_shows_progress_and_a_second_query_cancels_it(server, browser, page_run, tmp_path):
    """A query encoder that takes SLOW_S seconds a step: the page shows progress, stays responsive, and a second
    query cancels the first. The server's limits (issue: a 2,000-sequence request computed for minutes after its
    client left): it stops when the client goes, 408 past --timeout, 413 past --max-body-mb / --max-queries."""
    out, seqs = page_run
    ids = list(seqs)
    log = tmp_path / "embed.log"
    server.stop()
    server.start(out, service="slow_service:SlowSearchService", timeout_s=5.0, max_body_mb=1.0,
                 max_queries=3000, runtime_env={"env_vars": {"RDSCALE_TEST_EMBED_DELAY": str(SLOW_S),
                                                             "RDSCALE_TEST_EMBED_LOG": str(log),
                                                             "PYTHONPATH": str(TESTS)}})
    open_page(browser, server.url)
    before = started(browser)
    box = browser.find_element(By.ID, "query")
    browser.execute_script("arguments[0].value = arguments[1]", box, seqs[ids[9]][:50])
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "progress").is_displayed())
    time.sleep(1.0)
    assert browser.find_element(By.ID, "status").text.startswith("Searching")
    t0 = time.time()
    assert browser.execute_script("return 1 + 1") == 2 and time.time() - t0 < 1  # responsive
    browser.find_element(By.ID, "filter").send_keys("length > 0")  # typing works while it waits
    assert browser.find_element(By.ID, "filter").get_attribute("value") == "length > 0"
    browser.find_element(By.ID, "filter").clear()
    # the second query (an id: no embedding) is answered while the first would still be embedding
    t0 = time.time()
    search(browser, ids[10])
    assert time.time() - t0 < SLOW_S
    assert started(browser) == before + 2
    assert_rows_equal_api(browser, server, {"ids": [ids[10]], "k": 10})
    time.sleep(SLOW_S)  # the first query's answer, had it not been cancelled, would have arrived by now
    assert shown_rows(browser)[0]["id"] == ids[10] and error_text(browser) is None

    # a 2,000-sequence request whose client leaves after 1 s: the server stops at its next step
    letters = "ACDEFGHIKLMNPQRSTVWY"
    many = {f"s{i}": "MKTAYIAKQR" + letters[i % 20] + letters[i // 20 % 20] + letters[i // 400] for i in range(2000)}
    assert len(set(many.values())) == 2000  # all different: none is embedded (or kept) twice
    log.write_text("")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/search", json={"sequences": many}, timeout=1.0)
    time.sleep(2 * SLOW_S - 1.0)  # a second step would have started by now
    assert log.read_text().split() == ["16"], "the request kept computing after its client left"
    # a patient client: 408 past the time limit, and nothing computes after it
    log.write_text("")
    t0 = time.time()
    r = httpx.post(f"{server.url}/search", json={"sequences": many}, timeout=60)
    assert r.status_code == 408 and "time limit of 5 s" in r.json()["error"], r.text[:300]
    assert time.time() - t0 < 5.0 + 2 * SLOW_S
    time.sleep(SLOW_S + 1)  # the step under way when the limit passed has ended: nothing started since
    assert len(log.read_text().split()) <= 2  # steps at 0 and SLOW_S; the limit passed at 5 s
    # 413: a body over --max-body-mb, more queries than --max-queries
    r = httpx.post(f"{server.url}/search", content=b'{"ids": ["' + b"x" * (1 << 21) + b'"]}', timeout=30)
    assert r.status_code == 413 and "at most 1048576 bytes" in r.json()["error"], r.text[:300]
    r = httpx.post(f"{server.url}/search", json={"ids": ids * 80}, timeout=30)
    assert r.status_code == 413 and "at most 3000" in r.json()["error"], r.text[:300]


def test_two_replicas_on_a_run_stored_on_s3(server, browser, page_run, s3):
    out, seqs = page_run
    ids = list(seqs)
    remote = f"s3://{s3.bucket}/page/run"
    upload(out, remote)
    server.stop()
    server.start(remote, replicas=2, runtime_env={"env_vars": s3.env()})
    open_page(browser, server.url)
    assert f"{N_RECORDS} proteins" in browser.find_element(By.ID, "card").text
    for i in range(4):  # several searches, routed over the two replicas
        search(browser, ids[11 + i])
        assert_rows_equal_api(browser, server, {"ids": [ids[11 + i]], "k": 10})
    search(browser, seqs[ids[15]])
    got = assert_rows_equal_api(browser, server, {"sequences": {"query": seqs[ids[15]]}, "k": 10})
    assert got[0]["id"] == ids[15]
