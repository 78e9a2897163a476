"""Nearest-neighbour search over a run's tables at any chain-level prefix width: exact, ANN and funnel.

The public face is `search(...)` (by id or vector) and `search_sequences(...)` (by sequence, embedded through the
run's own chain).
"""

from rdscale.search.core import (  # noqa: F401
    MissingIndexError,
    SearchError,
    build_index,
    embed_sequences,
    format_results,
    list_indexes,
    recall_at_k,
    search,
    search_sequences,
    write_results,
)
