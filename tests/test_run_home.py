"""One home for a run (rdscale.io.runs.Run): the only module that spells the names under a run, the run's status and
its committed-rows filter on a real (interrupted, then finished) run, and search taking a Run or a path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import embed_killed_before_ledger, make_cfg, write_fasta

from rdscale.io import runs
from rdscale.io.runs import LEDGER, PROTEINS, Run, incomplete_message
from rdscale.io.store import reader_filter
from rdscale.search import Searcher, list_indexes, open_table, search

PACKAGE = Path(__file__).resolve().parents[1] / "rdscale"
HOME = PACKAGE / "io" / "runs.py"

# Names of a run's entries: a string literal equal to one of these, or starting with a prefix, spells one.
NAMES = {runs.FIT, runs.PLAN_FILE, runs.DEDUPE_PLAN, runs.UPDATE_STATE, runs.INDEX_DIR, runs.LEASE_NAME,
         runs.GATE_NAME, runs.GZIP_INDEX_DIR, runs.EXTEND_PARTIAL}
PREFIXES = (runs.PARTIAL_FIT, runs.FIT_EXT)
# A table's file: `proteins.lance`, `shards.lance/data/*`, `f"{name}.lance"` (prose such as "no proteins.lance"
# in an error message is not a path and is allowed).
TABLE_FILE = re.compile(r"^[\w{}/]*\.lance(/.*)?$")
# Names that are also words elsewhere (a config section, a JSON key) spell a run's entry only as a path: an operand
# of `/`, `.join(...)`, `.joinpath(...)`, `.glob(...)`.
AMBIGUOUS = {runs.FIT, runs.INDEX_DIR, runs.GZIP_INDEX_DIR}
PATH_CALLS = {"join", "joinpath", "glob", "rglob"}
# (file, literal) that spell the run's layout for a folder that is not a run, with the reason
NOT_A_RUN = {
    ("rdscale/cli/eval.py", "fit"): "`rdscale eval --fresh` fits into its report folder (owned by the CLI)",
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _spelled(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, literal) of every literal in `tree` that spells a name under a run."""
    skip = _docstrings(tree)
    # an f-string's constant parts are Constants too: each f-string is judged once, as a whole
    skip |= {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    path_operands: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            path_operands.add(id(node.right))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PATH_CALLS:
            path_operands.update(id(a) for a in node.args)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # f"{name}.lance", f"fit.partial.{id}", f"fit_ext_{w}"
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if TABLE_FILE.match(text) or text.startswith(PREFIXES):
                found.append((node.lineno, text))
            continue
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        text = node.value
        if (text in NAMES - AMBIGUOUS or text.startswith(PREFIXES) or TABLE_FILE.match(text)
                or (text in AMBIGUOUS and id(node) in path_operands)):
            found.append((node.lineno, text))
    return found


def test_only_run_spells_the_names_under_a_run():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HOME:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, text in _spelled(tree):
            if (str(path.relative_to(PACKAGE.parent)), text) in NOT_A_RUN:
                continue
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert not offenders, "ask rdscale.io.runs.Run for these names instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source", [
    'loc = root / "fit"',
    'loc = root.join("run_plan.json")',
    'loc = root / f"fit.partial.{run_id}"',
    'done = any(path.glob("shards.lance/data/*"))',
    'uri = f"{base}/{name}.lance"',
    'LEASE = "_writer.lease"',
    'cache = run.location.join("dedupe_plan.json.gz")',
    'folder = run / "indexes"',
])
def test_the_check_catches_a_name_spelled_again(source):
    assert _spelled(ast.parse(source)), source


@pytest.mark.parametrize("source", [
    'section = cfg["fit"]',
    'answer = {"indexes": []}',
    'raise ValueError(f"{run} holds no rdscale run (no proteins.lance)")',
    'def f():\n    """Reads <run>/proteins.lance."""',
])
def test_the_check_allows_prose_and_config_keys(source):
    assert not _spelled(ast.parse(source)), source


def test_run_names_its_entries(tmp_path):
    run = Run(tmp_path / "r")
    assert run.plan == run.location.join(runs.PLAN_FILE)
    assert run.ledger == run.table(LEDGER) and run.ledger.name == "shards.lance"
    assert run.partial_fit("abc").name == "fit.partial.abc" and Run.is_partial_fit("fit.partial.abc")
    assert run.fit_ext(64).name == "fit_ext_64" and run.fit.name == "fit"
    assert run.lease_file.name == runs.LEASE_NAME and run.index_dir.name == runs.INDEX_DIR
    assert Run.is_written("proteins.lance") and Run.is_written("fit_ext_32") and not Run.is_written("notes.txt")
    assert not Run.is_written(runs.LEASE_NAME)  # --restart keeps the lease
    assert Run.of(run.table(PROTEINS)) == run == Run.of(run) == Run(str(tmp_path / "r")) == Run(run)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_family):
    """One single-model run killed before its third shard's ledger row (two shards committed, the third's rows in
    the tables), and the same input embedded uninterrupted."""
    tmp = tmp_path_factory.mktemp("run_home")
    fasta = write_fasta(tmp / "in.fasta", n=24, seed=5)
    partial = make_cfg(tmp, fasta, tiny_family[:1], "partial")
    embed_killed_before_ledger(partial, commits=2)
    return tmp, partial


def test_status_and_committed_filter_of_an_interrupted_run(runs_dir):
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import embed

    tmp, cfg = runs_dir
    run = Run(tmp / "partial")
    status = run.status()
    assert status["committed"] == [0, 1] and status["planned"] > 2 and not status["complete"]
    assert incomplete_message(status) == f"incomplete: 2 of {status['planned']} shards committed"
    where = run.committed_filter()
    assert where == "shard IN (0, 1)" == run.committed_filter(status)
    proteins = run.dataset(PROTEINS)
    ledger = run.dataset(LEDGER).to_table(columns=["proteins"])["proteins"].to_pylist()
    assert proteins.count_rows(filter=where) == sum(ledger) < proteins.count_rows()  # the stray shard is hidden
    assert reader_filter(run.table(PROTEINS)) == where  # what search reads

    embed(cfg, None, LocalExecutor(), progress=False)  # the resume finishes it
    status = run.status()
    assert status["complete"] and status["committed"] == list(range(status["planned"]))
    assert incomplete_message(status) is None and run.committed_filter() is None


def test_search_takes_a_run_or_a_path(runs_dir):
    tmp, _ = runs_dir
    run = Run(tmp / "partial")
    ids = run.dataset(PROTEINS).to_table(columns=["id"])["id"].to_pylist()[:2]
    by_path = search(str(run), ids=ids, k=3)
    assert search(run, ids=ids, k=3).equals(by_path)
    assert search(tmp / "partial", ids=ids, k=3).equals(by_path)
    assert search(run.table(PROTEINS), ids=ids, k=3).equals(by_path)  # a table location names its run
    assert open_table(run).uri == open_table(str(run)).uri
    assert list_indexes(run) == list_indexes(str(run))
    with Searcher(run) as by_run, Searcher(str(run)) as by_str:  # resident: its own float order, compared alike
        assert by_run.search(ids=ids, k=3).equals(by_str.search(ids=ids, k=3))
        assert by_run.search(ids=ids, k=3)["id"].equals(by_path["id"])
