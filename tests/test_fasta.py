"""rdscale.fasta: sharding invariance (plain and BGZF), one test per validation rule, damaged inputs."""

from __future__ import annotations

import gzip
import math
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from bgzf_util import write_bgzf  # tests/ is on sys.path under pytest
from hypothesis import given
from hypothesis import strategies as st

from rdscale.io.fasta import (
    ESM_LETTERS,
    REJECT_CODES,
    FastaFormatError,
    Record,
    Reject,
    Shard,
    ValidationOptions,
    as_duplicate,
    dedupe_key,
    detect_format,
    plan_shards,
    read_fasta,
    read_shard,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path: Path, text: str | bytes, name: str = "in.fasta") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def read_all(path, **options) -> list[Record | Reject]:
    return list(read_fasta(path, ValidationOptions(**options)))


def only(path, **options) -> Record | Reject:
    (item,) = read_all(path, **options)
    return item


# ------------------------------------------------------------------------------------- generated FASTA files

# What a generated record should come out as: its sequence, or the reject code.
KINDS = ("valid", "empty", "invalid", "gaps")


@st.composite
def fasta_files(draw):
    """(file bytes, expected items) with awkward wrapping, blank lines, CRLF and maybe no final newline.

    Expected items are (id, offset of '>', sequence or reject code); ids may repeat (the first one wins).
    """
    n = draw(st.integers(0, 12))
    # one line ending for the file (Unix, Windows, classic Mac), or any of them at every line break
    style = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))

    def newline_() -> str:
        return draw(st.sampled_from(["\n", "\r\n", "\r"])) if style == "mixed" else style

    out = "".join(draw(st.lists(st.sampled_from(["", "nl"]), max_size=2))).replace("nl", newline_())
    expected, claimed = [], set()
    for _ in range(n):
        rid = draw(st.sampled_from(["P1", "P2", "sp|Q9|X_HUMAN", "tr|A0A|Y", "u5", "u6", "u7", "u8", "u9"]))
        desc = draw(st.sampled_from(["", " some protein", "\tOS=Homo sapiens  GN=X "]))
        kind = draw(st.sampled_from(KINDS))
        residues = draw(st.text(alphabet=ESM_LETTERS + ESM_LETTERS.lower(), min_size=1, max_size=40))
        if kind == "empty":
            residues = draw(st.sampled_from(["", "*"]))
        elif kind == "invalid":
            i = draw(st.integers(0, len(residues)))
            residues = residues[:i] + draw(st.sampled_from(["1", "#", "J", "**", "@"])) + residues[i:]
        elif kind == "gaps":
            i = draw(st.integers(0, len(residues)))
            residues = residues[:i] + draw(st.sampled_from(["-", ".", "--"])) + residues[i:]
        if kind != "empty" and draw(st.booleans()):
            residues += "*"
        width = draw(st.one_of(st.integers(1, 12), st.just(10_000)))
        lines = [residues[i : i + width] for i in range(0, len(residues), width)]
        body = "".join(line + newline_() + draw(st.sampled_from(["", "", newline_()])) for line in lines)
        expected_value = residues.upper().removesuffix("*") if kind == "valid" else kind + "_sequence"
        expected_value = {"invalid_sequence": "invalid_characters", "gaps_sequence": "gaps"}.get(
            expected_value, expected_value
        )
        if rid in claimed:
            expected_value = "duplicate_id"
        claimed.add(rid)
        expected.append((rid, len(out.encode()), expected_value))
        out += f">{rid}{desc}{newline_()}{body}"
    if n and draw(st.booleans()):
        out = out.rstrip("\r\n")  # last line without newline
    return out.encode(), expected


def outcome(item: Record | Reject):
    return item.sequence if isinstance(item, Record) else item.code


def dedupe(items):
    """What the pipeline does after reading shards independently: the first (file_index, offset) keeps an id."""
    first = {}
    for item in sorted(items, key=dedupe_key):
        if item.id and item.id in first:
            yield as_duplicate(item, first[item.id].source)
        else:
            first.setdefault(item.id, item)
            yield item


def cut(size: int, fmt: str, path: str, cuts: list[int]) -> list[Shard]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < size)), None]
    return [Shard(path, 0, i, fmt, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def check_sharding(path: str, fmt: str, size: int, expected, random_cuts, owner_of):
    """Every shard plan reads each record exactly once, in the shard that owns it, with unchanged content."""
    whole = list(read_fasta(path))
    assert [(i.id, i.offset, outcome(i)) for i in whole] == expected
    shard_sizes = [max(1, math.ceil(size / k)) for k in (1, 2, 7)]
    for shard_bytes in shard_sizes:
        assert list(read_fasta(path, shard_bytes=shard_bytes)) == whole
    plans = [plan_shards(path, shard_bytes) for shard_bytes in shard_sizes] + [cut(size, fmt, path, random_cuts)]
    for plan in plans:
        per_shard = [(shard, list(read_shard(shard))) for shard in plan]
        for shard, items in per_shard:
            for item in items:
                assert shard.start <= owner_of(item.offset) and (shard.end is None or owner_of(item.offset) < shard.end)
        union = [item for _, items in per_shard for item in items]
        assert Counter(i.offset for i in union) == Counter(o for _, o, _ in expected)  # each exactly once
        assert list(dedupe(union)) == whole


@given(fasta_files(), st.lists(st.integers(1, 2000), max_size=6))
def test_plain_shards_read_every_record_exactly_once(tmp_path_factory, generated, cuts):
    data, expected = generated
    path = write(tmp_path_factory.mktemp("plain"), data)
    check_sharding(path, "plain", len(data), expected, cuts, owner_of=lambda offset: offset)


@given(
    fasta_files(),
    st.lists(st.integers(0, 30), min_size=1, max_size=5).filter(any),
    st.booleans(),
    st.lists(st.integers(1, 4000), max_size=6),
)
def test_bgzf_shards_read_every_record_exactly_once(tmp_path_factory, generated, block_sizes, at_records, cuts):
    data, expected = generated
    if at_records:  # blocks that end right before a '>' (and empty blocks) exercise the resynchronisation
        starts = [0, *(o for _, o, _ in expected), len(data)]
        block_sizes = [n for a, b in zip(starts, starts[1:]) if b > a for n in (b - a, 0)] or block_sizes
    path = write(tmp_path_factory.mktemp("bgzf"), b"", "in.fasta.gz")
    layout = write_bgzf(path, data, block_sizes)
    assert gzip.decompress(Path(path).read_bytes()) == data  # the test writer makes valid gzip
    expected = [(rid, layout.virtual_offset(offset), value) for rid, offset, value in expected]
    size = Path(path).stat().st_size
    check_sharding(path, "bgzf", size, expected, cuts, owner_of=lambda voffset: voffset >> 16)


def test_bgzf_example_with_real_block_sizes_shards_like_plain(tmp_path):
    data = (EXAMPLES / "example.fasta").read_bytes()
    path = write(tmp_path, b"", "example.fasta.gz")
    write_bgzf(path, data)  # 65280-byte blocks, as bgzip writes them
    plain = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "example.fasta")]
    for shard_bytes in (1 << 20, 9000, 1000):
        assert [(r.id, r.sequence) for r in read_fasta(path, shard_bytes=shard_bytes)] == plain


# ------------------------------------------------------------------------------------------ validation rules


def test_lowercase_is_accepted_and_upper_cased(tmp_path):
    assert only(write(tmp_path, ">p\nmkvL\n")).sequence == "MKVL"


def test_full_esm_alphabet_is_accepted(tmp_path):
    assert only(write(tmp_path, f">p\n{ESM_LETTERS}\n")).sequence == ESM_LETTERS


def test_single_trailing_stop_is_stripped(tmp_path):
    assert only(write(tmp_path, ">p\nMKV*\n")).sequence == "MKV"


@pytest.mark.parametrize("sequence", ["MK*V", "MKV**"])
def test_other_stops_are_invalid(tmp_path, sequence):
    assert only(write(tmp_path, f">p\n{sequence}\n")).code == "invalid_characters"


def test_crlf_line_ends_are_accepted(tmp_path):
    item = only(write(tmp_path, ">p desc\r\nMK\r\nVL\r\n"))
    assert (item.id, item.description, item.sequence) == ("p", "desc", "MKVL")


def test_blank_lines_are_ignored(tmp_path):
    items = read_all(write(tmp_path, "\n\n>p\nMK\n\nVL\n\n\n>q\n\nA\n"))
    assert [(i.id, i.sequence) for i in items] == [("p", "MKVL"), ("q", "A")]


def test_last_line_without_newline(tmp_path):
    assert only(write(tmp_path, ">p\nMK\nVL")).sequence == "MKVL"


def test_spaces_inside_sequence_lines_are_ignored(tmp_path):
    assert only(write(tmp_path, ">p\nMK VL\t \n")).sequence == "MKVL"


def test_header_splits_into_id_and_description(tmp_path):
    item = only(write(tmp_path, ">sp|P69905|HBA_HUMAN \t Hemoglobin subunit alpha  OS=Homo sapiens \nMV\n"))
    assert (item.id, item.description) == ("sp|P69905|HBA_HUMAN", "Hemoglobin subunit alpha  OS=Homo sapiens")


@pytest.mark.parametrize("body", ["", "\n\n", "*\n"])
def test_empty_sequence_is_rejected(tmp_path, body):
    item = only(write(tmp_path, f">p\n{body}"))
    assert isinstance(item, Reject) and item.code == "empty_sequence"


@pytest.mark.parametrize("bad", ["1", "J", "#", "?", "é"])
def test_characters_outside_the_alphabet_are_rejected(tmp_path, bad):
    item = only(write(tmp_path, f">p\nMK{bad}V\n"))
    assert isinstance(item, Reject) and item.code == "invalid_characters"
    assert "residue 3" in item.reason


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_non_ascii_letters_are_named_as_typed(tmp_path, encoding):
    item = only(write(tmp_path, ">p\nMK\u00e9V\u00e9\n".encode(encoding)))
    assert item.code == "invalid_characters"
    assert "'\u00e9'" in item.reason and "residue 3" in item.reason


def test_gaps_are_rejected_by_default(tmp_path):
    item = only(write(tmp_path, ">p\nMK-V.L\n"))
    assert isinstance(item, Reject) and item.code == "gaps"


def test_remove_gaps_strips_them(tmp_path):
    path = write(tmp_path, ">p\nMK-V.L\n>q\n--\n")
    p, q = read_all(path, remove_gaps=True)
    assert p.sequence == "MKVL"
    assert q.code == "empty_sequence"  # nothing left once the gaps are gone


def test_header_without_id_is_rejected(tmp_path):
    item = only(write(tmp_path, ">   \nMKV\n"))
    assert isinstance(item, Reject) and item.code == "empty_id"


def test_later_duplicate_id_is_rejected_within_a_shard(tmp_path):
    path = write(tmp_path, ">p one\nMKV\n>q\nA\n>p two\nMKW\n")
    (shard,) = plan_shards(path)
    p, q, dup = read_shard(shard)
    assert (p.description, q.id) == ("one", "q")
    assert dup.code == "duplicate_id" and dup.offset == 16 and f"{path}:0" in dup.reason


def test_duplicate_ids_are_rejected_across_shards_and_files(tmp_path):
    a = write(tmp_path, ">p\nMKV\n>q\nAAAA\n", "a.fasta")
    b = write(tmp_path, ">q\nMKV\n", "b.fasta")
    assert [s.start for s in plan_shards(a, 5)] == [0, 5, 10]  # '>q' (byte 7) is in another shard than '>p'
    items = list(read_fasta([a, b], shard_bytes=5))
    assert [outcome(i) for i in items] == ["MKV", "AAAA", "duplicate_id"]
    assert items[2].source == f"{b}:0" and f"{a}:7" in items[2].reason
    assert dedupe_key(items[2]) == (1, 0)


def test_a_rejected_record_still_claims_its_id(tmp_path):
    items = read_all(write(tmp_path, ">p\nMK1\n>p\nMKV\n"))
    assert [i.code for i in items] == ["invalid_characters", "duplicate_id"]


def test_reject_codes_are_declared(tmp_path):
    items = read_all(write(tmp_path, ">a\n\n>b\nM1\n>c\nM-\n>c\nM\n>\nM\n"))
    assert [i.code for i in items] == ["empty_sequence", "invalid_characters", "gaps", "duplicate_id", "empty_id"]
    assert all(i.code in REJECT_CODES for i in items)
    assert all(re.fullmatch(r"\w+: .+", i.reason) for i in items)


# --------------------------------------------------------------------------------------------- damaged inputs


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.fasta"
    with pytest.raises(FileNotFoundError, match="nope.fasta"):
        list(read_fasta(missing))


def test_empty_file_has_no_records(tmp_path):
    assert read_all(write(tmp_path, b"")) == []
    assert read_all(write(tmp_path, gzip.compress(b""), "empty.fasta.gz")) == []
    assert read_all(write(tmp_path, "\n \r\n")) == []


def test_sequence_before_any_header_is_not_fasta(tmp_path):
    path = write(tmp_path, "\nMKVL\n>p\nMKV\n")
    with pytest.raises(FastaFormatError, match=re.escape(path) + r".*header.*byte 1\b"):
        list(read_fasta(path))


def test_sequence_before_any_header_is_found_whatever_the_sharding(tmp_path):
    path = write(tmp_path, "\n" * 30 + "MKVL\n" + "\n" * 30 + ">p\nMKV\n")
    for shard_bytes in (1, 7, 20, 1000):
        with pytest.raises(FastaFormatError, match="before the first"):
            list(read_fasta(path, shard_bytes=shard_bytes))


def test_other_formats_are_named_in_the_error(tmp_path):
    path = write(tmp_path, "@read1\nACGT\n+\nIIII\n", "reads.fastq")
    with pytest.raises(FastaFormatError, match=r"not a FASTA file \(the line starts '@read1'\)"):
        list(read_fasta(path))


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf>p one\nMKV\n>q\nAA\n")
    p, q = read_all(path)
    assert (p.id, p.description, p.sequence, p.offset) == ("p", "one", "MKV", 3)
    assert (q.id, q.offset) == ("q", 14)  # offsets stay file bytes: the BOM counts
    bgzf = write(tmp_path, b"", "bom.fasta.gz")
    write_bgzf(bgzf, Path(path).read_bytes(), [5, 0, 7])
    assert [(r.id, r.sequence) for r in read_fasta(bgzf, shard_bytes=20)] == [("p", "MKV"), ("q", "AA")]


def test_binary_content_is_not_fasta(tmp_path):
    path = write(tmp_path, b">p\nMKV\n>q\nMK\x00\x00V\n")
    items = []
    with pytest.raises(FastaFormatError, match=re.escape(path) + r".*binary.*byte 12\b"):
        for item in read_fasta(path):
            items.append(item)
    assert [i.id for i in items] == ["p"]  # records before the damage came out, and then the error


def gzip_records(n: int) -> bytes:
    rng = random.Random(0)  # random residues: the stream must not compress to a few bytes
    return gzip.compress("".join(f">p{i}\n{''.join(rng.choices(ESM_LETTERS, k=240))}\n" for i in range(n)).encode())


def test_truncated_gzip_raises_after_the_good_records(tmp_path):
    path = write(tmp_path, gzip_records(200)[:-200], "cut.fasta.gz")
    assert detect_format(path) == "gzip"
    items = []
    with pytest.raises(FastaFormatError, match=re.escape(path) + ".*gzip"):
        for item in read_fasta(path):
            items.append(item)
    assert 0 < len(items) < 200


def test_corrupt_gzip_raises(tmp_path):
    data = bytearray(gzip_records(50))
    data[len(data) // 2] ^= 0xFF
    path = write(tmp_path, bytes(data), "bad.fasta.gz")
    with pytest.raises(FastaFormatError, match=re.escape(path)):
        list(read_fasta(path))


def bgzf_of(tmp_path, text: str, name="in.fasta.gz", **kwargs):
    path = write(tmp_path, b"", name)
    layout = write_bgzf(path, text.encode(), [50, 37, 64], **kwargs)
    return path, Path(path).read_bytes(), layout


def test_truncated_bgzf_raises_with_any_sharding(tmp_path):
    text = "".join(f">p{i}\nMKVLAWMKVLAW\n" for i in range(40))
    _, data, _ = bgzf_of(tmp_path, text)
    for cut_at in (len(data) // 3, len(data) // 2 + 5, len(data) - 10):
        path = write(tmp_path, data[:cut_at], "cut.fasta.gz")
        for shard_bytes in (10**6, 301, 64):
            with pytest.raises(FastaFormatError, match=re.escape(path) + ".*BGZF"):
                list(read_fasta(path, shard_bytes=shard_bytes))


def test_bgzf_without_eof_block_is_truncated(tmp_path):
    path, _, _ = bgzf_of(tmp_path, ">p\nMKV\n>q\nMKV\n", eof_block=False)
    with pytest.raises(FastaFormatError, match="end-of-file block"):
        list(read_fasta(path))


def test_corrupt_bgzf_block_raises(tmp_path):
    _, data, layout = bgzf_of(tmp_path, "".join(f">p{i}\nMKVLAWMKVLAW\n" for i in range(40)))
    damaged = bytearray(data)
    block = layout.compressed_starts[len(layout.compressed_starts) // 2]
    damaged[block + 18 + 3] ^= 0x55  # inside the deflate data of a middle block (header fields are not all checked)
    path = write(tmp_path, bytes(damaged), "bad.fasta.gz")
    for shard_bytes in (10**6, 200):
        with pytest.raises(FastaFormatError, match=re.escape(path) + ".*BGZF"):
            list(read_fasta(path, shard_bytes=shard_bytes))


# ------------------------------------------------------------------------------------------ formats and plans


def test_detect_format_by_content(tmp_path):
    plain = write(tmp_path, ">p\nM\n", "a.gz")  # the name does not matter
    gz = write(tmp_path, gzip.compress(b">p\nM\n"), "b.fasta")
    bgzf, _, _ = bgzf_of(tmp_path, ">p\nM\n", "c.fasta")
    assert [detect_format(p) for p in (plain, gz, bgzf)] == ["plain", "gzip", "bgzf"]


def test_plan_shards_covers_files_contiguously(tmp_path):
    a = write(tmp_path, ">p\n" + "M" * 1000 + "\n", "a.fasta")
    b = write(tmp_path, gzip.compress(b">q\nM\n" * 500), "b.fasta.gz")
    plan = plan_shards([a, b], shard_bytes=300)
    assert [s.index for s in plan] == list(range(len(plan)))
    plain = [s for s in plan if s.file_index == 0]
    assert plain[0].start == 0 and plain[-1].end is None and len(plain) == 4
    assert all(x.end == y.start for x, y in zip(plain, plain[1:]))
    assert [(s.fmt, s.start, s.end) for s in plan if s.file_index == 1] == [("gzip", 0, None)]
    assert len({s.key for s in plan}) == len(plan)


def test_gzip_shard_cannot_start_mid_file(tmp_path):
    path = write(tmp_path, gzip.compress(b">q\nM\n"), "b.fasta.gz")
    with pytest.raises(ValueError, match="cannot be split"):
        list(read_shard(Shard(path, 0, 0, "gzip", 10, None)))


# ----------------------------------------------------------------------------------------------- example data


def test_example_fasta_is_clean_and_spans_the_lengths():
    items = read_all(EXAMPLES / "example.fasta")
    assert all(isinstance(i, Record) for i in items) and 100 <= len(items) <= 150
    lengths = [len(r.sequence) for r in items]
    assert min(lengths) >= 30 and sum(1100 <= n <= 1600 for n in lengths) == 1
    assert max(n for n in lengths if n < 1100) <= 900


def test_messy_fasta_counts_match_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    accepted = int(re.search(r"accepted: (\d+)", readme).group(1))
    rejected = dict(re.findall(r"`(\w+)`: (\d+)", readme))
    items = read_all(EXAMPLES / "messy.fasta")
    assert sum(isinstance(i, Record) for i in items) == accepted
    assert Counter(i.code for i in items if isinstance(i, Reject)) == {k: int(v) for k, v in rejected.items()}


def readme_table() -> list[str]:
    """The outcome column of the README's table of messy.fasta records, in record order."""
    rows = re.findall(r"^\| (\d+) \| .+ \| (\w+) \|$", (EXAMPLES / "README.md").read_text(), re.MULTILINE)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    return [outcome for _, outcome in rows]


def test_messy_fasta_records_match_the_readme_table():
    items = read_all(EXAMPLES / "messy.fasta")
    assert ["accepted" if isinstance(i, Record) else i.code for i in items] == readme_table()


def test_make_messy_damage_table_agrees_with_the_reader(tmp_path):
    """make_messy.py counts outcomes from its own table; the reader must agree on any clean input."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_messy.py")],
        input=(EXAMPLES / "example.fasta").read_bytes(), capture_output=True, check=True,
    )
    declared = dict(re.findall(r"`?(\w+)`?: (\d+)", done.stderr.decode()))
    items = read_all(write(tmp_path, done.stdout, "messy.fasta"))
    assert sum(isinstance(i, Record) for i in items) == int(declared.pop("accepted"))
    assert Counter(i.code for i in items if isinstance(i, Reject)) == {k: int(v) for k, v in declared.items()}
    assert not done.stdout.endswith(b"\n")  # the last line has no newline


# ------------------------------------------------------------------------------------------------ line endings


@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b">a b", b"MKV", b"", b"\r\r", b"\n\r"]), max_size=30),
       st.integers(1, 9))
def test_line_splitter_is_splitlines_whatever_the_read_size(pieces, chunk):
    """Reads of any size, a "\r\n" split between two of them included, give bytes.splitlines' lines."""
    import io

    from rdscale.io.fasta import _split_lines

    data = b"".join(pieces)
    assert list(_split_lines(io.BytesIO(data), chunk)) == data.splitlines(True)


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
@pytest.mark.parametrize("fmt", ["plain", "gzip", "bgzf"])
def test_every_line_ending_reads_every_record(tmp_path, ending, fmt):
    """Ten records with classic Mac (lone CR), Unix or Windows line ends: ten records, whatever the format and the
    shard size (a lone CR once read as one long header: 1 reject, 9 records gone)."""
    text = "".join(f">p{i} protein {i}{ending}MKV{ending}LLA{ending}" for i in range(10)).encode()
    path = write(tmp_path, b"", f"in.{fmt}")
    if fmt == "plain":
        Path(path).write_bytes(text)
    elif fmt == "gzip":
        Path(path).write_bytes(gzip.compress(text))
    else:
        write_bgzf(path, text, [7, 13, 1, 0, 29])
    for shard_bytes in (1 << 20, 40, 7, 1):
        items = list(read_fasta(path, shard_bytes=shard_bytes))
        assert [(i.id, outcome(i)) for i in items] == [(f"p{i}", "MKVLLA") for i in range(10)], shard_bytes
        assert [i.description for i in items] == [f"protein {i}" for i in range(10)]


def test_second_half_with_lone_cr_loses_nothing(tmp_path):
    first = "".join(f">a{i}\nMKV\n" for i in range(5))
    second = "".join(f">b{i}\rMKV\r" for i in range(5))
    items = read_all(write(tmp_path, first + second))
    assert [i.id for i in items] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    assert all(isinstance(i, Record) for i in items)


def test_crlf_split_across_a_shard_boundary(tmp_path):
    """A shard that starts between the "\r" and the "\n" of a line break: the "\n" ends the previous line; the next
    line (a header) belongs to this shard, read once."""
    data = b">a\r\nMKV\r\n>b\r\nLLA\r\n"
    path = write(tmp_path, data)
    cut_at = data.index(b"\n>b")  # the "\n" of the break before >b
    plan = [Shard(path, 0, 0, "plain", 0, cut_at), Shard(path, 0, 1, "plain", cut_at, None)]
    first, second = (list(read_shard(s)) for s in plan)
    assert [i.id for i in first] == ["a"] and [i.id for i in second] == ["b"]
    assert second[0].offset == cut_at + 1
