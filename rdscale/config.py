"""Run configuration: one YAML file (read with yaml.safe_load), overridable by `--set section.key=value`.

Every verb of the CLI reads the same structure; sections a verb does not use are ignored by it. Unknown keys are an
error (a typo in a config should not silently fall back to a default on a 1,000-GPU-hour run).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rdscale.errors import RdscaleError


class ConfigError(RdscaleError, ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # FASTA files (plain, .gz, BGZF)
    shard_mb: float = 64.0  # byte-range shard size; plain gzip files are always one shard
    remove_gaps: bool = False  # strip '-' and '.' instead of rejecting the record


@dataclass
class EmbeddingConfig:
    layer: int = -1
    toks_per_batch: int = 4096
    long_policy: str = "window"  # window | truncate | reject
    window: int = 1022
    overlap: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16


@dataclass
class FitConfig:
    sample_sequences: int = 1000  # fit on this many accepted sequences spread over the input
    regression: str = "pcr"  # pcr | ols
    artifact: str | None = None  # reuse an existing fit instead of fitting (embed / run)


@dataclass
class OutputConfig:
    dir: str = "runs/rdscale"
    residues: bool = True  # False: per-protein table only (the scale-friendly option)
    storage_width: int | None = None  # per-residue width stored (a prefix, <= k_m); None: full width
    residue_dtype: str = "float16"  # float16 (half the bytes) or float32 (exact; needed for bit-level checks)
    records_per_batch: int = 64  # records per Ray Data batch handed to an embedding actor
    compact: bool = True  # compact Lance fragments at the end of a run


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray (or join RAY_ADDRESS when set); "auto": join a cluster
    num_actors: int = 1  # embedding actors (one per GPU on a cluster)
    gpus_per_actor: float | None = None  # None: 1 when CUDA is visible to the driver, else 0
    cpus_per_actor: float = 1.0
    object_store_mb: int | None = None  # local Ray only
    max_restarts: int = 3  # fit-pass actors; apply-pass actors follow Ray Data (restarted, batch retried)
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
        if self.embedding.long_policy not in ("window", "truncate", "reject"):
            raise ConfigError(
                f"embedding.long_policy must be window, truncate or reject, not {self.embedding.long_policy!r}"
            )
        if self.fit.regression not in ("pcr", "ols"):
            raise ConfigError(f"fit.regression must be pcr or ols, not {self.fit.regression!r}")
        if self.fit.sample_sequences < 1:
            raise ConfigError("fit.sample_sequences must be at least 1")
        if self.embedding.toks_per_batch < 8:
            raise ConfigError("embedding.toks_per_batch must be at least 8")
        if self.input.shard_mb <= 0:
            raise ConfigError("input.shard_mb must be positive")
        if self.output.residue_dtype not in ("float16", "float32"):
            raise ConfigError(f"output.residue_dtype must be float16 or float32, got {self.output.residue_dtype!r}")
        if self.output.storage_width is not None and self.output.storage_width < 1:
            raise ConfigError("output.storage_width must be positive (or null for the full width)")
        if self.ray.num_actors < 1:
            raise ConfigError("ray.num_actors must be at least 1")
        return self


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
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


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
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
        _resolve_relative_paths(data, p.parent)
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    return _build(Config, data, "").validate()


PACKAGED_CONFIGS = Path(__file__).parent / "conf"


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (rdscale/conf/*.yaml): `-c demo` works from a wheel."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file: `path` itself if it exists, else the packaged config of that name (`demo`, `demo.yaml` or
    the repository's old spelling `conf/demo.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if str(p.parent) in (".", "conf") and (PACKAGED_CONFIGS / name).is_file():
        return PACKAGED_CONFIGS / name
    raise ConfigError(f"config file {p} does not exist (packaged configs: {', '.join(packaged_configs())})")


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Input files named relative to a config resolve against the repository/config location, not the cwd,
    when the cwd-relative path does not exist (so `rdscale run -c conf/demo.yaml` works from anywhere)."""
    paths = (data.get("input") or {}).get("paths")
    if not isinstance(paths, list):
        return
    resolved = []
    for item in paths:
        if "://" in str(item):  # a URI (s3://, file://, ...) is taken as it is
            resolved.append(str(item))
            continue
        candidate = Path(str(item))
        if not candidate.is_absolute() and not candidate.exists():
            for root in (base, base.parent, base.parent.parent):  # packaged configs: rdscale/conf -> repo
                if (root / candidate).exists():
                    candidate = root / candidate
                    break
        resolved.append(str(candidate))
    data["input"]["paths"] = resolved
