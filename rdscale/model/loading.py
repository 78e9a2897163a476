"""The ESM-2 family as data, safe checkpoint loading, and tiny random families for tests and demos.

Checkpoints are fair-esm's ``.pt`` files: a pickled dict ``{"model": state_dict, "cfg": {"model": Namespace}}``
whose state-dict keys carry fairseq's ``encoder.sentence_encoder.`` / ``encoder.`` prefixes. fair-esm's own loader
unpickles them with ``weights_only=False`` (arbitrary code execution from a downloaded file, and an error on
torch >= 2.6). We unpickle with ``weights_only=True`` and allow-list exactly one extra global, ``argparse.Namespace``
(the type of ``cfg["model"]``), then build fair-esm's ``ESM2`` module from the config ourselves. The
``-contact-regression.pt`` companion file is never needed: we do not predict contacts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2

from rdscale.errors import RdscaleError
from rdscale.io.location import Location, is_remote
from rdscale.model.hf import HUB_ID, hf_files, read_hf_checkpoint
from rdscale.model.stub import describe_stub, is_stub, load_stub

HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"

# Everything a fair-esm ESM-2 checkpoint pickles besides tensors, dicts, lists and scalars (which weights_only
# already permits). Anything else in a checkpoint is refused with an error that names it.
CHECKPOINT_SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# State-dict keys that live in the separate -contact-regression.pt file; tolerated as missing.
_CONTACT_REGRESSION_KEYS = frozenset({"contact_head.regression.weight", "contact_head.regression.bias"})
_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_VOCAB = 33  # ESM-1b alphabet, shared by every ESM-2 model


def esm2_parameter_count(layers: int, width: int, heads: int, vocab: int = _VOCAB) -> int:
    """Exact number of parameters of fair-esm's ESM2 (embedding table tied with the LM head)."""
    per_layer = 12 * width * width + 13 * width  # q,k,v,out projections; two layer norms; 4x-wide MLP
    lm_head = width * width + width + 2 * width + vocab  # dense + layer norm + output bias
    contact_head = layers * heads + 1
    return vocab * width + layers * per_layer + 2 * width + lm_head + contact_head


@dataclass(frozen=True)
class ModelSpec:
    """One ESM-2 architecture. `params` is the exact parameter count of fair-esm's module."""

    name: str
    layers: int
    width: int
    heads: int
    params: int

    @classmethod
    def of(cls, name: str, layers: int, width: int, heads: int) -> "ModelSpec":
        return cls(name, layers, width, heads, esm2_parameter_count(layers, width, heads))


_FAMILY = (
    # (README size label, layers, width, heads) from the fair-esm README's model table.
    ("8M", 6, 320, 20),
    ("35M", 12, 480, 20),
    ("150M", 30, 640, 20),
    ("650M", 33, 1280, 20),
    ("3B", 36, 2560, 40),
    ("15B", 48, 5120, 40),
)

ESM2_FAMILY: dict[str, ModelSpec] = {}
ESM2_ALIASES: dict[str, str] = {}
for _label, _layers, _width, _heads in _FAMILY:
    _name = f"esm2_t{_layers}_{_label}_UR50D"
    ESM2_FAMILY[_name] = ModelSpec.of(_name, _layers, _width, _heads)
    ESM2_ALIASES[_label] = _name
del _label, _layers, _width, _heads, _name


def resolve_name(name: str) -> ModelSpec:
    """Family member by full hub name or size alias ("8M", "650m", "esm2_t33_650M_UR50D")."""
    if name in ESM2_FAMILY:
        return ESM2_FAMILY[name]
    for alias, full in ESM2_ALIASES.items():
        if name.upper() == alias.upper():
            return ESM2_FAMILY[full]
    known = ", ".join(f"{a} ({n})" for a, n in ESM2_ALIASES.items())
    raise UnknownModelError(f"unknown ESM-2 model {name!r}; known models: {known}, or pass a path to a .pt checkpoint")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # fair-esm ESM2, eval(), on device, in dtype
    alphabet: esm.data.Alphabet
    spec: ModelSpec
    source: str  # hub name or checkpoint path
    sha256: str  # of the checkpoint file
    device: torch.device
    dtype: torch.dtype


class CheckpointError(RdscaleError, ValueError):
    """A checkpoint file that cannot be loaded safely or is not an ESM-2 checkpoint."""


class DeviceError(RdscaleError, ValueError):
    """A device or dtype that cannot be used on this machine."""


class TinyFamilyError(RdscaleError, ValueError):
    """Arguments of build_tiny_family (make-tiny-family) that cannot make a family."""


class HubError(RdscaleError, RuntimeError):
    """A hub checkpoint that could not be downloaded (no network, proxy, server error)."""


class UnknownModelError(RdscaleError, ValueError):
    """A model name that is neither an ESM-2 hub name/alias nor an existing checkpoint path."""


# --------------------------------------------------------------------------------------------------------------
# device and dtype

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    # Reference precision: removes the batch-shape-dependent round-off of fp32 kernels (reproducibility checks).
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Pick where and in what precision to run.

    Defaults: CUDA if available, in bf16 where the GPU supports it and fp16 otherwise; else CPU in fp32.
    Both can be overridden ("cpu", "cuda:1", torch.device; "float32"/"fp32", "bf16", "fp16", torch.dtype).
    fp16 on CPU is refused (several CPU kernels have no half implementation and the rest are slow);
    bf16 on CPU is allowed with a warning (supported, but usually slower than fp32 without AMX).
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise DeviceError(f"invalid device {device!r}: expected e.g. 'cpu', 'cuda', 'cuda:1'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} requested but CUDA is not available; use the CPU (--device cpu, "
                              "embedding.device: cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")

    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise DeviceError(f"invalid dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[key]
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise DeviceError(f"invalid dtype {dtype!r}: expected float32, bfloat16, float16 or float64")

    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("float16 on CPU is not supported; use dtype='float32' (default) or 'bfloat16'")
    if device.type == "cpu" and dtype == torch.bfloat16:
        warnings.warn("bfloat16 on CPU: supported, but usually slower and less accurate than float32", stacklevel=2)
    return device, dtype


# --------------------------------------------------------------------------------------------------------------
# checkpoint files

_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}
# A digest is remembered only for a file whose last change (ctime) is this much older than the hash: the kernel's
# file clock ticks coarsely (a few ms), so a change right after the hash could leave ctime as it was ("racy git")
_SETTLED_NS = 2_000_000_000


def digest_cache_dir() -> Path:
    """Where checkpoint digests are remembered across processes: $RDSCALE_CACHE_DIR, else
    $XDG_CACHE_HOME/rdscale, else ~/.cache/rdscale; a `sha256/` folder inside it."""
    base = os.environ.get("RDSCALE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdscale"
    return Path(base) / "sha256"


def _digest_record(path: Path) -> Path:
    return digest_cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    """What changes whenever the file's content may have: (path, size, mtime, ctime, inode). ctime cannot be set
    by a user: an edit in place or a replacement (rsync, cp -p, mv) with the mtime restored still moves it."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def checkpoint_sha256(path) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB chunks. Cached per (path, size, mtime, ctime, inode) in this
    process and in a small JSON record per file under digest_cache_dir(), so a multi-GB checkpoint is hashed once
    per machine, not once per load; a record whose key differs from the file's is ignored (re-hashed), so a
    checkpoint swapped for same-size weights with the mtime restored is hashed again. A file changed less than
    two seconds before it is hashed is not remembered (its next change could leave ctime as it was)."""
    path = Path(path).resolve()
    key = _file_key(path)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    record = _digest_record(path)
    fields = ("path", "size", "mtime_ns", "ctime_ns", "ino")
    try:
        saved = json.loads(record.read_text())
        if tuple(saved.get(f) for f in fields) == key and len(saved.get("sha256", "")) == 64:
            _SHA_CACHE[key] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no record, unreadable or not ours: hash the file
    hashed_at = time.time_ns()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if _file_key(path) != key or hashed_at - key[3] < _SETTLED_NS:
        return digest  # changed while hashed, or too recently to be told apart from its next change
    _SHA_CACHE[key] = digest
    try:  # best effort: a read-only home only costs the re-hash next time
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**dict(zip(fields, key)), "sha256": digest}))
        tmp.replace(record)
    except OSError:
        pass
    return digest


def hub_checkpoint_path(name: str) -> Path:
    """Where torch.hub (and therefore fair-esm) keeps the downloaded checkpoint of a hub model."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def download_checkpoint(name: str) -> Path:
    """The hub checkpoint file, downloaded from fair-esm's URL into torch.hub's cache unless already there."""
    spec = resolve_name(name)
    dst = hub_checkpoint_path(spec.name)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    url = HUB_URL.format(name=spec.name)
    try:
        # Writes to a temporary file and renames, so an interrupted download never leaves a partial checkpoint.
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    except Exception as e:  # urllib raises several unrelated types; all mean the same thing here
        reason = " ".join(str(e).split()) or type(e).__name__
        raise HubError(
            f"could not download {spec.name} from {url} ({reason}). Without network access, copy {spec.name}.pt to "
            f"{dst} or pass the checkpoint's path instead of its name"
        ) from e
    return dst


def _torch_load(path: Path, mmap: bool):
    if mmap:
        try:  # zip-format checkpoints map lazily; legacy ones cannot, and are read whole
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path, mmap: bool = False) -> dict:
    """Unpickle a fair-esm checkpoint with weights_only=True; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_magic(path)
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            data = _torch_load(path, mmap)
    except pickle.UnpicklingError as e:
        refused = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if not refused:  # not a refused global: a corrupt file or not a pickle at all
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "nsupported" in ln), lines[0] if lines else "")
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {reason}") from e
        what = f"global {refused[0]!r}"
        raise CheckpointError(
            f"refusing to load {path}: it pickles {what}, which is not on rdscale's allow-list "
            f"({', '.join(t.__module__ + '.' + t.__qualname__ for t in CHECKPOINT_SAFE_GLOBALS)}). "
            f"Loading it would run code from the file; rdscale never does that. "
            f"Inspect it with torch.serialization.get_unsafe_globals_in_checkpoint({str(path)!r})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = " ".join(str(e).split()[:30]) or type(e).__name__
        if not _zip_complete(path):  # torch says "[Errno 22] Invalid argument" of a cut-short archive
            reason = f"the zip archive is cut short ({path.stat().st_size} bytes; an interrupted download or copy?)"
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {reason}") from e
    _check_format(data, path)
    return data


def _zip_complete(path: Path) -> bool:
    """Whether the file at `path`, if a zip archive, has its end-of-central-directory record (a cut-short copy has
    none); a legacy pickle counts as complete."""
    import zipfile

    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return True
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def _check_magic(path: Path) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a pickle (legacy); anything else is refused before
    torch reads it, with a message that says what the file looks like."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint: the file is empty (an interrupted download or copy?)"
        )
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return
    looks = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
    raise CheckpointError(f"{path} is not a readable torch checkpoint: it starts with {looks} ({head!r}), not a zip "
                          "archive or a pickle")


def _check_format(data, path) -> None:
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not an ESM-2 checkpoint in fair-esm's format: expected a dict with 'model' and 'cfg', "
            f"found {keys}"
        )
    cfg = data["cfg"].get("model") if isinstance(data["cfg"], dict) else None
    needed = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")
    if cfg is None or not all(hasattr(cfg, a) for a in needed):
        raise CheckpointError(f"{path}: cfg['model'] must have {', '.join(needed)} (an ESM-2 training config)")
    if not isinstance(data["model"], dict) or not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise CheckpointError(f"{path}: 'model' must be a state dict of tensors")


@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's in-place initialisers as no-ops while a module is built whose values the checkpoint
    replaces anyway: random initialisation of a 3B model costs seconds and touches every page of its memory."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def _build_esm2(data: dict, path) -> tuple[ESM2, esm.data.Alphabet]:
    """fair-esm's ESM2 from a checkpoint dict (as in esm.pretrained._load_model_and_alphabet_core_v2)."""
    cfg = data["cfg"]["model"]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    state = {_PREFIX.sub("", k): v for k, v in data["model"].items()}
    _check_config_against_weights(cfg, state, path)
    # Built with uninitialised storage (never touched, so never resident) and filled by assignment: no second
    # full-size copy of the weights in memory. Not on the meta device: meta tensors run torch's Python reference
    # kernels, whose first use imports torch._dynamo and sympy (seconds of CPU per process, for nothing).
    with torch.device("cpu"), _skip_init():
        model = ESM2(
            num_layers=cfg.encoder_layers,
            embed_dim=cfg.encoder_embed_dim,
            attention_heads=cfg.encoder_attention_heads,
            alphabet=alphabet,
            token_dropout=getattr(cfg, "token_dropout", True),
        )
    expected = set(model.state_dict())
    missing = expected - set(state) - _CONTACT_REGRESSION_KEYS
    unexpected = set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: state dict does not match an ESM2 with {cfg.encoder_layers} layers, width "
            f"{cfg.encoder_embed_dim}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit the configured architecture: {e}") from e
    # The contact head's regression weights (from the separate file) stay unset; zero them so the module holds
    # defined values. Contact prediction from a model loaded here is therefore meaningless, embeddings are exact.
    if "contact_head.regression.weight" not in state:
        torch.nn.init.zeros_(model.contact_head.regression.weight)
        torch.nn.init.zeros_(model.contact_head.regression.bias)
    return model, alphabet


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def _shape_of(cfg, path) -> dict[str, int]:
    """The checkpoint config's layer count, width and heads, each a positive integer (a negative layer count would
    otherwise surface as an embedding.layer range that cannot hold any layer)."""
    values = {}
    for name in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"):
        value = getattr(cfg, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: cfg['model'].{name} must be a positive integer, got {value!r}")
        values[name] = value
    return values


def _check_config_against_weights(cfg, state: dict, path) -> None:
    """The checkpoint's config must describe its own weights before any module is built: a config claiming 1e8
    layers (or a width the embedding matrix does not have) would otherwise build that model first."""
    values = _shape_of(cfg, path)
    layers, width, heads = values["encoder_layers"], values["encoder_embed_dim"], values["encoder_attention_heads"]
    found = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    # (count, min, max) equal to those of 0..layers-1 means the same set, without building one of size `layers`
    if len(found) != layers or (found and (min(found), max(found)) != (0, layers - 1)):
        raise CheckpointError(
            f"{path}: weights do not fit its config: it says {layers} layers but the weights hold {len(found)} "
            f"(layer indices {min(found, default=None)}..{max(found, default=None)})"
        )
    embed = state.get("embed_tokens.weight")
    if embed is None or tuple(embed.shape) != (_VOCAB, width):
        shape = None if embed is None else tuple(embed.shape)
        raise CheckpointError(f"{path}: weights do not fit its config: it says width {width} but embed_tokens.weight has shape {shape} "
                              f"(expected ({_VOCAB}, {width}))")
    if width % heads:
        raise CheckpointError(f"{path}: width {width} is not divisible by its {heads} attention heads")


def _is_path(name_or_path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, os.PathLike) or text.endswith(".pt") or os.sep in text or Path(text).exists()


def _fetched(name_or_path) -> tuple[object, str | None]:
    """A checkpoint URI (s3://, gs://, az://) -> (its copy in this node's cache, the URI); anything else as is."""
    if not is_remote(name_or_path):
        return name_or_path, None
    return Path(Location.parse(name_or_path).local_copy()), str(name_or_path)


def _hub_snapshot(name: str) -> Path:
    """A Hugging Face hub id (owner/name) -> its local snapshot (downloaded once, needs huggingface_hub and a
    network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name} is neither a local checkpoint nor loadable here: a Hugging Face hub id "
                                "needs `pip install huggingface_hub` and a network (or pass the downloaded "
                                "folder)") from None
    return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))


def _local_checkpoint(name_or_path) -> Path:
    """A path given for a checkpoint: a fair-esm .pt file, or a Hugging Face-layout folder / file (a hub id
    owner/name that is no local path is fetched)."""
    path = Path(str(name_or_path)).expanduser()
    if not path.exists() and HUB_ID.match(str(name_or_path)):
        path = _hub_snapshot(str(name_or_path))
    if hf_files(path) is not None:
        return path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _read_any(path: Path) -> tuple[dict, Path]:
    """(fair-esm checkpoint dict, the file whose bytes identify it) of a fair-esm .pt or a Hugging Face layout."""
    if hf_files(path) is not None:
        return read_hf_checkpoint(path)
    return read_checkpoint(path, mmap=True), path


def describe_model(name_or_path) -> dict:
    """{name, source, width, layers, sha256} of a model without building it: the family table for a hub name
    (sha256 None until downloaded), the checkpoint's own config (memory-mapped, weights untouched) for a file.
    A checkpoint URI is fetched once per node into a local cache; its source stays the URI."""
    if is_stub(name_or_path):  # a benchmarking aid (rdscale.model.stub)
        return describe_stub(name_or_path)
    name_or_path, uri = _fetched(name_or_path)
    if uri is not None:
        return {**describe_model(name_or_path), "source": uri}
    if not _is_path(name_or_path):
        spec = resolve_name(str(name_or_path))
        cached = hub_checkpoint_path(spec.name)
        sha = checkpoint_sha256(cached) if cached.is_file() else None
        return {"name": spec.name, "source": spec.name, "width": spec.width, "layers": spec.layers, "sha256": sha}
    path = _local_checkpoint(name_or_path)
    data, weights = _read_any(path)
    shape = _shape_of(data["cfg"]["model"], path)
    return {"name": _model_name(path), "source": str(path), "width": shape["encoder_embed_dim"],
            "layers": shape["encoder_layers"], "sha256": checkpoint_sha256(weights)}


def _model_name(path: Path) -> str:
    """A checkpoint's name: the .pt file's stem, or a Hugging Face folder's name (of the folder of a weights file)."""
    if hf_files(path) is not None:
        return (path if path.is_dir() else path.parent).name
    return path.stem


def load_model(name_or_path, device=None, dtype=None) -> LoadedModel:
    """Load an ESM-2 model by hub name/alias (downloaded once into torch.hub's cache), from a local .pt file, or
    from a checkpoint URI (fetched once per node into a local cache; `source` stays the URI)."""
    if is_stub(name_or_path):  # no weights: the chain encoder gives it a StubEmbedder
        return load_stub(name_or_path)
    name_or_path, uri = _fetched(name_or_path)
    if uri is not None:
        loaded = load_model(name_or_path, device=device, dtype=dtype)
        return dataclasses.replace(loaded, source=uri)
    text = str(name_or_path)
    if _is_path(name_or_path):
        path = _local_checkpoint(name_or_path)
        family_spec = None
    else:
        family_spec = resolve_name(text)
        path = download_checkpoint(family_spec.name)
    device, dtype = resolve_device_dtype(device, dtype)

    # Memory-mapped: weights go from the page cache straight to the device in the target dtype (model.to below),
    # with no full host copy of the file first.
    data, weights = _read_any(path)  # a Hugging Face layout is converted to fair-esm's (rdscale.model.hf)
    model, alphabet = _build_esm2(data, path)
    spec = ModelSpec.of(
        family_spec.name if family_spec else _model_name(path), model.num_layers, model.embed_dim,
        model.attention_heads
    )
    if family_spec is not None and spec != family_spec:
        raise CheckpointError(f"{path} does not hold {family_spec.name}: its config gives {spec}")
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model,
        alphabet=alphabet,
        spec=spec,
        source=family_spec.name if family_spec else str(path),
        sha256=checkpoint_sha256(weights),
        device=device,
        dtype=dtype,
    )


# --------------------------------------------------------------------------------------------------------------
# tiny families

def _tiny_cfg(layers: int, width: int, heads: int) -> argparse.Namespace:
    # The attributes fair-esm reads, plus a few real ESM-2 configs carry, so the file looks like the real thing.
    return argparse.Namespace(
        arch="esm2",
        encoder_layers=layers,
        encoder_embed_dim=width,
        encoder_ffn_embed_dim=4 * width,
        encoder_attention_heads=heads,
        token_dropout=True,
        max_positions=1024,
    )


def _shared_residue_features(generator: torch.Generator, rank: int = 8) -> torch.Tensor:
    """(vocab, rank) latent features shared by every member of a tiny family."""
    return torch.randn(_VOCAB, rank, generator=generator)


def build_tiny_family(out_dir, widths=(32, 48, 64), layers=(2, 3, 4), heads=4, seed=0) -> list[Path]:
    """Randomly initialised ESM-2 checkpoints in fair-esm's exact file format, smallest first.

    Files are named ``esm2_t{layers}_{width}_tiny.pt``. Member i is initialised from seed ``seed * 1000 + i``
    (distinct per member, same files for the same arguments; the global RNG is left untouched). To give a
    reverse-distillation chain something to find, every member's token embeddings share a low-rank component
    drawn from ``seed`` (a common "residue chemistry"), plus member-specific noise; everything else is
    fair-esm's default initialisation.
    """
    if len(widths) != len(layers):
        raise TinyFamilyError(f"widths and layers must have the same length (one depth per model), got "
                              f"{len(widths)} widths and {len(layers)} layers")
    if not widths or any(w <= 0 for w in widths) or any(n < 1 for n in layers):
        raise TinyFamilyError(f"widths must be positive and layers at least 1, got widths {tuple(widths)}, "
                              f"layers {tuple(layers)}")
    if any(w % heads or (w // heads) % 2 for w in widths):
        raise TinyFamilyError(f"every width must split into {heads} heads of even size (rotary; a multiple of "
                              f"{2 * heads}), got {tuple(widths)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = _shared_residue_features(torch.Generator().manual_seed(seed))
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    paths = []
    for i, (width, n_layers) in enumerate(zip(widths, layers)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            model = ESM2(num_layers=n_layers, embed_dim=width, attention_heads=heads, alphabet=alphabet)
            projection = torch.randn(shared.shape[1], width) / shared.shape[1] ** 0.5
            with torch.no_grad():
                embed = model.embed_tokens.weight  # (vocab, width), tied with the LM head
                embed.copy_(shared @ projection + 0.5 * torch.randn_like(embed))
                embed[alphabet.padding_idx].zero_()
        state = {}
        for key, value in model.state_dict().items():
            if key in _CONTACT_REGRESSION_KEYS:
                continue  # real checkpoints ship these in a separate file
            prefix = "encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder."
            state[prefix + key] = value.detach()  # lm_head.weight stays tied to embed_tokens.weight
        path = out_dir / f"esm2_t{n_layers}_{width}_tiny.pt"
        torch.save({"model": state, "cfg": {"model": _tiny_cfg(n_layers, width, heads)}}, path)
        paths.append(path)
    return paths
