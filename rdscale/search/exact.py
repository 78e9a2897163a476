"""Exact (brute-force) nearest neighbours: distances under rdscale's convention, and a blocked GEMM with a top-k
merge across blocks over a resident matrix.

Distances (smaller = closer): ``cosine`` -> ``1 - <q/|q|, x/|x|>`` (rows normalised once, when the matrix is made
resident); ``l2`` -> squared Euclidean distance via the Gram trick ``|q|^2 - 2 q.x + |x|^2`` (one GEMM per block,
clipped at 0 because cancellation can dip slightly below it). Pure numpy, no I/O.
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
    """Running top-k: the k smallest of (nq, a) and (nq, b) candidate lists, sorted, ties kept in arrival order."""
    cand_d = np.concatenate([best_d, d], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    if cand_d.shape[1] > k:
        part = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # keep arrival order among equals for the stable sort below
        cand_d = np.take_along_axis(cand_d, part, 1)
        cand_i = np.take_along_axis(cand_i, part, 1)
    order = np.argsort(cand_d, axis=1, kind="stable")
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
    """
    metric_cos = x_sq is None
    if metric_cos:
        qp, q_sq = unit_rows(q), None
    else:
        qp = np.ascontiguousarray(q, dtype=np.float32)
        q_sq = np.einsum("nw,nw->n", qp, qp)
    nq = qp.shape[0]
    n = x.shape[0] if rows is None else len(rows)
    best_d = np.empty((nq, 0), np.float32)
    best_i = np.empty((nq, 0), np.int64)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        if rows is None:
            xb, xb_sq, pos = x[start:stop], None if metric_cos else x_sq[start:stop], None
        else:
            pos = rows[start:stop]
            xb, xb_sq = x[pos], None if metric_cos else x_sq[pos]
        d = block_distances(qp, q_sq, xb, xb_sq)  # (nq, b)
        take = min(k, d.shape[1])
        if take < d.shape[1]:
            local = np.argpartition(d, take - 1, axis=1)[:, :take]  # (nq, take) block-local rows
            local.sort(axis=1)
        else:
            local = np.broadcast_to(np.arange(d.shape[1]), (nq, d.shape[1]))
        dd = np.take_along_axis(d, local, 1)
        ii = (local + start) if pos is None else pos[local]
        best_d, best_i = merge_topk(best_d, best_i, dd.astype(np.float32), ii.astype(np.int64), k)
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
