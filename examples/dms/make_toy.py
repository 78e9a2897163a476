"""Write the synthetic ProteinGym-format DMS example in this directory (TOY_SYNTH.csv + wild_types.fasta).

The scores are made up, not measured: each substitution scores the Kyte-Doolittle hydropathy of the new residue
minus that of the old one, a multiple mutant the sum of its substitutions, plus Gaussian noise. That gives the
file a known, learnable signal, so `rdscale eval dms` has something to find, while keeping every row consistent
with the wild type (as real ProteinGym files are): 1-based positions, ':'-joined multiple mutants.

    python examples/dms/make_toy.py            # rewrites the files next to this script
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
KYTE_DOOLITTLE = dict(zip(AMINO_ACIDS, (1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8, 1.9, -3.5, -1.6,
                                        -3.5, -4.5, -0.8, -0.7, 4.2, -0.9, -1.3)))
NAME = "TOY_SYNTH"


def make(out_dir: Path, seed: int = 0, length: int = 40, per_position: int = 3, doubles: int = 20,
         triples: int = 10, noise: float = 0.5) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    wild_type = "".join(rng.choice(list(AMINO_ACIDS), size=length))
    variants: list[list[tuple[int, str]]] = []  # per variant: (0-based position, new letter)
    for pos in range(length):
        others = [a for a in AMINO_ACIDS if a != wild_type[pos]]
        variants += [[(pos, str(a))] for a in rng.choice(others, size=per_position, replace=False)]
    for count, how_many in ((2, doubles), (3, triples)):
        for _ in range(how_many):
            positions = sorted(rng.choice(length, size=count, replace=False).tolist())
            variants.append([(p, str(rng.choice([a for a in AMINO_ACIDS if a != wild_type[p]]))) for p in positions])

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, fasta_path = out_dir / f"{NAME}.csv", out_dir / "wild_types.fasta"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mutant", "mutated_sequence", "DMS_score"])
        for variant in variants:
            residues = list(wild_type)
            for pos, new in variant:
                residues[pos] = new
            mutant = ":".join(f"{wild_type[pos]}{pos + 1}{new}" for pos, new in variant)
            score = sum(KYTE_DOOLITTLE[new] - KYTE_DOOLITTLE[wild_type[pos]] for pos, new in variant)
            writer.writerow([mutant, "".join(residues), f"{score + rng.normal(scale=noise):.4f}"])
    fasta_path.write_text(f">{NAME} synthetic wild type (examples/dms/make_toy.py, seed {seed})\n{wild_type}\n")
    return csv_path, fasta_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="directory to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in make(Path(args.out), seed=args.seed):
        print(path)
