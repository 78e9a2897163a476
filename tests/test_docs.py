"""The documentation runs as written: every fenced block of README.md and docs/*.md carries a marker; `run` blocks
are executed on CPU against the demo run (one shared demo, copied per page), the gpu / cluster / internet blocks
are parsed by rdscale's own argument parser and config loader, and the commands of the cluster files resolve.
The runner is tests/docs_blocks.py; the block markers are described there."""

from __future__ import annotations

import shlex
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from docs_blocks import (
    CHECKED,
    ROOT,
    DocError,
    blocks,
    check_block,
    check_shell,
    commands,
    doc_files,
    run_file_blocks,
    scratch_repo,
    unmarked,
)

DOCS = doc_files()


@pytest.fixture(scope="module")
def demo_snapshot(tmp_path_factory):
    """One scratch copy of the repository with models/tiny and runs/demo made, and a pristine copy of it beside.
    A run records its inputs by absolute path, so pages get it back at the same path, not a copy elsewhere."""
    root = tmp_path_factory.mktemp("docs")
    repo = scratch_repo(root / "repo")
    shutil.copytree(repo, root / "pristine", symlinks=True)  # copy2: the inputs' mtimes (in the ledger) kept
    return repo, root / "pristine"


@pytest.fixture
def demo_repo(demo_snapshot):
    """The scratch repository as the demo left it (whatever an earlier page did to it undone)."""
    repo, pristine = demo_snapshot
    shutil.rmtree(repo)
    shutil.copytree(pristine, repo, symlinks=True)
    return repo


def test_every_block_is_marked_and_the_counts_are_printed(capsys):
    problems, kinds = [], Counter()
    for doc in DOCS:
        for block in blocks(doc):
            problem = unmarked(block)
            if problem:
                problems.append(problem)
            kinds[(block.marker, "shell" if block.is_shell else block.lang)] += 1
    assert not problems, "\n".join(problems)
    ran = sum(n for (marker, _), n in kinds.items() if marker == "run")
    checked = sum(n for (marker, _), n in kinds.items() if marker in CHECKED)
    with capsys.disabled():
        print(f"\ndocs: {len(DOCS)} pages; {ran} runnable blocks "
              f"({kinds['run', 'shell']} shell, {kinds['run', 'python']} python); {checked} skipped (not run: "
              + ", ".join(f"{kinds[m, 'shell'] + kinds[m, 'python']} {m}" for m in sorted(CHECKED))
              + f", parsed and checked); {kinds['output', 'text']} output, {kinds['config', 'yaml']} config")
    assert ran >= 20


def test_unmarked_block_is_refused(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("text\n\n```bash\nrdscale info runs/demo\n```\n")
    with pytest.raises(DocError, match="no marker"):
        run_file_blocks(blocks(doc), tmp_path)


def test_readme_runs_at_least_80_percent_of_its_shell_blocks():
    shell = [b for b in blocks(ROOT / "README.md") if b.is_shell]
    ran = [b for b in shell if b.marker == "run"]
    assert len(shell) >= 10 and len(ran) >= 0.8 * len(shell), (len(ran), len(shell))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_page_runs_as_written(doc, demo_repo):
    """Each page from the same starting point: the demo run made, nothing else (a page's blocks run in order)."""
    found = blocks(doc)
    ran = run_file_blocks(found, demo_repo)
    assert ran == sum(b.marker == "run" for b in found)


# ------------------------------------------------------------------------------------------------ the test can fail


def _first(marker_set, needle, doc=ROOT / "README.md"):
    for block in blocks(doc):
        if block.marker in marker_set and needle in block.text:
            return block
    raise AssertionError(f"no {marker_set} block with {needle!r} in {doc.name}")


def test_a_renamed_flag_fails():
    block = _first(CHECKED, "rdscale run -c single_gpu")
    check_block(block)  # as documented: passes
    block.text = block.text.replace("--fasta", "--fastas")
    with pytest.raises(DocError, match="unrecognized arguments|--fastas"):
        check_block(block)
    block = _first({"run"}, "rdscale search")  # runnable blocks are parsed too, before they run
    block.text = block.text.replace("--width", "--widths")
    with pytest.raises(DocError):
        check_shell(block.text, block.where)


def test_a_renamed_config_key_fails():
    block = _first(CHECKED, "--set output.")
    check_block(block)
    block.text = block.text.replace("--set output.", "--set outputs.")
    with pytest.raises(DocError, match="unknown key"):
        check_block(block)
    config = _first({"config"}, "embedding:", ROOT / "docs" / "performance.md")
    check_block(config)
    config.text = config.text.replace("toks_per_batch", "tokens_per_batch")
    with pytest.raises(DocError, match="unknown key"):
        check_block(config)


def test_a_renamed_module_path_fails():
    check_shell('python -c "from rdscale.model.loading import download_checkpoint"', "here")
    for wrong in ('python -c "from rdscale.models import download_checkpoint"',  # the old cluster file's import
                  'python -c "from rdscale.model.loading import download_checkpoints"'):
        with pytest.raises(DocError, match="rdscale.models|no download_checkpoints"):
            check_shell(wrong, "here")
    block = _first({"run"}, "from rdscale.search import Searcher", ROOT / "docs" / "search.md")
    block.text = block.text.replace("from rdscale.search import", "from rdscale.searching import")
    with pytest.raises(DocError):
        check_block(block)


def test_a_renamed_column_fails(demo_repo, tmp_path):
    page = (ROOT / "docs" / "outputs.md").read_text()
    assert '"length"' in page
    doc = tmp_path / "outputs.md"
    doc.write_text(page.replace('"length"', '"protein_length"'))
    with pytest.raises(DocError, match="protein_length"):
        run_file_blocks(blocks(doc), demo_repo)


# ------------------------------------------------------------------------------------------------ cluster files


def cluster_commands() -> list[tuple[str, str]]:
    """(where, command) of every shell command the cluster files run."""
    found = []
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        found += [(f"cluster/ray-cluster.yaml {key}", c) for c in launcher.get(key) or []]
    rayjob = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    found.append(("cluster/kuberay-rayjob.yaml spec.entrypoint", rayjob["spec"]["entrypoint"]))
    return found


def test_cluster_files_commands_resolve():
    found = cluster_commands()
    callers = [(w, c) for w, c in found if any(Path(a[0]).name in ("rdscale", "python", "python3")
                                              for a, _ in commands(c))]
    assert len(callers) >= 2, found  # the worker setup's checkpoint download and the RayJob's entrypoint
    for where, command in found:
        check_shell(command, where)  # imports resolve, rdscale flags and configs parse


def test_kuberay_job_needs_only_the_installed_package():
    entry = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]["entrypoint"]
    assert "jobs/" not in entry  # the wheel ships rdscale, not the repository's jobs/ folder


def test_single_gpu_config_runs_on_a_cpu_only_machine():
    """README's one-machine command: single_gpu derives its GPU request from the cluster (null), so a machine without
    a GPU gets a CPU actor instead of a refusal."""
    from rdscale.config import load_config

    assert load_config("single_gpu").ray.gpus_per_actor is None


def test_help_examples_parse():
    """The examples in `rdscale VERB --help` are docs too: each parses with the real parser and config loader."""
    import argparse
    import re

    from docs_blocks import check_rdscale

    from rdscale.cli.main import build_parser

    texts, todo = [], [build_parser(full=True)]
    while todo:
        parser = todo.pop()
        texts.append(parser.epilog or "")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    examples = [line for text in texts
                for line in re.findall(r"^\s*(rdscale [^#\n]+)", text.replace("\\\n", " "), flags=re.MULTILINE)]
    assert len(examples) >= 10
    for line in examples:
        args = shlex.split(line)
        check_rdscale(args[1:], f"--help example {line.strip()!r}")


def _joined_source() -> str:
    """rdscale's source with adjacent string literals joined ("a " f"b" -> "a b"), as its messages print."""
    import re

    text = "\n".join(p.read_text() for p in sorted((ROOT / "rdscale").rglob("*.py")))
    return re.sub(r"\"\s*\n\s*(?:\(\s*)?f?\"", "", text)


def _quotes_rdscale(heading: str, source: str) -> bool:
    """Whether an error text (placeholders such as paths, numbers and quoted names aside) is rdscale's own."""
    import re

    text = heading.strip().strip("`")
    # the literal stretches between placeholders (paths, numbers, dotted keys, names in quotes, "...")
    chunks = [c.strip(" ,;:") for c in re.split(r"\.\.\.|\S*[/\d'=]\S*|\S+\.\S+", text)]
    chunks = [c for c in chunks if c]
    spans = [" ".join(w[i:j]) for c in chunks for w in [c.split()]
             for i in range(len(w)) for j in range(i + 3, len(w) + 1)]  # runs of 3+ words of the literal text
    in_order = ".{0,120}?".join(re.escape(c) for c in chunks)  # every literal part, placeholders between
    return any(s in source for s in spans) or (len(chunks[0].split()) >= 2 and chunks[0] in source) \
        or re.search(in_order, source) is not None


def test_troubleshooting_quotes_messages_rdscale_prints():
    """Each heading of docs/troubleshooting.md is an error text users paste: it must be rdscale's own words, so a
    reworded message fails here."""
    import re

    source = _joined_source()
    headings = re.findall(r"^### (.+)$", (ROOT / "docs" / "troubleshooting.md").read_text(), flags=re.MULTILINE)
    assert len(headings) >= 12
    for heading in headings:
        if "DuckDB" not in heading:  # DuckDB's own message
            assert _quotes_rdscale(heading, source), f"{heading!r} is not among rdscale's messages"
    assert not _quotes_rdscale("`the run folder is locked by a different rdscale process (pid 1)`", source)
    assert not _quotes_rdscale("`no actor fits on any node of this Ray cluster; reduce ray.gpus_per_actor`", source)
