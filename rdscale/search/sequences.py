"""Query sequences: embed them the way the run embedded its database, then search with them."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rdscale.config import load_config
from rdscale.fit.artifact import ArtifactError, load_fit, load_query_chain
from rdscale.fit.extension import ExtendError, apply_chain
from rdscale.io.fasta import residue_letters
from rdscale.io.location import storage_options
from rdscale.io.runs import Run
from rdscale.model.encoder import ChainEncoder
from rdscale.model.loading import DeviceError
from rdscale.run.stages import Stage
from rdscale.search.tables import (
    EMBEDDING,
    SearchError,
    open_table,
    stored_width,
)
from rdscale.search.tables import (
    run_metadata as _run_metadata,
)


def _fit_dir_of(run: Run, manifest: dict, config: dict) -> Path | None:
    """Where the run's fit artifact is (rdscale.io.runs.Run.fit_location: the recorded one, relative to the run,
    else <run>/fit, else the configured fit.artifact); None for a single-model (extract) run, which has no fit."""
    found = Run(run).fit_location(manifest, config)
    if found is not None:
        return Path(found.path) if found.is_local else found
    if len(manifest.get("models", [])) == 1:
        return None
    raise SearchError(
        f"no fit artifact for {run}: neither {Run(run).fit} nor the run's fit.artifact holds a "
        "manifest.json; sequence queries are embedded through the run's own fitted chain"
    )


_LOADING = threading.Lock()  # QueryEmbedder._chain: model loading, one at a time per process


class QueryEmbedder(Stage):
    """Query pass: embeds query sequences exactly as the run embedded its database, through the run's chain
    (models, fit artifact, embedding settings). A long-lived ``Searcher``, the query server's replicas and the
    sharded search hold one; ``embed_sequences`` is the one-shot form.

    Built from small arguments (the run's location, the table, model names, a device, the storage options), so a
    Ray actor or a Serve replica can carry them inline; ``setup()``, once where it runs, applies the storage options
    and reads the run's chain: its fit manifest and config, the fit (and an extended run's steps). The models
    themselves load on demand, level by level: a query the first level answers loads only the first model.

    ``models`` overrides the checkpoint paths / names recorded in the fit manifest; ``device``: where to run the
    models (default: a GPU if there is one); ``storage``: object-store options (default: this process's).
    """

    def __init__(self, dataset_path: str | Path | Run, table: str = "proteins", models: Sequence[str] | None = None,
                 device: str | None = None, storage: dict | None = None):
        # the run's embedding settings are read in setup(); until then the config carries the storage options only
        cfg = load_config(None)
        cfg.storage.options = dict(storage_options() if storage is None else storage)
        super().__init__(cfg)
        self.dataset_path = str(dataset_path)
        self.table = table
        self.models = list(models) if models else None
        self.device = device
        self.ready = False  # set by setup(); a caller in this process that skipped it gets it on first use

    def load(self) -> None:
        """The run's chain metadata and fit, read once (no model is loaded here: ``_chain`` loads them)."""
        ds = open_table(self.dataset_path, self.table)
        run = Run.of(self.dataset_path)
        manifest = _run_metadata(ds, "rdscale.fit_manifest")
        config = _run_metadata(ds, "rdscale.config")
        if not manifest.get("models") or not config:
            raise SearchError(f"{ds.uri} has no rdscale.fit_manifest / rdscale.config schema metadata: it was not "
                              "written by `rdscale run` / `embed`, so there is no chain to embed queries with")
        models = self.models
        model_names = models if models else [m.get("source") or m.get("name") for m in manifest["models"]]
        if len(model_names) != len(manifest["models"]):
            raise SearchError(f"{len(model_names)} models given for a chain of {len(manifest['models'])}")
        embedding = {**config.get("embedding", {}), "device": self.device or "auto", "dtype": "auto"}
        storage = self.cfg.storage.options
        self.cfg = load_config(None, [f"embedding={json.dumps(embedding)}"])
        self.cfg.storage.options = storage
        self.width = stored_width(ds)
        value_type = ds.schema.field(EMBEDDING).type.value_type
        self.store_dtype = np.float16 if value_type == pa.float16() else np.float32

        self.model_names = model_names
        self.manifest_models = manifest["models"]
        self.fit_dir = _fit_dir_of(run, manifest, config)
        self.extended = bool(manifest.get("extensions"))
        self.run = run
        self.encoder = None  # a ChainEncoder over the first `models_loaded` models, grown on demand
        self.models_loaded = 0
        self.fit = None
        self.fits = None
        self._level_widths = [int(m.get("width", 0)) for m in self.manifest_models]  # output width per level
        if self.fit_dir is not None:
            try:
                self.fit, base = load_fit(self.fit_dir)
            except ArtifactError as err:
                raise SearchError(f"the models do not match the run's fit at {self.fit_dir}: {err}") from err
            self._level_widths = [int(w) for w in self.fit.widths]
        if self.extended:
            try:
                self.fits = load_query_chain(run)
            except ExtendError as err:
                raise SearchError(str(err)) from err
            self._level_widths = [*[int(w) for w in self.fits[0].widths],
                                  *[int(f.widths[-1]) for f in self.fits[1:]]]
        self.ready = True

    def __call__(self, sequences: Sequence[str], names: Sequence[str] | None = None,
                 width: int | None = None) -> np.ndarray | list[np.ndarray]:
        return self.embed(sequences, names, width=width)

    def models_for(self, width: int | None) -> int:
        """How many of the chain's models a query vector ``width`` wide needs (None: all): the first level at
        least that wide (the level-j embedding is the first k_j numbers of the full one)."""
        if not self.ready:
            self.setup()
        n = len(self.model_names)
        if width is None:
            return n
        for j, w in enumerate(self._level_widths[:n], start=1):
            if w >= width:
                return j
        return n

    def _chain(self, upto: int):
        """The ChainEncoder over the first ``upto`` models, loading them now if they are not (the run's fit is
        checked against every model loaded; the ones not loaded yet are checked when they are). One load at a
        time in a process: a server's concurrent requests would otherwise load the same models twice, and the
        checkpoint loader's allow-list of pickled globals is process-wide state that one thread's load leaves
        while another's is reading ("refusing to load ...")."""
        if self.encoder is not None and self.models_loaded >= upto:
            return self.encoder
        with _LOADING:
            return self._load_chain(upto)

    def _load_chain(self, upto: int):
        if self.encoder is not None and self.models_loaded >= upto:  # loaded while this thread waited
            return self.encoder
        try:
            encoder = ChainEncoder(self.model_names[:upto], self.cfg)
        except DeviceError as err:  # the models are fine; the device is not (no "pass --models" hint)
            raise SearchError(f"cannot embed the queries: {err}") from err
        except (OSError, ValueError) as err:
            raise SearchError(
                f"cannot load the run's models {self.model_names[:upto]}: {err}. Pass models= (--models) with their "
                "current paths"
            ) from err
        if self.fit is not None:
            n_base = len(self.fit.widths)
            loaded = encoder.model_info()[:n_base]
            # models not loaded yet: name and width from the manifest (their checkpoints are checked on loading)
            rest = [{k: m[k] for k in ("name", "width") if k in m} for m in self.manifest_models[len(loaded):n_base]]
            try:
                load_fit(self.fit_dir, expect_models=loaded + rest)
            except ArtifactError as err:
                raise SearchError(f"the models do not match the run's fit at {self.fit_dir}: {err}") from err
        self.encoder, self.models_loaded = encoder, upto
        return encoder

    def embed(self, sequences: Sequence[str], names: Sequence[str] | None = None,
              width: int | None = None) -> np.ndarray | list[np.ndarray]:
        """As ``embed_sequences``: (q, k_m) for proteins, one (L_i, d) array per sequence for residues.
        ``width``: the query width the search needs; the chain then runs only up to the first level at least
        that wide (and the vectors are k_j wide): a search at the first level loads and runs the first model."""
        if not self.ready:
            self.setup()
        names = [f"seq{i}" for i in range(len(sequences))] if names is None else list(names)
        if len(sequences) == 0:
            raise SearchError("no query sequences")
        if len(names) != len(sequences):
            raise SearchError(f"{len(names)} names for {len(sequences)} sequences")
        # as the FASTA reader treats database records: either case, no whitespace, a trailing stop '*' dropped
        sequences = [clean_query(q) for q in sequences]
        empty = [n for n, q in zip(names, sequences) if q == ""]
        if empty:
            raise SearchError(f"query {empty[0]} is an empty sequence")
        window, policy = self.cfg.embedding.window, self.cfg.embedding.long_policy
        long = [(n, len(q)) for n, q in zip(names, sequences) if len(q) > window]
        if long and policy == "reject":
            shown = ", ".join(f"{n} ({length} residues)" for n, length in long[:5])
            raise SearchError(
                f"query {shown} is longer than the {window}-residue model window, and this run rejected such "
                "sequences (embedding.long_policy=reject), so the database holds nothing comparable"
            )
        upto = self.models_for(width)
        encoder = self._chain(upto)
        try:
            blocks = [b[:upto] for b in encoder.blocks(list(sequences))]  # [seq][model <= upto] (L, k_i) float32
        except ValueError as err:  # the message names the sequence by position: say which query that is
            where = str(err).split(":", 1)
            head = where[0].split()
            if len(head) == 2 and head[0] == "sequence" and head[1].isdigit():
                raise SearchError(f"query {names[int(head[1])]}: {where[1].strip()}") from err
            raise SearchError(f"cannot embed the queries: {err}") from err
        with torch.no_grad():
            if self.fits is not None and upto > len(self.fits[0].widths):
                rd = [apply_chain(self.fits[: 1 + upto - len(self.fits[0].widths)], b).float().cpu()
                      for b in blocks]  # [seq] (L, k_upto), extended chain
            else:
                fit = self.fits[0] if self.fits is not None else self.fit
                rd = [(fit.apply(b) if fit is not None else b[0]).float().cpu() for b in blocks]  # [seq] (L, k_j)
        if self.table == "proteins":
            return torch.stack([e.mean(dim=0) for e in rd]).numpy()  # (q, k_m), as proteins.embedding
        d = min(self.width, rd[0].shape[1])
        return [e[:, :d].numpy().astype(self.store_dtype).astype(np.float32) for e in rd]  # [seq] (L, d)


def clean_query(sequence):
    """A query sequence as the pipeline reads a FASTA record's (rdscale.io.fasta.residue_letters): upper-cased,
    whitespace removed, one trailing '*' stripped (anything not a string is left for the embedder to refuse)."""
    if not isinstance(sequence, str):
        return sequence
    return residue_letters(sequence.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")


def embed_sequences(
    dataset_path: str | Path,
    sequences: Sequence[str],
    *,
    table: str = "proteins",
    names: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    device: str | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Embed query sequences exactly as the run embedded its database.

    The chain's models (``models`` overrides the checkpoint paths / names recorded in the fit manifest), the fit
    artifact (``<run>/fit``), and the embedding settings (layer, window, overlap, long-sequence policy) all come
    from the run, so a sequence that is in the database gets the vector stored for it. Sequences longer than the
    model window are windowed and stitched as in the pipeline (or truncated / refused, per the run's
    ``embedding.long_policy``). ``device``: where to run the models (default: a GPU if there is one).

    Returns for ``table="proteins"`` a (q, k_m) float32 array, the mean over residues of the rd embedding (what
    ``proteins.embedding`` holds); for ``table="residues"`` one (L_i, d) float32 array per sequence, the rd
    embedding cut to the stored width d and rounded to the stored dtype (what ``residues.embedding`` holds).
    """
    if len(sequences) == 0:
        raise SearchError("no query sequences")
    stage = QueryEmbedder(dataset_path, table, models=models, device=device)
    stage.setup()
    return stage.embed(sequences, names)


def sequence_queries(sequences: Sequence[str] | dict[str, str]) -> tuple[list[str], list[str]]:
    """(names, sequences) of {name: sequence} or a list (named seq0, seq1, ...)."""
    if isinstance(sequences, dict):
        return list(sequences), list(sequences.values())
    seqs = list(sequences)
    return [f"seq{i}" for i in range(len(seqs))], seqs


def stack_queries(names: Sequence[str], vectors, table: str) -> tuple[list[str], np.ndarray]:
    """(labels, (q, w) vectors): per-residue search makes every residue of a query its own query ``name:pos``."""
    if table == "proteins":
        return list(names), np.asarray(vectors)
    labels = [f"{n}:{pos}" for n, v in zip(names, vectors) for pos in range(len(v))]
    return labels, np.concatenate(vectors, axis=0)  # (sum L, d)
