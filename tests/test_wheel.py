"""The built wheel works on its own: `pip wheel . --no-deps`, installed into a fresh virtual environment outside
the repository, runs the README's install-and-demo path (rdscale config -c demo, make-tiny-family, run -c demo
--local, info) from a folder that holds only the example FASTA. The dependencies come from this environment's
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

    config = _run(["rdscale", "config", "-c", "demo"], work, env)
    assert "examples/example.fasta" in config and str(work / "runs" / "demo") in config
    _run(["rdscale", "make-tiny-family", "models/tiny"], work, env)
    summary = _run(["rdscale", "run", "-c", "demo", "--local"], work, env)
    assert "records: 120 (proteins 120 + rejects 0)" in summary, summary
    info = _run(["rdscale", "info", "runs/demo"], work, env)
    assert "proteins: 120 rows" in info and "levels (prefix widths): [32, 48, 64]" in info, info
