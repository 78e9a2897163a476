#!/usr/bin/env python3
"""Stream a BLAST version 4 protein database (.pin/.phr/.psq) out as FASTA, using only the standard library.

    python scripts/blastdb_to_fasta.py DB [DB ...] [-o OUT.fasta] [--limit N] [--every K] [--min-length A]
                                       [--max-length B] [--split-id-at CHAR]

DB is the database name as given to makeblastdb (the path without .pin/.phr/.psq). Several DBs are written one after
the other, so a multi-volume database is read by naming its volumes (name.00 name.01 ...); alias files (.pal) and
version 5 databases are not supported. --every, --min-length and --max-length apply to each DB, --limit to the total.

The format, as written by NCBI makeblastdb (BLAST+ source: objtools/blast/seqdb_reader/seqdbfile.cpp):

  .pin (index), big-endian unless noted:
      int32 version (4) | int32 type (1 = protein) | int32 n + n bytes title | int32 n + n bytes date (NUL padded)
      | int32 number of sequences N | int64 total residues (little-endian) | int32 longest sequence
      | (N + 1) int32 header offsets into .phr | (N + 1) int32 sequence offsets into .psq
  .psq: sequence i is psq[seq[i] : seq[i + 1] - 1], one byte per residue in NCBIstdaa code; a NUL byte separates
      sequences (and starts the file).
  .phr: header i is phr[hdr[i] : hdr[i + 1]], an ASN.1 BER-encoded Blast-def-line-set: a SEQUENCE OF
      Blast-def-line { title [0] VisibleString, seqid [1] SEQUENCE OF Seq-id, taxid [2] INTEGER, ... }.

The FASTA id is the first real Seq-id of the first def-line (an accession.version, a local id, gnl|db|tag, gi|N).
makeblastdb run without -parse_seqids stores only a placeholder id (general, db "BL_ORD_ID"); then the id is the
first whitespace-delimited word of the title, and the rest of the title is the description. ``--split-id-at '|'``
also cuts that word at the first '|' (for titles such as "B0RED7|GO:0046933", as in Debian's metastudent-data),
moving the rest into the description.

Nothing is loaded whole: .psq and .phr are memory-mapped, only the offset tables are read into memory.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# NCBIstdaa code -> letter (NCBI C++ toolkit, seqcode table "NCBIstdaa").
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_DECODE = bytes(NCBISTDAA.encode()) + b"?" * (256 - len(NCBISTDAA))

# Seq-id CHOICE alternatives (NCBI ASN.1 module NCBI-Seqloc) whose value is a Textseq-id with an accession.
_TEXTSEQ_IDS = {4: "genbank", 5: "embl", 6: "pir", 7: "swissprot", 9: "refseq", 12: "ddbj", 13: "prf",
                15: "tpg", 16: "tpe", 17: "tpd", 18: "gpipe", 19: "named-annot-track"}
_LOCAL, _GENERAL, _GI, _PDB = 0, 10, 11, 14


class BlastDbError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------- ASN.1 BER

@dataclass
class Ber:
    cls: int  # 0 universal, 2 context-specific
    tag: int
    value: bytes | list["Ber"]  # bytes if primitive, children if constructed

    def child(self, tag: int) -> "Ber | None":
        return next((c for c in self.value if c.cls == 2 and c.tag == tag), None) if isinstance(self.value, list) else None

    def first_primitive(self, universal_tag: int) -> "Ber | None":
        """Depth-first, the first primitive universal element with this tag (26 VisibleString, 2 INTEGER)."""
        if not isinstance(self.value, list):
            return self if (self.cls, self.tag) == (0, universal_tag) else None
        for c in self.value:
            if (found := c.first_primitive(universal_tag)) is not None:
                return found
        return None

    def text(self) -> str:
        return self.value.decode("latin-1")

    def integer(self) -> int:
        return int.from_bytes(self.value, "big", signed=True)


def ber_decode(buf: bytes, pos: int = 0) -> tuple[Ber, int]:
    """One BER element at ``buf[pos]`` (definite or indefinite length) and the position after it."""
    first = buf[pos]
    pos += 1
    cls, constructed, tag = first >> 6, bool(first & 0x20), first & 0x1F
    if tag == 0x1F:  # high tag number: base-128 digits, high bit = more follow
        tag = 0
        while True:
            b = buf[pos]
            pos += 1
            tag = tag << 7 | (b & 0x7F)
            if not b & 0x80:
                break
    length = buf[pos]
    pos += 1
    if length == 0x80:  # indefinite: children up to an end-of-contents 00 00
        if not constructed:
            raise BlastDbError("indefinite length on a primitive BER element")
        children = []
        while buf[pos : pos + 2] != b"\x00\x00":
            child, pos = ber_decode(buf, pos)
            children.append(child)
        return Ber(cls, tag, children), pos + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(buf):
        raise BlastDbError("BER element runs past the end of its header")
    if not constructed:
        return Ber(cls, tag, bytes(buf[pos:end])), end
    children = []
    while pos < end:
        child, pos = ber_decode(buf, pos)
        children.append(child)
    return Ber(cls, tag, children), end


def seqid_text(seqid: Ber) -> tuple[int, str] | None:
    """(preference, FASTA-style text) of one Seq-id; lower preference wins; None for BLAST's placeholder ids."""
    inner = seqid.value[0] if isinstance(seqid.value, list) and seqid.value else seqid
    if seqid.tag in _TEXTSEQ_IDS:  # Textseq-id ::= SEQUENCE { name [0], accession [1], release [2], version [3] }
        accession, name, version = inner.child(1), inner.child(0), inner.child(3)
        if accession is not None:
            acc = accession.first_primitive(26).text()
            if version is not None and (v := version.first_primitive(2)) is not None:
                acc += f".{v.integer()}"
            return 0, acc
        if name is not None:
            return 0, name.first_primitive(26).text()
        return None
    if seqid.tag == _PDB:  # PDB-seq-id ::= SEQUENCE { mol [0] VisibleString, chain [1], rel [2], chain-id [3] }
        mol, chain_id = inner.child(0), inner.child(3)
        text = mol.first_primitive(26).text() if mol is not None else ""
        if chain_id is not None:
            text += "_" + chain_id.first_primitive(26).text()
        return 0, text
    if seqid.tag == _LOCAL:  # Object-id ::= CHOICE { id [0] INTEGER, str [1] VisibleString }
        value = seqid.first_primitive(26) or seqid.first_primitive(2)
        return 1, value.text() if value.tag == 26 else str(value.integer())
    if seqid.tag == _GENERAL:  # Dbtag ::= SEQUENCE { db [0] VisibleString, tag [1] Object-id }
        db, tag = inner.child(0), inner.child(1)
        if db is None or tag is None or db.first_primitive(26).text() == "BL_ORD_ID":
            return None
        value = tag.first_primitive(26) or tag.first_primitive(2)
        return 2, f"gnl|{db.first_primitive(26).text()}|{value.text() if value.tag == 26 else value.integer()}"
    if seqid.tag == _GI:
        return 3, f"gi|{seqid.first_primitive(2).integer()}"
    return None


def parse_defline(raw: bytes, split_id_at: str | None = None) -> tuple[str, str]:
    """(id, description) from one .phr entry (the first Blast-def-line of the set)."""
    deflines, _ = ber_decode(raw)
    if not isinstance(deflines.value, list) or not deflines.value:
        raise BlastDbError("header is not a Blast-def-line-set")
    defline = deflines.value[0]
    title_node = defline.child(0)
    title = title_node.first_primitive(26).text().strip() if title_node is not None else ""
    seqids = defline.child(1)
    candidates = []
    if seqids is not None:
        for s in seqids.value[0].value if seqids.value and isinstance(seqids.value[0].value, list) else []:
            if (found := seqid_text(s)) is not None:
                candidates.append(found)
    if candidates:
        return min(candidates, key=lambda c: c[0])[1], title
    word, _, rest = title.partition(" ")
    if split_id_at and split_id_at in word:
        word, _, tail = word.partition(split_id_at)
        rest = f"{tail} {rest}".strip()
    return word, rest.strip()


# --------------------------------------------------------------------------------------------------- database


@dataclass
class BlastDb:
    title: str
    date: str
    count: int
    total_residues: int
    longest: int
    header_offsets: array  # (count + 1,) uint32
    sequence_offsets: array  # (count + 1,) uint32
    phr: mmap.mmap
    psq: mmap.mmap

    def length(self, i: int) -> int:
        return self.sequence_offsets[i + 1] - self.sequence_offsets[i] - 1

    def sequence(self, i: int) -> str:
        raw = self.psq[self.sequence_offsets[i] : self.sequence_offsets[i + 1] - 1]
        text = raw.translate(_DECODE).decode("ascii")
        if "?" in text:
            raise BlastDbError(f"sequence {i}: byte outside the NCBIstdaa code")
        return text

    def header(self, i: int) -> bytes:
        return self.phr[self.header_offsets[i] : self.header_offsets[i + 1]]


def _uint32s(data: bytes) -> array:
    values = array("I", data)
    if sys.byteorder == "little":
        values.byteswap()  # stored big-endian
    return values


def open_blastdb(name: str | Path) -> BlastDb:
    name = str(name)
    paths = {ext: Path(name + ext) for ext in (".pin", ".phr", ".psq")}
    for ext, path in paths.items():
        if not path.exists():
            hint = " (a nucleotide database?)" if ext == ".pin" and Path(name + ".nin").exists() else ""
            raise BlastDbError(f"{path} not found{hint}; give the database name without extension")
    pin = paths[".pin"].read_bytes()  # offsets only: 8 bytes per sequence

    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, pin, pos)
        pos += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal pos
        n = take(">i")
        pos += n
        return pin[pos - n : pos].rstrip(b"\x00").decode("latin-1")

    version, kind = take(">i"), take(">i")
    if version != 4:
        raise BlastDbError(f"{paths['.pin']}: BLAST database format version {version}; only version 4 is supported "
                           "(makeblastdb -blastdb_version 4)")
    if kind != 1:
        raise BlastDbError(f"{paths['.pin']}: not a protein database (type {kind})")
    title, date = string(), string()
    count, total, longest = take(">i"), take("<q"), take(">i")
    header_offsets = _uint32s(pin[pos : pos + 4 * (count + 1)])
    sequence_offsets = _uint32s(pin[pos + 4 * (count + 1) : pos + 8 * (count + 1)])
    if len(sequence_offsets) != count + 1:
        raise BlastDbError(f"{paths['.pin']}: truncated offset tables")

    def mapped(path: Path) -> mmap.mmap:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    db = BlastDb(title, date, count, total, longest, header_offsets, sequence_offsets,
                 mapped(paths[".phr"]), mapped(paths[".psq"]))
    if sequence_offsets[-1] > len(db.psq) or header_offsets[-1] > len(db.phr):
        raise BlastDbError(f"{name}: offsets point past the end of .psq/.phr (files from different databases?)")
    return db


def records(db: BlastDb, every: int = 1, min_length: int = 0, max_length: int | None = None,
            split_id_at: str | None = None) -> Iterator[tuple[str, str, str]]:
    """(id, description, sequence) of sequences 0, every, 2 * every, ... whose length is in range."""
    for i in range(0, db.count, every):
        n = db.length(i)
        if n < min_length or (max_length is not None and n > max_length):
            continue
        try:
            seq_id, description = parse_defline(db.header(i), split_id_at)
        except (BlastDbError, IndexError, AttributeError) as e:
            raise BlastDbError(f"sequence {i}: unreadable header ({e})") from None
        yield seq_id, description, db.sequence(i)


def write_fasta(out, items: Iterator[tuple[str, str, str]], width: int = 60) -> int:
    written = 0
    for seq_id, description, sequence in items:
        out.write(f">{seq_id} {description}\n" if description else f">{seq_id}\n")
        for start in range(0, len(sequence), width):
            out.write(sequence[start : start + width] + "\n")
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db", nargs="+", help="database name(s): the path without .pin/.phr/.psq")
    parser.add_argument("-o", "--output", help="FASTA file to write (default: stdout)")
    parser.add_argument("--limit", type=int, help="stop after this many sequences in all")
    parser.add_argument("--every", type=int, default=1, help="look at every K-th sequence of each database only")
    parser.add_argument("--min-length", type=int, default=0, help="skip sequences shorter than this")
    parser.add_argument("--max-length", type=int, help="skip sequences longer than this")
    parser.add_argument("--split-id-at", metavar="CHAR",
                        help="when the id comes from the title, cut it at the first CHAR (e.g. '|')")
    parser.add_argument("--width", type=int, default=60, help="residues per FASTA line (default 60)")
    args = parser.parse_args(argv)
    if args.every < 1 or args.width < 1:
        parser.error("--every and --width must be positive")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must not be negative")
    # Open every volume first, so that a wrong name fails before anything is written.
    try:
        dbs = [(name, open_blastdb(name)) for name in args.db]
    except BlastDbError as e:
        print(f"blastdb_to_fasta: {e}", file=sys.stderr)
        return 1

    def items() -> Iterator[tuple[str, str, str]]:
        for name, db in dbs:
            try:
                yield from records(db, args.every, args.min_length, args.max_length, args.split_id_at)
            except BlastDbError as e:
                raise BlastDbError(f"{name}: {e}") from None

    chosen = items()
    if args.limit is not None:
        chosen = (item for _, item in zip(range(args.limit), chosen))
    try:
        if args.output:
            with open(args.output, "w") as out:
                n = write_fasta(out, chosen, args.width)
        else:
            n = write_fasta(sys.stdout, chosen, args.width)
    except BlastDbError as e:
        print(f"blastdb_to_fasta: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        # point stdout at /dev/null so that the interpreter's final flush does not fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    total = sum(db.count for _, db in dbs)
    sources = ", ".join(f"{name} ({db.title!r}, {db.date})" for name, db in dbs)
    print(f"wrote {n} of {total} sequences from {sources}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
