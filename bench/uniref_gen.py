"""UniRef-shaped FASTA databases of any size, deterministic by seed: for the scale bench and for tests at small N.

What is UniRef-like about them:
- lengths: a lognormal fitted to UniRef50 (median 270, sigma 0.75: ~4% of records past 1,022 residues, the
  ESM-2 window) plus a thin Pareto tail up to 35,213 (UniRef50's longest clusters are titins of ~35k);
  shortest 11 (UniRef drops shorter fragments);
- residues drawn from UniProtKB/Swiss-Prot's amino-acid composition;
- identical sequences under different ids at `dup_rate` (default 1%: UniRef50 representatives are distinct
  clusters, but identical sequences under distinct ids are common in UniRef100/UniProtKB inputs and in merged
  databases, which is what input.dedupe_sequences serves);
- ids and headers as UniRef writes them: `>UniRef50_A0A0B4J2F2 Uncharacterized protein n=3 Tax=Homo sapiens
  TaxID=9606 RepID=A0A0B4J2F2_HUMAN`, UniParc-style `UniRef50_UPI0000...` for ~5% of clusters;
- plain, gzip and BGZF (blocked gzip, what `bgzip` writes; random access for sharding) output;
- release pairs: B = A with a share of sequences changed (same id), records removed and records added, the
  counts returned exactly (`release_pair`).

Generation streams chunk by chunk (each chunk's generator is seeded from (seed, chunk index)), so any N fits in
memory and the record at a given index does not depend on N.

    python bench/uniref_gen.py --n 100000 --out /tmp/uniref.fasta.gz --format bgzf
    python bench/uniref_gen.py --n 100000 --out /tmp/A.fasta --release-b /tmp/B.fasta --changed 0.01
"""

from __future__ import annotations

import argparse
import gzip
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AA = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
# UniProtKB/Swiss-Prot amino-acid composition (release 2024_01), in AA's order, normalised below.
_FREQ = np.array([8.25, 1.38, 5.46, 6.72, 3.86, 7.07, 2.27, 5.91, 5.80, 9.65,
                  2.41, 4.06, 4.74, 3.93, 5.53, 6.65, 5.36, 6.86, 1.10, 2.92])
FREQ = _FREQ / _FREQ.sum()

MEDIAN = 270.0
SIGMA = 0.75
MIN_LEN = 11
MAX_LEN = 35_213
TAIL_SHARE = 0.0005  # records drawn from the Pareto tail (2,000 .. MAX_LEN) instead of the lognormal
CHUNK = 8192  # records per independently seeded chunk

_TAXA = [("Homo sapiens", 9606, "HUMAN"), ("Mus musculus", 10090, "MOUSE"), ("Escherichia coli", 562, "ECOLX"),
         ("Saccharomyces cerevisiae", 4932, "YEAST"), ("Arabidopsis thaliana", 3702, "ARATH"),
         ("Bacillus subtilis", 1423, "BACSU"), ("uncultured bacterium", 77133, "9BACT"),
         ("Streptomyces sp.", 1931, "9ACTN"), ("Pseudomonas aeruginosa", 287, "PSEAI"),
         ("Danio rerio", 7955, "DANRE")]
_TAX_P = np.array([4, 3, 6, 3, 3, 2, 40, 15, 4, 2], dtype=float)
_TAX_P /= _TAX_P.sum()
_NAMES = ["Uncharacterized protein", "ABC transporter ATP-binding protein", "Histidine kinase",
          "Transcriptional regulator", "DUF1234 domain-containing protein", "Glycosyltransferase",
          "Methyltransferase", "Zinc finger protein", "Titin", "Hypothetical protein"]
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MULT = 1_299_709  # prime, coprime with 36**7 and 16**10: index -> accession is a bijection (unique ids)


def accession(index: int) -> str:
    """A unique UniProt-like accession for record `index`: A0A + 7 base-36 characters, or a UniParc UPI id for
    every 20th (the same bijection, another namespace, so the two never collide)."""
    if index % 20 == 19:
        return f"UPI{(index * _MULT) % 16**10:010X}"
    x = (index * _MULT) % 36**7
    chars = []
    for _ in range(7):
        x, r = divmod(x, 36)
        chars.append(_B36[r])
    return "A0A" + "".join(reversed(chars))


def lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) int64 UniRef50-like sequence lengths."""
    out = np.exp(rng.normal(np.log(MEDIAN), SIGMA, n))
    tail = rng.random(n) < TAIL_SHARE
    # Pareto (alpha 1.2) from 2,000: the few very long proteins (titins, polyketide synthases)
    out[tail] = 2000.0 * (1.0 - rng.random(int(tail.sum()))) ** (-1.0 / 1.2)
    return np.clip(np.rint(out), MIN_LEN, MAX_LEN).astype(np.int64)


def _sequences(rng: np.random.Generator, lens: np.ndarray) -> list[str]:
    letters = AA[rng.choice(len(AA), size=int(lens.sum()), p=FREQ)].tobytes().decode("ascii")
    ends = np.cumsum(lens)
    starts = ends - lens
    return [letters[s:e] for s, e in zip(starts.tolist(), ends.tolist())]


@dataclass(frozen=True)
class Rec:
    id: str
    description: str
    sequence: str

    def fasta(self, wrap: int = 60) -> str:
        body = "\n".join(self.sequence[i:i + wrap] for i in range(0, len(self.sequence), wrap))
        return f">{self.id} {self.description}\n{body}\n"


def _record(level: int, index: int, rng: np.random.Generator, sequence: str) -> Rec:
    acc = accession(index)
    taxon, taxid, code = _TAXA[int(rng.choice(len(_TAXA), p=_TAX_P))]
    members = int(rng.geometric(0.3) + (rng.random() < 0.1) * rng.integers(1, 200))  # cluster size n=
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    rep = acc if acc.startswith("UPI") else f"{acc}_{code}"
    return Rec(f"UniRef{level}_{acc}", f"{name} n={members} Tax={taxon} TaxID={taxid} RepID={rep}", sequence)


def _chunk(seed: int, c: int, count: int, level: int, dup_rate: float, cap: int | None = None) -> list[Rec]:
    rng = np.random.default_rng([seed, c, 1])
    lens = lengths(rng, count)
    if cap is not None:  # tests only: short proteins keep tiny models' CPU time small (the bench never caps)
        lens = np.minimum(lens, cap)
    seqs = _sequences(rng, lens)
    # identical sequences under other ids: a copy of an earlier record of the same chunk
    dup = np.flatnonzero(rng.random(count) < dup_rate)
    for i in dup.tolist():
        if i > 0:
            seqs[i] = seqs[int(rng.integers(0, i))]
    return [_record(level, c * CHUNK + i, rng, s) for i, s in enumerate(seqs)]


def records(n: int, seed: int = 0, level: int = 50, dup_rate: float = 0.01, cap: int | None = None) -> Iterator[Rec]:
    """The N records of database `seed`, in file order. cap: cut every length to at most this (tests)."""
    for c in range(-(-n // CHUNK)):
        yield from _chunk(seed, c, min(CHUNK, n - c * CHUNK), level, dup_rate, cap)


@dataclass
class ReleaseCounts:
    unchanged: int = 0
    changed: int = 0  # same id, another sequence
    removed: int = 0
    added: int = 0


def _mutate(rng: np.random.Generator, seq: str) -> str:
    """One substitution (most edits between releases are small), or a fresh sequence for 1 in 5."""
    if rng.random() < 0.2:
        return _sequences(rng, np.array([len(seq)]))[0]  # same length: a cap (tests) still holds
    i = int(rng.integers(len(seq)))
    new = AA[(int(np.flatnonzero(AA == ord(seq[i]))[0]) + 1 + int(rng.integers(19))) % 20]
    return seq[:i] + chr(new) + seq[i + 1:]


def release_b(n: int, seed: int = 0, level: int = 50, dup_rate: float = 0.01, changed: float = 0.01,
              removed: float = 0.005, added: float = 0.01, counts: ReleaseCounts | None = None,
              cap: int | None = None) -> Iterator[Rec]:
    """Release B of database `seed` (whose release A is `records(n, seed, ...)`): each record of A is kept, changed
    (probability `changed`) or removed (`removed`); after each chunk, new records (`added` x the chunk's size on
    average) with ids no release A record has. `counts` is filled in as the records are yielded."""
    counts = counts if counts is not None else ReleaseCounts()
    chunks = -(-n // CHUNK)
    new_index = chunks * CHUNK  # ids of added records: past every index of A, one more per added record
    for c in range(chunks):
        rng = np.random.default_rng([seed, c, 2])
        for rec in _chunk(seed, c, min(CHUNK, n - c * CHUNK), level, dup_rate, cap):
            u = rng.random()
            if u < removed:
                counts.removed += 1
                continue
            if u < removed + changed:
                counts.changed += 1
                yield Rec(rec.id, rec.description, _mutate(rng, rec.sequence))
                continue
            counts.unchanged += 1
            yield rec
        k = int(rng.binomial(min(CHUNK, n - c * CHUNK), added))
        if k:
            lens = lengths(rng, k) if cap is None else np.minimum(lengths(rng, k), cap)
            for s in _sequences(rng, lens):
                counts.added += 1
                yield _record(level, new_index, rng, s)
                new_index += 1


# ------------------------------------------------------------------------------------------------------ writers


_BGZF_BLOCK = 0xFF00  # bytes of text per block, what bgzip uses
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def bgzf_block(data: bytes, level: int = 6) -> bytes:
    """One BGZF block (SAM/BAM specification 4.1): a gzip member whose BC extra field holds its size."""
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    cdata = deflate.compress(data) + deflate.flush()
    size = 12 + 6 + len(cdata) + 8
    header = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<HBBHH", 6, 66, 67, 2, size - 1)
    return header + cdata + struct.pack("<II", zlib.crc32(data), len(data))


class _Bgzf:
    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.buf = bytearray()

    def write(self, text: str) -> None:
        self.buf += text.encode("ascii")
        while len(self.buf) >= _BGZF_BLOCK:
            self.f.write(bgzf_block(bytes(self.buf[:_BGZF_BLOCK])))
            del self.buf[:_BGZF_BLOCK]

    def close(self) -> None:
        if self.buf:
            self.f.write(bgzf_block(bytes(self.buf)))
        self.f.write(BGZF_EOF)
        self.f.close()


def write_fasta(path: str | Path, recs, fmt: str = "plain") -> dict:
    """Write `recs` to `path` as plain text, gzip or BGZF; returns {records, residues, bytes}."""
    path = Path(path)
    if fmt == "plain":
        out = open(path, "w")
    elif fmt == "gzip":
        out = gzip.open(path, "wt", compresslevel=6)
    elif fmt == "bgzf":
        out = _Bgzf(path)
    else:
        raise ValueError(f"format must be plain, gzip or bgzf, got {fmt!r}")
    n = residues = 0
    try:
        for rec in recs:
            out.write(rec.fasta())
            n += 1
            residues += len(rec.sequence)
    finally:
        out.close()
    return {"records": n, "residues": residues, "bytes": path.stat().st_size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=int, default=50, choices=(50, 90, 100))
    ap.add_argument("--dup-rate", type=float, default=0.01)
    ap.add_argument("--out", required=True, help="release A (or the one database)")
    ap.add_argument("--format", default="plain", choices=("plain", "gzip", "bgzf"))
    ap.add_argument("--release-b", help="also write release B here")
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--removed", type=float, default=0.005)
    ap.add_argument("--added", type=float, default=0.01)
    a = ap.parse_args(argv)
    print(a.out, write_fasta(a.out, records(a.n, a.seed, a.level, a.dup_rate), a.format))
    if a.release_b:
        counts = ReleaseCounts()
        info = write_fasta(a.release_b, release_b(a.n, a.seed, a.level, a.dup_rate, a.changed, a.removed, a.added,
                                                  counts), a.format)
        print(a.release_b, info, counts)


if __name__ == "__main__":
    main()
