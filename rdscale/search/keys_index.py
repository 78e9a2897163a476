"""A scalar (BTREE) index on a table's ``id`` column: two-stage residue search reads the shortlisted proteins'
residues with ``id IN (...)``, which Lance answers from this index instead of scanning the id column.

Idempotent, and tolerant of an index on ``id`` that something else made (another build, `rdscale compact`'s
tooling): an existing one is kept. Fragments appended after it was built are scanned by Lance (still correct).
"""

from __future__ import annotations

from pathlib import Path

from rdscale.io.runs import Run
from rdscale.search.tables import SearchError, open_table


def has_id_index(ds) -> bool:
    return any(list(i.get("fields") or []) == ["id"] for i in ds.list_indices())


def ensure_id_index(dataset_path: str | Path | Run, table: str = "residues") -> bool:
    """A BTREE index on ``id`` of ``table``; True if this call made it, False if one existed."""
    ds = open_table(dataset_path, table)
    if has_id_index(ds):
        return False
    try:
        ds.create_scalar_index("id", index_type="BTREE")
    except Exception as err:  # noqa: BLE001 - Lance raises ValueError/OSError/RuntimeError
        if "already exists" in str(err) or has_id_index(open_table(dataset_path, table)):
            return False  # made concurrently
        raise SearchError(f"cannot index the id column of {table}: {str(err).splitlines()[0]}") from None
    return True
