"""Helpers shared by several test modules (FASTA writers, configs, table readers); not tests themselves."""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
from pathlib import Path

import lance

from rdscale.cli.main import main
from rdscale.config import load_config
from rdscale.run.executor import LocalExecutor


def invoke(capsys, argv):
    """(exit code, stdout, stderr) of `rdscale ARGV` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


AA = "ACDEFGHIKLMNPQRSTVWY"
ROOT = Path(__file__).resolve().parents[1]


def write_fasta(path, n=24, seed=0, long_every=None, wrap=60):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            length = rng.randint(15, 90)
            if long_every and i % long_every == long_every - 1:
                length = 260  # longer than the test window (120): exercises windowing
            seq = "".join(rng.choice(AA) for _ in range(length))
            f.write(f">sp|P{i:05d}|PROT{i} protein {i}\n")
            f.writelines(seq[j : j + wrap] + "\n" for j in range(0, length, wrap))
    return path


def make_cfg(tmp_path, fasta, models, out="run", **overrides):
    settings = {
        "input.shard_mb": 0.0004,  # ~400-byte shards: about ten shards per test file
        "embedding.window": 120,
        "embedding.overlap": 30,
        "embedding.toks_per_batch": 1024,
        "fit.sample_sequences": 1000,
        "fit.regression": "pcr",
        "output.residue_dtype": "float32",
        "output.records_per_batch": 8,
        "ray.address": "local",
        **overrides,
    }
    items = [f"{k}={v}" for k, v in settings.items()]
    items += [f"input.paths={[str(p) for p in (fasta if isinstance(fasta, list) else [fasta])]}",
              f"models={[str(m) for m in models]}", f"output.dir={tmp_path / out}"]
    return load_config(None, items)


def table(run_dir, name, columns=None):
    t = lance.dataset(str(run_dir / f"{name}.lance")).to_table(columns=columns)
    keys = [("id", "ascending")] + ([("pos", "ascending")] if "pos" in t.column_names else [])
    return t.sort_by(keys)


def bench_module(name: str):
    """bench/<name>.py as a module (benchmarks are scripts, not a package), e.g. bench_module("benchkit")."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def embed_killed_before_ledger(cfg, commits: int) -> None:
    """`embed` (in-process), killed by the commit protocol's fault hook between the tables' commit and the ledger
    row of shard number `commits` + 1: `commits` shards are committed, the next one's rows are in the tables but
    not in the ledger (a run killed mid-commit)."""
    import pytest

    from rdscale.io import store
    from rdscale.run.executor import LocalExecutor
    from rdscale.run.pipeline import embed

    calls = []

    def die():
        calls.append(1)
        if len(calls) == commits + 1:
            raise KeyboardInterrupt

    cfg = copy.deepcopy(cfg)
    cfg.output.fragment_rows = 1  # a flush per batch: each shard committed as it completes
    store.FAULT_HOOKS["before_ledger"] = die
    try:
        with pytest.raises(KeyboardInterrupt):
            embed(cfg, None, LocalExecutor(), progress=False)
    finally:
        store.FAULT_HOOKS.clear()


class StopAfter(LocalExecutor):
    """Dies (KeyboardInterrupt, as from Ctrl-C or a preempted node) after handing over `n` batch results."""

    def __init__(self, n):
        self.n = n

    def apply(self, *args, **kwargs):
        for i, item in enumerate(super().apply(*args, **kwargs)):
            if i == self.n:
                raise KeyboardInterrupt
            yield item
