"""docs/outputs.md's "Reading the tables" code runs as written against a real run (float16 residues), with the real
pyarrow, Polars and DuckDB, and each reader sees the same rows as Lance."""

from __future__ import annotations

import re
from pathlib import Path

import lance
import pytest
from helpers import write_fasta

from rdscale.cli.main import main

pl = pytest.importorskip("polars")
duckdb = pytest.importorskip("duckdb")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "outputs.md"


def readme_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Reading the tables from pyarrow, Polars and DuckDB", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python run\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_family):
    tmp = tmp_path_factory.mktemp("readers")
    fasta = write_fasta(tmp / "in.fasta", n=9, seed=11)
    run = tmp / "run"
    assert main(["-q", "run", "--local", "--fasta", str(fasta), "--models", *map(str, tiny_family), "-o", str(run),
                 "--set", "embedding.window=100", "--set", "embedding.overlap=25"]) == 0
    assert lance.dataset(str(run / "residues.lance")).schema.field("embedding").type.value_type == "halffloat"
    return run


def test_readme_reader_snippets_run_as_written(demo_run, capsys):
    snippets = readme_snippets()
    assert len(snippets) == 3  # pyarrow, Polars, DuckDB
    scope: dict = {}
    for code in snippets:
        # the README's own code, run as written (only the run path substituted): the docs cannot drift
        exec(compile(code.replace('"runs/demo"', repr(str(demo_run))), str(README), "exec"), scope)  # noqa: S102
    n_proteins = lance.dataset(str(demo_run / "proteins.lance")).count_rows()
    n_residues = lance.dataset(str(demo_run / "residues.lance")).count_rows()
    # pyarrow
    assert scope["table"].num_rows == n_proteins and len(scope["first_level"][0]) == 32
    assert scope["long_ones"].num_rows == sum(n > 100 for n in scope["table"]["length"].to_pylist())
    # Polars: float16 residues and the lazy projected scan
    assert scope["df"].height == n_proteins and scope["res"].height == n_residues
    # DuckDB: every residue through the float32 stream, and the projection
    printed = capsys.readouterr().out
    assert str(n_proteins) in printed.splitlines()[0]
    stream = scope["float32_reader"](lance.dataset(str(demo_run / "residues.lance")))  # noqa: F841 - DuckDB reads it
    count = duckdb.sql("SELECT count(*), sum(len(embedding)) FROM stream").fetchall()
    assert count == [(n_residues, n_residues * 64)]


def test_duckdb_really_needs_the_cast(demo_run):
    raw = lance.dataset(str(demo_run / "residues.lance")).to_table()  # noqa: F841 - read by DuckDB by name
    with pytest.raises(duckdb.NotImplementedException):
        duckdb.sql("SELECT count(*) FROM raw").fetchall()


def test_float32_values_survive_the_cast(demo_run):
    import numpy as np

    scope: dict = {}
    pyarrow_code, _, duckdb_code = readme_snippets()
    exec(compile(pyarrow_code.replace('"runs/demo"', repr(str(demo_run))), "pyarrow", "exec"), scope)  # noqa: S102
    exec(compile(duckdb_code, "duckdb", "exec"), scope)  # noqa: S102
    residues = lance.dataset(str(demo_run / "residues.lance"))
    direct = residues.to_table(columns=["id", "pos", "embedding"]).sort_by([("id", "ascending"), ("pos", "ascending")])
    stream = scope["float32_reader"](residues, columns=["id", "pos", "embedding"])  # noqa: F841
    via_duckdb = duckdb.sql("SELECT embedding FROM stream ORDER BY id, pos").fetchnumpy()["embedding"]
    expect = np.asarray(direct["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, 64)
    np.testing.assert_array_equal(np.stack(via_duckdb), expect)


def test_docs_are_self_contained():
    """README and docs/ reference nothing outside the repository, and every docs/ link resolves."""
    root = ROOT
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, doc
        for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
            assert (doc.parent / target).is_file(), (doc, target)
    assert "## The chain, step by step" in (root / "docs" / "method.md").read_text()
    assert "Ray is imported only in `rdscale/cluster/`" in (root / "docs" / "architecture.md").read_text()
