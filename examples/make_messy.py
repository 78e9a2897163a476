#!/usr/bin/env python3
"""Write messy.fasta: real protein sequences damaged in every way rdscale's FASTA validation has a rule for.

    python scripts/blastdb_to_fasta.py DB --split-id-at '|' --every 4999 --min-length 30 --max-length 300 \\
        --limit 28 | python examples/make_messy.py > examples/messy.fasta

(DB and the provenance: examples/README.md.) Reads clean FASTA on stdin (one record per damage below is used, in
order, then two for duplicate ids and one for the last record), writes the damaged file on stdout and
prints, on stderr, what rdscale should make of it, counted from DAMAGES (not by running rdscale's reader), in the
form examples/README.md lists it. Deterministic: same input, same bytes.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

ACCEPTED = "accepted"


@dataclass(frozen=True)
class Damage:
    name: str
    outcome: str  # ACCEPTED or the reject code rdscale must give
    # (id, description, sequence, rng) -> (header line without '>', sequence lines, line end)
    apply: Callable[[str, str, str, random.Random], tuple[str, list[str], str]]


def wrap(seq: str, width: int = 60) -> list[str]:
    return [seq[i : i + width] for i in range(0, len(seq), width)]


def insert(seq: str, at: float, text: str) -> str:
    i = max(1, int(len(seq) * at))
    return seq[:i] + text + seq[i:]


def header(id_: str, desc: str) -> str:
    return f"{id_} {desc}" if desc else id_


def plain(transform: Callable[[str], str], width: int = 60, eol: str = "\n"):
    return lambda i, d, s, rng: (header(i, d), wrap(transform(s), width), eol)


def mixed_case(i, d, s, rng):
    return header(i, d), wrap("".join(c.lower() if rng.random() < 0.5 else c for c in s)), "\n"


def blank_lines(i, d, s, rng):
    lines = wrap(s, 50)
    return header(i, d), [x for line in lines for x in (line, "")] + ["", ""], "\n"


def spaced(i, d, s, rng):
    # blocks of ten, as in GenBank/EMBL flat files (without their line numbers), and a tab at the end of lines
    blocks = [s[k : k + 10] for k in range(0, len(s), 10)]
    return header(i, d), [" ".join(blocks[k : k + 6]) + " \t" for k in range(0, len(blocks), 6)], "\n"


def rare_letters(i, d, s, rng):
    chars = list(s)
    for letter in "XBZUO":  # the ESM-2 alphabet beyond the 20 standard amino acids
        chars[rng.randrange(len(chars))] = letter
    return header(i, d), wrap("".join(chars)), "\n"


def header_tabs(i, d, s, rng):
    return f"{i}\t{d}   ", wrap(s), "\n"


def numbered(i, d, s, rng):
    # GenBank ORIGIN style: a residue number before every line
    return header(i, d), [f"{1 + 60 * k:>9} {line.lower()}" for k, line in enumerate(wrap(s))], "\n"


def non_ascii(i, d, s, rng):
    return header(i, d), wrap(insert(s, 0.5, "\u00e9")), "\n"  # written as UTF-8: two bytes


def no_id(blank: str):
    return lambda i, d, s, rng: (blank, wrap(s), "\n")


DAMAGES = [
    Damage("lower case", ACCEPTED, plain(str.lower)),
    Damage("mixed case", ACCEPTED, mixed_case),
    Damage("single trailing '*'", ACCEPTED, plain(lambda s: s + "*")),
    Damage("CRLF line ends", ACCEPTED, plain(lambda s: s, eol="\r\n")),
    Damage("blank lines inside and after the record", ACCEPTED, blank_lines),
    Damage("spaces and tabs inside sequence lines", ACCEPTED, spaced),
    Damage("whole sequence on one line", ACCEPTED, plain(lambda s: s, width=10**6)),
    Damage("7 residues per line", ACCEPTED, plain(lambda s: s, width=7)),
    Damage("X B Z U O letters", ACCEPTED, rare_letters),
    Damage("lower case, trailing '*', CRLF", ACCEPTED, plain(lambda s: s.lower() + "*", eol="\r\n")),
    Damage("tab between id and description, trailing spaces", ACCEPTED, header_tabs),
    Damage("header only", "empty_sequence", plain(lambda s: "")),
    Damage("only a '*'", "empty_sequence", plain(lambda s: "*")),
    Damage("only blank lines", "empty_sequence", lambda i, d, s, rng: (header(i, d), ["", " ", ""], "\n")),
    Damage("residue numbers (GenBank style)", "invalid_characters", numbered),
    Damage("'#' inside", "invalid_characters", plain(lambda s: insert(s, 0.3, "#"))),
    Damage("'?' and digits inside", "invalid_characters", plain(lambda s: insert(s, 0.7, "?12"))),
    Damage("internal '*' (read-through stop)", "invalid_characters", plain(lambda s: insert(s, 0.5, "*"))),
    Damage("two trailing '*'", "invalid_characters", plain(lambda s: s + "**")),
    Damage("'J' (I/L ambiguity, not in the ESM-2 alphabet)", "invalid_characters", plain(lambda s: insert(s, 0.4, "J"))),
    Damage("non-ASCII letter", "invalid_characters", non_ascii),
    Damage("'-' alignment gaps", "gaps", plain(lambda s: "---" + insert(s, 0.5, "-----"))),
    Damage("'.' gaps (A2M style)", "gaps", plain(lambda s: insert(s, 0.5, "..").lower())),
    # ("> text" is not one: like Biopython, rdscale takes the first word after '>' as the id)
    Damage("'>' alone", "empty_id", no_id("")),
    Damage("'>' and only spaces and a tab", "empty_id", no_id("  \t ")),
]
# Records that reuse the id of an earlier record (the first one keeps it, accepted or not) and the file's last
# record, written without a final newline.
DUPLICATE_OF = ("lower case", "'#' inside")  # one accepted first, one rejected first
LAST = Damage("last line without a newline", ACCEPTED, plain(lambda s: s))


def read_clean(stream) -> list[tuple[str, str, str]]:
    records: list[tuple[str, str, str]] = []
    for line in stream:
        line = line.rstrip("\n")
        if line.startswith(">"):
            id_, _, desc = line[1:].partition(" ")
            records.append((id_, desc, ""))
        elif records and line:
            id_, desc, seq = records[-1]
            records[-1] = (id_, desc, seq + line)
    return records


def render(head: str, lines: list[str], eol: str) -> str:
    return ">" + head + eol + "".join(line + eol for line in lines)


def main() -> int:
    clean = read_clean(sys.stdin)
    needed = len(DAMAGES) + len(DUPLICATE_OF) + 1
    if len(clean) < needed:
        print(f"make_messy: need {needed} clean records on stdin, got {len(clean)}", file=sys.stderr)
        return 1
    rng = random.Random(0)
    sources = iter(clean)
    out = ["\n\n"]  # blank lines before the first header are allowed
    expected: Counter[str] = Counter()
    first_id: dict[str, str] = {}
    for damage in DAMAGES:
        id_, desc, seq = next(sources)
        out.append(render(*damage.apply(id_, desc, seq, rng)))
        first_id[damage.name] = id_
        expected[damage.outcome] += 1
    for name in DUPLICATE_OF:  # a different real sequence under an id already used
        _, desc, seq = next(sources)
        out.append(render(header(first_id[name], desc), wrap(seq), "\n"))
        expected["duplicate_id"] += 1
    id_, desc, seq = next(sources)
    out.append(render(*LAST.apply(id_, desc, seq, rng)).removesuffix("\n"))
    expected[LAST.outcome] += 1
    sys.stdout.buffer.write("".join(out).encode("utf-8"))
    print(f"accepted: {expected.pop(ACCEPTED)}", file=sys.stderr)
    for code, n in sorted(expected.items()):
        print(f"`{code}`: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
