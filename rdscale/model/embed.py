"""Per-residue embeddings from one ESM-2 model: token-budget batching and long-sequence windows.

The forward pass is fair-esm's ESM2 computed with the model's own weights, rewritten around
``torch.nn.functional.scaled_dot_product_attention`` (fused attention kernels on CPU and GPU, no (B, H, T, T)
attention matrix kept) and stopped at the requested layer. Two further differences from ``model(tokens)``:
rotary tables are computed in float32 and then cast (fair-esm builds them in the model dtype, so in bfloat16
positions above 256 are rounded), and the LM head is skipped. In float32 it matches fair-esm's forward to
~1e-6; ``attention="esm"`` calls fair-esm's own forward instead (a reference path, used by the tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rdscale.config import FORWARDS, LONG_POLICIES
from rdscale.errors import ConfigError
from rdscale.model.fast_esm import FastESM2, pack_by_tokens
from rdscale.model.loading import LoadedModel

log = logging.getLogger(__name__)

_EXTRA_TOKENS = 2  # BOS and EOS around every sequence
MIN_OOM_WINDOW = 16  # residues: a piece this short that still runs out of memory is not split further

# What a forward raises when the device's memory is exhausted. torch.cuda.OutOfMemoryError on CUDA; CPU allocations
# that fail raise RuntimeError and are not caught (a host out of memory is not a batch-size problem).
OutOfMemory = torch.cuda.OutOfMemoryError

# Forward wrapper: (forward, flat token ids (N,), cu_seqlens of its pieces) -> the forward's result. The supported
# hook for fault injection (Embedder.forward_wrapper): a test raises OutOfMemory from it at a chosen batch size.
ForwardWrapper = Callable[[Callable[[], torch.Tensor], int, int], torch.Tensor]


def inject_oom(at_batch_size: int | None = None, above_tokens: int | None = None) -> ForwardWrapper:
    """A forward_wrapper that raises OutOfMemory, as a GPU would, for a batch of at least `at_batch_size` sequences
    or more than `above_tokens` tokens (BOS/EOS included), and runs every other forward. For tests and drills
    (ray.fault_injection: {oom_at_batch_size: N} / {oom_above_tokens: N})."""

    def wrapper(run: Callable[[], torch.Tensor], tokens: int, sequences: int) -> torch.Tensor:
        if (at_batch_size is not None and sequences >= at_batch_size) or (
                above_tokens is not None and tokens > above_tokens):
            raise OutOfMemory(f"injected: CUDA out of memory ({sequences} sequences, {tokens} tokens)")
        return run()

    return wrapper


def pack_batches(lengths: Sequence[int], toks_per_batch: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sequence indices into batches of similar length under a token budget.

    Indices are sorted by length (ties by index) and packed greedily so that
    ``(max length in batch + 2) * batch size <= toks_per_batch`` (the +2 is BOS/EOS; this is fair-esm's
    ``FastaBatchedDataset.get_batch_indices`` with ``extra_toks_per_seq=2``). A sequence over the budget on its
    own gets a batch of its own. Every index appears exactly once; batches come shortest first.
    """
    if toks_per_batch < 1:
        raise ConfigError(f"toks_per_batch must be positive, got {toks_per_batch}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be positive or None, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        padded = max(longest, lengths[i] + _EXTRA_TOKENS)
        full = max_batch_size is not None and len(batch) >= max_batch_size
        if batch and (padded * (len(batch) + 1) > toks_per_batch or full):
            batches.append(batch)
            batch, padded = [], lengths[i] + _EXTRA_TOKENS
        batch.append(i)
        longest = padded
    if batch:
        batches.append(batch)
    return batches


def plan_windows(length: int, window: int = 1022, overlap: int | None = None) -> list[tuple[int, int]]:
    """Residue ranges [start, end) of overlapping windows covering a sequence, each at most `window` long.

    One window if the sequence fits. Otherwise the fewest windows of exactly `window` residues whose
    consecutive overlaps are all >= `overlap` (default window // 4), spread evenly from the first residue to
    the last.
    """
    if window < 1:
        raise ConfigError(f"window must be positive, got {window}")
    overlap = window // 4 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise ConfigError(f"overlap must be in [0, window), got overlap={overlap}, window={window}")
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    if length <= window:
        return [(0, length)]
    stride = window - overlap
    n = -(-(length - window) // stride) + 1  # ceil division: gaps between starts are then <= stride
    span = length - window
    starts = [(i * span) // (n - 1) for i in range(n)]
    return [(s, s + window) for s in starts]


def stitch_plan(windows: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int, int]]:
    """Which window supplies each residue: contiguous (window index, start, end) runs covering [0, length).

    Each residue comes from the window in which it is farthest from an artificial edge (a window boundary
    that is not also the sequence's own start or end), ties to the earlier window; every residue gets
    exactly one embedding.
    """
    pos = np.arange(length)
    score = np.full((len(windows), length), -1.0)  # (n_windows, length); -1 = not covered
    for w, (start, end) in enumerate(windows):
        inside = pos[start:end]
        left = inside - start if start > 0 else np.full(len(inside), np.inf)
        right = end - 1 - inside if end < length else np.full(len(inside), np.inf)
        score[w, start:end] = np.minimum(left, right)
    if (score.max(axis=0) < 0).any():
        raise ValueError(f"windows {list(windows)} do not cover [0, {length})")
    owner = score.argmax(axis=0)  # (length,)
    cuts = np.flatnonzero(np.diff(owner)) + 1
    bounds = [0, *cuts.tolist(), length]
    return [(int(owner[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class EmbedStats:
    """Counters of one Embedder, summed over calls (for logs and benchmarks)."""

    sequences: int = 0
    residues: int = 0  # residues returned
    windows: int = 0  # pieces run through the model (= sequences when nothing is windowed)
    batches: int = 0
    tokens: int = 0  # real tokens, BOS/EOS included
    padded_tokens: int = 0  # batch * max length, summed over batches
    truncated: list[int] = field(default_factory=list)  # indices (per call) of truncated sequences, last call
    oom_splits: int = 0  # batches split (or single pieces windowed) after running out of device memory


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Embedder:
    """Per-residue embeddings of one model's layer, for any number of sequences of any length.

    layer: 0 = token embeddings, n = last layer (after the final layer norm, as fair-esm returns it),
        negative counts from the end (-1 = last), like esm-extract's --repr_layers.
    toks_per_batch: token budget per forward, BOS/EOS and padding included (see pack_batches).
    long_policy for sequences longer than `window` residues:
        "window": overlapping windows of <= window residues (each with BOS/EOS), stitched so each residue
            comes from the window where it is farthest from an edge; output has one row per residue.
        "truncate": only the first `window` residues are embedded; output has `window` rows.
        "reject": embed() raises ValueError naming them; use too_long() to filter beforehand.
    attention: "sdpa" (default, fused attention) or "esm" (fair-esm's own forward; reference, slower).
    forward: "fast" (default: packed batches without padding, rdscale.model.fast_esm; token budget counts real
        tokens only) or "plain" (padded (B, T) batches, the forward below; budget counts padding too).
        Ignored with attention="esm".
    fast_attention: attention backend of the fast forward (rdscale.model.fast_esm.ATTENTION_BACKENDS).
    compile: fuse the fast forward's elementwise work with torch.compile (first batch compiles, tens of seconds).

    Out-of-memory back-off: a batch whose forward raises torch.cuda.OutOfMemoryError is split in halves and
    retried (down to one piece, then one piece in overlapping windows of half its length, down to
    MIN_OOM_WINDOW residues); the token budget drops below the failed batch's tokens for the rest of this
    Embedder's life, and one warning line is logged per event. Splitting a batch changes no number (every
    sequence is embedded on its own either way); windowing a single sequence does (like long_policy="window").
    forward_wrapper: None, or a callable (run, tokens, sequences) -> run() around every forward; fault injection.

    embed() returns, per sequence, an ordinary (not inference-mode) tensor (L_i, k) on the model's device in
    the model's dtype: float32 on CPU, bfloat16/float16 on GPU as resolved by load_model.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layer: int = -1,
        toks_per_batch: int = 4096,
        long_policy: str = "window",
        window: int = 1022,
        overlap: int | None = None,
        max_batch_size: int | None = None,
        attention: str = "sdpa",
        forward: str = "fast",
        fast_attention: str = "auto",
        compile: bool = False,
    ):
        self.loaded = loaded
        self.model = loaded.model
        n_layers = self.model.num_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ConfigError(f"layer must be in [{-(n_layers + 1)}, {n_layers}] for {loaded.spec.name}, got {layer}")
        self.layer = layer % (n_layers + 1)
        if long_policy not in LONG_POLICIES:
            raise ConfigError(f"long_policy must be one of {LONG_POLICIES}, got {long_policy!r}")
        if attention not in ("sdpa", "esm"):
            raise ValueError(f"attention must be 'sdpa' or 'esm', got {attention!r}")
        plan_windows(window + 1, window, overlap)  # validates window and overlap
        if toks_per_batch < 1:
            raise ConfigError(f"toks_per_batch must be positive, got {toks_per_batch}")
        self.toks_per_batch = toks_per_batch
        self.long_policy = long_policy
        self.window = window
        self.overlap = window // 4 if overlap is None else overlap
        self.max_batch_size = max_batch_size
        self.attention = attention
        if forward not in FORWARDS:
            raise ConfigError(f"forward must be one of {FORWARDS}, got {forward!r}")
        self.forward = forward if attention == "sdpa" else "plain"
        self.stats = EmbedStats()
        self.forward_wrapper: ForwardWrapper | None = None
        self._fast = None
        if self.forward == "fast":
            self._fast = FastESM2(self.model, attention=fast_attention, compile=compile)

        alphabet = loaded.alphabet
        self._bos, self._eos, self._pad = alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx
        self._lookup = np.full(128, -1, dtype=np.int64)  # ASCII code -> token id, -1 = not a residue letter
        for tok in alphabet.standard_toks:
            if len(tok) == 1:
                self._lookup[ord(tok)] = alphabet.get_idx(tok)
        if self.attention == "sdpa":
            attn = self.model.layers[0].self_attn if n_layers else None
            if attn is not None and (attn.rot_emb is None or attn.bias_k is not None):
                raise ValueError("attention='sdpa' needs an ESM-2 model (rotary, no bias_kv); use attention='esm'")

    @property
    def width(self) -> int:
        return self.model.embed_dim

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def too_long(self, sequence: str) -> bool:
        """Longer than one window (what long_policy applies to)."""
        return len(sequence) > self.window

    def tokenize(self, sequence: str) -> np.ndarray:
        """(L,) int64 token ids of the residues (no BOS/EOS); ValueError on letters outside the ESM alphabet."""
        try:
            codes = np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError:
            codes = None
        ids = self._lookup[codes] if codes is not None and codes.max(initial=0) < 128 else None
        if ids is None or (ids < 0).any():
            bad = sorted({c for c in sequence if not (ord(c) < 128 and self._lookup[ord(c)] >= 0)})
            raise ValueError(f"characters {bad} are not ESM residue letters (expected upper-case, e.g. ACDEFGHIKLMNPQRSTVWYX)")
        return ids

    # ---------------------------------------------------------------------------------------------------------

    def embed(self, sequences: Sequence[str]) -> list[torch.Tensor]:
        """One (L_i, k) tensor per sequence, in input order (rows = window rows for truncated sequences)."""
        if isinstance(sequences, str):
            raise TypeError("embed() takes a sequence of strings, not one string; wrap it in a list")
        tokens = []
        for i, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"sequence {i} is empty")
            try:
                tokens.append(self.tokenize(seq))
            except ValueError as e:
                raise ValueError(f"sequence {i}: {e}") from None
        lengths = [len(t) for t in tokens]
        long = [i for i, n in enumerate(lengths) if n > self.window]
        if long and self.long_policy == "reject":
            shown = ", ".join(f"{i} ({lengths[i]} residues)" for i in long[:10])
            more = f" and {len(long) - 10} more" if len(long) > 10 else ""
            raise ValueError(
                f"{len(long)} sequence(s) longer than the {self.window}-residue window: {shown}{more}; "
                f"filter with Embedder.too_long() or use long_policy='window' or 'truncate'"
            )

        # pieces: (sequence index, start, end) residue ranges, each run through the model as its own sequence
        pieces: list[tuple[int, int, int]] = []
        # per sequence: (piece index, start, end) runs whose rows, concatenated, are its output
        plans: list[list[tuple[int, int, int]]] = []
        for i, n in enumerate(lengths):
            if n <= self.window or self.long_policy == "truncate":
                end = min(n, self.window)
                plans.append([(len(pieces), 0, end)])
                pieces.append((i, 0, end))
            else:
                windows = plan_windows(n, self.window, self.overlap)
                first = len(pieces)
                pieces.extend((i, s, e) for s, e in windows)
                plans.append([(first + w, a, b) for w, a, b in stitch_plan(windows, n)])

        outputs: list[torch.Tensor | None] = [None] * len(pieces)
        piece_tokens = [tokens[i][s:e] for i, s, e in pieces]  # each (L_p,) int64
        self._embed_pieces(piece_tokens, outputs)
        results: list[torch.Tensor] = []
        for plan in plans:
            if len(plan) == 1:
                results.append(outputs[plan[0][0]])
            else:
                results.append(torch.cat([outputs[p][a - pieces[p][1] : b - pieces[p][1]] for p, a, b in plan]))
        self.stats.sequences += len(lengths)
        self.stats.residues += sum(r.shape[0] for r in results)
        self.stats.windows += len(pieces)
        self.stats.truncated = [i for i in long if self.long_policy == "truncate"]
        return results

    def _plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Batches of piece indices under the current token budget (packed: real tokens; plain: padded)."""
        if self._fast is not None:
            return pack_by_tokens(lengths, self.toks_per_batch)
        return pack_batches(lengths, self.toks_per_batch, self.max_batch_size)

    def _embed_pieces(self, pieces: list[np.ndarray], outputs: list) -> None:
        """outputs[p] := (L_p, k) for every piece p (token ids without BOS/EOS), batch by batch, splitting a
        batch that runs out of device memory (see the class docstring)."""
        queue = self._plan([len(p) for p in pieces])
        queue.reverse()  # a stack: split halves go back on top and run next
        while queue:
            batch = queue.pop()
            try:
                hidden = self._run_batch([pieces[p] for p in batch])
            except OutOfMemory:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the failed forward's blocks, back before the retry
                tokens = sum(len(pieces[p]) + _EXTRA_TOKENS for p in batch)
                self.stats.oom_splits += 1
                if len(batch) > 1:
                    # Below the failed batch's tokens from now on: later batches of this shape do not fail again.
                    self.toks_per_batch = max(1, min(self.toks_per_batch, tokens // 2))
                    half = len(batch) // 2
                    queue += [batch[half:], batch[:half]]
                    log.warning("out of memory on a batch of %d sequences (%d tokens) on %s: split in two; token "
                                "budget now %d", len(batch), tokens, self.device, self.toks_per_batch)
                    continue
                # Below this piece's tokens: its windows (half as long, each with its own BOS/EOS) run one by one.
                self.toks_per_batch = max(1, min(self.toks_per_batch, tokens - 1))
                outputs[batch[0]] = self._embed_windowed(pieces[batch[0]], tokens)
                continue
            for p, h in zip(batch, hidden):
                outputs[p] = h

    def _embed_windowed(self, piece: np.ndarray, tokens: int) -> torch.Tensor:
        """(L, k) of one piece that ran out of memory alone: overlapping windows of half its length, stitched like
        long_policy="window" (each window through _embed_pieces, so a window that still fails is halved again)."""
        n = len(piece)
        window = n // 2
        if window < MIN_OOM_WINDOW:
            raise OutOfMemory(f"out of memory on one piece of {n} residues on {self.device}, even after splitting")
        overlap = min(self.overlap, window // 4)
        windows = plan_windows(n, window, overlap)
        log.warning("out of memory on one sequence of %d residues (%d tokens) on %s: embedded in %d windows of %d",
                    n, tokens, self.device, len(windows), window)
        outs: list = [None] * len(windows)
        self._embed_pieces([piece[s:e] for s, e in windows], outs)
        return torch.cat([outs[w][a - windows[w][0] : b - windows[w][0]] for w, a, b in stitch_plan(windows, n)])

    def _run_batch(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """One forward over `pieces` (token ids without BOS/EOS) -> per piece (L_p, k), each owning its memory."""
        tokens = sum(len(p) + _EXTRA_TOKENS for p in pieces)
        if self._fast is not None:
            ids, cu = [], [0]
            for p in pieces:
                ids += [np.array([self._bos]), p, np.array([self._eos])]
                cu.append(cu[-1] + len(p) + _EXTRA_TOKENS)
            flat = torch.from_numpy(np.concatenate(ids))  # (N,)

            def run() -> torch.Tensor:
                with torch.inference_mode():
                    return self._fast(flat.to(self.device, non_blocking=True), cu, self.layer)  # (N, k)

            hidden = run() if self.forward_wrapper is None else self.forward_wrapper(run, tokens, len(pieces))
            # Outside inference mode, clone() gives ordinary tensors, each owning its memory (a kept output does
            # not pin the batch).
            out = [hidden[a + 1 : b - 1].clone() for a, b in zip(cu[:-1], cu[1:])]  # (L, k): BOS and EOS dropped
            padded = cu[-1]
        else:
            batch_tokens = self._batch_tokens(pieces)
            # Whether the batch is padded is read on the host: on the device it would be a synchronisation.
            has_padding = bool(batch_tokens.eq(self._pad).any())

            def run() -> torch.Tensor:
                with torch.inference_mode():
                    return self._forward(batch_tokens.to(self.device, non_blocking=True), has_padding)  # (B, T, k)

            hidden = run() if self.forward_wrapper is None else self.forward_wrapper(run, tokens, len(pieces))
            # Outside inference mode, clone() gives ordinary tensors that do not pin the whole batch in memory.
            out = [hidden[row, 1 : 1 + len(p)].clone() for row, p in enumerate(pieces)]
            padded = batch_tokens.numel()
        self.stats.batches += 1
        self.stats.tokens += tokens
        self.stats.padded_tokens += padded
        return out

    def _batch_tokens(self, pieces: list[np.ndarray]) -> torch.Tensor:
        """(B, T) int64: BOS, residues, EOS, then padding."""
        longest = max(len(p) for p in pieces)
        out = np.full((len(pieces), longest + _EXTRA_TOKENS), self._pad, dtype=np.int64)
        for row, ids in enumerate(pieces):
            out[row, 0] = self._bos
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self._eos
        return torch.from_numpy(out)

    # ---------------------------------------------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, has_padding: bool | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, k) hidden states at self.layer. `has_padding`: whether any token is padding,
        when the caller knows it (None: read from `tokens`, a host synchronisation on a GPU)."""
        if self.attention == "esm":
            return self.model(tokens, repr_layers=[self.layer])["representations"][self.layer]
        m = self.model
        padding = tokens.eq(m.padding_idx)  # (B, T)
        x = m.embed_scale * m.embed_tokens(tokens)  # (B, T, k)
        if m.token_dropout:
            # ESM-2 was trained with 15% * 80% of tokens masked and rescales embeddings to match; with no
            # <mask> tokens in the input this is a constant factor, kept in fair-esm's form for exactness.
            is_mask = tokens.eq(m.mask_idx)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            observed = is_mask.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
        if has_padding is None:
            has_padding = bool(padding.any())
        if has_padding:
            x = x * (1 - padding.unsqueeze(-1).type_as(x))
        if self.layer == 0:
            return x
        keep = ~padding[:, None, None, :] if has_padding else None  # (B, 1, 1, T): True = attend to this key
        cos, sin = self._rotary(tokens.shape[1], x)
        for block in m.layers[: self.layer]:
            x = self._block(block, x, keep, cos, sin)
        if self.layer == m.num_layers:
            x = m.emb_layer_norm_after(x)
        return x

    def _rotary(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (T, head_dim) rotary tables, computed in float32, cast to the model dtype."""
        head_dim = self.model.layers[0].self_attn.head_dim
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=like.device).float() / head_dim))
        t = torch.arange(length, device=like.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    @staticmethod
    def _block(block, x: torch.Tensor, keep, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One pre-LN transformer layer of ESM-2 (esm.modules.TransformerLayer) on x: (B, T, k)."""
        attn = block.self_attn
        b, t, k = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        h = block.self_attn_layer_norm(x)
        # fair-esm scales q before the rotary rotation; rotation is linear, so this equals SDPA's own scaling.
        q = (attn.q_proj(h) * attn.scaling).view(b, t, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
        kk = attn.k_proj(h).view(b, t, heads, head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, heads, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        kk = kk * cos + _rotate_half(kk) * sin
        o = F.scaled_dot_product_attention(q, kk, v, attn_mask=keep, scale=1.0)  # (B, H, T, D)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(b, t, k))
        h = block.final_layer_norm(x)
        return x + block.fc2(F.gelu(block.fc1(h)))
