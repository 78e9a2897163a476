"""The user contract, for every verb: bad input gives ONE line on stderr, exit code 1 or 2, no traceback, and no
half-made output directory. The CLI runs in-process (rdscale.cli.main.main), so the whole sweep is fast; a few real
subprocess runs check that no traceback reaches the terminal and that `-v` shows one.

Also: global flags before or after the verb, the positional RUN (with -o as an alias), one spelling `--fit`,
`rdscale config`, and the error contract's handling of OS errors and the __cause__ chain."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import invoke, write_fasta
from hypothesis import given
from hypothesis import strategies as st

from rdscale.cli.main import main
from rdscale.errors import RdscaleError, user_facing

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line(code, err, argv):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (1, 2), f"{argv}: exit {code}, stderr {err!r}"
    assert "Traceback" not in err, f"{argv}: {err}"
    assert len(lines) == 1, f"{argv}: {len(lines)} lines on stderr:\n{err}"


# ---------------------------------------------------------------------------------------------------------------
# the world of bad inputs


class Evil:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_family):
    w = tmp_path_factory.mktemp("world")
    f = {}
    f["fasta"] = write_fasta(w / "ok.fasta", n=6, seed=3)
    f["missing"] = w / "missing.fasta"
    (w / "empty.fasta").write_text("")
    f["empty"] = w / "empty.fasta"
    (w / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    f["garbage"] = w / "garbage.bin"
    (w / "a_directory").mkdir()
    f["dir"] = w / "a_directory"
    (w / "a_file").write_text("x")
    f["file"] = w / "a_file"
    f["models"] = [str(m) for m in tiny_family]
    # checkpoints
    (w / "plain.pt").write_text("this is not a checkpoint\n")
    f["plain_pt"] = w / "plain.pt"
    (w / "empty.pt").write_bytes(b"")
    f["empty_pt"] = w / "empty.pt"
    with open(w / "evil.pt", "wb") as fh:
        pickle.dump({"model": {}, "cfg": Evil()}, fh)
    f["evil_pt"] = w / "evil.pt"
    data = torch.load(tiny_family[0], weights_only=False)
    data["cfg"]["model"].encoder_layers = 10**8
    torch.save(data, w / "huge_layers.pt")
    f["huge_pt"] = w / "huge_layers.pt"
    # configs
    for name, text in {
        "bad_yaml": "models: [a, b\n  input: {",
        "not_mapping": "- just\n- a list\n",
        "unknown_key": "embedding:\n  toks_per_bach: 10\n",
        "bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
        "python_tag": "models: !!python/object/apply:os.system ['echo pwned']\n",
    }.items():
        (w / f"{name}.yaml").write_text(text)
        f[name] = w / f"{name}.yaml"
    # a finished run, and broken copies of it
    run = w / "run"
    code = main(["-q", "run", "--local", "--fasta", str(f["fasta"]), "--models", *f["models"][:2], "-o", str(run),
                 "--set", "embedding.window=100", "--set", "embedding.overlap=25",
                 "--set", "input.shard_mb=0.001"])
    assert code == 0
    f["run"] = run
    no_table = w / "run_no_proteins"
    shutil.copytree(run, no_table)
    shutil.rmtree(no_table / "proteins.lance")
    f["run_no_proteins"] = no_table
    half = w / "run_half"
    shutil.copytree(run, half)
    for data_file in (half / "proteins.lance" / "data").iterdir():
        data_file.unlink()
    f["run_half"] = half
    partial = w / "run_partial"  # a run whose plan names one shard more than it committed (an interrupted run)
    shutil.copytree(run, partial)
    plan = json.loads((partial / "run_plan.json").read_text())
    (partial / "run_plan.json").write_text(json.dumps({**plan, "shards": plan["shards"] + 1}))
    f["run_partial"] = partial
    data["cfg"]["model"].encoder_layers = -3
    torch.save(data, w / "negative_layers.pt")
    f["negative_pt"] = w / "negative_layers.pt"
    (w / "deep.yaml").write_text("embedding:\n  window: " + "[" * 2000 + "]" * 2000 + "\n")
    f["deep_yaml"] = w / "deep.yaml"
    (w / "long_int.yaml").write_text("embedding:\n  window: " + "9" * 5000 + "\n")
    f["long_int_yaml"] = w / "long_int.yaml"
    f["npy_text"] = w / "q.npy"
    f["npy_text"].write_text("not numpy")
    f["csv_garbage"] = w / "dms.csv"
    f["csv_garbage"].write_text("this,is\nnot,dms\n")
    return f


W = "{w}"  # placeholder: a fresh output path under tmp_path that must not exist afterwards


def writer(verb, *extra, models=2, fasta="fasta"):
    def build(f, out):
        return [verb, "--local", "--fasta", f[fasta], "--models", *f["models"][:models], "-o", out, *extra]
    return build


CASES = {
    # --- inputs of the writing verbs
    "run/missing-fasta": writer("run", fasta="missing"),
    "run/empty-fasta": writer("run", fasta="empty"),
    "run/garbage-fasta": writer("run", fasta="garbage"),
    "run/dir-as-fasta": writer("run", fasta="dir"),
    "extract/missing-fasta": writer("extract", models=1, fasta="missing"),
    "extract/garbage-fasta": writer("extract", models=1, fasta="garbage"),
    "fit/empty-fasta": writer("fit", fasta="empty"),
    "embed/no-fit": writer("embed", "--fit", "{missing}"),
    "embed/fit-is-a-file": writer("embed", "--fit", "{file}"),
    # --- models and checkpoints
    "extract/unknown-model": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                             "esm2_t99_1T_UR50D", "-o", out],
    "extract/missing-checkpoint": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                  f["missing"].with_suffix(".pt"), "-o", out],
    "extract/plain-text-checkpoint": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                     f["plain_pt"], "-o", out],
    "extract/empty-checkpoint": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                f["empty_pt"], "-o", out],
    "extract/malicious-pickle": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                f["evil_pt"], "-o", out],
    "run/1e8-layers-checkpoint": lambda f, out: ["run", "--local", "--fasta", f["fasta"], "--models",
                                                 f["models"][0], f["huge_pt"], "-o", out],
    "extract/dir-as-checkpoint": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                 f["dir"], "-o", out],
    # --- configs
    "run/missing-config": lambda f, out: ["run", "-c", f["missing"].with_suffix(".yaml"), "-o", out],
    "run/dir-as-config": lambda f, out: ["run", "-c", f["dir"], "-o", out],
    "run/garbage-config": lambda f, out: ["run", "-c", f["garbage"], "-o", out],
    "run/malformed-yaml": lambda f, out: ["run", "-c", f["bad_yaml"], "-o", out],
    "run/yaml-not-a-mapping": lambda f, out: ["run", "-c", f["not_mapping"], "-o", out],
    "run/unknown-key": lambda f, out: ["run", "-c", f["unknown_key"], "-o", out],
    "run/alias-bomb": lambda f, out: ["run", "-c", f["bomb"], "-o", out],
    "config/alias-bomb": lambda f, out: ["config", "-c", f["bomb"]],
    "run/python-tag": lambda f, out: ["run", "-c", f["python_tag"], "-o", out],
    "run/malformed-set": writer("run", "--set", "embedding.window=[1,"),
    "run/set-without-equals": writer("run", "--set", "embedding.window"),
    "run/window-too-large": writer("run", "--set", "embedding.window=100000"),
    "run/overlap-ge-window": writer("run", "--set", "embedding.window=50", "--set", "embedding.overlap=50"),
    "run/layer-out-of-range": writer("run", "--set", "embedding.layer=99"),
    "run/shard-mb-zero": writer("run", "--set", "input.shard_mb=0"),
    "run/shard-mb-nan": writer("run", "--set", "input.shard_mb=.nan"),
    "run/records-per-batch-zero": writer("run", "--set", "output.records_per_batch=0"),
    "run/storage-width-zero": writer("run", "--set", "output.storage_width=0"),
    "run/toks-per-batch-zero": writer("run", "--set", "embedding.toks_per_batch=0"),
    "run/bad-device": writer("run", "--set", "embedding.device=gpu7"),
    "run/bad-dtype": writer("run", "--set", "embedding.dtype=int8"),
    "run/bad-residue-dtype": writer("run", "--set", "output.residue_dtype=float8"),
    "config/bad-value": lambda f, out: ["config", "--set", "ray.num_actors=0"],
    # --- output locations
    "run/out-is-a-file": lambda f, out: writer("run")(f, f["file"]),
    "extract/out-under-a-file": lambda f, out: writer("extract", models=1)(f, f["file"] / "sub"),
    "fit/fit-out-is-a-file": writer("fit", "--fit", "{file}"),
    "make-tiny-family/dir-is-a-file": lambda f, out: ["make-tiny-family", f["file"]],
    # --- verbs that read a run
    "info/missing-run": lambda f, out: ["info", f["missing"]],
    "info/run-is-a-file": lambda f, out: ["info", f["file"]],
    "info/empty-dir": lambda f, out: ["info", f["dir"]],
    "info/no-run-given": lambda f, out: ["info"],
    "info/two-runs": lambda f, out: ["info", f["run"], "-o", f["dir"]],
    "index/missing-run": lambda f, out: ["index", f["missing"]],
    "index/table-deleted": lambda f, out: ["index", f["run_no_proteins"], "--width", "32"],
    "index/half-written": lambda f, out: ["index", f["run_half"], "--width", "32"],
    "search/missing-run": lambda f, out: ["search", f["missing"], "--id", "x"],
    "search/table-deleted": lambda f, out: ["search", f["run_no_proteins"], "--id", "P00000"],
    "search/half-written": lambda f, out: ["search", f["run_half"], "--id", "P00000"],
    "search/unknown-id": lambda f, out: ["search", f["run"], "--id", "NO_SUCH_ID"],
    "search/k-zero": lambda f, out: ["search", f["run"], "--id", "sp|P00000|PROT0", "-k", "0"],
    "search/k-negative": lambda f, out: ["search", f["run"], "--id", "sp|P00000|PROT0", "-k", "-3"],
    "search/vector-not-npy": lambda f, out: ["search", f["run"], "--vector", f["npy_text"]],
    "search/query-fasta-garbage": lambda f, out: ["search", f["run"], "--fasta", f["garbage"]],
    "search/bad-filter": lambda f, out: ["search", f["run"], "--id", "sp|P00000|PROT0", "--filter", "lenght > 3"],
    "search/huge-k-funnel": lambda f, out: ["search", f["run"], "--id", "sp|P00000|PROT0", "-k", "1000000000",
                                            "--mode", "funnel", "--width", "32"],
    "extend/missing-run": lambda f, out: ["extend", f["missing"], "--model", f["models"][2]],
    "extend/table-deleted": lambda f, out: ["extend", f["run_no_proteins"], "--model", f["models"][2]],
    "extend/half-written": lambda f, out: ["extend", f["run_half"], "--model", f["models"][2]],
    "extend/missing-checkpoint": lambda f, out: ["extend", f["run"], "--model", f["missing"].with_suffix(".pt")],
    "extend/plain-text-checkpoint": lambda f, out: ["extend", f["run"], "--model", f["plain_pt"]],
    "eval-reconstruction/missing-fit": lambda f, out: ["eval", "reconstruction", "--fit", f["missing"]],
    "eval-reconstruction/run-without-fit": lambda f, out: ["eval", "reconstruction", f["dir"]],
    "eval-reconstruction/fit-is-a-file": lambda f, out: ["eval", "reconstruction", "--fit", f["file"]],
    # --- serve's request limits (checked before Ray starts)
    "serve/zero-max-queries": lambda f, out: ["serve", f["run"], "--max-queries", "0"],
    "serve/nan-timeout": lambda f, out: ["serve", f["run"], "--timeout", "nan"],
    "serve/negative-body-limit": lambda f, out: ["serve", f["run"], "--max-body-mb", "-1"],
    "eval-dms/out-is-a-file": lambda f, out: ["eval", "dms", "--csv", f["csv_garbage"], "--wild-type", "MKT",
                                              "--models", *f["models"][:1], "-o", f["file"]],
    "eval-reconstruction/out-is-a-file": lambda f, out: ["eval", "reconstruction", f["run"], "-o", f["file"]],
    "extract/hub-unreachable": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models", "8M",
                                               "-o", out],
    "eval-dms/missing-csv": lambda f, out: ["eval", "dms", "--csv", f["missing"], "--wild-type", "MKT",
                                            "--models", *f["models"][:1], "-o", out],
    "eval-dms/garbage-csv": lambda f, out: ["eval", "dms", "--csv", f["csv_garbage"], "--wild-type", "MKT",
                                            "--models", *f["models"][:1], "-o", out],
    "eval-dms/bad-wild-type": lambda f, out: ["eval", "dms", "--csv", f["csv_garbage"], "--wild-type", f["garbage"],
                                              "--models", *f["models"][:1], "-o", out],
    # --- issue 25: degenerate settings, hostile values, refused updates (each: one line, the run unchanged)
    "run/shard-mb-rounds-to-zero-bytes": writer("run", "--set", "input.shard_mb=1e-9"),
    "run/same-fasta-twice": lambda f, out: ["run", "--local", "--fasta", f["fasta"], f["fasta"], "--models",
                                            *f["models"][:2], "-o", out],
    "run/set-int-past-python-digit-limit": writer("run", "--set", "embedding.window=" + "9" * 5000),
    "run/set-nested-past-recursion-limit": writer("run", "--set", "embedding.window=" + "[" * 3000 + "]" * 3000),
    "run/config-nested-past-recursion-limit": lambda f, out: ["run", "-c", f["deep_yaml"], "-o", out],
    "run/config-int-past-python-digit-limit": lambda f, out: ["run", "-c", f["long_int_yaml"], "-o", out],
    "extract/negative-layers-checkpoint": lambda f, out: ["extract", "--local", "--fasta", f["fasta"], "--models",
                                                          f["negative_pt"], "-o", out],
    "index/partial-run": lambda f, out: ["index", f["run_partial"], "--width", "32"],
    "index/lance-unknown-param": lambda f, out: ["index", f["run"], "--backend", "lance", "--width", "32",
                                                 "--param", "num_partitoins=2"],
    "index/lance-negative-param": lambda f, out: ["index", f["run"], "--backend", "lance", "--width", "32",
                                                  "--param", "m=-5"],
    "index/lance-param-past-u32": lambda f, out: ["index", f["run"], "--backend", "lance", "--width", "32",
                                                  "--param", "ef_construction=99999999999999999999"],
    "index/faiss-param-past-c-int": lambda f, out: ["index", f["run"], "--backend", "faiss", "--width", "32",
                                                    "--param", "m=100000000000000000000"],
    "index/param-int-past-python-digit-limit": lambda f, out: ["index", f["run"], "--width", "32", "--param",
                                                               "m=" + "9" * 5000],
    "index/param-nested-past-recursion-limit": lambda f, out: ["index", f["run"], "--width", "32", "--param",
                                                               "m=" + "[" * 3000 + "]" * 3000],
    "index/param-named-like-a-flag": lambda f, out: ["index", f["run"], "--width", "32", "--param", "metric=l2"],
    "update/all-digit-release": lambda f, out: ["update", f["run"], "--fasta", f["fasta"], "--release", "2024",
                                                "--local"],
    "update/no-release": lambda f, out: ["update", f["run"], "--fasta", f["fasta"], "--local"],
    "update/abort-without-update": lambda f, out: ["update", f["run"], "--abort"],
    "update/garbage-release-fasta": lambda f, out: ["update", f["run"], "--fasta", f["garbage"], "--release", "B1",
                                                    "--local"],
    "update/partial-run": lambda f, out: ["update", f["run_partial"], "--fasta", f["fasta"], "--release", "B1",
                                          "--local"],
}

SEARCH_HELPER = {"search/bad-filter", "search/huge-k-funnel"}  # fixed on the search helper's branch


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every file under a run, with its size and mtime: what a refused command must leave as it was."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def _expand(item, f):
    if isinstance(item, str) and item.startswith("{") and item.endswith("}"):
        return f[item[1:-1]]
    return item


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A hub that cannot be reached (a real connection refused), and an empty torch.hub cache."""
    from rdscale.model import loading

    monkeypatch.setattr(loading, "HUB_URL", "http://127.0.0.1:9/fair-esm/{name}.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, world, tmp_path, capsys, offline_hub):
    out = tmp_path / "out"
    argv = [_expand(a, world) for a in CASES[case](world, out)]
    before = {p.name for p in world["dir"].iterdir()}
    runs = {name: listing(world[name]) for name in ("run", "run_partial")}
    try:
        code, _, err = invoke(capsys, argv)
        assert_one_line(code, err, argv)
    except (AssertionError, BaseException) as failure:
        if case in SEARCH_HELPER:
            pytest.xfail(f"search helper: {failure}")
        raise
    assert not out.exists(), f"{argv}: left a half-made output directory {out}"
    assert {p.name for p in world["dir"].iterdir()} == before
    assert {name: listing(world[name]) for name in runs} == runs, f"{argv}: changed a run"
    assert not Path("PWNED").exists()


# ---------------------------------------------------------------------------------------------------------------
# a consistent CLI


def test_global_flags_before_or_after_the_verb(world, capsys):
    for argv in (["-q", "info", world["run"]], ["info", world["run"], "-q"], ["info", "-v", world["run"]]):
        code, out, err = invoke(capsys, argv)
        assert code == 0 and "proteins: 6 rows" in out, (argv, err)


def test_run_is_positional_with_o_as_alias(world, capsys):
    a = invoke(capsys, ["info", world["run"]])
    b = invoke(capsys, ["info", "-o", world["run"]])
    assert a[0] == b[0] == 0 and a[1] == b[1]
    code, _, err = invoke(capsys, ["info", world["run"], "-o", world["dir"]])
    assert code == 2 and "two runs" in err


def test_hub_failure_is_one_line_that_says_what_to_do(world, tmp_path, capsys, offline_hub):
    code, _, err = invoke(capsys, writer("extract", models=1)(world, tmp_path / "o")[:5] + ["8M", "-o",
                                                                                             tmp_path / "o"])
    assert_one_line(code, err, "hub")
    assert "could not download esm2_t6_8M_UR50D" in err and "copy esm2_t6_8M_UR50D.pt to" in err


def test_verbs_read_a_run_given_positionally(world, capsys):
    code, out, err = invoke(capsys, ["search", world["run"], "--id", "sp|P00000|PROT0", "-k", "2"])
    assert code == 0, err
    assert "sp|P00000|PROT0" in out
    code, out, err = invoke(capsys, ["eval", "reconstruction", world["run"]])
    assert code == 0, err
    assert f"fit artifact: {world['run'] / 'fit'}" in out


def test_fit_is_one_spelling_old_spellings_hidden(capsys):
    from rdscale.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for verb in ("fit", "embed", "extend"):
        text = sub.choices[verb].format_help()
        assert "--fit DIR" in text and "--fit-out" not in text and "--from-fit" not in text, verb
    assert sub.choices["fit"].parse_args(["--fit-out", "x"]).fit == "x"
    assert sub.choices["extend"].parse_args(["r", "--model", "m", "--from-fit", "y"]).fit == "y"


def test_config_prints_the_effective_merged_config(tmp_path, capsys):
    import yaml

    code, out, err = invoke(capsys, ["config", "-c", "demo", "--set", "embedding.window=500",
                                     "--set", "output.storage_width=16", "-o", tmp_path / "x"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["embedding"]["window"] == 500 and cfg["output"]["storage_width"] == 16
    assert cfg["output"]["dir"] == str(tmp_path / "x") and len(cfg["models"]) == 3
    assert not (tmp_path / "x").exists()  # config runs nothing


def test_help_does_not_import_the_heavy_stack():
    code = ("import sys; from rdscale.cli.main import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "try: main(['info', '--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('lance', 'torch', 'ray', 'rdscale.search', 'pyarrow') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True).stdout
    assert "HEAVY []" in out


# ---------------------------------------------------------------------------------------------------------------
# the error contract


class _Mine(RdscaleError):
    pass


def test_rdscale_error_anywhere_in_the_cause_chain():
    try:
        try:
            raise _Mine("the thing at fault: fix it")
        except _Mine as inner:
            raise RuntimeError("wrapper with\na long\nmulti-line\ntext") from inner
    except RuntimeError as outer:
        assert user_facing(outer) == "the thing at fault: fix it"
    assert user_facing(RuntimeError("a bug")) is None


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
    (errno.ENOSPC, "no space left on device"), (errno.EISDIR, "is a directory"),
    (errno.ENOTDIR, "not a directory"),
])
def test_os_errors_the_user_causes_name_the_path(code, words):
    err = OSError(code, os.strerror(code), "/data/run/proteins.lance")
    assert user_facing(RuntimeError("while writing")) is None  # no OS error in the chain: a bug, traceback
    message = user_facing(err)
    assert message.startswith("/data/run/proteins.lance: ") and words in message
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = err
    assert user_facing(wrapped) == message


def test_lance_style_os_error_without_errno():
    assert "no space left" in user_facing(OSError("LanceError(IO): No space left on device (os error 28)"))


def test_output_on_a_read_only_location(tmp_path, world, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = invoke(capsys, writer("run")(world, locked / "out"))
        assert_one_line(code, err, "locked")
        assert "not writable" in err and not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


@pytest.fixture
def small_filesystems(tmp_path):
    """Real small and read-only file systems (tmpfs mounts), unmounted afterwards."""
    mounted = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_output_on_a_read_only_file_system(world, capsys, small_filesystems):
    ro = small_filesystems("ro", "ro,size=64k")
    code, _, err = invoke(capsys, writer("run")(world, ro / "out"))
    assert_one_line(code, err, "read-only")
    assert "read-only file system" in err and str(ro / "out") in err


@pytest.mark.parametrize("size, committed", [("64k", False), ("2m", True)])
def test_full_disk_is_one_line_and_resumable_work_is_kept(world, capsys, small_filesystems, size, committed):
    """64k fills up while the fit artifact is written (a Rust error, "os error 28"); 2m after the fit, while the
    tables are written (Lance). The first leaves nothing behind; the second keeps the fit to resume from."""
    fs = small_filesystems(f"full{size}", f"size={size}")
    example = ROOT / "examples" / "example.fasta"  # 120 proteins: 7.5 MB of float32 residues at width 48
    argv = ["run", "--local", "--fasta", example, "--models", *world["models"][:2], "-o", fs / "out",
            "--set", "output.residue_dtype=float32", "--set", "input.shard_mb=0.01", "--set", "fit.sample_sequences=20"]
    code, _, err = invoke(capsys, argv)
    assert_one_line(code, err, "enospc")
    assert f"writing {fs / 'out'}: no space left on device" in err and "rerun the same command" in err
    assert (fs / "out" / "fit" / "manifest.json").is_file() == committed
    assert (fs / "out").exists() == committed


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_real_process_one_line_and_v_shows_the_traceback(world, tmp_path):
    argv = [sys.executable, "-m", "rdscale", "extract", "--local", "--fasta", str(world["fasta"]),
            "--models", str(world["plain_pt"]), "-o", str(tmp_path / "o")]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=_env(), check=False)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    expected = (f"rdscale extract: error: {world['plain_pt']} is not a readable torch checkpoint: it starts with "
                "text (b'this'), not a zip archive or a pickle")
    assert [ln for ln in quiet.stderr.splitlines() if ln.strip()] == [expected]
    loud = subprocess.run(argv[:3] + ["-v"] + argv[3:], capture_output=True, text=True, env=_env(), check=False)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
@pytest.mark.parametrize("residues", ["true", "false"])  # false: the identical-sequence pass reads it first
def test_bad_fasta_read_by_a_ray_worker_is_one_line(world, tmp_path, residues):
    """A FASTA error raised in a Ray read task (or a Ray task of the grouping pass) crosses the process boundary
    as the same error and is printed as one line; Ray Data's own tracebacks stay in the log file."""
    bad = tmp_path / "bad.fasta"
    bad.write_bytes(b">a\nMKV\n>b\nMK\x00V\n")
    argv = [sys.executable, "-m", "rdscale", "extract", "--fasta", str(bad), "--models", world["models"][0],
            "-o", str(tmp_path / "o"), "--set", f"output.residues={residues}", "--set", "ray.object_store_mb=100"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**_env(), "RAY_ADDRESS": "local"},
                          check=False, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"rdscale extract: error: {bad}: binary content (byte 0x00): not a FASTA text file (at byte 12)" \
        in done.stderr.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# a Ray run's terminal: progress and summary, not Ray's notices


_NOTICES_CHILD = """
import logging, os, sys, warnings
from rdscale.cluster.progress import route_ray_notices

path = route_ray_notices(sys.argv[1])
logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.INFO)
logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
logging.getLogger("ray.data._internal.execution.streaming_executor").info("Starting execution of Dataset d_0.")
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
logging.getLogger("ray.data").error("a real problem")
with warnings.catch_warnings(record=True) as caught:  # keeps the filters route_ray_notices installed
    warnings.warn("lance is not fork-safe. If you are using multiprocessing, use spawn", UserWarning)
assert not caught, caught
assert "lance is not fork-safe" in os.environ["PYTHONWARNINGS"]
"""


def test_ray_notices_go_to_the_log_file(tmp_path):
    """In a fresh process (Ray's logging set-up is per process: a Ray run earlier in this test session would have
    bound its handlers to that test's captured stderr)."""
    log_file = tmp_path / "ray.log"
    done = subprocess.run([sys.executable, "-c", _NOTICES_CHILD, str(log_file)], capture_output=True, text=True,
                          env={**_env(), "PYTHONWARNINGS": ""}, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stderr
    assert "Token authentication" not in terminal and "Starting execution" not in terminal
    assert "Progress bars disabled" not in terminal and "a real problem" in terminal
    logged = log_file.read_text()
    assert "Token authentication" in logged and "Starting execution" in logged and "a real problem" in logged


@contextlib.contextmanager
def logged_by(name: str, monkeypatch):
    """The records `name`'s logger emits inside the block, through a handler on that logger itself: other
    libraries' logging set-up earlier in the session (Ray's dictConfig, levels) cannot hide them from a test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "disabled", False)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also clears the loggers' isEnabledFor caches
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_log_names_the_final_fit_location_not_the_staging_one(tmp_path, tiny_family, monkeypatch):
    from helpers import make_cfg

    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import run

    with logged_by("rdscale.run.pipeline", monkeypatch) as records:
        fasta = write_fasta(tmp_path / "a.fasta", n=4, seed=1)
        run(make_cfg(tmp_path, fasta, tiny_family[:2], "r"), LocalExecutor(), progress=False)
    written = [r.getMessage() for r in records if "fit artifact written" in r.getMessage()]
    assert written and all(".partial" not in m for m in written)
    assert str(tmp_path / "r" / "fit") in written[0]


# ---------------------------------------------------------------------------------------------------------------
# config values: whatever a user types, a Config that holds its ranges or one ConfigError


def _config_keys():
    import dataclasses

    from rdscale.config import _SECTIONS, Config

    keys = [f.name for f in dataclasses.fields(Config) if f.name not in _SECTIONS]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                  st.integers(), max_size=2),
)


@given(key=st.sampled_from(_config_keys()), value=_VALUES)
def test_any_override_gives_a_valid_config_or_a_config_error(key, value):
    import json
    import math

    from rdscale.config import ConfigError, load_config

    text = "null" if value is None else json.dumps(value) if not isinstance(value, float) or math.isfinite(value) \
        else {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    try:
        cfg = load_config(None, [f"{key}={text}"])
    except ConfigError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    e, o = cfg.embedding, cfg.output
    assert 1 <= e.window <= 1022 and 0 <= e.overlap < e.window and 8 <= e.toks_per_batch
    assert o.records_per_batch >= 1 and (o.storage_width is None or o.storage_width >= 1)
    assert 0 < cfg.input.shard_mb <= 1 << 20 and math.isfinite(cfg.input.shard_mb)
    assert (cfg.ray.num_actors == "auto" or cfg.ray.num_actors >= 1) and o.residue_dtype in ("float16", "float32")


@given(raw=st.text(max_size=40))
def test_any_set_text_is_accepted_or_one_config_error(raw):
    from rdscale.config import ConfigError, load_config

    try:
        load_config(None, [raw])
    except ConfigError as err:
        assert str(err)


def lance_reports_progress() -> bool:
    import inspect

    import lance

    return "progress_callback" in inspect.signature(lance.LanceDataset.create_index).parameters


def test_long_verbs_report_progress_unless_quiet(world, tmp_path, capsys, monkeypatch):
    """verify and index builds (FAISS; Lance where pylance reports its stages) report their progress (a count line
    when stderr is not a terminal); -q silences it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    with logged_by("rdscale.progress", monkeypatch) as records:
        for argv, lines in ((["verify", run], ("verify: reading the input: 1/1 shards",
                                              "verify: reading proteins and rejects: 6/6 rows",
                                              "verify: reading residues: ")),
                            (["index", run, "--backend", "faiss", "--width", "32", "--index-type", "IVF_FLAT",
                              "--param", "nlist=2", "--rebuild"],
                             ("indexing proteins (width 32, IVF_FLAT): 6/6 rows",)),
                            *([(["index", run, "--backend", "lance", "--width", "32", "--param", "num_partitions=1",
                                 "--rebuild"], ("indexing proteins (width 32, IVF_HNSW_SQ): ",))]
                              if lance_reports_progress() else [])):
            for quiet in (False, True):
                records.clear()
                code, _, err = invoke(capsys, (["-q"] if quiet else []) + argv)
                assert code == 0, err
                logged = [r.getMessage() for r in records]
                for line in lines:
                    assert any(m.startswith(line) for m in logged) != quiet, (argv, quiet, logged)


# ---------------------------------------------------------------------------------------------------------------
# issue 25: FAISS on a full or read-only disk, a nucleotide FASTA


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_faiss_index_on_a_full_or_read_only_disk(world, capsys, small_filesystems, disk):
    """FAISS reports a failed write as a RuntimeError of C++ text: one line naming the index and the OS's reason,
    no `.tmp` file left, the run as it was."""
    size_kb = sum(p.stat().st_size for p in world["run"].rglob("*") if p.is_file()) // 1024 + 512
    fs = small_filesystems(f"faiss_{disk}", f"size={size_kb}k")
    run = fs / "run"
    shutil.copytree(world["run"], run)
    (run / "indexes").mkdir()
    if disk == "full":
        with open(fs / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    before = listing(run)
    code, _, err = invoke(capsys, ["index", run, "--backend", "faiss", "--width", "32", "--index-type", "HNSW"])
    assert_one_line(code, err, disk)
    reason = "no space left on device" if disk == "full" else "read-only file system"
    assert f"rdscale index: error: cannot write the faiss index {run / 'indexes'}" in err and reason in err, err
    assert listing(run) == before and not list((run / "indexes").iterdir())


def test_a_nucleotide_fasta_is_warned_about_by_name(world, tmp_path, capsys, monkeypatch):
    """A C G T are amino-acid letters: DNA is valid protein text. The run goes on, with one warning naming the file."""
    import random

    rng = random.Random(0)
    dna = tmp_path / "contigs.fasta"
    dna.write_text("".join(f">c{i}\n" + "".join(rng.choice("ACGT") for _ in range(120)) + "\n" for i in range(5)))
    for fasta, out in ((dna, tmp_path / "o"), (world["fasta"], tmp_path / "p")):
        with logged_by("rdscale.run.pipeline", monkeypatch) as records:
            code, _, err = invoke(capsys, ["extract", "--local", "--fasta", fasta, "--models", world["models"][0],
                                           "-o", out])
        assert code == 0, err
        warned = [r.getMessage() for r in records if "looks like nucleotide" in r.getMessage()]
        if fasta == dna:
            assert len(warned) == 1 and warned[0].startswith(f"{dna} looks like nucleotide sequences (100% of its "
                                                             "first 600 residues"), warned
        else:
            assert warned == []  # proteins: not a word


_OOM_NOTICE = ("A worker died or was killed while executing a task by an unexpected system error. Memory on the node "
               "(IP: 10.0.0.7, ID: 9f3) where the task (task ID: 51, name=ReadShards, pid=4242) was running was "
               "14.87GB / 15.50GB (0.959), which exceeds the memory usage threshold of 0.95. Ray killed this worker "
               "(ID: 77) because it was the most recently scheduled task")


def test_memory_monitor_kills_are_one_line_with_the_details_in_the_log(tmp_path, monkeypatch):
    """What Ray forwards from its workers during a burst of memory-monitor kills (the raylet's notices, Ray Data's
    stats actor's KeyError tracebacks): one warning naming the log file; all of it in the file; other worker
    output printed as Ray prints it."""
    from rdscale.cluster.executor import WorkerOutput

    log_file = tmp_path / "ray.log"
    printed = []
    out = WorkerOutput(str(log_file), printed.append)
    traceback = ["Traceback (most recent call last):", '  File "/x/ray/data/_internal/stats.py", line 9, in update',
                 "KeyError: 'ReadShards->MapBatches(_ApplyActor)'"]
    with logged_by("rdscale.cluster.executor", monkeypatch) as records:
        for i in range(9):
            out({"lines": [f"(raylet) [2026-12-06] {_OOM_NOTICE}"], "pid": "raylet", "ip": "10.0.0.7", "is_err": True})
            out({"lines": traceback, "pid": 100 + i, "ip": "10.0.0.7", "is_err": True})
        out({"lines": ["rdscale worker: a line of its own"], "pid": 7, "ip": "10.0.0.7", "is_err": True})
    warned = [r.getMessage() for r in records]
    assert warned == [f"Ray's memory monitor killed a worker under memory pressure (node 10.0.0.7); Ray retries "
                      f"the killed tasks and the run goes on. Details: {log_file}"]
    assert [d["lines"] for d in printed] == [["rdscale worker: a line of its own"]]
    logged = log_file.read_text()
    assert logged.count("Ray killed this worker") == 9 and logged.count("KeyError") == 9
    assert out.kills == 9


def test_serve_info_lines_stay_in_the_log_and_its_warnings_reach_the_terminal(tmp_path):
    """`rdscale serve`'s terminal: its own line, not Serve's start-up and access log (every request, from the
    proxy, controller and replicas); what they warn or raise is still printed."""
    from rdscale.cluster.executor import WorkerOutput

    log_file = tmp_path / "ray.log"
    printed = []
    out = WorkerOutput(str(log_file), printed.append)
    access = "INFO 2026-12-07 13:47:59,841 rdscale_rdscale-search hsd 2f1 -- POST /search 200 24.0ms"
    for actor in ("ProxyActor", "ServeController", "ServeReplica:rdscale:rdscale-search"):
        out({"lines": [access, "WARNING 2026-12-07 13:48:00,001 replica -- slow", "a print of its own"],
             "pid": 5, "ip": "10.0.0.7", "actor_name": actor})
    out({"lines": [access], "pid": 6, "ip": "10.0.0.7", "actor_name": "_ApplyActor"})  # not Serve's: printed
    assert [d["lines"] for d in printed] == [["WARNING 2026-12-07 13:48:00,001 replica -- slow",
                                              "a print of its own"]] * 3 + [[access]]
    assert log_file.read_text().count("POST /search 200") == 4


def test_serve_driver_logger_writes_to_the_log_file_when_ray_messages_do(tmp_path, monkeypatch):
    """Serve's driver-side logger has a terminal handler of its own (it does not propagate to "ray")."""
    import io

    from rdscale.cluster.serve import route_serve_logger

    logger = logging.getLogger("ray.serve")
    terminal = io.StringIO()
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(terminal)])
    monkeypatch.setattr(logger, "propagate", False)
    route_serve_logger(None)  # Ray's messages on the terminal (-v): unchanged
    assert [type(h) for h in logger.handlers] == [logging.StreamHandler]
    route_serve_logger(str(tmp_path / "ray.log"))
    logger.warning("Application 'rdscale' is ready")
    for h in logger.handlers:
        h.close()
    assert terminal.getvalue() == "" and "is ready" in (tmp_path / "ray.log").read_text()


_KILLS_CHILD = """
import logging, sys, time
import ray
from rdscale.cluster.progress import route_ray_notices
from rdscale.cluster.executor import ray_log_file, route_worker_output

logging.basicConfig(level=logging.WARNING)
path = route_ray_notices(sys.argv[1])
log_file = ray_log_file()
ray.init(address="local", include_dashboard=False, configure_logging=False, num_cpus=1)
assert route_worker_output(log_file) is not None

@ray.remote
def noisy(notice):
    for _ in range(3):
        print(notice, file=sys.stderr, flush=True)
    print("Traceback (most recent call last):\\n  File \\"/x/ray/data/_internal/stats.py\\"\\nKeyError: 'op'",
          file=sys.stderr, flush=True)
    print("a worker line of its own", file=sys.stderr, flush=True)

ray.get(noisy.remote(sys.argv[2]))
time.sleep(5)  # forwarded output arrives asynchronously
ray.shutdown()
"""


@pytest.mark.ray
def test_memory_monitor_notices_forwarded_by_a_real_ray_are_one_line(tmp_path):
    """Through Ray's own forwarding of worker output to the driver (a fresh process: Ray's printer is per process)."""
    log_file = tmp_path / "ray.log"
    done = subprocess.run([sys.executable, "-c", _KILLS_CHILD, str(log_file), _OOM_NOTICE], capture_output=True,
                          text=True, env={**_env(), "PYTHONWARNINGS": "", "RAY_ADDRESS": ""}, check=False,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stderr + done.stdout
    assert "Ray killed this worker" not in terminal and "KeyError" not in terminal, terminal[-3000:]
    assert terminal.count("Ray's memory monitor killed") == 1 and str(log_file) in terminal, terminal[-3000:]
    assert "a worker line of its own" in terminal
    logged = log_file.read_text()
    assert logged.count("Ray killed this worker") == 3 and "KeyError" in logged


@pytest.mark.parametrize("local, overrides, routed", [(False, [], True), (True, [], False),
                                                      (False, ["ray.address = local"], False)])
def test_update_routes_ray_notices_to_a_log_file_when_it_starts_ray(local, overrides, routed, monkeypatch):
    """`update` starts Ray as `run` does: its terminal shows the release summary, not Ray's token or Lance's fork
    notices (they went to the terminal before it called quiet_ray)."""
    import argparse

    from rdscale.cli import update as cli_update

    calls = []
    monkeypatch.setattr(cli_update, "quiet_ray", lambda args, uses_ray: calls.append(uses_ray))

    class Report:
        previous = "initial"

        def lines(self):
            return ["release r2"]

    monkeypatch.setattr(cli_update, "update", lambda *a, **kw: Report())
    args = argparse.Namespace(abort=False, fasta=["x.fasta"], release="r2", overrides=list(overrides), local=local,
                              device=None, out="run", quiet=True, previous="initial", verbose=False)
    assert cli_update.cmd_update(args) == 0
    assert calls == [routed]
