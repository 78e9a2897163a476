"""bench/bench_gpu.py survives what a single, short GPU run can meet: a part that fails is recorded and the others
still run, parts that would not fit the time budget are skipped and say why, a part still running past the budget
is interrupted, and the JSON on disk is complete after every part. The whole script also runs end to end on a CPU
(--smoke) with only torch, numpy, pyarrow, pylance and fair-esm importable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import bench_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(tmp_path, monkeypatch):
    gpu = bench_module("bench_gpu")
    monkeypatch.setenv("RDSCALE_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    made = []

    def make(*flags):
        args = gpu.parse_args(["--local", "--smoke", "--out", str(tmp_path / "bench_gpu.json"), *flags])
        b = gpu.Bench(args)
        made.append(b)
        return b

    yield gpu, make
    torch.set_num_threads(threads)  # Bench(--smoke) pins one thread
    for b in made:
        import shutil

        shutil.rmtree(b.scratch, ignore_errors=True)


def _report(b):
    return json.loads(b.args.out.read_text())


def test_a_failing_part_is_recorded_and_the_parts_after_it_still_run(bench):
    gpu, make = bench
    b = make()

    def boom():
        raise ValueError("no kernel image is available")

    b.section("first", boom)
    report = _report(b)  # on disk already, before any other part ran
    assert report["sections"]["first"]["status"] == "error"
    assert "ValueError: no kernel image is available" in report["sections"]["first"]["error"]
    assert "test_bench_gpu.py" in report["sections"]["first"]["error"]  # where it was raised
    assert report["torch"] == torch.__version__ and "device_name" in report and "cuda" in report

    def works():
        b.state["made"] = True

    b.section("second", works)
    b.section("third", lambda: None, needs=["made", "never made"])
    sections = _report(b)["sections"]
    assert sections["second"]["status"] == "ok"
    assert sections["third"] == {"status": "skipped", "reason": "needs never made"}


def test_parts_past_the_time_budget_are_skipped_with_the_reason(bench):
    _, make = bench
    b = make("--max-seconds", "0")
    ran = []
    b.section("late", lambda: ran.append(1), estimate=5)
    assert not ran
    record = _report(b)["sections"]["late"]
    assert record["status"] == "skipped" and "time budget" in record["reason"]


def test_the_watchdog_interrupts_a_part_that_runs_past_the_budget(bench):
    gpu, make = bench
    b = make()
    previous = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    try:
        gpu._start_watchdog(0.3)
        b.section("hangs", lambda: time.sleep(30))
    finally:
        gpu._stop_watchdog()
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < 10
    record = _report(b)["sections"]["hangs"]
    assert record["status"] == "error" and "interrupted" in record["error"]


def test_the_table_of_a_report_needs_no_torch(tmp_path):
    report = {"device_name": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "seconds_total": 301.0,
              "finished": False,
              "rows": [{"variant": "forward fast", "model": "650M", "residues": 1000, "seconds": 0.5,
                        "residues_per_s": 2000.0, "mfu": 0.41, "rate_vs_forward_fast": 0.9}],
              "sections": {"rd.3B chain": {"status": "error", "error": "OutOfMemoryError: CUDA out of memory"}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    code = "import sys; sys.modules['torch'] = None; sys.path.insert(0, 'bench'); import bench_gpu; " \
           f"sys.exit(bench_gpu.main(['--table', {str(path)!r}]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "NOT FINISHED" in done.stdout and "41.0%" in done.stdout and "rate_vs_forward_fast=0.9" in done.stdout
    assert "[error] rd.3B chain: OutOfMemoryError" in done.stdout


def test_smoke_run_end_to_end_with_only_the_gpu_machines_packages(tmp_path):
    """Every part runs (tiny shapes, CPU) with ray, yaml, safetensors, scipy, ... unimportable (the script
    refuses them itself), and the JSON lists every part as ok."""
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--local", "--smoke", "--residues", "1500", "--fit-sequences", "6",
         "--esm-residues", "600", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "RDSCALE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and not report["ray_imported"]
    bad = {k: v for k, v in report["sections"].items() if v["status"] != "ok"}
    assert set(bad) == {"forward fast + torch.compile 650M"}, bad  # skipped by --smoke
    variants = {r["variant"] for r in report["rows"]}
    assert {"forward fast", "forward plain", "extract cold, prefix 640 fp16", "rd.3B chain: forwards + rd map",
            "fair-esm autocast loop (esm-extract)"} <= variants
