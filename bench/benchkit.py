"""What several benchmarks (and a few tests) share: timing, the in-process config of a benchmark run, where the
machine's description and the results JSON go, a counting proxy in front of a local S3 server, the process's peak
memory, and a synthetic run store for the driver-memory measurements of dedupe.

Benchmarks run as scripts (`python bench/bench_x.py`), so `import benchkit` finds this file beside them; tests load
it by path (tests/helpers.py: `bench_module`)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


# -- timing and results ---------------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs):
    """(seconds, result) of calling fn(*args, **kwargs)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def cfg_for(tmp: Path, fasta: Path, models, out: str, **extra):
    """The config of an in-process benchmark run (LocalExecutor, small shards, no compaction) of `models` over
    `fasta` into tmp/out; `extra`: more `key=value` overrides (e.g. **{"fit.artifact": path})."""
    from rdscale.config import load_config

    items = [f"input.paths=['{fasta}']", f"models={[str(m) for m in models]}", f"output.dir={tmp / out}",
             "ray.address=local", "input.shard_mb=0.05", "output.compact=false"]
    items += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, items)


def torch_machine() -> dict[str, Any]:
    """Where a torch benchmark ran: device (and GPU), torch, platform, threads."""
    import torch

    cuda = torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "torch": torch.__version__, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def rates(names: list[str], residues: dict[str, int], wall: dict[str, list[float]],
          cpu: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant, from its median wall and CPU seconds: residues/s, residues per CPU s, and both as ratios to
    the first variant's (the baseline measured side by side in the same run)."""
    out = {}
    for name in names:
        out[name] = {"rate": residues[name] / median(wall[name]), "cpu_rate": residues[name] / median(cpu[name])}
    base = out[names[0]]
    for r in out.values():
        r["ratio"], r["cpu_ratio"] = r["rate"] / base["rate"], r["cpu_rate"] / base["cpu_rate"]
    return out


def write_results(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


# -- an S3 request counter (bench_search_s3.py, bench_scale.py --s3) ------------------------------------------------


_REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")


class Proxy:
    """A TCP proxy for an HTTP server (localhost): counts the requests it forwards by kind and holds each one back
    ``delay`` seconds (a request line seen in the client's stream) before passing it on."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.delay = 0.0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> dict[str, int]:
        with self.lock:
            out, self.counts = self.counts, {}
        return out

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if requests:
                    found = _REQUEST.findall(data)
                    if found:
                        with self.lock:
                            for method, path in found:
                                kind = method.decode()
                                if kind == "GET" and (b"list-type" in path or b"prefix=" in path):
                                    kind = "LIST"
                                self.counts[kind] = self.counts.get(kind, 0) + 1
                        if self.delay:
                            time.sleep(self.delay * len(found))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- memory (Linux) -------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server the bench starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kb(field: str, pid: int | str = "self") -> int:
    """A field of /proc/<pid>/status in kB (VmRSS: resident now; VmHWM: peak resident); OSError if the process
    is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def reset_peak() -> None:
    """VmHWM := the current RSS (Linux >= 4.0), so that what ran before (imports, set-up) drops out of the peak."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(fn):
    """(result, seconds, peak MB above the RSS before fn)."""
    reset_peak()
    before = status_kb("VmRSS")
    seconds, result = timed(fn)
    return result, seconds, (status_kb("VmHWM") - before) * 1024 / MB


# -- a synthetic run store ------------------------------------------------------------------------------------------


def open_synthetic_store(root):
    """The RunStore of a synthetic store at `root` (created when absent): width 1, no residues table."""
    from rdscale.io.store import RunStore, run_schemas, schema_metadata

    schemas = run_schemas(1, None, schema_metadata([1], {}, {}, "k"), residues=False)
    return RunStore(root, schemas, "k")


def synthetic_store(root, n_ids: int, seed: int = 0, shards: int = 50, expected: bool = True,
                    chunk: int = 2_000_000):
    """A run store (rdscale.io.store.RunStore) holding n_ids protein ids "UPI%010d" (no embeddings worth the name:
    width 1, no residues) over `shards` shards in id order, with known cross-shard duplicates: 0.1% of the ids again
    in a later shard (a quarter of those a third time, in shard `shards` + 3), 0.05% of the ids among the rejects one
    shard earlier (the protein must move), and 100 unrelated rejects. Rows are written `chunk` at a time, so 1e7 ids
    never exist as Python strings at once.

    Returns (store, moved, first): with `expected`, the (id, shard) pairs dedupe must move and the first shard of
    every id, computed the slow obvious way (a Python loop: tests, up to ~1e6 ids); else (store, None, None)."""
    import lance
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from rdscale.io.store import PROTEINS, REJECTS

    def id_strings(index: np.ndarray) -> pa.Array:  # (m,) int -> "UPI%010d" strings, vectorised
        return pc.binary_join_element_wise("UPI", pc.utf8_lpad(pa.array(index).cast(pa.string()), 10, "0"), "")

    rng = np.random.default_rng(seed)
    store = open_synthetic_store(root)
    schemas = store.schemas
    shard = np.sort(rng.integers(0, shards, n_ids)).astype(np.int32)  # (n_ids,) shard of each id
    dup = rng.choice(n_ids, n_ids // 1000, replace=False)
    p_index = np.concatenate([np.arange(n_ids), dup, dup[: len(dup) // 4]])  # (n,) id number of each protein row
    p_shard = np.concatenate([shard, np.minimum(shard[dup] + 1 + rng.integers(0, 3, len(dup)), shards + 2),
                              np.full(len(dup) // 4, shards + 3)]).astype(np.int32)
    n = len(p_index)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        k = hi - lo
        lance.write_dataset(pa.table({
            "id": id_strings(p_index[lo:hi]), "description": pa.array([""] * k),
            "length": pa.array(np.ones(k, np.int32)), "sequence": pa.array(["M"] * k),
            "source": pc.binary_join_element_wise("f:", pa.array(np.arange(lo, hi)).cast(pa.string()), ""),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(k, np.float32)), 1),
            "shard": pa.array(p_shard[lo:hi])}, schema=schemas[PROTEINS]), store.uri(PROTEINS), mode="append")
    rej_src = rng.choice(n_ids, n_ids // 2000, replace=False)
    rej_ids = pa.concat_arrays([id_strings(rej_src), pa.array([f"BAD{i}" for i in range(100)], pa.string())])
    rej_shard = np.concatenate([shard[rej_src] - 1, np.zeros(100, np.int32)]).astype(np.int32)
    lance.write_dataset(pa.table({"id": rej_ids, "source": pa.array(["r"] * len(rej_ids)),
                                  "reason": pa.array(["invalid_characters"] * len(rej_ids)),
                                  "shard": pa.array(rej_shard)}, schema=schemas[REJECTS]),
                        store.uri(REJECTS), mode="append")
    if not expected:
        return store, None, None
    p_ids = [f"UPI{i:010d}" for i in p_index.tolist()]
    first: dict[str, int] = {}
    for i, s in zip(p_ids + rej_ids.to_pylist(), np.concatenate([p_shard, rej_shard]).tolist()):
        first[i] = min(first.get(i, s), s)
    moved = {(i, int(s)) for i, s in zip(p_ids, p_shard.tolist()) if s > first[i]}
    return store, moved, first
