"""Sharded search on Ray: a table split into partitions of whole Lance fragments, each held by a searcher actor
(its rows resident, its FAISS index built in memory from its own rows), queried scatter-gather.

Exact search is exact under sharding: every shard returns its own top k, and the k best of the union of the
shards' top k are the k best overall (ties aside), so ``ShardedSearcher`` answers what a single ``Searcher``
answers. ANN / funnel search ask each shard's index for its shortlist and merge the same way; recall matches a
single index's up to the index's own variance (a shard's graph is smaller, so usually a little better).

    sharded = ShardedSearcher(run, num_shards=4, build=[{"width": 320}])   # 4 actors, an HNSW each
    hits = sharded.search(queries, k=10, mode="funnel")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray

from rdscale.io.location import storage_options
from rdscale.search.request import SearchRequest
from rdscale.search.searcher import NUM_QUERIES_KEY, Searcher
from rdscale.search.sequences import QueryEmbedder, sequence_queries, stack_queries
from rdscale.search.tables import TABLES, SearchError, open_table


@ray.remote
class ShardActor:
    """One partition's Searcher: fragments ``fragment_ids`` of ``table``, resident, with in-memory indexes."""

    def __init__(self, run: str, table: str, fragment_ids: list[int], build: list[dict]):
        self.searcher = Searcher(run, table, fragments=fragment_ids, build=build)
        self.searcher.load()

    def num_rows(self) -> int:
        return self.searcher.num_rows

    def search(self, queries: np.ndarray, options: dict) -> pa.Table:
        return self.searcher.search(queries, **options)


@ray.remote
class QueryActor:
    """The query pass on Ray: a ``QueryEmbedder`` stage built from its small arguments and set up once, here
    (storage options, the run's chain and fit); its models load as the asked widths need them."""

    def __init__(self, run: str, table: str, models: list[str] | None, device: str | None, storage: dict):
        self.stage = QueryEmbedder(run, table, models, device, storage)
        self.error = None
        try:
            self.stage.setup()
        except SearchError as err:  # kept for the caller: an actor that fails to start says only that it died
            self.error = err

    def embed(self, sequences: list[str], names: list[str], width: int | None):
        if self.error is not None:
            raise self.error
        return self.stage(sequences, names, width=width)


def partition_fragments(fragments: list[tuple[int, int]], num_shards: int) -> list[list[int]]:
    """[(fragment id, rows), ...] -> ``num_shards`` groups of fragment ids, contiguous, rows balanced greedily."""
    total = sum(r for _, r in fragments)
    groups: list[list[int]] = [[] for _ in range(num_shards)]
    done, g = 0, 0
    for fid, rows in fragments:
        if g < num_shards - 1 and groups[g] and done >= total * (g + 1) / num_shards:
            g += 1
        groups[g].append(fid)
        done += rows
    return [grp for grp in groups if grp]


class ShardedSearcher:
    """Scatter-gather search over ``num_shards`` ShardActors (default: one per fragment, at most 8).

    ``build``: in-memory FAISS indexes each shard builds over its rows, as keyword dicts of
    ``Searcher.build_memory_index`` (width, index_type, metric, params). ``num_cpus``: reserved per actor."""

    def __init__(self, run: str | Path, table: str = "proteins", num_shards: int | None = None,
                 build: Sequence[dict] = (), num_cpus: float = 1.0, models: Sequence[str] | None = None,
                 device: str | None = None):
        ds = open_table(run, table)
        fragments = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
        if not fragments:
            raise SearchError(f"the {table} table at {ds.uri} is empty: nothing to search")
        num_shards = min(num_shards or min(len(fragments), 8), len(fragments))
        if num_shards < 1:
            raise SearchError(f"num_shards must be >= 1, got {num_shards}")
        self.table = table
        self.keys = TABLES[table]
        self.groups = partition_fragments(fragments, num_shards)
        self.actors = [ShardActor.options(num_cpus=num_cpus).remote(str(run), table, grp, list(build))
                       for grp in self.groups]
        self.num_rows = sum(ray.get([a.num_rows.remote() for a in self.actors]))
        self._lookup = Searcher(run, table, resident=False)  # id queries: the stored rows, read on demand
        self.run, self.num_cpus = str(run), num_cpus
        self._models, self._device = (list(models) if models else None), device
        self._query_actor = None  # sequence queries: one QueryActor, started on the first

    def query_width(self, **options: Any) -> int | None:
        """How far the chain runs for a sequence query with these options: as ``Searcher.query_width``; ann (the
        shards' in-memory indexes) at the asked width, or the whole chain."""
        req = SearchRequest.of(None, **options)
        if req.mode == "ann":
            return req.width
        return self._lookup.query_width(req)

    def search_sequences(self, sequences: Sequence[str] | dict[str, str], **options: Any) -> pa.Table:
        """``search`` with query sequences, embedded through the run's chain by a QueryActor (set up once)."""
        names, seqs = sequence_queries(sequences)
        if not seqs:
            raise SearchError("no query sequences")
        if self._query_actor is None:
            self._query_actor = QueryActor.options(num_cpus=self.num_cpus).remote(
                self.run, self.table, self._models, self._device, storage_options())
        vectors = ray.get(self._query_actor.embed.remote(seqs, names, self.query_width(**options)))
        labels, q = stack_queries(names, vectors, self.table)
        return self.search(q, labels=labels, **options)

    def search(self, queries: np.ndarray | None = None, *, ids=None, k: int = 10, exclude_self: bool = False,
               labels: Sequence[str] | None = None, **options: Any) -> pa.Table:
        """As ``Searcher.search`` (same options and result table), merged over the shards. ``labels``: names for
        the rows of ``queries``."""
        if (queries is None) == (ids is None):
            raise SearchError("give exactly one of queries= (vectors) or ids= (stored keys)")
        if options.get("aggregate") is not None:
            raise SearchError("aggregate= is not supported by sharded search: a protein's residues may span shards")
        self_keys = None
        if ids is not None:
            labels, q, _ = self._lookup.lookup(ids)
            self_keys = [tuple(lbl.rsplit(":", 1)) if self.table == "residues" else (lbl,) for lbl in labels]
        else:
            q = np.asarray(queries, dtype=np.float32)
            q = q[None, :] if q.ndim == 1 else q
            if labels is not None and len(labels) != len(q):
                raise SearchError(f"{len(labels)} labels for {len(q)} queries")
        fetch = k + 1 if exclude_self and self_keys is not None else k
        parts = ray.get([a.search.remote(q, {**options, "k": fetch}) for a in self.actors])
        return merge_topk(parts, k, len(q), self.keys, labels, self_keys if exclude_self else None)

    def close(self) -> None:
        for a in [*self.actors, *([self._query_actor] if self._query_actor is not None else [])]:
            ray.kill(a)
        self.actors, self._query_actor = [], None


def merge_topk(parts: list[pa.Table], k: int, nq: int, keys: Sequence[str], labels=None, self_keys=None) -> pa.Table:
    """The k best rows per query over the shards' result tables (each sorted per query), ranks renumbered."""
    merged = pa.concat_tables(parts)
    query = merged.column("query").to_numpy()
    score = merged.column("score").to_numpy()
    keep = np.ones(len(query), bool)
    if self_keys is not None:
        cols = [merged.column(c).to_pylist() for c in keys]
        kv = list(zip(*cols))
        keep = np.array([tuple(str(x) for x in kv[i]) != tuple(self_keys[query[i]]) for i in range(len(query))],
                        dtype=bool) if len(query) else keep
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((score[idx], query[idx]))]
    q_sorted = query[order]
    rank = np.arange(len(order)) - np.searchsorted(q_sorted, q_sorted, side="left") + 1
    take = order[rank <= k]
    out = merged.take(pa.array(take, pa.int64())).drop_columns(["rank"])
    out = out.append_column("rank", pa.array(rank[rank <= k].astype(np.int32), pa.int32()))
    if labels is not None:
        out = out.set_column(0, "query", pa.array(labels, pa.string()).take(out.column("query").cast(pa.int64())))
    return out.replace_schema_metadata({NUM_QUERIES_KEY: str(nq)})
