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
import time
from pathlib import Path

import pytest
from bgzf_util import write_bgzf
from hypothesis import given
from hypothesis import strategies as st
from helpers import make_cfg, write_fasta

from rdscale.io import fasta as fasta_mod
from rdscale.run.executor import LocalExecutor
from rdscale.run.pipeline import embed, run
from rdscale.io.headcount import count_headers, file_headers
from rdscale.run.verify import verify


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


# ------------------------------------------------------------------------------------ content, not mtime


def edit_one_byte_keep_mtime(path: Path, rng: random.Random) -> int:
    """Replace one byte at a random offset by another printable one, in place (same inode, same size), and put the
    mtime back as rsync -t or cp -p would. Returns the offset."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] = rng.choice([c for c in b"ACDEFGHIKLMNPQRSTVWYZ>\n x1" if c != data[at]])
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    return at


def test_input_edit_with_mtime_restored_is_caught(tmp_path, tiny_family):
    """20 seeds: a complete run, then one byte of its input changed at a random offset with size and mtime kept.
    Rerunning refuses (InputChangedError naming the file) whenever the records changed, and verify reports it;
    an edit that changes no record (e.g. a letter's case) leaves a run that still equals its input."""
    from rdscale.io.fasta import read_fasta
    from rdscale.run.integrity import InputChangedError

    fasta = Path(write_fasta(tmp_path / "in.fasta", n=10, seed=2))
    pristine = fasta.read_bytes()
    cfg = make_cfg(tmp_path, str(fasta), tiny_family[:1], "run")
    embed(cfg, None, LocalExecutor(), progress=False)
    refused = 0
    for seed in range(20):
        fasta.write_bytes(pristine)
        embed(cfg, None, LocalExecutor(), progress=False)  # records the pristine content as the run's input
        before = list(read_fasta(fasta))
        at = edit_one_byte_keep_mtime(fasta, random.Random(seed))
        try:
            after = list(read_fasta(fasta))
        except ValueError:  # e.g. the first '>' replaced: not FASTA any more
            after = None
        if after == before:
            embed(cfg, None, LocalExecutor(), progress=False)
            assert verify(tmp_path / "run") == [], seed
            continue
        with pytest.raises(InputChangedError, match=str(fasta)):
            embed(cfg, None, LocalExecutor(), progress=False)
        assert verify(tmp_path / "run"), (seed, at)
        refused += 1
    assert refused >= 15


def test_checkpoint_swap_with_mtime_restored_is_caught(tmp_path, monkeypatch):
    """20 seeds: a checkpoint's digest, then one byte changed at a random offset with size and mtime kept: the
    digest is the new content's, in the same process (the in-memory cache) and in a new one (the on-disk record)."""
    import hashlib

    from rdscale.model import loading

    monkeypatch.setenv("RDSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_SHA_CACHE", {})
    path = tmp_path / "model.pt"
    path.write_bytes(random.Random(0).randbytes(1 << 16))
    time.sleep(loading._SETTLED_NS / 1e9 + 0.1)  # settled: its digest is remembered, in memory and on disk
    loading.checkpoint_sha256(path)
    assert loading._SHA_CACHE and list((tmp_path / "cache").rglob("*.json"))
    for seed in range(20):
        old = loading.checkpoint_sha256(path)
        edit_one_byte_keep_mtime(path, random.Random(seed))
        true = hashlib.sha256(path.read_bytes()).hexdigest()
        assert true != old
        assert loading.checkpoint_sha256(path) == true, seed
        loading._SHA_CACHE.clear()  # a new process
        assert loading.checkpoint_sha256(path) == true, seed
