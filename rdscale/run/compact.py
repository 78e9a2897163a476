"""`rdscale compact RUN`: merge a run's small Lance fragments into large ones, off the run's critical path.

The apply pass writes one fragment per table per chunk (a few thousand residues each) so that writing overlaps the
forward; reading many small fragments is slower than reading a few large ones. A run no longer compacts at its end
by default (`output.compact: false`; it cost a quarter of a warm GPU run and grew with the output): compact once,
when the run is finished, or between resumes. Compaction rewrites data files under a new table version; rows and
their values are unchanged. Do not compact a directory that a run is writing into at the same time.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from rdscale.config import ConfigError
from rdscale.io.lease import fenced
from rdscale.io.runs import Run
from rdscale.io.store import DATA_TABLES, LEDGER, PROTEINS


def compactable(out_dir: str | Path) -> Run:
    """The run at `out_dir` (a local directory or an object-store prefix: a Run, never a Path, which would turn
    s3://b/x into s3:/b/x), or a ConfigError when there is none; checked before the writer lease is taken, so a
    mistyped path leaves no directory behind."""
    run = Run(out_dir)
    if not run.has_table(PROTEINS):
        raise ConfigError(f"{run.uri} holds no rdscale run (no proteins.lance)")
    return run


def compact_run(out_dir: str | Path, cleanup: bool = False, target_rows: int | None = None) -> dict[str, dict]:
    """Compact every table of a run directory. cleanup: also delete the data files of older table versions
    (frees the disk space; earlier versions can no longer be checked out). Returns per table
    {fragments_before, fragments_after, rows}."""
    if target_rows is not None and target_rows < 1:
        raise ConfigError(f"--target-rows must be at least 1, got {target_rows}")
    run = compactable(out_dir)
    report = {}
    for name in (*DATA_TABLES, LEDGER):
        if not run.has_table(name):
            continue
        uri = run.table_uri(name)
        ds = run.dataset(name)
        before = len(ds.get_fragments())
        rows = ds.count_rows()
        if before > 1:
            options = {"target_rows_per_fragment": target_rows} if target_rows else {}
            with fenced(uri, f"compact {name}"):  # under the caller's lease: a fenced step (rdscale.io.lease)
                run.dataset(name).optimize.compact_files(**options)
            ds = run.dataset(name)
        if cleanup:
            with fenced(uri, f"cleanup {name}"):  # keeps releases
                run.dataset(name).cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
            ds = run.dataset(name)
        after = len(ds.get_fragments())
        if ds.count_rows() != rows:  # compaction never changes rows; refuse to report success if it did
            raise RuntimeError(f"{uri}: {rows} rows before compaction, {ds.count_rows()} after")
        report[name] = {"fragments_before": before, "fragments_after": after, "rows": rows}
    return report
