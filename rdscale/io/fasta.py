"""Streaming FASTA reading: plain, gzip and BGZF files, byte-range shards, validation.

A FASTA input is split into shards so that many workers can read one file. Plain and BGZF files are split by byte
range; plain gzip cannot be entered mid-stream, so it is one shard per file unless `plan_shards` is given an
`index_dir`: then a seek-point index (rdscale/io/gzindex.py, one sequential pass, stored and reused) splits it by
decompressed byte range like a plain file. Inputs may be local paths or object-store URIs (s3://, gs://, az://),
read with ranged reads through `rdscale.io.location.Location`. A record belongs to exactly one shard:

- plain, and gzip split by an index: the shard whose (decompressed) byte range holds the record's '>' byte;
- BGZF: the shard whose (compressed) byte range holds the start of the BGZF block in which the '>' lies.

A reader seeks to its start, resynchronises on the next line that starts with '>', and reads past its end to finish
its last record. Reading every shard of a plan therefore yields every record once, whatever the shard size.

Offsets (``Record.offset``, ``Reject.offset``) say where a record's '>' is, in a way that does not depend on the
sharding:

- plain: byte offset in the file;
- gzip: byte offset in the decompressed stream;
- BGZF: the BGZF virtual offset ``block_start << 16 | offset_in_block`` (as htslib and samtools use it), where
  ``block_start`` is the compressed offset of the block that holds the '>'.

All three grow with the position in the file, so ``(file_index, offset)`` orders records globally.

Validation is the same in every reader. A record is accepted when its sequence, upper-cased, with ASCII spaces and
tabs inside lines ignored and one trailing '*' removed, is a non-empty string over ``ESM_LETTERS``. Otherwise it
becomes a ``Reject`` whose reason is ``"<code>: <detail>"``. The first record carrying an id claims it, accepted or
not; later records with that id are rejected as ``duplicate_id``.

A UTF-8 byte-order mark at the start of a file is skipped (offsets still count its three bytes). LF, CRLF and a lone
CR (classic Mac OS) all end a line, in every format and across every shard or read boundary, so a file with old or
mixed line endings reads as the same records.

Damage that is not one record's fault (text before the first header, binary bytes, a corrupt or truncated gzip or
BGZF stream) raises ``FastaFormatError`` when the reader reaches it: records read before the damage have already
been yielded, but the iteration fails rather than passing them off as the whole file.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from rdscale.errors import FastaFormatError
from rdscale.io.gzindex import open_at, seek_points, spacing_for
from rdscale.io.location import Location

__all__ = [
    "ESM_LETTERS",
    "REJECT_CODES",
    "FastaFormatError",
    "Record",
    "Reject",
    "Shard",
    "ValidationOptions",
    "as_duplicate",
    "dedupe_key",
    "detect_format",
    "nucleotide_share",
    "plan_shards",
    "read_fasta",
    "read_shard",
]

ESM_LETTERS = "ACDEFGHIKLMNPQRSTVWYXBZUO"

REJECT_CODES = ("empty_sequence", "invalid_characters", "duplicate_id", "too_long", "gaps", "empty_id")

GAP_CHARACTERS = "-."


@dataclass(frozen=True, slots=True)
class Record:
    """One accepted FASTA record."""

    id: str  # first whitespace-delimited token of the header (without '>')
    description: str  # rest of the header line, stripped ("" if none)
    sequence: str  # upper-cased, validated, trailing '*' removed
    path: str  # file it came from
    offset: int  # where its '>' is (see the module docstring for what offsets mean per format)
    file_index: int  # position of the file in the input list; (file_index, offset) orders records globally

    @property
    def source(self) -> str:
        return f"{self.path}:{self.offset}"


@dataclass(frozen=True, slots=True)
class Reject:
    """One input record that will not be embedded, and why."""

    id: str
    path: str
    offset: int
    file_index: int
    reason: str  # "<code>: <detail>", code in REJECT_CODES

    @property
    def source(self) -> str:
        return f"{self.path}:{self.offset}"

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class ValidationOptions:
    remove_gaps: bool = False  # strip '-' and '.' instead of rejecting the record


@dataclass(frozen=True)
class Shard:
    """A byte range of one input file; ``read_shard`` yields the records that belong to it."""

    path: str
    file_index: int
    index: int  # position in the global shard plan
    fmt: str  # "plain" | "gzip" | "bgzf"
    start: int  # [start, end): file bytes (compressed bytes for BGZF, decompressed bytes for indexed gzip)
    end: int | None  # None = end of file
    gzip_index: str | None = None  # plain gzip: the seek-point index that lets the shard start mid-stream (else [0, None))

    @property
    def key(self) -> str:
        return f"{self.path}@{self.start}-{'eof' if self.end is None else self.end}"


# --------------------------------------------------------------------------------------------------- formats

_GZIP_MAGIC = b"\x1f\x8b"
_BGZF_MAGIC = b"\x1f\x8b\x08\x04"  # gzip, deflate, FLG.FEXTRA
_BGZF_MAX_BLOCK = 1 << 16  # BSIZE is 16 bits: a block is at most 64 KiB compressed
_BGZF_FOOTER = 8  # CRC32 + ISIZE


def _check_exists(path: str | os.PathLike) -> None:
    loc = Location.parse(path)
    if not loc.is_local:
        if loc.is_dir():
            raise IsADirectoryError(f"FASTA input is a directory, not a file: {path}")
        if not loc.is_file():
            raise loc.error(FileNotFoundError(f"FASTA input not found: {path}"))
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"FASTA input not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"FASTA input is a directory, not a file: {path}")


def _open(path: str | os.PathLike, buffer_size: int | None = None):
    """A seekable binary reader of a local file or an object (ranged reads of `buffer_size` bytes, 8 MiB by
    default for objects; never the whole object at once)."""
    loc = Location.parse(path)
    if loc.is_local:
        return open(path, "rb", buffering=buffer_size or 1 << 20)
    return loc.open(buffer_size=buffer_size or 8 << 20)


def _bgzf_block_size(buf: bytes | memoryview, pos: int = 0) -> int | None:
    """Total size of the BGZF block whose header starts at ``buf[pos]``, or None if it is not a BGZF header.

    Needs the 12 fixed gzip header bytes and the extra field in ``buf``. A header is BGZF when the gzip
    FEXTRA field holds a 'BC' subfield of length 2 (SAM/BAM specification, section 4.1).
    """
    if buf[pos : pos + 4] != _BGZF_MAGIC or len(buf) < pos + 12:
        return None
    (xlen,) = struct.unpack_from("<H", buf, pos + 10)
    extra = buf[pos + 12 : pos + 12 + xlen]
    if len(extra) < xlen:
        return None
    i = 0
    while i + 4 <= xlen:
        si1, si2, slen = extra[i], extra[i + 1], struct.unpack_from("<H", extra, i + 2)[0]
        if si1 == 66 and si2 == 67 and slen == 2 and i + 6 <= xlen:  # 'B', 'C'
            size = struct.unpack_from("<H", extra, i + 4)[0] + 1
            # smallest possible block: header, an empty deflate stream (2 bytes), footer
            return size if size >= 12 + xlen + 2 + _BGZF_FOOTER else None
        i += 4 + slen
    return None


def detect_format(path: str | os.PathLike) -> str:
    """"plain", "gzip" or "bgzf", from the file's first bytes (not its name)."""
    _check_exists(path)
    with _open(path, 1 << 16) as f:
        head = f.read(12)
        if head[:2] != _GZIP_MAGIC:
            return "plain"
        if len(head) == 12 and head[3] & 0x04:  # FEXTRA: read the extra field to look for 'BC'
            (xlen,) = struct.unpack_from("<H", head, 10)
            head += f.read(xlen)
            if _bgzf_block_size(head) is not None:
                return "bgzf"
        return "gzip"


def plan_shards(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    shard_bytes: int = 64 << 20,
    index_dir: str | os.PathLike | Location | None = None,
) -> list[Shard]:
    """Split the inputs into shards of about ``shard_bytes`` (file bytes; compressed bytes for BGZF).

    Plain gzip files are one shard each, unless ``index_dir`` is given: then a plain gzip file larger than
    ``shard_bytes`` is indexed (or its stored index reused) and split at seek points about ``shard_bytes``
    decompressed bytes apart. Every file gets at least one shard, empty files included, so that a shard plan
    also says which files were read.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    shards: list[Shard] = []
    for file_index, path in enumerate(paths):
        path = str(path)
        fmt = detect_format(path)
        size = Location.parse(path).size()
        gz_index = None
        if fmt == "gzip" and index_dir is not None and size > shard_bytes:
            gz_index, points, _ = seek_points(path, index_dir, spacing_for(shard_bytes))
            ranges = [(p, points[i + 1] if i + 1 < len(points) else None) for i, p in enumerate(points)]
        elif fmt == "gzip" or size <= shard_bytes:
            ranges = [(0, None)]
        else:
            starts = range(0, size, shard_bytes)
            ranges = [(s, s + shard_bytes if s + shard_bytes < size else None) for s in starts]
        for start, end in ranges:
            shards.append(Shard(path, file_index, len(shards), fmt, start, end, gz_index))
    return shards


# ------------------------------------------------------------------------------------------------ line sources
# Each source yields (line, offset, owner): the line with its end-of-line bytes, the offset of its first byte
# (as documented for Record.offset) and the file position that decides which shard owns a header on that line
# (the byte offset for plain and gzip, the block start for BGZF).

Line = tuple[bytes, int, int]


_CHUNK = 1 << 20  # bytes read at a time by the line splitter
_EOL = re.compile(rb"\r\n|\r|\n")  # a line break, whatever the platform that wrote the file


def _split_lines(f, chunk: int | None = None) -> Iterator[bytes]:
    r"""The lines of a binary stream, each with its end-of-line bytes, where "\n", "\r\n" and a lone "\r" (classic
    Mac) all end a line (bytes.splitlines' rule). A "\r" that ends a chunk is held back until the next chunk says
    whether a "\n" follows, so a "\r\n" split across reads (or shards, or object-store ranges) is one line break."""
    # read1 where the stream has it (gzip): what is decompressed so far, so the records before a damaged spot are
    # yielded before the damage raises
    read = getattr(f, "read1", f.read)
    pending: list[bytes] = []  # pieces of a line not ended yet (kept apart: one very long line stays linear)
    while True:
        data = read(chunk or _CHUNK)
        if not data:
            if pending:
                yield b"".join(pending)
            return
        if pending and pending[-1].endswith(b"\r"):  # a "\r" at the end of the previous chunk
            if data.startswith(b"\n"):
                pending.append(b"\n")
                data = data[1:]
            yield b"".join(pending)
            pending = []
            if not data:
                continue
        lines = data.splitlines(True)
        last = lines.pop()
        if last.endswith(b"\n"):
            lines.append(last)
            last = None
        if lines:
            if pending:
                lines[0] = b"".join([*pending, lines[0]])
                pending = []
            yield from lines
        if last is not None:  # no line end yet, or a "\r" whose "\n" may open the next chunk
            pending.append(last)


def _plain_lines(path: str, start: int, opened=None) -> Iterator[Line]:
    with (opened if opened is not None else _open(path)) as f:
        pos = start
        if start > 0:
            # The byte before `start` decides whether `start` begins a line: the rest of the line that holds it
            # (with its line break, "\r\n" across `start` included) ends where the first line at or after `start`
            # begins.
            f.seek(start - 1)
        lines = _split_lines(f)
        if start > 0:
            pos = start - 1 + len(next(lines, b""))
        for line in lines:
            yield line, pos, pos
            pos += len(line)


def _indexed_gzip_lines(path: str, start: int, index: str) -> Iterator[Line]:
    """Lines of the decompressed stream from `start` on (resynchronised like a plain file), via the index."""
    gz, raw = open_at(path, index)
    pos = start
    try:
        lines = _plain_lines(path, start, opened=gz)
        while True:
            try:
                item = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, ValueError, zlib.error) as e:
                raise FastaFormatError(path, f"decompressed byte {pos}", f"corrupt or truncated gzip stream: {e}")
            pos = item[1] + len(item[0])
            yield item
    finally:
        raw.close()


def _gzip_lines(path: str) -> Iterator[Line]:
    pos = 0
    with _open(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
        lines = _split_lines(f)
        while True:
            try:
                line = next(lines, b"")
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise FastaFormatError(path, f"decompressed byte {pos}", f"corrupt or truncated gzip stream: {e}")
            if not line:
                return
            yield line, pos, pos
            pos += len(line)


class _BgzfFile:
    """Random access to the BGZF blocks of one file."""

    def __init__(self, path: str):
        self.path = path
        self.size = Location.parse(path).size()
        self.f = _open(path, 1 << 20)  # BGZF readers also seek back a block: keep each ranged read small

    def close(self) -> None:
        self.f.close()

    def _pread(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(n)

    def block_at(self, offset: int) -> tuple[bytes, int] | None:
        """(decompressed data, total block size) of the block at ``offset``; None at end of file."""
        head = self._pread(offset, 12)
        if not head:
            return None
        if len(head) < 12:
            raise FastaFormatError(self.path, f"byte {offset}", "truncated BGZF block header")
        (xlen,) = struct.unpack_from("<H", head, 10)
        head += self.f.read(xlen)
        size = _bgzf_block_size(head)
        if size is None:
            raise FastaFormatError(self.path, f"byte {offset}", "not a BGZF block header (corrupt BGZF stream)")
        body = self.f.read(size - len(head))
        if len(head) + len(body) < size:
            raise FastaFormatError(
                self.path, f"byte {offset}", f"truncated BGZF block: {size} bytes announced, file ends first"
            )
        crc, isize = struct.unpack_from("<II", body, len(body) - _BGZF_FOOTER)
        try:
            data = zlib.decompress(body[: len(body) - _BGZF_FOOTER], -15)
        except zlib.error as e:
            raise FastaFormatError(self.path, f"byte {offset}", f"corrupt BGZF block: {e}") from None
        if len(data) != isize or zlib.crc32(data) != crc:
            raise FastaFormatError(self.path, f"byte {offset}", "corrupt BGZF block: size or CRC32 mismatch")
        return data, size

    def first_block_at_or_after(self, start: int, limit: int | None) -> int | None:
        """Offset of the first intact block starting in [start, limit), or None.

        A candidate counts only if its header is valid, it fits in the file and it decompresses to the size and
        CRC32 its footer announces: a stray 1f 8b 08 04 inside deflate data passes all of that with negligible
        probability. The check deliberately does not look at the next block: a damaged block must be skipped
        here so that the sequential reader of the previous shard runs into it and reports it.
        """
        limit = self.size if limit is None else min(limit, self.size)
        chunk = 4 * _BGZF_MAX_BLOCK
        base = start
        while base < limit:
            buf = self._pread(base, chunk + len(_BGZF_MAGIC) - 1)  # magics straddling the chunk end are found
            pos = buf.find(_BGZF_MAGIC)
            while pos != -1 and pos < chunk and base + pos < limit:
                if self._intact(base + pos):
                    return base + pos
                pos = buf.find(_BGZF_MAGIC, pos + 1)
            base += chunk
        return None

    def _intact(self, offset: int) -> bool:
        try:
            return self.block_at(offset) is not None
        except FastaFormatError:
            return False

    def previous_block(self, offset: int) -> int | None:
        """Start of the block that ends exactly at ``offset`` (a block start), or None if ``offset`` is 0.

        The previous block starts at most 64 KiB earlier; a chain of valid headers from a candidate in that
        window that lands exactly on ``offset`` identifies it.
        """
        if offset == 0:
            return None
        lo = max(0, offset - _BGZF_MAX_BLOCK)
        window = self._pread(lo, offset - lo)
        pos = window.find(_BGZF_MAGIC)
        while pos != -1:
            x, last = pos, None
            while x < len(window):
                size = _bgzf_block_size(window, x)
                if size is None:
                    break
                last, x = x, x + size
            if x == len(window) and last is not None:
                return lo + last
            pos = window.find(_BGZF_MAGIC, pos + 1)
        raise FastaFormatError(self.path, f"byte {offset}", "no BGZF block ends here (corrupt BGZF stream)")

    def starts_line(self, offset: int) -> bool:
        r"""Whether the first decompressed byte of the block at ``offset`` begins a line: the data before it ends
        with "\n", or with a "\r" that is not the first half of a "\r\n" (lone "\r" ends a line too)."""
        first = self.first_byte(offset)
        while (prev := self.previous_block(offset)) is not None:
            data = self.block_at(prev)[0]
            if data:  # an empty block says nothing: look one further back
                return data.endswith(b"\n") or (data.endswith(b"\r") and first != b"\n")
            offset = prev
        return True

    def first_byte(self, offset: int) -> bytes:
        """The first decompressed byte at or after the block at ``offset`` (empty blocks skipped; b"" at the end)."""
        while (got := self.block_at(offset)) is not None:
            if got[0]:
                return got[0][:1]
            offset += got[1]
        return b""


def _bgzf_lines(path: str, start: int, end: int | None) -> Iterator[Line]:
    bgzf = _BgzfFile(path)
    try:
        if start == 0:
            block = 0
            at_line_start = True
        else:
            block = bgzf.first_block_at_or_after(start, end)
            if block is None:
                return
            at_line_start = bgzf.starts_line(block)
        pieces: list[bytes] = []
        line_voffset = line_block = -1
        last_isize = -1
        pending_cr = False  # the line in `pieces` ended with a "\r" at the end of a block: a "\n" may follow
        while (got := bgzf.block_at(block)) is not None:
            data, size = got
            last_isize = len(data)
            pos = 0
            if pending_cr and data:
                if data.startswith(b"\n"):
                    pieces.append(b"\n")
                    pos = 1
                if at_line_start:
                    yield b"".join(pieces), line_voffset, line_block
                at_line_start, pieces, pending_cr = True, [], False
            while pos < len(data):
                if not pieces:
                    line_voffset, line_block = block << 16 | pos, block
                m = _EOL.search(data, pos)
                if m is None:
                    pieces.append(data[pos:])
                    break
                pieces.append(data[pos : m.end()])
                pos = m.end()
                if pos == len(data) and m.group() == b"\r":
                    pending_cr = True
                    break
                if at_line_start:
                    yield b"".join(pieces), line_voffset, line_block
                at_line_start = True
                pieces = []
            block += size
        if pieces and at_line_start:
            yield b"".join(pieces), line_voffset, line_block
        if last_isize != 0:
            # bgzip and htslib end every file with an empty block; without it the file was cut at a block boundary
            raise FastaFormatError(path, f"byte {bgzf.size}", "BGZF file lacks its end-of-file block (truncated?)")
    finally:
        bgzf.close()


# ----------------------------------------------------------------------------------------------------- parsing

_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")  # control bytes other than \t \n \v \f \r
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some Windows editors put at the start of text files
_LINE_SPACE = re.compile(rb"[ \t\r\n\v\f]+")
_ALLOWED = ESM_LETTERS.encode()
_GAPS = GAP_CHARACTERS.encode()


def _text(raw: bytes) -> str:
    """Bytes outside the alphabet as the characters the user typed: UTF-8 if they are, else Latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def residue_letters(raw: bytes) -> bytes:
    """A sequence as records are read: whitespace removed, upper-cased, one trailing '*' (a stop) dropped. Query
    sequences go through the same (rdscale.search.sequences), so a query reads like the record it copies."""
    seq = _LINE_SPACE.sub(b"", raw).upper()
    return seq[:-1] if seq.endswith(b"*") else seq


def _judge(
    header: bytes, chunks: list[bytes], path: str, offset: int, file_index: int, options: ValidationOptions
) -> Record | Reject:
    text = header[1:].decode("utf-8", "backslashreplace").strip()
    words = text.split(None, 1)
    id_ = words[0] if words else ""
    description = words[1].strip() if len(words) > 1 else ""

    def reject(reason: str) -> Reject:
        return Reject(id_, path, offset, file_index, reason)

    if not id_:
        return reject("empty_id: header line has no identifier")
    seq = residue_letters(b"".join(chunks))
    if options.remove_gaps:
        seq = seq.translate(None, _GAPS)
    bad = seq.translate(None, _ALLOWED)
    if bad.translate(None, _GAPS):
        chars = sorted(set(_text(bad)))
        first = next(i for i, c in enumerate(seq) if c not in _ALLOWED)
        return reject(f"invalid_characters: {''.join(chars)!r} (first at residue {first + 1})")
    if bad:
        return reject(f"gaps: {len(bad)} gap characters ('-' or '.'); set remove_gaps to strip them")
    if not seq:
        return reject("empty_sequence: no residues after the header")
    return Record(id_, description, seq.decode("ascii"), path, offset, file_index)


def _records(
    lines: Iterator[Line],
    shard: Shard,
    owns: Callable[[int], bool],
    options: ValidationOptions,
) -> Iterator[Record | Reject]:
    """Group lines into records; yield the records whose header this shard owns, each judged, within-shard
    duplicates rejected."""
    header: bytes | None = None
    offset = 0
    chunks: list[bytes] = []
    seen: dict[str, int] = {}
    first_shard = shard.start == 0

    def finish() -> Record | Reject:
        item = _judge(header, chunks, shard.path, offset, shard.file_index, options)
        if item.id:
            if item.id in seen:
                return as_duplicate(item, f"{shard.path}:{seen[item.id]}")
            seen[item.id] = offset
        return item

    for line, line_offset, owner in lines:
        if first_shard and line_offset == 0 and line.startswith(_BOM):
            line, line_offset = line[len(_BOM) :], len(_BOM)  # same block for BGZF: virtual offset 0 << 16 | 3
        if (m := _BINARY.search(line)) is not None:
            raise FastaFormatError(
                shard.path, _where(shard, line_offset, m.start()),
                f"binary content (byte 0x{m.group()[0]:02x}): not a FASTA text file",
            )
        if line.startswith(b">"):
            if header is not None:
                yield finish()
            if not owns(owner):
                return
            header, offset, chunks = line, line_offset, []
        elif header is not None:
            chunks.append(line)
        elif first_shard:
            if line.strip():  # text before the first header of the file
                raise FastaFormatError(
                    shard.path, _where(shard, line_offset),
                    f"sequence data before the first '>' header: not a FASTA file (the line starts "
                    f"{_text(line.strip()[:40])!r})",
                )
        elif not owns(owner):
            return  # still resynchronising, and already past this shard: no record starts here
    if header is not None:
        yield finish()


def _where(shard: Shard, line_offset: int, column: int = 0) -> str:
    """Where byte ``column`` of the line at ``line_offset`` is, in words."""
    if shard.fmt == "bgzf":  # a line may span blocks: name the line's start
        return f"column {column} of the line at BGZF virtual offset {line_offset} (block at byte {line_offset >> 16})"
    if shard.fmt == "gzip":
        return f"decompressed byte {line_offset + column}"
    return f"byte {line_offset + column}"


def read_shard(shard: Shard, options: ValidationOptions = ValidationOptions()) -> Iterator[Record | Reject]:
    """Yield the records (accepted or rejected) that belong to ``shard``, in file order.

    Duplicate ids are rejected within the shard (the later record); across shards use ``dedupe_key`` and
    ``as_duplicate``, or ``read_fasta``.
    """
    _check_exists(shard.path)
    if shard.fmt == "plain":
        lines = _plain_lines(shard.path, shard.start)
    elif shard.fmt == "gzip" and shard.gzip_index is not None:
        lines = _indexed_gzip_lines(shard.path, shard.start, shard.gzip_index)
    elif shard.fmt == "gzip":
        if shard.start != 0 or shard.end is not None:
            raise ValueError(f"{shard.path}: a plain gzip file cannot be split without a seek-point index; "
                             "its shard must be [0, None)")
        lines = _gzip_lines(shard.path)
    elif shard.fmt == "bgzf":
        lines = _bgzf_lines(shard.path, shard.start, shard.end)
    else:
        raise ValueError(f"unknown FASTA format {shard.fmt!r} (expected plain, gzip or bgzf)")
    end = shard.end
    yield from _records(lines, shard, lambda owner: end is None or owner < end, options)


def read_fasta(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    options: ValidationOptions = ValidationOptions(),
    *,
    shard_bytes: int = 64 << 20,
) -> Iterator[Record | Reject]:
    """Every record of every input, in order, duplicate ids rejected across the whole input.

    Keeps one entry per distinct id in memory; for very large inputs the pipeline dedupes after the fact.
    """
    first_seen: dict[str, str] = {}
    for shard in plan_shards(paths, shard_bytes):
        for item in read_shard(shard, options):
            if not item.id:
                yield item
            elif item.id in first_seen:  # also rewrites within-shard duplicates to point at the first overall
                yield as_duplicate(item, first_seen[item.id])
            else:
                first_seen[item.id] = item.source
                yield item


NUCLEOTIDES = b"ACGTUN"  # also amino-acid letters (Ala, Cys, Gly, Thr, Sec, Asn): DNA reads as a protein


def nucleotide_share(path: str | os.PathLike, residues: int = 20_000) -> tuple[float, int]:
    """(share of A, C, G, T, U, N among the first `residues` residues of the file's accepted records, residues
    seen). Proteins hold about a quarter of these letters; nucleotide sequences nothing else."""
    seen = hits = 0
    first = plan_shards([path], shard_bytes=1 << 62)[0]
    for item in read_shard(first):
        if isinstance(item, Record):
            seq = item.sequence.encode()
            seen += len(seq)
            hits += len(seq) - len(seq.translate(None, NUCLEOTIDES))
            if seen >= residues:
                break
    return (hits / seen if seen else 0.0), seen


def dedupe_key(item: Record | Reject) -> tuple[int, int]:
    """Global input order; of records sharing an id, the one with the smallest key wins."""
    return item.file_index, item.offset


def as_duplicate(item: Record | Reject, first_source: str) -> Reject:
    """The reject for a later occurrence of an id first seen at ``first_source`` ("path:offset")."""
    return Reject(item.id, item.path, item.offset, item.file_index, f"duplicate_id: first seen at {first_source}")

