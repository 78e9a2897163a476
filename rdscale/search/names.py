"""The search stack's vocabulary (tables, metrics, modes, backends, index types), importable without numpy, Lance or
FAISS: the CLI builds its argument parsers from these before any search runs."""

TABLES: dict[str, tuple[str, ...]] = {"proteins": ("id",), "residues": ("id", "pos")}  # table -> key columns
METRICS = ("cosine", "l2")
MODES = ("exact", "ann", "funnel")
# residue search: "two-stage" (proteins shortlisted by their per-protein embedding, then their residues searched
# exactly; the default for exact residue search) or "global" (one search over the whole residues table)
RESIDUE_MODES = ("two-stage", "global")
BACKENDS = ("lance", "faiss")
INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_HNSW_FLAT", "IVF_FLAT", "IVF_SQ", "IVF_RQ")
DEFAULT_INDEX_TYPE = "IVF_HNSW_SQ"
FAISS_INDEX_TYPES = ("HNSW", "IVF_FLAT", "IVF_PQ")
DEFAULT_FAISS_INDEX_TYPE = "HNSW"
