"""The built wheel works on its own: `pip wheel . --no-deps`, installed into a fresh virtual environment outside
the repository, prints the shipped configs (rdscale config -c demo, -c uniref50_cluster: conf/ packaged as
rdscale.conf) and runs the demo (make-tiny-family, run -c demo --local with its inputs named on the command line,
info) from a folder that holds only the example FASTA. The dependencies come from this environment's
site-packages (a path entry, offline-safe), never rdscale itself: the import must resolve inside the new venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_in_a_fresh_venv_runs_the_readme_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info folder.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "models", "build", "dist",
                                                               "*.egg-info", "__pycache__", ".pytest_cache",
                                                               "gpu_deps", ".hypothesis"))
    wheels = tmp_path / "wheels"
    # Offline with this environment's setuptools; an environment without it (Python >= 3.12 venvs) builds in
    # pip's isolated build environment, from the package index.
    import importlib.util

    offline = importlib.util.find_spec("setuptools") is not None
    build_env = env if offline else {k: v for k, v in env.items() if k != "PIP_NO_INDEX"}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(wheels), "-q",
          *(["--no-build-isolation"] if offline else [])], tmp_path, build_env)
    (wheel,) = wheels.glob("rdscale-*.whl")

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    bin_dir = fresh / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    fresh_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # This environment's packages as a plain path entry: its .pth files (the editable rdscale among them) are not
    # processed, so rdscale can only come from the wheel.
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel), "-q"], tmp_path, env)

    work = tmp_path / "work"  # outside the repository: only the example input
    (work / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "example.fasta", work / "examples")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    where = _run([python, "-c", "import rdscale; print(rdscale.__file__)"], work, env).strip()
    assert Path(where).is_relative_to(fresh), where
    assert shutil.which("rdscale", path=env["PATH"]) == str(bin_dir / "rdscale")

    # The shipped configs' relative paths are relative to their own file, inside the installed package.
    config = _run(["rdscale", "config", "-c", "demo"], work, env)
    installed = Path(where).parent  # site-packages/rdscale; the demo names ../examples from rdscale/conf
    assert f"- {installed / 'examples' / 'example.fasta'}" in config and "shard_mb: 0.03" in config, config
    cluster = _run(["rdscale", "config", "-c", "uniref50_cluster"], work, env)
    assert "- /data/uniref50/uniref50.fasta.gz" in cluster and "esm2_t36_3B_UR50D" in cluster, cluster
    _run(["rdscale", "make-tiny-family", "models/tiny"], work, env)
    models = [str(Path("models/tiny") / f"esm2_t{n}_tiny.pt") for n in ("2_32", "3_48", "4_64")]
    summary = _run(["rdscale", "run", "-c", "demo", "--local", "--models", *models,
                    "--fasta", "examples/example.fasta", "-o", "runs/demo"], work, env)
    assert "records: 120 (proteins 120 + rejects 0)" in summary, summary
    info = _run(["rdscale", "info", "runs/demo"], work, env)
    assert "proteins: 120 rows" in info and "levels (prefix widths): [32, 48, 64]" in info, info


def test_pyproject_lists_every_package():
    """pyproject.toml names the packages (conf/ is mapped in as rdscale.conf): a new package must be added there, or
    the wheel leaves it out."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rdscale").rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"rdscale.conf", "rdscale.cluster.page"}
    assert setup["package-dir"] == {"rdscale.conf": "conf"} and (ROOT / "conf" / "demo.yaml").is_file()
