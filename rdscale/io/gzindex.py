"""Plain gzip split into many shards: a seek-point index of the gzip stream (indexed_gzip's zran).

UniProt ships `uniref50.fasta.gz` as one plain gzip member, which cannot be entered mid-stream without the 32 KiB
of history the decompressor had at that point. One sequential pass records that history every `spacing`
decompressed bytes (a seek point); afterwards a reader starts at any seek point, so the file is split into shards
at seek points and read in parallel, committed shard by shard, exactly as a plain file split by byte range (same
record offsets: decompressed bytes; a record belongs to the shard whose range holds its '>').

The index is built once, stored beside the run (`<run>/gzip_index/<key>-<spacing>.gzidx` plus a small JSON with
the seek points, written last so a JSON marks a complete index) and reused by reruns; `<key>` is a hash of the
input's location, size and modification time, so a changed input gets a new index. Index size is about 32 KiB per
seek point.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import time
import zlib

from rdscale.errors import FastaFormatError
from rdscale.io.location import Location

log = logging.getLogger(__name__)

MIN_SPACING = 1 << 16  # zran needs more than its 32 KiB window between seek points


def spacing_for(shard_bytes: int) -> int:
    """Seek-point spacing (decompressed bytes) for a target shard size: one seek point per shard."""
    return max(MIN_SPACING, int(shard_bytes))


def _format_error(path: str, where: str, detail: str) -> Exception:
    return FastaFormatError(path, where, detail)


def _key(source: Location) -> str:
    fp = source.fingerprint()
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


def seek_points(path: str, index_dir: str | Location, spacing: int) -> tuple[str, list[int], int]:
    """(index location, decompressed offsets of the seek points (0 first), decompressed size) of the plain gzip
    file at `path`, building and storing the index in `index_dir` unless an index for this exact file and
    spacing is already there."""
    source = Location.parse(path)
    index_dir = Location.parse(index_dir)
    name = f"{_key(source)}-{spacing}"
    index, meta = index_dir.join(name + ".gzidx"), index_dir.join(name + ".json")
    if meta.is_file() and index.is_file():
        info = json.loads(meta.read_text())
        return index.uri, [int(p) for p in info["points"]], int(info["size"])
    started = time.perf_counter()
    data, points, size = build_index(path, spacing)
    index_dir.mkdir()
    index.write_bytes(data)
    meta.write_text(json.dumps({"source": source.uri, "spacing": spacing, "size": size, "points": points,
                                "seconds": round(time.perf_counter() - started, 3)}))
    log.info("gzip seek-point index of %s: %d points, %.1f s (%s)", path, len(points),
             time.perf_counter() - started, index.uri)
    return index.uri, points, size


def build_index(path: str, spacing: int) -> tuple[bytes, list[int], int]:
    """One sequential pass over the gzip file -> (exported index, seek-point offsets, decompressed size)."""
    import indexed_gzip

    source = Location.parse(path)
    with source.open() as raw:
        try:
            gz = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=spacing)
            gz.build_full_index()
            size = gz.seek(0, io.SEEK_END)
            points = sorted({int(u) for u, _ in gz.seek_points() if u < size} | {0})
            out = io.BytesIO()
            gz.export_index(fileobj=out)
        except (OSError, ValueError) as err:
            raise _format_error(path, "the compressed stream", f"corrupt or truncated gzip stream: {err}") from None
        raw.seek(-4, io.SEEK_END)
        (isize,) = struct.unpack("<I", raw.read(4))
    if isize != size % (1 << 32):
        # A single-member file whose trailer disagrees was cut short (zran stops quietly at the end of data); a
        # multi-member file has the last member's size there, so check the whole stream the slow way before
        # refusing it.
        _verify_stream(source)
    return out.getvalue(), points, size


def _verify_stream(source: Location) -> None:
    import gzip

    pos = 0
    with source.open() as raw, gzip.GzipFile(fileobj=raw) as gz:
        try:
            while chunk := gz.read(1 << 20):
                pos += len(chunk)
        except (EOFError, OSError, zlib.error) as err:
            raise _format_error(source.uri, f"decompressed byte {pos}",
                                f"corrupt or truncated gzip stream: {err}") from None


def open_at(path: str, index_uri: str):
    """A reader of the decompressed stream of `path` that can seek to any offset, using the stored index."""
    import indexed_gzip

    raw = Location.parse(path).open()
    # a large read buffer: line-by-line reads through a small one cost three times the decompression
    gz = indexed_gzip.IndexedGzipFile(fileobj=raw, auto_build=False, spacing=MIN_SPACING, buffer_size=4 << 20)
    gz.import_index(fileobj=io.BytesIO(Location.parse(index_uri).read_bytes()))
    return gz, raw
