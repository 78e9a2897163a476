"""SearchRequest: the search options declared once, checked once, the same one-line error from Python (Searcher,
search()), the CLI and the HTTP service."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import invoke
from test_search import clustered, write_proteins

from rdscale import search as S
from rdscale.search.request import OPTIONS, SearchRequest
from rdscale.search.searcher import Searcher
from rdscale.search.service import SearchService

BAD = [  # (options, the one-line error every entry point gives)
    ({"k": 0}, "k must be a positive integer, got 0"),
    ({"mode": "fast"}, "unknown mode 'fast'; expected one of ('exact', 'ann', 'funnel')"),
    ({"metric": "dot"}, "unknown metric 'dot'; expected one of"),
    ({"shortlist": -3, "mode": "funnel"}, "shortlist must be a positive integer, got -3"),
    ({"recall": 1.5, "mode": "ann"}, "recall must be a number in (0, 1], got 1.5"),
    ({"recall": 0.9, "nprobes": 4, "mode": "ann"}, "give recall or the search parameters (nprobes), not both"),
    ({"residue_hits": 5}, "residue_hits only applies with aggregate='proteins'"),
]
CLI_FLAGS = {"k": "--k", "mode": "--mode", "shortlist": "--shortlist", "recall": "--recall", "nprobes": "--nprobes"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("request_run")
    write_proteins(out / "proteins.lance", clustered(300, 32, 10, spread=0.15, seed=3))
    return out


def test_the_options_are_declared_once():
    assert OPTIONS == tuple(f.name for f in dataclasses.fields(SearchRequest)) and len(OPTIONS) == 17
    serve = pytest.importorskip("rdscale.cluster.serve")
    http = set(serve.SearchRequest.model_fields)
    assert http == {*OPTIONS, "table", "ids", "sequences", "vectors", "release"}
    for name in OPTIONS:  # the HTTP defaults are the dataclass's
        assert serve.SearchRequest.model_fields[name].default == getattr(SearchRequest(), name), name


def test_a_request_is_normalised_and_passed_whole(run):
    req = SearchRequest(k=np.int64(3), metric="euclidean")
    assert req.k == 3 and type(req.k) is int and req.metric == "l2"
    searcher = Searcher(run)
    q = searcher.vectors(np.arange(2), searcher.full_width)
    by_request = searcher.search(q, request=SearchRequest(k=4, width=16))
    by_keywords = searcher.search(q, k=4, width=16)
    assert by_request.equals(by_keywords) and by_request.num_rows == 8
    with pytest.raises(S.SearchError, match="not both"):
        searcher.search(q, request=req, k=4)


def test_an_unknown_option_is_a_search_error_not_a_type_error(run):
    with pytest.raises(S.SearchError, match=r"unknown search option\(s\) \['kk'\]"):
        Searcher(run).search(np.ones((1, 64), np.float32), kk=3)


@pytest.mark.parametrize("options,message", BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_options_get_one_line_identical_everywhere(run, capsys, options, message):
    got = []
    for call in (lambda: SearchRequest(**options),
                 lambda: Searcher(run).search(ids=["P00001"], **options),
                 lambda: S.search(run, ids=["P00001"], **options),
                 lambda: SearchService(run, preload=False).search({"ids": ["P00001"], **options})):
        with pytest.raises(S.SearchError) as err:
            call()
        got.append(str(err.value))
    assert len(set(got)) == 1 and got[0].startswith(message) and "\n" not in got[0], got
    if set(options) <= set(CLI_FLAGS) and options.get("mode") != "fast":
        argv = ["search", run, "--id", "P00001"]
        for name, value in options.items():
            argv += [CLI_FLAGS[name], value]
        code, _, err = invoke(capsys, argv)
        assert code != 0 and got[0] in err, err
