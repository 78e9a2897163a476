"""Compatibility module: rdscale.search used to live here in one file. It is now split by job (see the package
docstring); this module re-exports the names callers imported from it."""

from rdscale.search.exact import pairwise_distances  # noqa: F401
from rdscale.search.exact import unit_rows as _unit_rows  # noqa: F401
from rdscale.search.faiss_index import DEFAULT_FAISS_INDEX_TYPE, FAISS_INDEX_TYPES  # noqa: F401
from rdscale.search.lance_index import default_index_params, materialize_prefix  # noqa: F401
from rdscale.search.results import format_results, recall_at_k, write_results  # noqa: F401
from rdscale.search.searcher import Searcher, build_index, list_indexes, search  # noqa: F401
from rdscale.search.sequences import QueryEmbedder, embed_sequences, search_sequences  # noqa: F401
from rdscale.search.tables import (  # noqa: F401
    BACKENDS,
    DEFAULT_INDEX_TYPE,
    EMBEDDING,
    INDEX_TYPES,
    INDEXES_KEY,
    LEVELS_KEY,
    METRICS,
    MODES,
    TABLES,
    IndexInfo,
    MissingIndexError,
    SearchError,
    _check_metric,
    _column_is_complete,
    _embedding_block,
    chain_levels,
    check_width,
    open_table,
    prefix_column,
    run_dir_of,
    stored_width,
)
