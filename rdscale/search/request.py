"""What one search asks for besides its queries: the options of ``Searcher.search``, ``rdscale.search.search``,
``rdscale search`` and ``POST /search``, declared once here.

A ``SearchRequest`` checks what it can without a table (names, positive integers, a recall in (0, 1]) when it is
made, so a bad option gets the same one-line ``SearchError`` from Python, the CLI and the HTTP service; what needs
the table (a width among its chain levels, an index, the residue mode a table allows) the searcher checks.
"""

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from rdscale.search.calibrate import check_recall
from rdscale.search.names import MODES
from rdscale.search.tables import SearchError, _check_metric

AGGREGATES = ("proteins",)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class SearchRequest:
    k: int = field(default=10, metadata=_doc("neighbours per query"))
    mode: str = field(default="exact", metadata=_doc("exact, ann or funnel"))
    width: int | None = field(default=None, metadata=_doc("prefix width, a chain level"))
    metric: str = field(default="cosine", metadata=_doc("cosine or l2"))
    filter: str | None = field(default=None, metadata=_doc("Lance SQL predicate on the table's columns"))
    shortlist: int | None = field(default=None, metadata=_doc("funnel: candidates from the index, default "
                                                              "max(10 k, 100)"))
    rerank_width: int | None = field(default=None, metadata=_doc("funnel: width of the exact re-rank, default "
                                                                 "the stored width"))
    nprobes: int | None = field(default=None, metadata=_doc("IVF index: partitions probed"))
    refine_factor: int | None = field(default=None, metadata=_doc("Lance index: candidates re-ranked exactly, "
                                                                  "as a multiple of k"))
    ef: int | None = field(default=None, metadata=_doc("HNSW index: search breadth"))
    exclude_self: bool = field(default=False, metadata=_doc("ids queries: leave the queried row out"))
    backend: str | None = field(default=None, metadata=_doc("faiss or lance (ann / funnel)"))
    aggregate: str | None = field(default=None, metadata=_doc("proteins: residue hits aggregated to proteins"))
    residue_hits: int | None = field(default=None, metadata=_doc("aggregate: residue hits per query residue, "
                                                                 "default max(10 k, 100)"))
    recall: float | None = field(default=None, metadata=_doc(
        "ann / funnel: recall@k to reach, from the index's calibrated curve (default: the point calibrated at "
        "`rdscale index`)"))
    residue_mode: str | None = field(default=None, metadata=_doc("residues: two-stage (default for exact) or "
                                                                 "global"))
    protein_shortlist: int | None = field(default=None, metadata=_doc("two-stage: proteins shortlisted per query"))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SearchError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        set_ = object.__setattr__  # frozen: the checked values are normalised once, here
        set_(self, "metric", _check_metric(self.metric))
        k = self.k
        if isinstance(k, bool) or not _is_int(k) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        set_(self, "k", int(k))
        for name in ("shortlist", "nprobes", "ef", "refine_factor", "residue_hits", "protein_shortlist"):
            set_(self, name, _positive(name, getattr(self, name)))
        if self.aggregate is not None:
            if self.aggregate not in AGGREGATES:
                raise SearchError(f"unknown aggregate {self.aggregate!r}; expected 'proteins'")
        elif self.residue_hits is not None:
            raise SearchError("residue_hits only applies with aggregate='proteins'")
        if self.recall is not None:
            set_(self, "recall", check_recall(self.recall))
            given = [name for name in ("shortlist", "nprobes", "ef", "refine_factor") if getattr(self, name) is not None]
            if given and self.mode != "exact":
                raise SearchError(f"give recall or the search parameters ({', '.join(given)}), not both: recall "
                                  "picks them from the index's calibration")

    @classmethod
    def of(cls, request: "SearchRequest | None" = None, **options: Any) -> "SearchRequest":
        """``request``, or one made of keyword ``options`` (an unknown name is a SearchError, not a TypeError)."""
        if request is not None:
            if options:
                raise SearchError(f"give a SearchRequest or options ({', '.join(sorted(options))}), not both")
            return request
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise SearchError(f"unknown search option(s) {unknown}; expected some of {list(OPTIONS)}")
        return cls(**options)

    @classmethod
    def from_given(cls, values: dict[str, Any]) -> "SearchRequest":
        """From a mapping holding options among other things (a JSON request): the options that are not None."""
        return cls(**{name: values[name] for name in OPTIONS if values.get(name) is not None})


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer))


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not _is_int(value) or value < 1:
        raise SearchError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(SearchRequest))


def option_fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, description) per option: what a request schema (the HTTP model) is built from."""
    return [(f.name, f.type, f.default, f.metadata.get("doc", "")) for f in fields(SearchRequest)]
