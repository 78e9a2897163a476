"""Records in a FASTA file counted without the FASTA reader (rdscale.io.fasta): a byte-level count of '>' at the
start of a line, for `rdscale verify` to check the reader against. Deliberately shares no code with the reader."""

from __future__ import annotations

import gzip
import zlib

from rdscale.io.fasta import FastaFormatError, detect_format
from rdscale.io.location import Location

_BOM = b"\xef\xbb\xbf"


def count_headers(stream, chunk: int = 1 << 20) -> int:
    r"""Records in a FASTA byte stream, counted without the reader: a '>' at the start of the stream (after a UTF-8
    byte-order mark) or right after a "\n" or a "\r" (so after "\r\n" too, counted once, as "\n>"). A '>' inside
    a line (a description, a sequence) is not a header. `stream`: a binary file object (decompressed)."""
    count = 0
    previous = b"\n"  # the byte before `data`: the start of the stream is a line start
    data = stream.read(len(_BOM))
    if data == _BOM:
        data = b""
    while True:
        count += data.count(b"\n>") + data.count(b"\r>")
        if data[:1] == b">" and previous in (b"\n", b"\r"):
            count += 1
        previous = data[-1:] or previous
        data = stream.read(chunk)
        if not data:
            return count


def file_headers(path: str) -> int:
    """`count_headers` of an input file, local or an object, decompressed when it is gzip or BGZF (multi-member
    gzip: BGZF's blocks are members)."""
    with Location.parse(path).open() as raw:
        if detect_format(path) == "plain":
            return count_headers(raw)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return count_headers(stream)
        except (EOFError, OSError, zlib.error) as err:
            raise FastaFormatError(path, "its gzip stream", f"corrupt or truncated gzip stream: {err}") from err
