"""A packed (no padding) ESM-2 forward with fair-esm's weights and arithmetic.

The sequences of a batch are laid end to end: tokens (N,) with BOS/EOS around every sequence and
`cu_seqlens` (B + 1,) marking where each starts. Every matrix product (q/k/v, out, fc1, fc2) runs on the (N, k)
packed activations, so no FLOP is spent on padding. The differences from fair-esm's `ESM2.forward` are
arithmetic re-associations only:

- q, k, v come from one GEMM with the three projections concatenated (the layer's own weights, re-pointed to
  views of the fused matrix: no second copy in memory);
- fair-esm scales q by head_dim**-0.5 before the rotary rotation; the rotation is linear, so the scale is folded
  into q's rotary tables, and q and k are rotated together in one pass over (N, 2, H, D);
- rotary tables are computed in float32 and cast (as Embedder's SDPA path does; fair-esm builds them in the model
  dtype, which rounds positions above 256 in bfloat16);
- with no <mask> token in the input, token dropout's rescaling is the constant 1 - 0.15 * 0.8 (as in fair-esm).

In float32 the output equals fair-esm's to ~1e-6. Attention is computed per sequence by one of:

- "flash": FlashAttention's varlen kernel (package flash-attn; CUDA, fp16/bf16);
- "varlen": PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16; torch releases whose varlen_attn
  takes `scale`, which q's pre-scaled tables need);
- "nested": SDPA on a jagged nested tensor (any device; on CUDA it dispatches to the fused varlen kernels);
- "padded": pure PyTorch: the sequences are grouped by length bucket (T rounded up to a multiple of 64), each
  group's q/k/v scattered into a (B, H, T, D) batch and SDPA run with a key-padding mask (on CUDA B is rounded
  up to a multiple of 4 too). Only the attention sees padding (< 64 per sequence); the bucketing bounds the
  number of distinct shapes a run plans.
"auto" picks flash, then varlen, then nested on CUDA in half precision, and padded otherwise (CPU, float32/64).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rdscale.config import ATTENTION_BACKENDS
from rdscale.errors import ConfigError

T_BUCKET = 64
B_BUCKET = 4


def _varlen_attn():
    """PyTorch's varlen attention, or None where torch lacks it or its `scale` argument (the first releases of
    the API had none; q arrives pre-scaled here, so the kernel's default 1/sqrt(D) would scale it twice)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if _accepts_scale(varlen_attn) else None


def _accepts_scale(fn) -> bool:
    """Whether `fn` takes a `scale` argument (False where its signature cannot be read: do not guess)."""
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resolve_attention(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend "auto" means here, or a clear ValueError when a named one cannot run on this device/dtype."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = device.type == "cuda"
    have_flash = importlib.util.find_spec("flash_attn") is not None
    if backend == "auto":
        if cuda and half and have_flash:
            return "flash"
        if cuda and half and _varlen_attn() is not None:
            return "varlen"
        if cuda:
            return "nested"
        return "padded"
    if backend == "flash" and not (cuda and half and have_flash):
        raise ConfigError("attention backend 'flash' needs the flash-attn package, CUDA and float16/bfloat16")
    if backend == "varlen" and not (cuda and half and _varlen_attn() is not None):
        raise ConfigError("attention backend 'varlen' needs torch.nn.attention.varlen (a release whose varlen_attn "
                         "takes scale), CUDA and float16/bfloat16")
    return backend


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_by_tokens(lengths, toks_per_batch: int) -> list[list[int]]:
    """Indices grouped so that each batch's real tokens (residues + BOS/EOS) fit `toks_per_batch`; sorted by
    length (ties by index) so the padded attention fallback pads little. An over-budget sequence is a batch of
    its own. Every index appears exactly once."""
    if toks_per_batch < 1:
        raise ConfigError(f"toks_per_batch must be positive, got {toks_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    batch: list[int] = []
    used = 0
    for i in order:
        cost = lengths[i] + 2
        if batch and used + cost > toks_per_batch:
            batches.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += cost
    if batch:
        batches.append(batch)
    return batches


GIB = 1 << 30


def device_budget(name: str, total_memory: int | None, toks_per_batch: int,
                  by_device: dict[str, int] | None = None, toks_per_gib: int | None = None,
                  weight_bytes: int = 0) -> int:
    """The token budget (of the chain's largest model) on one device, from its name and memory in bytes.

    by_device: budgets keyed by part of the device's name, matched case-insensitively ("H100" matches
    "NVIDIA H100 80GB HBM3"; "cpu" the CPU); the longest matching key wins, so {"A100": a, "A100 80GB": b} tells
    the two A100s apart. No key matches: toks_per_gib tokens per GiB of the memory left after the chain's weights
    (`weight_bytes`), when both are known; else toks_per_batch."""
    low = name.lower()
    matches = [key for key in (by_device or {}) if key.lower() in low]
    if matches:
        return int(by_device[max(matches, key=len)])
    if toks_per_gib and total_memory:
        free_gib = max(0.0, (total_memory - weight_bytes) / GIB)
        return max(8, int(toks_per_gib * free_gib))
    return int(toks_per_batch)


def model_budgets(toks_per_batch: int, widths: Sequence[int], explicit: Sequence[int] | None = None,
                  max_scale: float = 8.0) -> list[int]:
    """Token budget per model of a chain. A model's FLOPs and activation memory per token grow with its width, so
    smaller models take budgets scaled by k_largest / k_i (at most `max_scale`x): fewer, larger batches keep a
    small model from being launch-bound. One model (extract): toks_per_batch as given."""
    if explicit is not None:
        return [int(b) for b in explicit]
    top = max(widths)
    return [int(toks_per_batch * min(max_scale, top / w)) for w in widths]


class FastESM2:
    """Packed forward of a fair-esm ESM2 (`esm.model.esm2.ESM2`), returning hidden states at any layer."""

    def __init__(self, model, attention: str = "auto", compile: bool = False):
        self.model = model
        first = model.layers[0].self_attn if model.num_layers else None
        if first is not None and (first.rot_emb is None or first.bias_k is not None):
            raise ValueError("the fast forward needs an ESM-2 model (rotary embeddings, no bias_kv)")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.attention = resolve_attention(attention, self.device, self.dtype)
        self.heads = first.num_heads if first is not None else 1
        self.head_dim = first.head_dim if first is not None else model.embed_dim
        self.scaling = first.scaling if first is not None else 1.0
        self.qkv = [self._fuse(layer.self_attn) for layer in model.layers]  # [(w (3k, k), b (3k,))]
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: (positions, 2, 1, D)
        self.attention_shapes: set[tuple[int, int]] = set()  # (B, T) planned by the padded backend so far
        # The elementwise work around the GEMMs (layer norms, rotary, residual adds, GELU) as two pure functions of
        # tensors; compile=True fuses them with torch.compile (dynamic token count: one graph per model width).
        self._pre, self._post = _pre_attention, _post_attention
        if compile:
            self._pre = torch.compile(_pre_attention, dynamic=True)
            self._post = torch.compile(_post_attention, dynamic=True)

    @staticmethod
    def _fuse(attn) -> tuple[torch.Tensor, torch.Tensor]:
        """One (3k, k) weight and (3k,) bias; q/k/v_proj are re-pointed to views of them (same values)."""
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight.detach() for p in projections])
        bias = torch.cat([p.bias.detach() for p in projections])
        k = attn.embed_dim
        for i, p in enumerate(projections):
            p.weight.data = weight[i * k : (i + 1) * k]
            p.bias.data = bias[i * k : (i + 1) * k]
        return weight, bias

    def _rotary(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (N, 2, 1, D) for q (scaled) and k at the given positions (all < needed), in the model dtype.
        `needed` comes from the host, so no device synchronisation happens here."""
        if self._tables is None or self._tables[0].shape[0] < needed:
            size = max(needed, 1024)
            d = self.head_dim
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=self.device).float() / d))
            t = torch.arange(size, device=self.device, dtype=torch.float32)
            emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # (size, D)
            # q, k; made on the host and copied without blocking: torch.tensor(..., device=cuda) would wait for
            # every queued kernel (a blocking copy synchronises the stream)
            scale = _to_device(torch.tensor([self.scaling, 1.0]), self.device)[None, :, None, None]
            cos = (emb.cos()[:, None, None, :] * scale).to(self.dtype)
            sin = (emb.sin()[:, None, None, :] * scale).to(self.dtype)
            self._tables = (cos, sin)
        cos, sin = self._tables
        return cos[positions], sin[positions]

    # ---------------------------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, cu_seqlens: list[int], layer: int) -> torch.Tensor:
        """tokens: (N,) ids on the device, BOS ... EOS per sequence, sequences back to back;
        cu_seqlens: B + 1 host ints (0, end of sequence 1, ..., N). -> (N, k) hidden states at `layer`
        (0 = scaled token embeddings, num_layers = after the final layer norm)."""
        m = self.model
        x = m.embed_scale * m.embed_tokens(tokens)  # (N, k)
        if m.token_dropout:
            # fair-esm's rescaling with zero observed <mask> tokens (the tokenizer never produces one)
            x = x * (1 - 0.15 * 0.8)
        if layer == 0:
            return x
        lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        starts = torch.tensor(cu_seqlens[:-1], dtype=torch.int64)
        seq_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (N,)
        positions = _to_device(torch.arange(cu_seqlens[-1]) - starts[seq_of], self.device)  # (N,)
        cos, sin = self._rotary(positions, max(lengths))
        attend = self._attention_fn(cu_seqlens, lengths, seq_of, positions)
        for i, block in enumerate(m.layers[:layer]):
            x = self._block(block, self.qkv[i], x, cos, sin, attend)
        if layer == m.num_layers:
            x = m.emb_layer_norm_after(x)
        return x

    __call__ = forward

    def _block(self, block, qkv_weights, x, cos, sin, attend) -> torch.Tensor:
        """One pre-LN ESM-2 layer on packed x: (N, k)."""
        ln1, ln2, out = block.self_attn_layer_norm, block.final_layer_norm, block.self_attn.out_proj
        q, k, v = self._pre(x, ln1.weight, ln1.bias, ln1.eps, *qkv_weights, cos, sin, self.heads, self.head_dim)
        o = attend(q, k, v)  # (N, H, D)
        return self._post(x, o, out.weight, out.bias, ln2.weight, ln2.bias, ln2.eps,
                          block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias)

    # ------------------------------------------------------------------------------------------------ attention

    def _attention_fn(self, cu_seqlens, lengths, seq_of, positions):
        """A function (q, k, v: (N, H, D)) -> (N, H, D) attending within each sequence; the per-batch index
        work is done once here, not per layer."""
        longest = max(lengths)
        # Index tensors are built on the host and copied with non_blocking=True: a blocking host-to-device copy
        # (also torch.tensor(..., device=cuda)) synchronises the stream, so the previous batch's forward would
        # drain before this batch's kernels are queued.
        if self.attention in ("flash", "varlen"):
            cu = _to_device(torch.tensor(cu_seqlens, dtype=torch.int32), self.device)
            if self.attention == "flash":
                from flash_attn import flash_attn_varlen_func

                return lambda q, k, v: flash_attn_varlen_func(
                    q, k, v, cu, cu, longest, longest, softmax_scale=1.0)
            varlen_attn = _varlen_attn()
            return lambda q, k, v: varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest,
                                               longest, scale=1.0)
        if self.attention == "nested":
            offsets = _to_device(torch.tensor(cu_seqlens, dtype=torch.int64), self.device)

            def nested(q, k, v):
                def nt(t):  # (N, H, D) -> jagged (B, H, j, D)
                    return torch.nested.nested_tensor_from_jagged(
                        t.contiguous(), offsets, max_seqlen=longest, min_seqlen=min(lengths)).transpose(1, 2)

                o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=1.0)
                return o.transpose(1, 2).values()

            return nested
        # padded: sequences grouped by length bucket (T rounded up to T_BUCKET), one SDPA call per group, so only
        # attention sees padding (< T_BUCKET per sequence) and a run sees a bounded set of attention shapes. On CUDA
        # the group size is bucketed too (shape plans are per shape there; on a CPU extra rows only cost time).
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(round_up(n, T_BUCKET), []).append(i)
        plans = []
        for t_pad, members in sorted(groups.items()):
            b_pad = round_up(len(members), B_BUCKET) if self.device.type == "cuda" else len(members)
            self.attention_shapes.add((b_pad, t_pad))
            tokens = torch.cat([torch.arange(cu_seqlens[i], cu_seqlens[i + 1]) for i in members])  # packed rows
            slot = torch.cat([row * t_pad + torch.arange(lengths[i]) for row, i in enumerate(members)])  # padded rows
            keep = None
            if b_pad != len(members) or any(lengths[i] != t_pad for i in members):
                valid = torch.zeros(b_pad, t_pad, dtype=torch.bool)
                for row, i in enumerate(members):
                    valid[row, : lengths[i]] = True
                valid[len(members):, 0] = True  # bucket-filler rows attend to one (zero) key, not none (NaN)
                keep = _to_device(valid, self.device)[:, None, None, :]  # (B, 1, 1, T)
            plans.append((_to_device(tokens, self.device), _to_device(slot, self.device), keep, b_pad, t_pad))

        def padded(q, k, v):
            n, heads, d = q.shape
            qkv = torch.stack((q, k, v), dim=1)  # (N, 3, H, D)
            out = torch.empty_like(q) if len(plans) > 1 else None
            for tokens, slot, keep, b_pad, t_pad in plans:
                buf = qkv.new_zeros(b_pad * t_pad, 3, heads, d)
                buf[slot] = qkv if out is None else qkv[tokens]
                qp, kp, vp = buf.view(b_pad, t_pad, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep, scale=1.0)
                o = o.transpose(1, 2).reshape(b_pad * t_pad, heads, d)[slot]
                if out is None:
                    return o
                out[tokens] = o
            return out

        return padded


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without synchronising it: a non-blocking copy from pageable memory is staged by
    the driver before the call returns (the host tensor may be freed at once), and queued behind earlier work."""
    return t.to(device, non_blocking=True)


def _pre_attention(x, ln_w, ln_b, eps: float, qkv_w, qkv_b, cos, sin, heads: int, head_dim: int):
    """x: (N, k) -> q, k, v: (N, H, D), rotary applied (q's scale is in its cos/sin tables)."""
    n = x.shape[0]
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    qkv = F.linear(h, qkv_w, qkv_b).view(n, 3, heads, head_dim)  # (N, 3, H, D)
    qk = qkv[:, :2]
    half = head_dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)  # fair-esm's rotate_half
    qk = qk * cos + rotated * sin  # (N, 2, H, D)
    return qk[:, 0], qk[:, 1], qkv[:, 2]


def _post_attention(x, o, out_w, out_b, ln_w, ln_b, eps: float, fc1_w, fc1_b, fc2_w, fc2_b):
    """x: (N, k), attention output o: (N, H, D) -> the layer's output (N, k)."""
    n, k = x.shape
    x = x + F.linear(o.reshape(n, k), out_w, out_b)
    h = F.layer_norm(x, (k,), ln_w, ln_b, eps)
    return x + F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


def packed_flops_per_token(layers: int, width: int, context: float) -> float:
    """Forward FLOPs per token of an ESM-2 layer stack (2 per multiply-add): 24 k^2 per layer for the GEMMs
    (q, k, v, out: 4 k^2; fc1, fc2: 8 k^2; times 2) plus 4 k * context for attention scores and values."""
    return layers * (24.0 * width * width + 4.0 * width * context)


__all__ = ["ATTENTION_BACKENDS", "FastESM2", "model_budgets", "pack_by_tokens", "packed_flops_per_token",
           "resolve_attention", "round_up"]
