"""ESM-2 checkpoints in Hugging Face's layout (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``),
read into fair-esm's checkpoint form so that rdscale.model.loading builds the same ``ESM2`` module from them.

A checkpoint is a directory holding both files, or one of the two files (its directory then holds the other). The
state dict is read with ``torch.load(weights_only=True)`` or by a safetensors reader written here (a JSON header
and raw little-endian tensors: no code runs, no extra package). Hugging Face's module names are mapped onto
fair-esm's (``esm.encoder.layer.{i}.attention.self.query`` -> ``layers.{i}.self_attn.q_proj``, ...); the
language-model head and contact regression, which embeddings never use, are filled in where a fine-tuned encoder
(e.g. a sequence classifier) does not ship them: the LM head tied to the token embeddings, the rest zero.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path

import torch

from rdscale.errors import RdscaleError

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, e.g. facebook/esm2_t33_650M_UR50D

_LAYER = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "attention.self.rotary_embeddings": "self_attn.rot_emb",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_TOP = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
}
_LM_HEAD = {"lm_head.dense.weight": "lm_head.dense.weight", "lm_head.dense.bias": "lm_head.dense.bias",
            "lm_head.layer_norm.weight": "lm_head.layer_norm.weight", "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
            "lm_head.decoder.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|inv_freq)$")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class HFCheckpointError(RdscaleError, ValueError):
    """A Hugging Face-layout checkpoint rdscale cannot read as ESM-2 (the message names the file)."""


def hf_files(path) -> tuple[Path, Path] | None:
    """(config.json, weights file) if ``path`` is a Hugging Face-layout checkpoint (a directory or one of its
    files); None otherwise."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG).is_file():
        return None
    if path.is_file() and path.name in WEIGHT_FILES:
        return folder / CONFIG, path
    if path.is_file() and path.name != CONFIG:
        return None
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / CONFIG, folder / name
    raise HFCheckpointError(f"{folder} holds {CONFIG} but no weights ({' or '.join(WEIGHT_FILES)})")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file: 8-byte little-endian header length, a JSON header, raw data."""
    raw = path.read_bytes()
    if len(raw) < 8:
        raise HFCheckpointError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{path} is not a safetensors file: {err}") from None
    base = 8 + size
    buf = bytearray(raw)  # writable: torch.frombuffer warns on read-only memory
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
        start, end = meta["data_offsets"]
        if dtype is None or not 0 <= start <= end or base + end > len(raw):
            raise HFCheckpointError(f"{path}: tensor {name} has dtype {meta.get('dtype')} or offsets out of range")
        shape = [int(d) for d in meta["shape"]]
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).reshape(shape)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The inverse of ``read_safetensors`` (tests write Hugging Face-layout checkpoints with it)."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        return read_safetensors(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise HFCheckpointError(f"{weights} is not a readable torch state dict: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise HFCheckpointError(f"{weights} holds a {type(state).__name__}, not a state dict")
    return state


def to_fair_esm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ESM module names -> fair-esm ESM2's (unknown heads, e.g. a classifier, are dropped)."""
    prefix = "esm." if any(k.startswith("esm.") for k in state) else ""
    out = {}
    for key, value in state.items():
        if key in _LM_HEAD:
            out[_LM_HEAD[key]] = value
            continue
        if not key.startswith(prefix):
            continue  # a task head (classifier, ...): not part of the encoder
        inner = key[len(prefix):]
        if inner in _TOP:
            out[_TOP[inner]] = value
        elif m := _LAYER_KEY.match(inner):
            layer, module, leaf = m.groups()
            if module in _LAYER:
                out[f"layers.{layer}.{_LAYER[module]}.{leaf}"] = value
    embed = out.get("embed_tokens.weight")
    if embed is not None:  # embeddings never read the LM head or contact regression: defined values where absent
        width = embed.shape[1]
        out.setdefault("lm_head.weight", embed)
        out.setdefault("lm_head.bias", torch.zeros(embed.shape[0], dtype=embed.dtype))
        out.setdefault("lm_head.dense.weight", torch.zeros(width, width, dtype=embed.dtype))
        out.setdefault("lm_head.dense.bias", torch.zeros(width, dtype=embed.dtype))
        out.setdefault("lm_head.layer_norm.weight", torch.ones(width, dtype=embed.dtype))
        out.setdefault("lm_head.layer_norm.bias", torch.zeros(width, dtype=embed.dtype))
    return out


def read_hf_checkpoint(path) -> tuple[dict, Path]:
    """A Hugging Face-layout ESM-2 checkpoint -> ({"model": fair-esm state dict, "cfg": {"model": Namespace}}, the
    weights file), the form rdscale.model.loading builds ESM2 from."""
    found = hf_files(path)
    if found is None:
        raise HFCheckpointError(f"{path} is not a Hugging Face-layout checkpoint ({CONFIG} + weights)")
    config_path, weights = found
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{config_path} is not JSON: {err}") from None
    if config.get("model_type") not in (None, "esm") or config.get("position_embedding_type", "rotary") != "rotary":
        raise HFCheckpointError(f"{config_path} describes a {config.get('model_type')} model with "
                                f"{config.get('position_embedding_type')} positions, not ESM-2 (esm, rotary)")
    if config.get("emb_layer_norm_before"):
        raise HFCheckpointError(f"{config_path}: emb_layer_norm_before is ESM-1b's layout, not ESM-2's")
    try:
        cfg = argparse.Namespace(
            arch="esm2", encoder_layers=int(config["num_hidden_layers"]),
            encoder_embed_dim=int(config["hidden_size"]), encoder_attention_heads=int(config["num_attention_heads"]),
            encoder_ffn_embed_dim=int(config.get("intermediate_size", 4 * int(config["hidden_size"]))),
            token_dropout=bool(config.get("token_dropout", True)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise HFCheckpointError(f"{config_path} lacks or garbles {err}: not an ESM config") from None
    state = to_fair_esm(_state_dict(weights))
    head_dim = cfg.encoder_embed_dim // cfg.encoder_attention_heads
    for layer in range(cfg.encoder_layers):  # newer transformers keep the rotary frequencies out of the file
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        state.setdefault(f"layers.{layer}.self_attn.rot_emb.inv_freq", inv_freq)
    return {"model": state, "cfg": {"model": cfg}}, weights


def write_hf_checkpoint(checkpoint: dict, out_dir, safetensors: bool = False, head: bool = True) -> Path:
    """Write a fair-esm checkpoint dict (rdscale.model.loading.read_checkpoint's) in Hugging Face's layout
    (EsmForMaskedLM names; ``head=False``: an encoder without the LM head, as a fine-tuned classifier ships).
    For tests: the inverse of ``to_fair_esm``."""
    cfg = checkpoint["cfg"]["model"]
    state = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v for k, v in checkpoint["model"].items()}
    inverse_layer = {v: k for k, v in _LAYER.items()}
    inverse_top = {v: k for k, v in _TOP.items()}
    inverse_head = {v: k for k, v in _LM_HEAD.items()}
    out = {}
    for key, value in state.items():
        if key in inverse_head:
            if head:
                out[inverse_head[key]] = value.clone()
        elif key in inverse_top:
            out["esm." + inverse_top[key]] = value.clone()
        elif m := re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias|inv_freq)$", key):
            layer, module, leaf = m.groups()
            out[f"esm.encoder.layer.{layer}.{inverse_layer[module]}.{leaf}"] = value.clone()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "esm", "architectures": ["EsmForMaskedLM"], "num_hidden_layers": cfg.encoder_layers,
              "hidden_size": cfg.encoder_embed_dim, "num_attention_heads": cfg.encoder_attention_heads,
              "intermediate_size": getattr(cfg, "encoder_ffn_embed_dim", 4 * cfg.encoder_embed_dim),
              "token_dropout": getattr(cfg, "token_dropout", True), "position_embedding_type": "rotary",
              "emb_layer_norm_before": False, "vocab_size": 33, "layer_norm_eps": 1e-5}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=1))
    if safetensors:
        write_safetensors(out, out_dir / "model.safetensors")
    else:
        torch.save(out, out_dir / "pytorch_model.bin")
    return out_dir
