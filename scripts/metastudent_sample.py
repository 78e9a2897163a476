#!/usr/bin/env python3
"""A seeded uniform sample of a metastudent-data BLAST database as FASTA (`>ACCESSION GO:...,GO:...`).

    python scripts/metastudent_sample.py DB -n N [--seed S] [--crop C] [-o OUT.fasta]

DB: a database name as scripts/blastdb_to_fasta.py takes it, e.g.
/usr/share/metastudent-data/dataset_201401/MFO/goasp.fasta (Debian's metastudent-data; examples/README.md says
how to get it without installing). N distinct database entries are drawn with Python's random.Random(S) and
written in database order; an accession seen twice keeps its first entry. --crop C keeps each sequence's first C
residues (the description still lists the whole protein's GO terms). Deterministic: the same arguments give the
same file.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import blastdb_to_fasta as blastdb  # noqa: E402


def sample(db_name, n: int, seed: int = 0, crop: int | None = None):
    """(id, description, sequence) of n entries drawn uniformly with random.Random(seed), in database order."""
    db = blastdb.open_blastdb(db_name)
    seen: set[str] = set()
    for i in sorted(random.Random(seed).sample(range(db.count), n)):
        seq_id, description = blastdb.parse_defline(db.header(i), "|")
        if seq_id in seen:
            continue
        seen.add(seq_id)
        seq = db.sequence(i)
        yield seq_id, description, seq[:crop] if crop else seq


def go_terms(fasta) -> dict[str, set[str]]:
    """id -> GO terms of a FASTA file written by this script (the description is the comma-separated terms)."""
    terms = {}
    with open(fasta) as f:
        for line in f:
            if line.startswith(">"):
                head, _, desc = line[1:].strip().partition(" ")
                terms[head] = set(desc.split(",")) - {""}
    return terms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db")
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("-o", "--output")
    args = p.parse_args(argv)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        blastdb.write_fasta(out, sample(args.db, args.n, args.seed, args.crop))
    finally:
        if args.output:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
