"""One home for "a run": where it is, the name of every file and folder under it, its tables, the keys of its schema
metadata, its chain levels, where its fit artifacts are, its status (which shards are committed) and the filter
that hides rows of uncommitted shards from readers.

A run is a location (local directory or object-store prefix) holding `proteins.lance`, `residues.lance`,
`rejects.lance`, the `shards.lance` ledger, the fit artifact `fit/` and, after `rdscale extend`, one
`fit_ext_<width>/` per added level; beside them the shard plan, the writer lease, the FAISS indexes and the
bookkeeping of dedupe, update and extend (the constants below). Only this module spells those names: every other
module asks a `Run` (tests/test_run_home.py checks it).

Runs are relocatable: everything a run records about its own files is relative to the run (`fit`, `fit_ext_64`),
so a run copied to another directory or bucket opens, searches and extends. Fits that live outside the run are
recorded as given by the user (a path or URI).

Every Lance dataset of rdscale is opened through `open_dataset`, which passes the location's storage options
(credentials from the environment or `storage.options`, bounded timeouts) and turns object-store failures into
one-line `LocationError`s naming the location.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from rdscale.io.location import Location, LocationError

__all__ = [
    "DATA_TABLES",
    "DEDUPE_PLAN",
    "EXTEND_PARTIAL",
    "EXTENSIONS_KEY",
    "FIT",
    "FIT_EXT",
    "GATE_NAME",
    "GZIP_INDEX_DIR",
    "INDEX_DIR",
    "LANCE_SUFFIX",
    "LEASE_NAME",
    "LEDGER",
    "META_CONFIG",
    "META_LEVELS",
    "META_MANIFEST",
    "META_RUN_KEY",
    "META_VERSION",
    "PARTIAL_FIT",
    "PLAN_FILE",
    "PROTEINS",
    "REJECTS",
    "RESIDUES",
    "Run",
    "RunStatus",
    "UPDATE_STATE",
    "WRITTEN",
    "dataset_exists",
    "default_fit",
    "fit_ext_name",
    "incomplete_message",
    "open_dataset",
    "read_metadata",
    "recorded_config",
    "table_location",
]

PROTEINS, RESIDUES, REJECTS, LEDGER = "proteins", "residues", "rejects", "shards"
DATA_TABLES = (PROTEINS, RESIDUES, REJECTS)

META_MANIFEST = b"rdscale.fit_manifest"
META_LEVELS = b"rdscale.levels"
META_CONFIG = b"rdscale.config"
META_VERSION = b"rdscale.version"
META_RUN_KEY = b"rdscale.run_key"
EXTENSIONS_KEY = "rdscale.extensions"

LANCE_SUFFIX = ".lance"  # a table `<name>` of the run is the Lance dataset `<run>/<name>.lance`
FIT = "fit"  # the fit artifact of `rdscale run` / `rdscale fit`, relative to the run
PARTIAL_FIT = "fit.partial"  # `fit.partial.<run id>`: a fit being written, renamed to `fit` once complete
FIT_EXT = "fit_ext_"  # `fit_ext_<width>`: the step artifact of `rdscale extend` from level <width>
EXTEND_PARTIAL = "extend.partial"  # `rdscale extend`'s work in progress (its new columns, per table)
GZIP_INDEX_DIR = "gzip_index"  # seek-point indexes of plain-gzip inputs, relative to the run
PLAN_FILE = "run_plan.json"  # the run's shard plan (number of shards, their keys): readers tell complete runs by it
DEDUPE_PLAN = "dedupe_plan.json.gz"  # the last grouping of `input.dedupe`, with the key of the plan it was made for
UPDATE_STATE = "updates.json"  # `rdscale update`'s record of the run's releases
INDEX_DIR = "indexes"  # FAISS index files and their sidecars
LEASE_NAME = "_writer.lease"  # the writer lease (rdscale.io.lease)
GATE_NAME = "_writer.gate"  # the lease's commit gate (rdscale.io.lease)
# What rdscale writes directly under a run, besides `fit.partial*` / `fit_ext_*`: what `--restart` may delete.
WRITTEN = (*(f"{t}{LANCE_SUFFIX}" for t in (*DATA_TABLES, LEDGER)), FIT, PLAN_FILE, DEDUPE_PLAN)


def fit_ext_name(width: int) -> str:
    """The extension step that grew a run whose stored width was `width` (the level it extended from), relative
    to the run."""
    return f"{FIT_EXT}{width}"


def default_fit(out: str | Location) -> Location:
    """`<out>/fit`: where `rdscale fit` / `run` write the fit and `embed`, `eval`, `search` look for it."""
    return Location.parse(out).join(FIT)


def table_location(where: str | Location, name: str) -> Location:
    """`where` itself when it is a Lance table (`*.lance`), else the table `name` of the run at `where`."""
    loc = Location.parse(where)
    return loc if loc.name.endswith(LANCE_SUFFIX) else Run(loc).table(name)


class RunStatus(TypedDict):
    """What a reader needs to know about a run (`Run.status`)."""

    committed: list[int]  # sorted shard indices in the ledger
    planned: int | None  # shards in the run's plan; None for runs written before plans were recorded
    complete: bool


def incomplete_message(status: RunStatus) -> str | None:
    """`incomplete: <n> of <m> shards committed`, or None for a complete run."""
    if status["complete"]:
        return None
    return f"incomplete: {len(status['committed'])} of {status['planned']} shards committed"


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

    def __init__(self, location: str | Path | Location | Run):
        self.location = location.location if isinstance(location, Run) else Location.parse(location)

    @classmethod
    def of(cls, where: str | Path | Location | Run) -> Run:
        """The run at `where`, or the run holding the table `where` (a `*.lance` location)."""
        if isinstance(where, Run):
            return where
        loc = Location.parse(where)
        return cls(loc.parent if loc.name.endswith(LANCE_SUFFIX) else loc)

    def __repr__(self) -> str:
        return f"Run({self.location.uri!r})"

    def __str__(self) -> str:
        return self.location.uri

    def __fspath__(self) -> str:
        return self.location.__fspath__()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location.uri)

    @property
    def uri(self) -> str:
        return self.location.uri

    # tables
    def table(self, name: str) -> Location:
        return self.location.join(f"{name}{LANCE_SUFFIX}")

    @property
    def ledger(self) -> Location:
        """`<run>/shards.lance`: one row per committed shard."""
        return self.table(LEDGER)

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
            raise LocationError(f"{self.uri} holds no rdscale run (no {PROTEINS}{LANCE_SUFFIX})")
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

    def partial_fit(self, run_id: str) -> Location:
        """Where the writer `run_id` stages the run's fit before renaming it to `fit` (never shared by two
        writers)."""
        return self.location.join(f"{PARTIAL_FIT}.{run_id}")

    @staticmethod
    def is_partial_fit(name: str) -> bool:
        """Whether an entry directly under a run is a fit being staged (`partial_fit`)."""
        return name.startswith(PARTIAL_FIT)

    @staticmethod
    def is_written(name: str) -> bool:
        """Whether an entry directly under a run is output of rdscale (what `--restart` deletes; never the lease,
        never files of the user's)."""
        return name in WRITTEN or name.startswith((PARTIAL_FIT, FIT_EXT))

    @property
    def extend_partial(self) -> Location:
        return self.location.join(EXTEND_PARTIAL)

    @property
    def gzip_index(self) -> Location:
        return self.location.join(GZIP_INDEX_DIR)

    @property
    def plan(self) -> Location:
        """The run's shard plan (rdscale.run.integrity.write_plan)."""
        return self.location.join(PLAN_FILE)

    @property
    def dedupe_plan(self) -> Location:
        return self.location.join(DEDUPE_PLAN)

    @property
    def update_state(self) -> Location:
        return self.location.join(UPDATE_STATE)

    @property
    def lease_file(self) -> Location:
        return self.location.join(LEASE_NAME)

    @property
    def index_dir(self) -> Location:
        """`<run>/indexes`: FAISS index files (Lance's indexes live inside the tables)."""
        return self.location.join(INDEX_DIR)

    # status
    def status(self) -> RunStatus:
        """Which shards are committed, how many were planned, and whether the run is complete. Readers must read
        only committed shards' rows (`committed_filter`)."""
        has_ledger = self.has_table(LEDGER)
        committed = sorted(self.dataset(LEDGER).to_table(columns=["shard"])["shard"].to_pylist()) if has_ledger else []
        planned = None
        if self.plan.is_file():
            data = self.plan.read_bytes()  # a denied or failed read is an error, not "no plan"
            try:
                planned = int(json.loads(data)["shards"])
            except (ValueError, KeyError, TypeError):
                planned = None
        complete = planned is not None and set(range(planned)) <= set(committed)
        if planned is None and has_ledger:
            complete = True  # a run from before plans were recorded: nothing to compare against
        return RunStatus(committed=committed, planned=planned, complete=complete)

    def committed_filter(self, status: RunStatus | None = None) -> str | None:
        """A Lance filter selecting the rows of committed shards only, or None when every row is committed (a
        complete run, after recovery). Rows of a shard whose ledger row is missing belong to a commit in progress
        or an interrupted one and must not be read. status: `self.status()`, when the caller has it already."""
        status = self.status() if status is None else status
        done = status["committed"]
        if status["complete"] and self._no_stray_rows(done):
            return None
        return f"shard IN ({', '.join(map(str, done))})" if done else "shard < -2147483647"

    def _no_stray_rows(self, done: list[int]) -> bool:
        if not done:
            return False
        if not self.has_table(PROTEINS):
            return True
        return self.dataset(PROTEINS).count_rows(filter=f"shard NOT IN ({', '.join(map(str, done))})") == 0

    def update_in_progress(self) -> str | None:
        """What a reader of the run must know while `rdscale update` is running or was interrupted (its tables are
        then between two releases), in words; None otherwise."""
        if not self.update_state.is_file():
            return None
        try:
            running = [e for e in json.loads(self.update_state.read_text()).get("releases", [])
                       if e.get("status") != "done"]
        except (ValueError, AttributeError):
            return None
        if not running:
            return None
        entry = running[0]
        return (f"the update to release {entry.get('name')} is running or was interrupted: until it finishes, an "
                f"id may be found twice (old and new row) and removed ids may still be found; read the previous "
                f"release ({entry.get('previous')}) with --release, or finish or abort the update (rdscale update "
                "--abort)")

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
