"""Run configuration: one YAML file (read with yaml.safe_load), overridable by `--set section.key=value`.

Every verb of the CLI reads the same structure; sections a verb does not use are ignored by it. Unknown keys are an
error (a typo in a config should not silently fall back to a default on a 1,000-GPU-hour run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdscale.errors import ConfigError


# The allowed values of the config's named choices, written here once: the modules that take them (rdscale.model.embed,
# rdscale.model.fast_esm, rdscale.fit.chain, rdscale.fit.moments, the CLI's choices) import these.
LONG_POLICIES = ("window", "truncate", "reject")  # a sequence longer than the model's window
FORWARDS = ("fast", "plain")  # packed forward without padding (rdscale.model.fast_esm) | fair-esm's padded batches
ATTENTION_BACKENDS = ("auto", "flash", "varlen", "nested", "padded")  # the fast forward's attention
REGRESSIONS = ("pcr", "ols")  # principal-component regression (the paper's) | ordinary least squares
GRAM_MODES = ("auto", "float64", "float32")  # the moments' Gram matrix precision
STORED_DTYPES = ("float16", "float32")  # output.residue_dtype, output.protein_dtype


def _one_of(values: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c", as the config's messages name the allowed values."""
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # FASTA files (plain, .gz, BGZF)
    shard_mb: float = 64.0  # byte-range shard size; plain gzip files are always one shard
    remove_gaps: bool = False  # strip '-' and '.' instead of rejecting the record
    # identical sequences embedded once, the other records' rows copied (null: on for per-protein output only)
    dedupe_sequences: bool | None = None


@dataclass
class EmbeddingConfig:
    layer: int = -1
    toks_per_batch: int = 4096
    long_policy: str = "window"  # LONG_POLICIES: window | truncate | reject
    window: int = 1022
    overlap: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    forward: str = "fast"  # FORWARDS: fast (packed, no padding: rdscale.model.fast_esm) | plain (padded batches)
    attention: str = "auto"  # ATTENTION_BACKENDS, the fast forward's: auto | flash | varlen | nested | padded
    compile: bool = False  # torch.compile the fast forward's elementwise work (pays on GPUs; compiles once per model)
    # per-model token budgets, smallest model first; null: toks_per_batch scaled by k_largest / k_i (at most 8x)
    toks_per_batch_per_model: list[int] | None = None
    # per-GPU budgets replacing toks_per_batch on matching devices, keyed by part of the device name: {H100: 32768,
    # A10G: 8192} (case-insensitive, longest matching key wins; "cpu" for CPU actors)
    toks_per_batch_by_device: dict[str, int] = field(default_factory=dict)
    # no key matches: this many tokens per GiB of GPU memory left after the chain's weights (null: toks_per_batch)
    toks_per_gib: int | None = None


@dataclass
class FitConfig:
    sample_sequences: int = 1000  # fit on this many accepted sequences spread over the input
    regression: str = "pcr"  # REGRESSIONS: pcr | ols
    artifact: str | None = None  # reuse an existing fit instead of fitting (embed / run)
    gram: str = "auto"  # moments' Gram: auto (float32 on CUDA, float64 elsewhere) | float64 | float32 (folded)


@dataclass
class OutputConfig:
    dir: str = "runs/rdscale"
    residues: bool = True  # False: per-protein table only (the scale-friendly option)
    storage_width: int | None = None  # per-residue width stored (a prefix, <= k_m); None: full width
    residue_dtype: str = "float16"  # float16 (half the bytes) or float32 (exact; needed for bit-level checks)
    protein_dtype: str = "float32"  # per-protein embeddings: float32 (exact) or float16 (half the bytes, recall ~same)
    records_per_batch: int = 64  # records per Ray Data batch handed to an embedding actor
    compact: bool = False  # compact Lance fragments at the end of a run (else later: `rdscale compact DIR`)
    overlap_writes: bool = True  # build Arrow tables and write fragments on a writer thread during the forward
    # Rows reach each Lance table in fragments of about this many rows or MiB, whichever comes first: the driver
    # commits finished shards in groups (docs/outputs.md, "Fragments"); fragment_rows 0: a fragment per batch
    fragment_rows: int = 1_000_000
    fragment_mb: float = 128.0
    # ... and at least this often (seconds) a group with a finished shard is committed, so that a kill redoes at
    # most this much work and `status` shows progress on a slow run (0: only the size targets)
    fragment_seconds: float = 600.0


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray (or join RAY_ADDRESS when set); "auto": join a cluster
    # embedding actors (one per GPU on a cluster), or "auto": as many as the cluster's nodes hold at the start, and
    # more as nodes join (the apply pass's pool grows up to max_actors)
    num_actors: int | str = 1
    max_actors: int | None = None  # the apply pass's pool grows up to this as nodes join (null: fixed; auto: no cap)
    gpus_per_actor: float | None = None  # None: 1 when some node of the Ray cluster has a GPU, else 0
    cpus_per_actor: float = 1.0
    object_store_mb: int | None = None  # local Ray only
    max_restarts: int = 3  # fit/extend actors' restarts; apply pass: new pools over uncommitted shards (-1: no limit)
    fault_injection: dict[str, Any] = field(default_factory=dict)  # tests only: {"exit_on_batch": N, "marker": path}


@dataclass
class StorageConfig:
    # Object-store options for s3:// gs:// az:// locations, passed to Lance as given and mapped onto pyarrow (e.g.
    # aws_endpoint, region, allow_http). Credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...);
    # this section is never written into table metadata, fit manifests or logs.
    options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Config:
    models: list[str] = field(default_factory=list)  # the chain, smallest first (hub names or checkpoint paths)
    input: InputConfig = field(default_factory=InputConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> "Config":
        """The inverse of to_dict (e.g. the config recorded in a run's metadata), with optional overrides."""
        data = json.loads(json.dumps(data))  # a deep copy that the overrides may edit
        for text in overrides or []:
            apply_override(data, *parse_override(text))
        return _build(cls, data, "").validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> "Config":
        """Every value checked here, when the config is loaded, before anything is created or run."""
        for problem in _problems(self):
            raise ConfigError(problem)
        return self


# Largest values accepted; each is far beyond any real run and keeps a typo from allocating without bound.
MAX_WINDOW = 1022  # ESM-2 was trained on 1024 positions: 1022 residues + BOS/EOS
MAX_SHARD_MB = 1 << 20  # 1 TiB shards
MAX_TOKS_PER_BATCH = 1 << 24
MAX_RECORDS_PER_BATCH = 1 << 20
MAX_FRAGMENT_ROWS = 1 << 31  # Lance's limit on the rows of one fragment
MAX_LAYER = 1000
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16", "float64", "fp64")


def _problems(cfg: Config):
    """Yields what is wrong with a config, one message per value, naming the key, the value and the range."""

    def between(key, value, low, high, what="an integer"):
        if value is not None and not low <= value <= high:
            yield f"{key} must be {what} in [{low}, {high}], got {value!r}"

    if not all(isinstance(m, str) and m.strip() for m in cfg.models):
        yield f"models must be a list of model names or checkpoint paths, got {cfg.models!r}"
    if not all(isinstance(p, str) and p.strip() for p in cfg.input.paths):
        yield f"input.paths must be a list of file paths, got {cfg.input.paths!r}"
    if not 0 < cfg.input.shard_mb <= MAX_SHARD_MB:
        yield f"input.shard_mb must be in (0, {MAX_SHARD_MB}] megabytes, got {cfg.input.shard_mb!r}"
    elif int(cfg.input.shard_mb * (1 << 20)) < 1:  # shards are cut in whole bytes
        yield (f"input.shard_mb = {cfg.input.shard_mb!r} rounds to a shard of 0 bytes; use at least "
               f"{1 / (1 << 20):.1e} (one byte), in practice megabytes")
    named = [p for p in cfg.input.paths if isinstance(p, str)]
    twice = next((p for i, p in enumerate(named) if p in named[:i]), None)
    if twice is not None:  # its records would be read twice, under the same file:offset sources
        yield f"input.paths names {twice} twice; name each input file once"
    e = cfg.embedding
    yield from between("embedding.layer", e.layer, -MAX_LAYER, MAX_LAYER)
    yield from between("embedding.toks_per_batch", e.toks_per_batch, 8, MAX_TOKS_PER_BATCH)
    if e.long_policy not in LONG_POLICIES:
        yield f"embedding.long_policy must be {_one_of(LONG_POLICIES)}, not {e.long_policy!r}"
    yield from between("embedding.window", e.window, 1, MAX_WINDOW)
    if not 0 <= e.overlap < e.window:
        yield f"embedding.overlap must be in [0, embedding.window) = [0, {e.window}), got {e.overlap!r}"
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", e.device):
        yield f"embedding.device must be one of {', '.join(DEVICES)}, got {e.device!r}"
    if e.dtype.lower() not in DTYPES:
        yield f"embedding.dtype must be one of {', '.join(DTYPES)}, got {e.dtype!r}"
    if e.forward not in FORWARDS:
        yield f"embedding.forward must be {_one_of(FORWARDS)}, not {e.forward!r}"
    if e.attention not in ATTENTION_BACKENDS:
        yield f"embedding.attention must be {_one_of(ATTENTION_BACKENDS)}, not {e.attention!r}"
    per_model = e.toks_per_batch_per_model
    if per_model is not None and (len(per_model) != len(cfg.models) or min(per_model, default=8) < 8):
        yield (f"embedding.toks_per_batch_per_model must list one budget (>= 8) per model ({len(cfg.models)}), "
               f"got {per_model}")
    for name, budget in (e.toks_per_batch_by_device or {}).items():
        if not (isinstance(name, str) and name.strip()) or isinstance(budget, bool) or not isinstance(budget, int) \
                or not 8 <= budget <= MAX_TOKS_PER_BATCH:
            yield (f"embedding.toks_per_batch_by_device must map part of a device name to a token budget in "
                   f"[8, {MAX_TOKS_PER_BATCH}], e.g. {{H100: 32768, A10G: 8192}}; got {name!r}: {budget!r}")
    yield from between("embedding.toks_per_gib", e.toks_per_gib, 1, MAX_TOKS_PER_BATCH)
    if cfg.fit.regression not in REGRESSIONS:
        yield f"fit.regression must be {_one_of(REGRESSIONS)}, not {cfg.fit.regression!r}"
    yield from between("fit.sample_sequences", cfg.fit.sample_sequences, 1, 1 << 40)
    if cfg.fit.artifact is not None and not cfg.fit.artifact.strip():
        yield "fit.artifact must be a directory or null"
    if cfg.fit.gram not in GRAM_MODES:
        yield f"fit.gram must be {_one_of(GRAM_MODES)}, not {cfg.fit.gram!r}"
    o = cfg.output
    if not o.dir.strip():
        yield "output.dir must name a directory"
    if o.residue_dtype not in STORED_DTYPES:
        yield f"output.residue_dtype must be {_one_of(STORED_DTYPES)}, got {o.residue_dtype!r}"
    if o.protein_dtype not in STORED_DTYPES:
        yield f"output.protein_dtype must be {_one_of(STORED_DTYPES)}, got {o.protein_dtype!r}"
    yield from between("output.storage_width", o.storage_width, 1, 1 << 20,
                       "an integer (or null for the full width)")
    yield from between("output.records_per_batch", o.records_per_batch, 1, MAX_RECORDS_PER_BATCH)
    yield from between("output.fragment_rows", o.fragment_rows, 0, MAX_FRAGMENT_ROWS,
                       "an integer (0: a fragment per batch, no grouping)")
    yield from between("output.fragment_mb", o.fragment_mb, 0.001, 1 << 20, "a number of MiB")
    yield from between("output.fragment_seconds", o.fragment_seconds, 0, 1 << 30,
                       "a number of seconds (0: commit by size only)")
    r = cfg.ray
    if isinstance(r.num_actors, str) or isinstance(r.num_actors, bool) or not isinstance(r.num_actors, int):
        if r.num_actors != "auto":
            yield f"ray.num_actors must be an integer or auto, got {r.num_actors!r}"
    else:
        yield from between("ray.num_actors", r.num_actors, 1, 1 << 20)
    yield from between("ray.max_actors", r.max_actors, 1, 1 << 20)
    if isinstance(r.num_actors, int) and r.max_actors is not None and r.max_actors < r.num_actors:
        yield f"ray.max_actors ({r.max_actors}) must be at least ray.num_actors ({r.num_actors})"
    yield from between("ray.gpus_per_actor", r.gpus_per_actor, 0, 1024, "a number")
    yield from between("ray.cpus_per_actor", r.cpus_per_actor, 0, 1 << 16, "a number")
    yield from between("ray.object_store_mb", r.object_store_mb, 1, 1 << 30)
    yield from between("ray.max_restarts", r.max_restarts, -1, 1 << 20)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if cls is Config else None
        key = f"{where}.{name}" if where else name
        kwargs[name] = _build(sub, value or {}, name) if sub else _coerce(value, fields[name].type, key)
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Check a scalar against its field's annotation; numbers given as strings (YAML reads `5e-5` as one) are
    converted, anything else of the wrong type is a ConfigError naming the key."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    base = annotation.replace("| None", "").strip()
    if base in ("int", "float"):
        kind = int if base == "int" else float
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if kind is int and not number.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return kind(number)
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if base.startswith("list") and not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if base.startswith("dict") and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


_SECTIONS = {
    "input": InputConfig,
    "embedding": EmbeddingConfig,
    "fit": FitConfig,
    "output": OutputConfig,
    "ray": RayConfig,
    "storage": StorageConfig,
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML, so 3 -> int, null -> None, [a,b] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")

    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r}: the key must look like section.key")
    try:
        value = safe_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
    except ConfigError as err:
        shown = text if len(text) <= 80 else text[:60] + f"... ({len(text):,} characters)"
        raise ConfigError(f"override {shown!r}: {err}") from None
    return key.strip().split("."), value


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing what a config never needs but an attacker or a typo can use: anchors/aliases
    (an alias bomb expands without bound when the config is serialised) and more than MAX_CONFIG_BYTES."""
    import yaml  # here, not at module level: the library path (bench/bench_gpu.py) runs without PyYAML

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {len(text):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{where}: YAML anchors and aliases (&name, *name) are not allowed in a config; "
                                  "write the values out")
            # PyYAML builds nested values recursively: a deep nest would end in Python's recursion limit
            depth += isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
            depth -= isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent))
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{where}: values nested more than {MAX_CONFIG_DEPTH} deep; a config never is")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"{where} is not valid YAML: {reason}") from None
    except ConfigError:
        raise
    except ValueError as err:  # Python's limit on integer digits (sys.get_int_max_str_digits)
        raise ConfigError(f"{where}: a number with more digits than any config value needs") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deep") from None


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {p} cannot be read: {err}") from None
        data = safe_yaml(text, str(p)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
        _resolve_relative_paths(data, p.parent)  # paths in a config file are relative to its folder
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    _resolve_relative_paths(data, Path.cwd(), default_output=True)  # the rest came from the command line
    return _build(Config, data, "").validate()


def packaged_config_dir() -> Path | None:
    """The folder of the shipped configs: the package rdscale.conf, which is the repository's top-level conf/
    (pyproject.toml maps it; an editable install points at the checkout's, a wheel carries a copy)."""
    spec = importlib.util.find_spec("rdscale.conf")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if Path(folder).is_dir():
            return Path(folder)
    return None


def packaged_configs() -> list[str]:
    """Names of the shipped configs (conf/*.yaml, the package rdscale.conf): `-c demo` works from a wheel."""
    folder = packaged_config_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def resolve_config_path(path: str | Path) -> Path:
    """A config file: `path` itself if it exists, else the shipped config of that name (`demo` or `demo.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    folder = packaged_config_dir()
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if folder is not None and str(p.parent) == "." and (folder / name).is_file():
        return folder / name
    shipped = ", ".join(packaged_configs()) or "none found: reinstall rdscale (pip install -e .)"
    raise ConfigError(f"config file {p} does not exist (packaged configs: {shipped})")


def _is_local_path(text: str) -> bool:
    """A filesystem path (not `s3://...`-style URI)."""
    return "://" not in text


def _is_model_path(text: str) -> bool:
    """A model entry that names a checkpoint file rather than an ESM-2 hub name (`650M`, `esm2_t33_650M_UR50D`);
    the same rule as rdscale.model.loading, minus the existence check (the file may be elsewhere)."""
    return _is_local_path(text) and (text.endswith(".pt") or "/" in text or "\\" in text)


def _resolve_relative_paths(data: dict[str, Any], base: Path, default_output: bool = False) -> None:
    """Make every relative local path of a config absolute, against `base`: the config file's folder for paths
    written in the file, the current directory for paths given on the command line. Runs on the driver, so the
    Ray actors (whose working directory is not the driver's, and may be on another node) only ever see absolute
    paths. Covers input.paths, model checkpoints (entries that look like files; hub names stay), fit.artifact and
    output.dir. URIs (`s3://...`) are left alone."""
    base = Path(base).absolute()
    if default_output and isinstance(data.get("output", {}), dict):
        data.setdefault("output", {}).setdefault("dir", OutputConfig.dir)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and _is_local_path(value):
            p = Path(value).expanduser()
            return os.path.normpath(p if p.is_absolute() else base / p)
        return value

    section = data.get("input")
    if isinstance(section, dict) and isinstance(section.get("paths"), list):
        section["paths"] = [fix(p) for p in section["paths"]]
    if isinstance(data.get("models"), list):
        data["models"] = [fix(m) if isinstance(m, str) and _is_model_path(m) else m for m in data["models"]]
    for name, key in (("fit", "artifact"), ("output", "dir")):
        section = data.get(name)
        if isinstance(section, dict) and section.get(key) is not None:
            section[key] = fix(section[key])
