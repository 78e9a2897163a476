"""The query service behind ``rdscale serve``: JSON-shaped requests in, JSON-shaped answers out, over long-lived
Searchers (one per table, loaded once). Plain Python, no Ray and no HTTP: rdscale.cluster.serve puts it behind
Ray Serve and FastAPI; tests and the benchmark call it in-process.

A request is a dict with exactly one of ``ids`` (protein ids; for residues ``"ID:POS"`` or a bare ``"ID"``),
``sequences`` ({name: sequence}, embedded through the run's chain) or ``vectors`` (a list of equal-length lists
of numbers), plus any of the ``search`` options: table, k, mode, width, metric, filter, shortlist, rerank_width,
nprobes, refine_factor, ef, exclude_self, backend, aggregate, residue_hits, residue_mode, protein_shortlist, recall (the recall@k to meet: the cheapest calibrated point of the index), and ``release`` (a release tag of
`rdscale update`: search that earlier version, exact mode). The answer lists the hits as rows, exactly the rows
``rdscale search`` prints and writes: ``{"queries": n, "hits": [{"query", "id", ["pos"], "score", "rank",
["hits"]}, ...]}``. Bad requests raise ``SearchError`` (``KeyNotFoundError`` for unknown keys,
``RequestTooLarge`` past ``max_queries``, ``SearchCancelled`` when the caller's ``cancelled()`` turned true).

Beside search, what a person's search page needs, each a plain JSON answer: ``card()`` (the run's models, levels,
row counts and releases), ``records(ids)`` (description and length of proteins, for a hit table) and
``explain(request)`` (one query's distance to given proteins at every chain level, and a sequence query's
per-residue similarity to a protein).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rdscale.io.location import Location
from rdscale.io.runs import Run
from rdscale.search.exact import unit_rows
from rdscale.search.request import OPTIONS, SearchRequest
from rdscale.search.searcher import Searcher, num_queries
from rdscale.search.sequences import clean_query, sequence_queries, stack_queries
from rdscale.search.tables import TABLES, KeyNotFoundError, SearchError, open_table  # noqa: F401

QUERY_KINDS = ("ids", "sequences", "vectors")
EMBED_CHUNK = 16  # sequences embedded per step: a cancelled or timed-out request stops within one step
MAX_BATCH = 16  # default sequences of concurrent requests embedded in one forward (rdscale serve --max-batch)
BATCH_WAIT_MS = 5.0  # default time the first of them waits for others (--batch-wait-ms)
_CACHE_ENTRIES = 256  # query embeddings kept (a page asks /search, then /explain, for the same sequence)
_CACHE_MAX_FLOATS = 1 << 20  # a longer per-residue query embedding is not kept
EXPLAIN_MAX_TARGETS = 100
RECORD_FIELDS = ("id", "description", "length")


class RequestTooLarge(SearchError):
    """More queries in one request than the service takes (the server answers 413)."""


class SearchCancelled(SearchError):
    """The caller gave up on the request (the client left, or the server's time limit passed)."""


def _tables_of(run: str | Path) -> list[str]:
    """The tables the run holds, on a local disk or an object store (a Path test would find none on s3://)."""
    return [t for t in TABLES if Run(run).has_table(t)]


def run_name(run: str | Path) -> str:
    """The run's last path component (``s3://bucket/runs/x`` -> ``x``), never its bucket or credentials."""
    return Location.parse(run).name


def parse_key(text: str, table: str):
    """``ID:POS`` -> (ID, POS) for residues; anything else is the key itself."""
    if table == "residues":
        head, sep, tail = text.rpartition(":")
        if sep and head and tail.isdigit():
            return head, int(tail)
    return text


class SearchService:
    """Searchers over the tables of one run, kept for the life of the service (a server replica)."""

    def __init__(self, run: str | Path, tables: list[str] | None = None, preload: bool = True,
                 models: list[str] | None = None, device: str | None = None, max_queries: int | None = None,
                 max_batch: int = MAX_BATCH, batch_wait_ms: float = BATCH_WAIT_MS):
        self.run = str(run)
        # Concurrent requests' sequences (each request's calls come from its own thread) share a forward.
        self.batcher = EmbedBatcher(max_batch, batch_wait_ms / 1000.0)
        wanted = tables or _tables_of(run)
        if not wanted:
            open_table(run, "proteins")  # raises the usual "no Lance dataset" error
        self.searchers = {t: Searcher(run, t, models=models, device=device) for t in wanted}
        if "residues" in self.searchers and "proteins" in self.searchers:  # two-stage search's stage 1: held once
            self.searchers["residues"].use_proteins(self.searchers["proteins"])
        self.max_queries = max_queries
        self._models, self._device = models, device
        self._lock = threading.Lock()
        self._released: dict[tuple[str, str], Searcher] = {}  # (table, release tag) -> searcher of that version
        self._embedded: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # (table, sequence) -> vector(s)
        if preload:  # pay the loading once, before the first request, not inside it
            for s in self.searchers.values():
                s.load()
                try:  # the query stage's setup (the run's chain and fit; its models load as widths need them)
                    s.embedder()
                except SearchError:
                    pass  # a table without a chain serves vector and id queries; a sequence query says why not

    def info(self) -> dict[str, Any]:
        for s in self.searchers.values():
            s.recheck_indexes()
        return {
            "run": run_name(self.run),
            "tables": {
                t: {
                    "rows": s.num_rows,
                    "width": s.full_width,
                    "levels": s.levels,
                    "indexes": [{"width": i.width, "metric": i.metric, "backend": i.backend,
                                 "index_type": i.index_type, "recall": recall_info(i)} for i in s.indexes()],
                }
                for t, s in self.searchers.items()
            },
        }

    def search(self, request: dict[str, Any], cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """``cancelled``: polled between steps of a long request (sequence embedding); when it turns true the
        request stops with ``SearchCancelled`` instead of computing for a client that has gone."""
        if not isinstance(request, dict):
            raise SearchError("the request must be a JSON object")
        unknown = set(request) - {*OPTIONS, *QUERY_KINDS, "table", "release"}
        if unknown:
            raise SearchError(f"unknown request field(s) {sorted(unknown)}; expected some of "
                              f"{['table', *QUERY_KINDS, *OPTIONS, 'release']}")
        table = request.get("table") or "proteins"
        searcher = self._searcher(table, request.get("release"))
        given = [kind for kind in QUERY_KINDS if request.get(kind) is not None]
        if len(given) != 1:
            raise SearchError(f"give exactly one of {list(QUERY_KINDS)}, got {given or 'none'}")
        options = SearchRequest.from_given(request)  # the same one-line errors as Searcher.search and the CLI
        kind = given[0]
        value = request[kind]
        self._check_size(kind, value)
        if kind == "ids":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise SearchError("ids must be a non-empty list of strings")
            result = searcher.search(ids=[parse_key(v, table) for v in value], request=options)
        elif kind == "sequences":
            labels, q = self.embed(table, value, cancelled, width=searcher.query_width(options))
            result = searcher.search(q, labels=labels, request=options)
        else:
            result = searcher.search(vectors_of(value), request=options)
        rows = result.to_pylist()
        for row in rows:  # float32 -> the nearest float64 repr a client reads back exactly
            row["score"] = float(np.float32(row["score"]))
        return {"queries": num_queries(result), "hits": rows}

    def _searcher(self, table: str, release: str | None = None) -> Searcher:
        if table not in self.searchers:
            raise SearchError(f"unknown table {table!r}; this server holds {sorted(self.searchers)}")
        if release is None:
            return self.searchers[table]
        if not isinstance(release, str) or not release.strip():
            raise SearchError(f"release must be a release tag (a name `rdscale info` lists), got {release!r}")
        with self._lock:
            key = (table, release)
            if key not in self._released:  # opened once per tag; a tag names one fixed version
                self._released[key] = Searcher(self.run, table, models=self._models, device=self._device,
                                               version=release)
            return self._released[key]

    def _check_size(self, kind: str, value: Any) -> None:
        if self.max_queries is None or not isinstance(value, (list, dict)):
            return
        n = len(value) if kind != "vectors" or not value or isinstance(value[0], list) else 1
        if n > self.max_queries:
            raise RequestTooLarge(f"{n} {kind} in one request; this server takes at most {self.max_queries} "
                                  "(rdscale serve --max-queries): send them in several requests")

    def embed(self, table: str, sequences: Any, cancelled: Callable[[], bool] | None = None,
              width: int | None = None) -> tuple[list[str], np.ndarray]:
        """(labels, (q, w) vectors) of {name: sequence} through the run's chain, as ``Searcher.search_sequences``
        embeds them, EMBED_CHUNK sequences at a time (``cancelled`` is polled between chunks); recent query
        embeddings are kept, so asking again for the same sequence costs nothing. ``width``: the numbers the search
        reads; the chain runs only to the first level that wide (None: the whole chain). A kept embedding at least
        that wide serves as well, cut to its prefix (the levels nest)."""
        if not isinstance(sequences, dict) or not sequences or not all(isinstance(v, str)
                                                                     for v in sequences.values()):
            raise SearchError("sequences must be a non-empty object {name: sequence}")
        names, seqs = sequence_queries(sequences)
        searcher = self._searcher(table)
        need = searcher.full_width if width is None else width
        vectors: list[np.ndarray | None] = [self._cached(table, q, need) for q in seqs]
        first: dict[str, int] = {}  # a sequence asked twice in one request is embedded once
        for i, v in enumerate(vectors):
            if v is None:
                first.setdefault(clean_query(seqs[i]), i)
        todo = list(first.values())
        for start in range(0, len(todo), EMBED_CHUNK):
            if cancelled is not None and cancelled():
                raise SearchCancelled(f"the request was cancelled after {start} of {len(todo)} sequences")
            chunk = todo[start : start + EMBED_CHUNK]
            embedder = searcher.embedder()
            got = self.batcher.embed((table, embedder.models_for(width)),
                                     lambda s, n: embedder.embed(s, n, width=width),
                                     [seqs[i] for i in chunk], [names[i] for i in chunk])
            for i, v in zip(chunk, got):  # proteins: (q, k_m) rows; residues: one (L, d) array per sequence
                vectors[i] = np.asarray(v)
                self._keep(table, seqs[i], vectors[i])
        vectors = [v if v is not None else vectors[first[clean_query(q)]] for v, q in zip(vectors, seqs)]
        common = min(v.shape[-1] for v in vectors)  # kept ones may be wider than this request's level
        vectors = [v[..., :common] for v in vectors]
        if table == "proteins":
            return list(names), np.stack(vectors)  # (q, k_m)
        return stack_queries(names, vectors, table)

    def _cached(self, table: str, sequence: str, width: int) -> np.ndarray | None:
        with self._lock:
            key = (table, clean_query(sequence))
            if key in self._embedded and self._embedded[key].shape[-1] >= width:
                self._embedded.move_to_end(key)
                return self._embedded[key]
        return None

    def _keep(self, table: str, sequence: str, vector: np.ndarray) -> None:
        if vector.size > _CACHE_MAX_FLOATS:
            return
        with self._lock:
            key = (table, clean_query(sequence))
            if key in self._embedded and self._embedded[key].shape[-1] >= vector.shape[-1]:
                return  # a wider one is kept already
            self._embedded[key] = vector
            while len(self._embedded) > _CACHE_ENTRIES:
                self._embedded.popitem(last=False)

    def card(self) -> dict[str, Any]:
        """The run at a glance: the chain's models, its levels, rows per table (proteins, residues, rejects) and
        the releases (`rdscale update` tags, oldest first; search one with ``release``)."""
        run = Run(self.run)
        meta = run.metadata()
        models = [{"name": m.get("name"), "width": m.get("width")}
                  for m in (meta.get("fit_manifest") or {}).get("models", [])]
        counts = {t: s.num_rows for t, s in self.searchers.items()}
        if run.has_table("rejects"):
            counts["rejects"] = run.dataset("rejects").count_rows()
        proteins = run.dataset("proteins")
        tags = sorted(proteins.tags.list().items(), key=lambda kv: kv[1]["version"])
        releases = [{"name": name, "version": int(tag["version"]), "current": int(tag["version"]) == proteins.version}
                    for name, tag in tags]
        return {"run": run_name(self.run), "models": models, "levels": [int(w) for w in meta.get("levels", [])],
                "counts": counts, "releases": releases}

    def records(self, ids: Any, release: str | None = None) -> dict[str, Any]:
        """{"records": [{"id", "description", "length"}, ...]} of stored proteins (of ``release``, default the
        latest), in the order asked; ids the table does not hold are left out (a hit table asks for the ids a
        search just returned)."""
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise SearchError("ids must be a list of strings")
        self._check_size("ids", ids)
        searcher = self._searcher("proteins", release)
        wanted = list(dict.fromkeys(ids))
        at = searcher.positions_of_keys(wanted)  # (n,) scan positions, -1: not stored
        found = [(i, int(p)) for i, p in zip(wanted, at) if p >= 0]
        if not found:
            return {"records": []}
        rows = searcher.ds.take([p for _, p in found], columns=list(RECORD_FIELDS)).to_pylist()
        return {"records": rows}

    def explain(self, request: dict[str, Any], cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """One query against given proteins, the picture behind a hit list:

        - ``levels``: the cosine distance from the query to each target at every chain level (the prefix widths),
          so a client sees how the ranking settles as the prefix widens;
        - for a sequence query (and a run with a residues table), ``residues``: for each query residue, its best
          cosine similarity to any residue of ``residues_of`` (default the first target) at the residues' width.

        Request: ``{"ids": [one id]}`` / ``{"sequences": {name: seq}}`` (one) / ``{"vectors": [...]}`` (one), and
        ``targets`` (protein ids, at most EXPLAIN_MAX_TARGETS), optionally ``residues_of`` and ``release`` (compare
        with the proteins of that release)."""
        if not isinstance(request, dict):
            raise SearchError("the request must be a JSON object")
        unknown = set(request) - {*QUERY_KINDS, "targets", "residues_of", "release"}
        if unknown:
            raise SearchError(f"unknown request field(s) {sorted(unknown)}; expected some of "
                              f"{[*QUERY_KINDS, 'targets', 'residues_of', 'release']}")
        given = [kind for kind in QUERY_KINDS if request.get(kind) is not None]
        if len(given) != 1:
            raise SearchError(f"give exactly one of {list(QUERY_KINDS)}, got {given or 'none'}")
        targets = request.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise SearchError("targets must be a non-empty list of protein ids")
        if len(targets) > EXPLAIN_MAX_TARGETS:
            raise RequestTooLarge(f"{len(targets)} targets; explain takes at most {EXPLAIN_MAX_TARGETS}")
        release = request.get("release")
        proteins = self._searcher("proteins", release)
        kind, value = given[0], request[given[0]]
        if kind == "ids":
            if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], str):
                raise SearchError("explain takes one query: ids must hold one protein id")
            _, q, _ = proteins.lookup([value[0]])
        elif kind == "sequences":
            if not isinstance(value, dict) or len(value) != 1:
                raise SearchError("explain takes one query: sequences must hold one {name: sequence}")
            _, q = self.embed("proteins", value, cancelled)
        else:
            q = vectors_of(value)
            if len(q) != 1:
                raise SearchError("explain takes one query: give one vector")
        q = q[0]  # (w,) w >= the widest level it is compared at
        _, t, _ = proteins.lookup(list(targets))  # (t, full) float32; unknown ids raise KeyNotFoundError
        levels = [w for w in proteins.levels if w <= len(q)]
        if not levels:
            raise SearchError(f"the query vector is {len(q)} wide, narrower than the narrowest level "
                              f"{proteins.levels[0]}")
        per_level = [1.0 - unit_rows(t[:, :w]) @ unit_rows(q[None, :w])[0] for w in levels]  # [level] (t,)
        answer: dict[str, Any] = {
            "metric": "cosine", "levels": levels,
            "targets": [{"id": tid, "scores": [float(np.float32(max(d[i], 0.0))) for d in per_level]}
                        for i, tid in enumerate(targets)],
        }
        if kind == "sequences" and "residues" in self.searchers:
            answer["residues"] = self._residue_similarity(value, request.get("residues_of") or targets[0],
                                                          release, cancelled)
        return answer

    def _residue_similarity(self, sequence: dict[str, str], target: str, release, cancelled) -> dict[str, Any]:
        residues = self._searcher("residues", release)
        if not isinstance(target, str):
            raise SearchError("residues_of must be a protein id")
        _, q = self.embed("residues", sequence, cancelled)  # (L, d): one row per query residue
        _, h, _ = residues.lookup([target])  # (L_h, d) the target's residues, in position order
        sim = unit_rows(q) @ unit_rows(h).T  # (L, L_h) cosine similarities
        best = sim.max(axis=1)  # (L,)
        query = clean_query(next(iter(sequence.values())))
        return {"of": target, "width": int(q.shape[1]), "sequence": query,
                "similarity": [round(float(v), 4) for v in best], "best_match": [int(j) for j in sim.argmax(axis=1)]}


class _Batch:
    def __init__(self):
        self.sequences: list[str] = []
        self.names: list[str] = []
        self.members = 0
        self.closed = threading.Event()  # full, or its wait is over: no one joins any more
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class EmbedBatcher:
    """Sequence embedding for concurrent callers (a server's requests, each on its own thread), grouped: the first
    caller of a key waits up to ``max_wait_s`` for others (or until ``max_batch`` sequences have come), then runs
    one forward for them all and hands each caller its rows. A key is what makes a forward shareable: the table
    and the number of chain models the search width needs (rdscale.search.sequences.QueryEmbedder.models_for).

    Each caller gets what embedding its own sequences alone would give (the encoder embeds each sequence on its
    own; only the padding of a batch is shared). A batch that fails (one caller's sequence is refused, say) is
    redone caller by caller, so each gets its own answer or its own error. ``max_batch`` 1: no grouping."""

    def __init__(self, max_batch: int = MAX_BATCH, max_wait_s: float = BATCH_WAIT_MS / 1000.0):
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._lock = threading.Lock()
        self._open: dict[Any, _Batch] = {}
        self.forwards = 0  # embedding calls made (for tests and benchmarks: fewer than callers when grouped)

    def embed(self, key: Any, embed: Callable[[list[str], list[str]], Any], sequences: list[str],
              names: list[str]) -> Any:
        """``embed(sequences, names)`` (rows, or one array per sequence) for these sequences, in a shared call."""
        if self.max_batch == 1 or len(sequences) >= self.max_batch:
            return self._call(embed, sequences, names)
        with self._lock:
            batch = self._open.get(key)
            lead = batch is None or len(batch.sequences) + len(sequences) > self.max_batch
            if lead:
                if batch is not None:
                    batch.closed.set()  # full for us: its leader starts now
                batch = self._open[key] = _Batch()
            start = len(batch.sequences)
            batch.sequences += sequences
            batch.names += names
            batch.members += 1
            if len(batch.sequences) >= self.max_batch:
                batch.closed.set()
        if lead:
            batch.closed.wait(self.max_wait_s)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]
                batch.closed.set()
            try:
                batch.result = self._call(embed, batch.sequences, batch.names)
            except Exception as err:  # noqa: BLE001 - handed to every member below
                batch.error = err
            batch.done.set()
        else:
            batch.done.wait()
        if batch.error is not None:
            if batch.members == 1:
                raise batch.error
            return self._call(embed, sequences, names)  # whose sequence failed it: each finds out alone
        return batch.result[start : start + len(sequences)]

    def _call(self, embed, sequences, names):
        with self._lock:
            self.forwards += 1
        return embed(list(sequences), list(names))


def recall_info(info) -> dict[str, Any] | None:
    """An index's calibration for clients: k, target, the default point per mode and the measured curves (each
    point: params, recall, recall_low (one-sided 99 % bound), cost); None for an uncalibrated index."""
    cal = info.calibration or {}
    if not cal:
        return None
    return {"k": cal.get("k"), "target": cal.get("target"), "queries": cal.get("queries"),
            "default": cal.get("default", {}), "reached": cal.get("reached", {}),
            "curves": {mode: cal.get(mode, []) for mode in ("ann", "funnel")}}


def vectors_of(value: Any) -> np.ndarray:
    """(q, w) float32 from a JSON list of equal-length lists of finite numbers (or one list: one query)."""
    if not isinstance(value, list) or not value:
        raise SearchError("vectors must be a non-empty list of lists of numbers")
    rows = value if isinstance(value[0], list) else [value]
    widths = {len(r) if isinstance(r, list) else -1 for r in rows}
    if len(widths) != 1 or -1 in widths or 0 in widths:
        raise SearchError(f"vectors must be lists of numbers of one length, got lengths {sorted(widths)}")
    try:
        q = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise SearchError("vectors must hold numbers only") from None
    if not np.isfinite(q).all() or np.abs(q).max() > math.ldexp(1.0, 127):
        raise SearchError("vectors hold NaN, inf or numbers beyond float32")
    return q.astype(np.float32)
