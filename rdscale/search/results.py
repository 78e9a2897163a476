"""Search results: recall against a reference, terminal formatting, files (Arrow IPC, CSV, Parquet)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rdscale.io.location import Location, is_remote
from rdscale.search.tables import SearchError

# evaluation and output


def recall_at_k(found: pa.Table, truth: pa.Table, k: int = 10) -> float:
    """Mean over queries of |found top-k ∩ truth top-k| / k, matching rows by key (id, and pos if present)."""
    keys = [c for c in ("id", "pos") if c in truth.column_names]

    def top(tbl: pa.Table) -> dict[Any, set]:
        out: dict[Any, set] = {}
        cols = [tbl.column(c).to_pylist() for c in ("query", "rank", *keys)]
        for qv, r, *kv in zip(*cols):
            if r <= k:
                out.setdefault(qv, set()).add(tuple(kv))
        return out

    want, got = top(truth), top(found)
    if not want:
        raise SearchError("recall_at_k: the reference table is empty")
    return float(np.mean([len(got.get(qv, set()) & ref) / min(k, len(ref)) for qv, ref in want.items()]))


def format_results(result: pa.Table, max_rows: int | None = 50) -> str:
    """The result table as aligned plain text for a terminal (scores to 4 decimals)."""
    names = result.column_names
    n = result.num_rows if max_rows is None else min(max_rows, result.num_rows)
    columns = [result.column(c).to_pylist()[:n] for c in names]
    # round + 0.0: a distance that rounds to zero (1 - cos of a row with itself, -1e-7) prints 0.0000, not -0.0000
    cells = [[f"{round(v, 4) + 0.0:.4f}" if isinstance(v, float) else str(v) for v in col] for col in columns]
    widths = [max([len(name), *map(len, col)]) for name, col in zip(names, cells)]
    numeric = [pa.types.is_integer(result.schema.field(c).type) or pa.types.is_floating(result.schema.field(c).type)
               for c in names]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(names), line(["-" * w for w in widths])]
    out += [line(row) for row in zip(*cells)]
    if n < result.num_rows:
        out.append(f"... {result.num_rows - n} more rows")
    return "\n".join(out)


def write_results(result: pa.Table, path: str | Path, fmt: str | None = None) -> Path | str:
    """Write results as ``fmt`` ("arrow", "csv" or "parquet"), by default told by the extension: .arrow / .ipc /
    .feather (Arrow IPC file), .csv, .parquet. ``path`` may be on an object store (s3://, gs://, az://): the file
    is written locally and uploaded (a Path would turn s3://b/x into a local folder 's3:/b')."""
    if is_remote(path):
        import tempfile

        target = Location.parse(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = write_results(result, Path(tmp) / target.name, fmt)
            target.write_bytes(local.read_bytes())
        return target.uri
    path = Path(path)
    suffix = f".{fmt}" if fmt else path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".arrow", ".ipc", ".feather"):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, result.schema) as writer:
            writer.write_table(result)
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(result.column_names)
            writer.writerows(zip(*(result.column(c).to_pylist() for c in result.column_names)))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(result, str(path))
    else:
        raise SearchError(f"cannot tell the format of {path}: use .arrow/.ipc/.feather, .csv or .parquet")
    return path
