"""What the content check of inputs costs: sha256 of a FASTA file (what every start of a run adds, once per local
input: rdscale.run.integrity.content_digests) next to the FASTA reader on the same file (what one pass of a run or
a `verify` reads anyway), in MB/s, and the hash as a fraction of the reading pass.

Prints a table and writes JSON (default bench/results/bench_input_hash.json). Not a test: timings depend on the
machine. A few seconds at the default 200 MB.

    python bench/bench_input_hash.py
    python bench/bench_input_hash.py --mb 1000
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchkit import write_results  # noqa: E402

from rdscale.io.fasta import read_fasta  # noqa: E402
from rdscale.run.integrity import content_digests  # noqa: E402


def make_fasta(path: Path, mb: float) -> None:
    rng = random.Random(0)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    block = []
    for i in range(2000):
        seq = "".join(rng.choice(letters) for _ in range(rng.randint(50, 600)))
        block.append(f">UniRef50_{i:08d} n=1 Tax=x\n" + "\n".join(seq[j:j + 60] for j in range(0, len(seq), 60)) + "\n")
    chunk = "".join(block).encode()
    with open(path, "wb") as f:
        for _ in range(max(1, int(mb * (1 << 20) / len(chunk)))):
            f.write(chunk)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_input_hash.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.fasta"
        make_fasta(path, args.mb)
        size_mb = path.stat().st_size / (1 << 20)
        hash_s = best(lambda: content_digests([str(path)]), args.repeat)
        read_s = best(lambda: sum(1 for _ in read_fasta(path)), 1)
    rows = {"sha256 (content check, per start)": hash_s, "FASTA reader (one pass)": read_s}
    print(f"{'what':38} {'s':>8} {'MB/s':>9}   ({size_mb:.0f} MB file, page cache warm)")
    for name, s in rows.items():
        print(f"{name:38} {s:8.2f} {size_mb / s:9.0f}")
    print(f"hash / reading pass: {hash_s / read_s:.1%}")
    write_results(args.out, {"machine": {"platform": platform.platform(), "python": platform.python_version()},
                             "file_mb": size_mb, "sha256_s": hash_s, "reader_s": read_s,
                          "sha256_mb_s": size_mb / hash_s, "reader_mb_s": size_mb / read_s,
                          "hash_over_read": hash_s / read_s})


if __name__ == "__main__":
    main()
