"""A minimal BGZF writer for tests, with control over where blocks end.

Real writers (bgzip, htslib) cut blocks every 65280 uncompressed bytes; tests need tiny blocks, blocks that end
exactly at a record boundary and empty blocks to exercise shard resynchronisation, so this one takes the block
sizes from the caller. Format: SAM/BAM specification section 4.1.
"""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The 28-byte empty block that bgzip appends to every file (SAM spec 4.1.2).
EOF_BLOCK = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def bgzf_block(data: bytes, level: int = 6) -> bytes:
    if len(data) > 0xFF00:
        raise ValueError("a BGZF block holds at most 65280 uncompressed bytes here")
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    cdata = deflate.compress(data) + deflate.flush()
    size = 12 + 6 + len(cdata) + 8
    header = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<HBBHH", 6, 66, 67, 2, size - 1)
    return header + cdata + struct.pack("<II", zlib.crc32(data), len(data))


@dataclass
class BgzfLayout:
    """Where each block of a written file starts, compressed and decompressed."""

    compressed_starts: list[int]
    uncompressed_starts: list[int]

    def virtual_offset(self, upos: int) -> int:
        """The virtual offset of decompressed byte ``upos`` (canonical: the block that holds that byte)."""
        # the last block starting at or before upos: empty blocks sharing its start come before it
        i = bisect_right(self.uncompressed_starts, upos) - 1
        return self.compressed_starts[i] << 16 | (upos - self.uncompressed_starts[i])

    def block_start(self, upos: int) -> int:
        return self.virtual_offset(upos) >> 16


def write_bgzf(path: str | Path, data: bytes, block_sizes: Iterable[int] = (), eof_block: bool = True) -> BgzfLayout:
    """Write ``data`` as BGZF, cutting blocks at ``block_sizes`` (0 makes an empty block; cycled; the rest in
    65280-byte blocks). Returns the block layout."""
    sizes = list(block_sizes)
    if sizes and not any(sizes):
        raise ValueError("block_sizes must not all be 0")
    out, cstarts, ustarts = bytearray(), [], []
    upos, i = 0, 0
    while upos < len(data):
        n = sizes[i % len(sizes)] if sizes else 0xFF00
        i += 1
        chunk = data[upos : upos + min(n, 0xFF00)]
        cstarts.append(len(out))
        ustarts.append(upos)
        out += bgzf_block(chunk)
        upos += len(chunk)
    if eof_block:
        out += EOF_BLOCK
    Path(path).write_bytes(bytes(out))
    return BgzfLayout(cstarts, ustarts)
