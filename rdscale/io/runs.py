"""One home for "a run": where it is, its tables, the keys of its schema metadata, its chain levels and where its
fit artifacts are.

A run is a location (local directory or object-store prefix) holding `proteins.lance`, `residues.lance`,
`rejects.lance`, the `shards.lance` ledger, the fit artifact `fit/` and, after `rdscale extend`, one
`fit_ext_<width>/` per added level. Runs are relocatable: everything a run records about its own files is relative
to the run (`fit`, `fit_ext_64`), so a run copied to another directory or bucket opens, searches and extends.
Fits that live outside the run are recorded as given by the user (a path or URI).

Every Lance dataset of rdscale is opened through `open_dataset`, which passes the location's storage options
(credentials from the environment or `storage.options`, bounded timeouts) and turns object-store failures into
one-line `LocationError`s naming the location.
"""

from __future__ import annotations

import json
from typing import Any

from rdscale.io.location import Location, LocationError

__all__ = [
    "DATA_TABLES",
    "EXTENSIONS_KEY",
    "FIT",
    "GZIP_INDEX_DIR",
    "LEDGER",
    "META_CONFIG",
    "META_LEVELS",
    "META_MANIFEST",
    "META_RUN_KEY",
    "META_VERSION",
    "PROTEINS",
    "REJECTS",
    "RESIDUES",
    "Run",
    "dataset_exists",
    "default_fit",
    "fit_ext_name",
    "open_dataset",
    "read_metadata",
    "recorded_config",
]

PROTEINS, RESIDUES, REJECTS, LEDGER = "proteins", "residues", "rejects", "shards"
DATA_TABLES = (PROTEINS, RESIDUES, REJECTS)

META_MANIFEST = b"rdscale.fit_manifest"
META_LEVELS = b"rdscale.levels"
META_CONFIG = b"rdscale.config"
META_VERSION = b"rdscale.version"
META_RUN_KEY = b"rdscale.run_key"
EXTENSIONS_KEY = "rdscale.extensions"

FIT = "fit"  # the fit artifact of `rdscale run` / `rdscale fit`, relative to the run
GZIP_INDEX_DIR = "gzip_index"  # seek-point indexes of plain-gzip inputs, relative to the run


def fit_ext_name(width: int) -> str:
    """The extension step that grew a run whose stored width was `width` (the level it extended from), relative
    to the run."""
    return f"fit_ext_{width}"


def default_fit(out: str | Location) -> Location:
    """`<out>/fit`: where `rdscale fit` / `run` write the fit and `embed`, `eval`, `search` look for it."""
    return Location.parse(out).join(FIT)


def dataset_exists(where: str | Location) -> bool:
    """Whether a Lance dataset is at `where` (it has a `_versions` directory)."""
    loc = Location.parse(where)
    return loc.join("_versions").is_dir()


def open_dataset(where: str | Location, version: int | str | None = None):
    """The Lance dataset at `where` (a `*.lance` location), opened with the location's storage options."""
    import lance

    loc = Location.parse(where)
    try:
        return lance.dataset(loc.uri, version=version, storage_options=loc.storage_options or None)
    except (ValueError, OSError) as err:
        if loc.is_local:
            raise
        raise loc.error(err, "open the Lance dataset") from None


def recorded_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The configuration as written into table metadata and fit manifests: without `storage` (its options may
    hold credentials and endpoints, which are never recorded)."""
    return {k: v for k, v in cfg_dict.items() if k != "storage"}


def read_metadata(where: str | Location, ds=None) -> dict[str, Any]:
    """The rdscale metadata of a run's table (proteins.lance etc.), decoded: levels, fit_manifest, config,
    version, extensions."""
    md = (ds if ds is not None else open_dataset(where)).schema.metadata or {}
    out: dict[str, Any] = {}
    for key in (META_LEVELS, META_MANIFEST, META_CONFIG):
        if key in md:
            out[key.decode().split(".", 1)[1]] = json.loads(md[key])
    if META_VERSION in md:
        out["version"] = md[META_VERSION].decode()
    if EXTENSIONS_KEY.encode() in md:
        out["extensions"] = json.loads(md[EXTENSIONS_KEY.encode()])
    return out


class Run:
    """A run at a location (a local directory or an object-store prefix)."""

    def __init__(self, location: str | Location):
        self.location = Location.parse(location)

    def __repr__(self) -> str:
        return f"Run({self.location.uri!r})"

    def __str__(self) -> str:
        return self.location.uri

    @property
    def uri(self) -> str:
        return self.location.uri

    # tables
    def table(self, name: str) -> Location:
        return self.location.join(f"{name}.lance")

    def table_uri(self, name: str) -> str:
        return self.table(name).uri

    def has_table(self, name: str) -> bool:
        return dataset_exists(self.table(name))

    def dataset(self, name: str, version: int | str | None = None):
        return open_dataset(self.table(name), version=version)

    def require(self) -> Run:
        """This run, or a LocationError if there is no rdscale run here."""
        if not self.has_table(PROTEINS):
            if not self.location.is_local:
                missing = self.location.not_found_error()
                if "bucket" in str(missing):
                    raise missing
            raise LocationError(f"{self.uri} holds no rdscale run (no proteins.lance)")
        return self

    # metadata
    def metadata(self, name: str = PROTEINS) -> dict[str, Any]:
        return read_metadata(self.table(name))

    def levels(self) -> list[int]:
        return [int(w) for w in self.metadata().get("levels", [])]

    # fits
    @property
    def fit(self) -> Location:
        """`<run>/fit`: where this run's own fit artifact is written."""
        return self.location.join(FIT)

    def fit_ext(self, width: int) -> Location:
        return self.location.join(fit_ext_name(width))

    @property
    def gzip_index(self) -> Location:
        return self.location.join(GZIP_INDEX_DIR)

    def ref(self, loc: str | Location) -> str:
        """How the run records a location: relative to the run when it is inside it, else as given."""
        loc = Location.parse(loc)
        rel = loc.relative_to(self.location)
        return rel if rel is not None else loc.uri

    def resolve(self, ref: str | None) -> Location | None:
        """A location recorded by `ref` (relative to the run, or absolute / a URI)."""
        return self.location.resolve(ref)

    def fit_location(self, manifest: dict | None = None, config: dict | None = None) -> Location | None:
        """The run's base fit artifact: the one recorded in its metadata (relative to the run, or external), else
        `<run>/fit`, else the `fit.artifact` it was configured with; None when none of them holds a manifest."""
        if manifest is None or config is None:
            meta = self.metadata()
            if manifest is None:
                manifest = meta.get("fit_manifest") or {}
            if config is None:
                config = meta.get("config") or {}
        recorded = manifest.get("artifact")
        artifact = (config.get("fit") or {}).get("artifact")  # as the user gave it (relative to their cwd)
        configured = Location.parse(artifact) if artifact else None
        if recorded and "://" not in str(recorded) and not str(recorded).startswith("/"):
            candidates = [self.resolve(recorded), self.fit, configured]
        else:  # an external fit, or a run recorded before references were relative: a copy beside the run wins
            candidates = [self.fit, self.resolve(recorded), configured]
        for loc in candidates:
            if loc is not None and loc.join("manifest.json").is_file():
                return loc
        return None

    def extension_steps(self, manifest: dict | None = None) -> list[Location]:
        """The step artifacts of `rdscale extend`, in order (recorded relative to the run)."""
        if manifest is None:
            manifest = self.metadata().get("fit_manifest") or {}
        out = []
        models = manifest.get("models") or [{}]
        previous = models[-1].get("width")  # the level each step extended from names its folder
        for ext in manifest.get("extensions", []):
            step = self.resolve(ext.get("step"))
            beside = self.fit_ext(int(previous)) if previous else None
            # a run recorded before steps were relative names an absolute path; the copy beside the run wins
            if beside is not None and beside != step and beside.join("manifest.json").is_file():
                step = beside
            out.append(step)
            previous = ext.get("width")
        return out
