"""FAISS IVF index builds on a Ray cluster (``rdscale index --ray``): the driver trains, Ray tasks add the rows.

- The driver trains the empty index (coarse centroids, PQ codebooks) on a uniform sample of the table: that sample
  (max(64 nlist, 16384) rows of the prefix) is all of the table it ever holds.
- One Ray task per fragment group (contiguous groups, rows balanced) deserialises the trained empty index, streams
  its fragments' prefixes into it and returns it serialised (an IVF index's lists: codes and ids, no graph).
- One more Ray task merges the groups in scan order (``merge_from`` with each group's first row position as the
  label offset, so labels are row positions of the whole table, as in a single-process build) and writes the index
  file beside the run; the driver then writes the sidecar. Group indexes travel through Ray's object store.

HNSW graphs cannot be merged: a Ray build is for IVF_FLAT and IVF_PQ (the compact types large tables use). With the
same training sample (a fixed seed) and the same rows the merged index equals the single-process one.

The recall calibration (rdscale.search.calibrate) runs in one more Ray task, not in the driver: it builds a twin of
the index over the table without the calibration rows and searches it, which holds that twin index and streams
the rows for the exact truth; the task's memory is about that of a searcher serving the index. The driver only
receives the calibrated IndexInfo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from rdscale.cluster.search import partition_fragments
from rdscale.io.runs import open_dataset
from rdscale.search import calibrate as C
from rdscale.search import faiss_index as F
from rdscale.search.searcher import build_index, calibrate
from rdscale.search.tables import IndexInfo, SearchError

RAY_INDEX_TYPES = ("IVF_FLAT", "IVF_PQ")


def _serialize(index) -> np.ndarray:
    return F.import_faiss().serialize_index(index)  # (bytes,) uint8


def _deserialize(blob: np.ndarray):
    return F.import_faiss().deserialize_index(blob)


@ray.remote
def _add_group(dataset_uri: str, fragment_ids: list[int], empty: np.ndarray, width: int, metric: str) -> np.ndarray:
    """The trained empty index with fragments ``fragment_ids`` added (labels from 0 in their scan order)."""
    ds = open_dataset(dataset_uri)
    known = {f.fragment_id: f for f in ds.get_fragments()}
    frags = [known[f] for f in fragment_ids]
    return _serialize(F.add_rows(_deserialize(empty), ds, width, metric, fragments=frags))


@ray.remote
def _merge_and_write(dataset_uri: str, table: str, width: int, metric: str, offsets: list[int], *groups) -> int:
    """Merge the group indexes (group g's labels shifted by offsets[g]) and write the index file; its row count."""
    ds = open_dataset(dataset_uri)
    index = _deserialize(groups[0])
    if offsets[0] != 0:
        raise SearchError("the first fragment group must start at row 0")
    for offset, blob in zip(offsets[1:], groups[1:]):
        index.merge_from(_deserialize(blob), offset)
    F.write_index(ds, table, width, metric, index)
    return int(index.ntotal)


@ray.remote
def _calibrate(dataset_path: str, info: IndexInfo, recall: float) -> IndexInfo:
    return calibrate(dataset_path, info, recall)


class RayIndexBuilder:
    """A ``builder`` for ``rdscale.search.build_index`` (faiss): called, it builds the index with ``num_tasks`` Ray
    tasks (default one per fragment, at most 2 x the cluster's CPUs), merged and written by one more;
    ``calibrate`` measures its recall curve in a Ray task. ``address``: the cluster to join when Ray is not
    started yet (default auto; local starts one in this process)."""

    def __init__(self, num_tasks: int | None = None, num_cpus: float = 1.0, address: str | None = None):
        self.num_tasks, self.num_cpus, self.address = num_tasks, num_cpus, address

    def _connect(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address or "auto", include_dashboard=False, configure_logging=False)

    def calibrate(self, dataset_path: str | Path, info: IndexInfo, recall: float) -> IndexInfo:
        self._connect()
        return ray.get(_calibrate.options(num_cpus=self.num_cpus).remote(str(dataset_path), info, recall))

    def __call__(self, ds, table: str, width: int, index_type: str, metric: str, params: dict[str, Any]) -> None:
        num_tasks, num_cpus = self.num_tasks, self.num_cpus
        if index_type not in RAY_INDEX_TYPES:
            raise SearchError(f"a Ray index build makes {' or '.join(RAY_INDEX_TYPES)} (an HNSW graph cannot be "
                              f"built in parts); got {index_type}")
        self._connect()
        empty = _serialize(F.trained_empty(ds, width, index_type, metric, params, table))
        fragments = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
        tasks = num_tasks or min(len(fragments), max(1, int(2 * ray.cluster_resources().get("CPU", 1))))
        groups = partition_fragments(fragments, max(1, min(tasks, len(fragments))))
        rows = dict(fragments)
        offsets = np.cumsum([0] + [sum(rows[f] for f in g) for g in groups])[:-1].tolist()
        empty_ref = ray.put(empty)
        parts = [_add_group.options(num_cpus=num_cpus).remote(ds.uri, g, empty_ref, width, metric) for g in groups]
        total = ray.get(_merge_and_write.options(num_cpus=num_cpus).remote(ds.uri, table, width, metric, offsets,
                                                                             *parts))
        if total != ds.count_rows():
            raise SearchError(f"{table} changed while indexing ({total} rows indexed, {ds.count_rows()} expected)")


def ray_builder(num_tasks: int | None = None, num_cpus: float = 1.0, address: str | None = None) -> RayIndexBuilder:
    """The builder ``rdscale index --ray`` passes to ``build_index`` (RayIndexBuilder)."""
    return RayIndexBuilder(num_tasks, num_cpus, address)


def build_index_on_ray(run: str | Path, table: str = "proteins", width: int | None = None,
                       index_type: str = "IVF_PQ", metric: str = "cosine", rebuild: bool = False,
                       num_tasks: int | None = None, recall: float | None = C.DEFAULT_RECALL, **params: Any
                       ) -> IndexInfo:
    """``rdscale.search.build_index`` with the FAISS index built on the Ray cluster (see the module)."""
    return build_index(run, table=table, width=width, index_type=index_type, metric=metric, rebuild=rebuild,
                       backend="faiss", recall=recall, builder=ray_builder(num_tasks), **params)
