"""Nearest-neighbour search over a run's tables at any chain-level prefix width: exact, ANN and funnel.

The public face is `search(...)` (by id or vector) and `search_sequences(...)` (by sequence, embedded through the
run's own chain), both one-shot; `Searcher(run)` keeps the table, its indexes and the embedding matrix open for
many queries. Modules, by job:

- tables: opening a run's tables, widths (chain levels), prefix columns, errors, conventions;
- exact: distances and the blocked-GEMM exact top-k;
- lance_index / faiss_index: the two index backends (`rdscale index --backend {lance,faiss}`);
- searcher: `Searcher` (also residue hits -> protein hits, `aggregate="proteins"`), `search`, `build_index`,
  `list_indexes`;
- sequences: embedding query sequences through the run's chain;
- service: the JSON query service behind `rdscale serve` (rdscale.cluster.serve puts it on Ray Serve);
- results: recall, formatting, writing results.

Sharded search over Ray actors lives in rdscale.cluster.search (Ray code stays in rdscale.cluster).
"""

import importlib

# Public names -> the module that defines them. Imported on first use (PEP 562), so that `rdscale.search.names`
# and the CLI's parsers do not pull in numpy, Lance and FAISS.
_EXPORTS = {
    **dict.fromkeys(("format_results", "recall_at_k", "write_results"), "results"),
    **dict.fromkeys(("Searcher", "build_index", "list_indexes", "search", "search_sequences"), "searcher"),
    **dict.fromkeys(("QueryEmbedder", "embed_sequences"), "sequences"),
    **dict.fromkeys(("IndexInfo", "MissingIndexError", "SearchError", "chain_levels", "open_table"), "tables"),
    **dict.fromkeys(("BACKENDS", "DEFAULT_INDEX_TYPE", "INDEX_TYPES", "METRICS", "MODES", "RESIDUE_MODES", "TABLES"), "names"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rdscale.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rdscale.search' has no attribute {name!r}")
