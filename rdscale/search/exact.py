"""Exact (brute-force) nearest neighbours: distances under rdscale's convention, and a blocked GEMM with a top-k
merge across blocks over a resident matrix.

Distances (smaller = closer): ``cosine`` -> ``1 - <q/|q|, x/|x|>`` (rows normalised once, when the matrix is made
resident); ``l2`` -> squared Euclidean distance: candidates chosen via the Gram trick ``|q|^2 - 2 q.x + |x|^2`` (one
GEMM per block, clipped at 0), the top k's distances then computed from differences (the trick cancels). Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = 32768  # rows per GEMM block: (32768, 1280) float32 is 168 MB; (nq, 32768) scores per block


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero (their cosine distance to anything is 1)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def pairwise_distances(queries: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """(q, w) x (n, w) -> (q, n) float32 distances under the module's convention (smaller = closer)."""
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(rows, dtype=np.float32)
    if metric == "cosine":
        return 1.0 - unit_rows(q) @ unit_rows(x).T
    sq = (q * q).sum(1)[:, None] - 2.0 * (q @ x.T) + (x * x).sum(1)[None, :]
    return np.maximum(sq, 0.0)


def prepare_rows(x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The resident form of a (n, w) matrix: (unit rows, None) for cosine; (rows, (n,) squared norms) for l2."""
    if metric == "cosine":
        return np.ascontiguousarray(unit_rows(x)), None
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x, np.einsum("nw,nw->n", x, x)


def block_distances(q: np.ndarray, q_sq: np.ndarray | None, xb: np.ndarray, xb_sq: np.ndarray | None) -> np.ndarray:
    """(nq, b) distances of prepared queries to a block of prepared rows (see ``prepare_rows``)."""
    gram = q @ xb.T  # (nq, b): the one GEMM of the block
    if xb_sq is None:
        return 1.0 - gram
    return np.maximum(q_sq[:, None] - 2.0 * gram + xb_sq[None, :], 0.0)


def merge_topk(best_d: np.ndarray, best_i: np.ndarray, d: np.ndarray, i: np.ndarray, k: int):
    """Running top-k: the k smallest of (nq, a) and (nq, b) candidate lists, sorted, ties in arrival order (the
    first list's before the second's)."""
    cand_d = np.concatenate([best_d, d], axis=1)  # (nq, a + b): earlier arrivals first
    cand_i = np.concatenate([best_i, i], axis=1)
    order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]  # small (k + new candidates): a stable sort decides ties
    return np.take_along_axis(cand_d, order, 1), np.take_along_axis(cand_i, order, 1)


def topk(
    q: np.ndarray,
    x: np.ndarray,
    x_sq: np.ndarray | None,
    k: int,
    rows: np.ndarray | None = None,
    block_rows: int = BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of prepared rows ``x`` ((n, w) float32, see ``prepare_rows``) for raw queries ``q`` (nq, w).

    ``rows``: restrict to these row positions (a filter), else all rows. Returns ((nq, k') float32 distances,
    (nq, k') int64 row positions), sorted by distance, k' = min(k, rows searched). Memory: O(nq * block_rows).

    Once every query has k candidates (after a small first block), a block's scores are only compared with each
    query's current k-th distance and the few that beat it are merged: a selection over the whole (nq, b) block
    (argpartition) would cost about as much as the block's GEMM. Results are those of selecting everything."""
    metric_cos = x_sq is None
    if metric_cos:
        qp, q_sq = unit_rows(q), None
    else:
        qp = np.ascontiguousarray(q, dtype=np.float32)
        q_sq = np.einsum("nw,nw->n", qp, qp)
    nq = qp.shape[0]
    n = x.shape[0] if rows is None else len(rows)
    k_out = k
    if not metric_cos:  # l2: a few more, so that the exact distances below also settle who is k-th
        k = k + _L2_EXTRA
    best_d = np.empty((nq, 0), np.float32)
    best_i = np.empty((nq, 0), np.int64)
    scores = mask = None  # (nq, block_rows) buffers reused block after block: no fresh pages per block
    start = 0
    while start < n:
        stop = min(start + (min(block_rows, FIRST_BLOCK_ROWS) if start == 0 else block_rows), n)
        if rows is None:
            xb, xb_sq, pos = x[start:stop], None if metric_cos else x_sq[start:stop], None
        else:
            pos = rows[start:stop]
            xb, xb_sq = x[pos], None if metric_cos else x_sq[pos]
        if best_d.shape[1] < k:  # the first block(s): select
            d = block_distances(qp, q_sq, xb, xb_sq)  # (nq, b)
            take = min(k, d.shape[1])
            local = np.argsort(d, axis=1, kind="stable")[:, :take]  # (nq, take) block-local rows, ties in row order
            dd = np.take_along_axis(d, local, 1)
            ii = (local + start) if pos is None else pos[local]
            best_d, best_i = merge_topk(best_d, best_i, dd.astype(np.float32), ii.astype(np.int64), k)
        else:  # then: only what beats each query's k-th so far
            kth = best_d[:, -1:]  # (nq, 1)
            if metric_cos:
                if scores is None:
                    scores = np.empty((nq, block_rows), np.float32)
                    mask = np.empty((nq, block_rows), bool)
                b = stop - start
                gram = np.matmul(qp, xb.T, out=scores[:, :b])  # (nq, b); d = 1 - gram: d < kth needs
                np.greater(gram, (1.0 - kth) - _COS_SLACK, out=mask[:, :b])  # gram > 1 - kth (up to rounding)
                r, c = np.nonzero(mask[:, :b])
                dv = 1.0 - gram[r, c]
            else:
                d = block_distances(qp, q_sq, xb, xb_sq)
                r, c = np.nonzero(d < kth)
                dv = d[r, c]
            beat = dv < kth[r, 0]
            r, c, dv = r[beat], c[beat], dv[beat]
            if r.size:
                best_d, best_i = _merge_sparse(best_d, best_i, r, dv, (c + start) if pos is None else pos[c], k)
        start = stop
    if not metric_cos:
        return _exact_l2(qp, x, best_d, best_i, k_out)
    return best_d, best_i


def _exact_l2(q: np.ndarray, x: np.ndarray, best_d: np.ndarray, best_i: np.ndarray, k: int):
    """The candidates' squared distances computed from differences, re-sorted, cut to k.

    The Gram trick cancels: with |x|^2 ~ 34 and neighbours at 0.09 its float32 result is off by ~4e-5 (a
    relative 5e-4), enough to swap near neighbours; (x - q)^2 over k candidates costs next to nothing."""
    out_d = np.empty((len(q), min(k, best_d.shape[1])), np.float32)
    out_i = np.empty(out_d.shape, np.int64)
    step = max(1, (1 << 24) // max(1, best_i.shape[1] * x.shape[1]))  # queries per (step, k, w) block: <= 64 MB
    for s in range(0, len(q), step):
        diff = x[best_i[s : s + step]] - q[s : s + step, None, :]  # (b, k', w)
        d = np.einsum("qsw,qsw->qs", diff, diff)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]  # equal distances keep their row order
        out_d[s : s + step] = np.take_along_axis(d, order, 1)
        out_i[s : s + step] = np.take_along_axis(best_i[s : s + step], order, 1)
    return out_d, out_i


_L2_EXTRA = 8  # extra l2 candidates re-ranked exactly
FIRST_BLOCK_ROWS = 1024  # a cheap first selection gives every query its k-th distance to compare against
_COS_SLACK = 1e-6  # float32 rounding of 1 - gram near 1 is ~6e-8: compare a little wide, then exactly


def _merge_sparse(best_d, best_i, r, dv, iv, k):
    """Merge candidates (query r[j], distance dv[j], row iv[j]), grouped by query in arrival order, into the
    running top-k of the queries that have any."""
    queries, first, counts = np.unique(r, return_index=True, return_counts=True)
    pad_d = np.full((len(queries), counts.max()), np.inf, np.float32)  # (u, m): inf never enters a full top-k
    pad_i = np.full((len(queries), counts.max()), -1, np.int64)
    which = np.repeat(np.arange(len(queries)), counts)
    slot = np.arange(r.size) - np.repeat(first, counts)
    pad_d[which, slot] = dv
    pad_i[which, slot] = iv
    best_d[queries], best_i[queries] = merge_topk(best_d[queries], best_i[queries], pad_d, pad_i, k)
    return best_d, best_i


def rerank(q: np.ndarray, x_rows: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances of each query to its own candidates: q (nq, w), x_rows (nq, s, w) -> (nq, s) float32."""
    x_rows = np.asarray(x_rows, dtype=np.float32)
    q = np.asarray(q, dtype=np.float32)
    if metric == "cosine":
        xn = x_rows / np.maximum(np.linalg.norm(x_rows, axis=2, keepdims=True), np.finfo(np.float32).tiny)
        return 1.0 - np.einsum("qsw,qw->qs", xn, unit_rows(q))
    diff = x_rows - q[:, None, :]
    return np.einsum("qsw,qsw->qs", diff, diff)
