"""Object storage end to end, against a real S3 server (SeaweedFS): locations, runs on S3 equal to local runs, the
verbs on an S3 run, relocated runs, plain gzip split by a seek-point index, checkpoint URIs, bad locations."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdscale.cli.main import main
from rdscale.io.fasta import Reject, plan_shards, read_fasta, read_shard
from rdscale.io.location import Location, LocationError
from rdscale.io.runs import Run, open_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "example.fasta"


# ------------------------------------------------------------------------------------------------- locations


def test_location_parse_forms():
    assert Location.parse("s3://bucket//a/b/").uri == "s3://bucket/a/b"
    assert Location.parse("s3://bucket/a").bucket == "bucket"
    assert Location.parse("s3://bucket/a/b").key == "a/b"
    assert Location.parse("gcs://b/x").scheme == "gs"
    assert Location.parse("file:///tmp/x/../y").uri == "/tmp/y"
    assert Location.parse("runs/demo").is_local and Location.parse("runs/demo").uri == "runs/demo"
    assert (Location.parse("s3://b/run") / "fit").uri == "s3://b/run/fit"
    assert Location.parse("s3://b/run/fit").relative_to("s3://b/run") == "fit"
    assert Location.parse("s3://b/other/fit").relative_to("s3://b/run") is None
    assert Location.parse("s3://b/run").resolve("fit_ext_64").uri == "s3://b/run/fit_ext_64"
    assert Location.parse("s3://b/run").resolve("/abs/fit").uri == "/abs/fit"
    for bad in ("ftp://host/x", "http://x/y", "s3://", "s3:///key"):
        with pytest.raises(LocationError) as err:
            Location.parse(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(LocationError):
        Location.parse("s3://b/run").join("../escape")


@given(st.lists(st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=8).filter(lambda t: t not in (".", "..")),
                min_size=1, max_size=4),
       st.sampled_from(["s3://bucket/base", "gs://bucket", "/tmp/base", "rel/base"]))
def test_join_relative_roundtrip(parts, base):
    loc = Location.parse(base).join(*parts)
    rel = loc.relative_to(base)
    assert rel == "/".join(parts)
    assert Location.parse(base).resolve(rel) == loc
    assert Location.parse(loc.uri) == loc


def test_location_bytes_and_ranged_reads(s3):
    data = bytes(random.Random(1).randrange(256) for _ in range(300_000))
    loc = Location.parse(s3.uri("loc", "blob.gz"))  # a .gz name must not be (de)compressed on the way
    loc.write_bytes(data)
    assert loc.is_file() and loc.size() == len(data) and loc.read_bytes() == data
    with loc.open(buffer_size=1 << 16) as fh:
        fh.seek(123_457)
        assert fh.read(70_000) == data[123_457:193_457]
        fh.seek(5)
        assert fh.read(3) == data[5:8]
    assert [x.name for x in Location.parse(s3.uri("loc")).list()] == ["blob.gz"]
    cached = Location.parse(loc.uri).local_copy()
    assert Path(cached).read_bytes() == data
    stamp = Path(cached).stat().st_mtime_ns
    assert loc.local_copy() == cached and Path(cached).stat().st_mtime_ns == stamp  # fetched once
    loc.delete()
    assert not loc.exists()


# ------------------------------------------------------------------------------------------ runs on S3


def _subset(path: Path, n: int) -> Path:
    items = [r for r in read_fasta([str(EXAMPLE)]) if not isinstance(r, Reject)][:n]
    text = "".join(f">{r.id} {r.description}\n{r.sequence[:300]}\n" for r in items)
    text += ">bad_one\nMKV1LL\n>empty_one\n"  # two rejects
    path.write_text(text)
    return path


def _cli(*argv: str) -> int:
    return main(["-q", *argv])


def _rows(run: str | Path, table: str, keys: list[str]):
    t = open_dataset(Run(str(run)).table(table)).to_table()
    t = t.sort_by([(k, "ascending") for k in keys])
    return t


@pytest.fixture(scope="module")
def s3_runs(s3_server, tiny_family, tmp_path_factory):
    """The same small run on local disk and with FASTA, checkpoints and output on S3 (storage options from the
    config carry the credentials, which must never be recorded)."""
    mp = pytest.MonkeyPatch()
    for key, value in s3_server.env().items():
        mp.setenv(key, value)
    tmp = tmp_path_factory.mktemp("s3runs")
    mp.setenv("RDSCALE_CACHE_DIR", str(tmp / "cache"))
    fasta = _subset(tmp / "in.fasta", 30)
    models_s3 = []
    for path in tiny_family:
        uri = s3_server.uri("models", Path(path).name)
        Location.parse(uri).write_bytes(Path(path).read_bytes())
        models_s3.append(uri)
    fasta_s3 = s3_server.uri("in", "in.fasta")
    Location.parse(fasta_s3).write_bytes(fasta.read_bytes())
    # groups of >= 200 rows: several fragments per table, written by the driver to S3 (compact has work to do)
    common = ["--local", "--set", "output.residue_dtype=float32", "--set", "fit.sample_sequences=20",
              "--set", "input.shard_mb=0.004", "--set", "output.fragment_rows=200"]
    local = tmp / "local"
    assert _cli("run", "--fasta", str(fasta), "--models", *map(str, tiny_family), "-o", str(local), *common) == 0
    remote = s3_server.uri("runs", "r1")
    mp.delenv("AWS_SECRET_ACCESS_KEY")  # from storage.options only
    options = json.dumps({"aws_secret_access_key": s3_server.env()["AWS_SECRET_ACCESS_KEY"]})
    assert _cli("run", "--fasta", fasta_s3, "--models", *models_s3, "-o", remote, *common,
                "--set", f"storage.options={options}") == 0
    mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env()["AWS_SECRET_ACCESS_KEY"])
    from rdscale.io.location import set_storage_options

    set_storage_options(None)
    yield {"local": local, "remote": remote, "fasta": fasta, "models_s3": models_s3, "tmp": tmp}
    mp.undo()


def test_s3_run_equals_local_run(s3_runs, s3):
    local, remote = s3_runs["local"], s3_runs["remote"]
    for table, keys in (("proteins", ["id"]), ("residues", ["id", "pos"]), ("rejects", ["id"])):
        a, b = _rows(local, table, keys), _rows(remote, table, keys)
        assert a.num_rows == b.num_rows > 0
        for column in keys + (["length", "sequence"] if table == "proteins" else []) + \
                (["reason"] if table == "rejects" else []):
            assert a[column].to_pylist() == b[column].to_pylist()
        if "embedding" in a.column_names:
            ea = np.asarray(a["embedding"].to_pylist(), np.float32)
            eb = np.asarray(b["embedding"].to_pylist(), np.float32)
            np.testing.assert_allclose(eb, ea, atol=1e-5, rtol=0)
    # no absolute paths, no credentials in what the run records
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    meta = Run(remote).metadata()
    assert meta["fit_manifest"]["artifact"] == "fit"
    assert "storage" not in meta["config"]
    for table in ("proteins", "residues", "rejects", "shards"):
        md = open_dataset(Run(remote).table(table)).schema.metadata or {}
        assert all(secret.encode() not in v for v in md.values())
    assert secret not in Location.parse(remote).join("fit", "manifest.json").read_text()
    # the checkpoints came from S3 and are recorded as their URIs with their hashes
    models = meta["fit_manifest"]["models"]
    assert [m["source"] for m in models] == s3_runs["models_s3"] and all(m["sha256"] for m in models)


def test_verbs_on_s3_run(s3_runs, s3, capsys):
    remote = s3_runs["remote"]
    assert _cli("info", "-o", remote) == 0
    out = capsys.readouterr().out
    assert "proteins: 30 rows" in out and "rejects: 2 rows" in out and "[32, 48, 64]" in out
    assert _cli("index", "-o", remote, "--width", "32") == 0
    first = next(r for r in read_fasta([str(s3_runs["fasta"])]) if not isinstance(r, Reject))
    capsys.readouterr()
    assert _cli("search", "-o", remote, "--id", first.id, "--width", "32", "-k", "3", "--mode", "exact") == 0
    assert first.id in capsys.readouterr().out
    query = s3_runs["tmp"] / "q.fasta"
    query.write_text(f">q\n{first.sequence}\n")
    csv = s3_runs["tmp"] / "hits.csv"
    assert _cli("search", "-o", remote, "--fasta", str(query), "--mode", "exact", "-k", "1", "--csv", str(csv)) == 0
    lines = csv.read_text().splitlines()
    assert lines[1].split(",")[1] == first.id  # the query's own sequence is its nearest neighbour
    assert _cli("eval", "reconstruction", "--fit", f"{remote}/fit") == 0
    assert "R^2" in capsys.readouterr().out
    assert _cli("verify", remote) == 0  # the inputs on S3 too
    assert ": ok (every input record" in capsys.readouterr().out
    broken = Location.parse(s3.uri("runs", "broken"))
    Location.parse(remote).copy_tree_to(broken)
    Run(broken).dataset("proteins").delete(f"id = '{first.id}'")
    assert _cli("verify", broken.uri) == 1
    assert f"({first.id}) is in neither proteins nor rejects" in capsys.readouterr().out


def test_compact_and_index_hints_on_s3_run(s3_runs, s3, capsys, tmp_path):
    # compact on an s3:// run used to read it as a local Path ("s3:/bucket/..." holds no rdscale run)
    copy = Location.parse(s3.uri("compacted", "r1"))
    Location.parse(s3_runs["remote"]).copy_tree_to(copy)
    before = {name: _rows(copy.uri, name, keys) for name, keys in (("proteins", ["id"]), ("residues", ["id", "pos"]))}
    assert len(Run(copy).dataset("proteins").get_fragments()) > 1
    capsys.readouterr()
    assert _cli("compact", copy.uri) == 0
    assert "proteins: " in capsys.readouterr().out
    assert len(Run(copy).dataset("proteins").get_fragments()) == 1
    for name, keys in (("proteins", ["id"]), ("residues", ["id", "pos"])):
        assert _rows(copy.uri, name, keys).equals(before[name])
    assert _cli("verify", copy.uri) == 0
    # a missing run: one line, exit 2, and no directory (or lease object) left behind by the check
    capsys.readouterr()
    assert _cli("compact", s3.uri("compacted", "nothing")) == 2
    assert _cli("compact", str(tmp_path / "nothing")) == 2
    assert not (tmp_path / "nothing").exists()
    assert not Location.parse(s3.uri("compacted", "nothing")).exists()
    # FAISS indexes live beside an S3 run as objects: the search hint names the command that builds one, and it works
    capsys.readouterr()
    first = before["proteins"]["id"][0].as_py()
    assert _cli("search", copy.uri, "--id", first, "--mode", "ann", "--backend", "faiss") == 1
    err = capsys.readouterr().err
    assert "--backend faiss`" in err, err
    assert _cli("index", copy.uri, "--width", "32", "--backend", "faiss") == 0
    assert _cli("search", copy.uri, "--id", first, "--mode", "ann", "--backend", "faiss", "--width", "32") == 0
    assert first in capsys.readouterr().out


def test_copied_run_still_works(s3_runs, s3, tiny_family, capsys):
    remote = Location.parse(s3_runs["remote"])
    copy = Location.parse(s3.uri("moved", "elsewhere", "r1"))
    remote.copy_tree_to(copy)
    query = s3_runs["tmp"] / "q2.fasta"
    first = next(r for r in read_fasta([str(s3_runs["fasta"])]) if not isinstance(r, Reject))
    query.write_text(f">q\n{first.sequence}\n")
    # the original is deleted: nothing of the copy may still point at it
    original_fit = remote.join("fit")
    original_fit.delete()
    csv = s3_runs["tmp"] / "hits2.csv"
    assert _cli("search", "-o", copy.uri, "--fasta", str(query), "--mode", "exact", "-k", "1", "--csv", str(csv)) == 0
    assert csv.read_text().splitlines()[1].split(",")[1] == first.id
    # extend the copy with a wider model from S3
    from rdscale.model.loading import build_tiny_family

    wider = build_tiny_family(s3_runs["tmp"] / "wider", widths=(32, 48, 64, 80), layers=(2, 3, 4, 4), seed=0)[-1]
    wider_uri = s3.uri("models", wider.name)
    Location.parse(wider_uri).write_bytes(wider.read_bytes())
    assert _cli("extend", "-o", copy.uri, "--model", wider_uri, "--sample", "10", "--local") == 0
    meta = Run(copy).metadata()
    assert meta["levels"] == [32, 48, 64, 80]
    assert [e["step"] for e in meta["fit_manifest"]["extensions"]] == ["fit_ext_64"]
    capsys.readouterr()
    assert _cli("search", "-o", copy.uri, "--fasta", str(query), "--mode", "exact", "-k", "1", "--csv", str(csv)) == 0
    assert csv.read_text().splitlines()[1].split(",")[1] == first.id


def test_tampered_checkpoint_is_refused(s3_runs, s3, tiny_family, tmp_path, capsys):
    """A checkpoint URI whose content no longer matches the fit manifest's sha256 is refused, not used."""
    models = list(s3_runs["models_s3"])
    other = s3.uri("models", "tampered", Path(models[1]).name)
    from rdscale.model.loading import build_tiny_family

    swapped = build_tiny_family(tmp_path / "seed1", widths=(32, 48, 64), layers=(2, 3, 4), seed=1)[1]
    Location.parse(other).write_bytes(swapped.read_bytes())
    models[1] = other
    code = _cli("embed", "--local", "--fasta", str(s3_runs["fasta"]), "--models", *models,
                "-o", s3.uri("runs", "tampered"), "--fit", str(s3_runs["local"] / "fit"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "sha256" in err[0]


# ---------------------------------------------------------------------------------------------- plain gzip


def _fasta_text(n: int, seed: int = 0, lengths: tuple[int, int] = (20, 200), pad: int = 0) -> str:
    """n FASTA records with random sequences, a few invalid ones and repeated ids; `pad` random description
    characters make records long without adding residues (cheap to embed, several shards of gzip)."""
    rng = random.Random(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    out = []
    for i in range(n):
        seq = "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))
        note = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(pad))
        if i % 97 == 5:
            seq = seq[:10] + "1" + seq[10:]  # invalid character
        name = f"p{i}" if i % 211 != 7 else "p3"  # a few duplicate ids
        lines = [seq[j:j + 60] for j in range(0, len(seq), 60)]
        out.append(f">{name} protein {i} {note}\n" + "\n".join(lines) + "\n")
    return "".join(out)


def _items(paths, shard_bytes, index_dir=None):
    """Every record of every shard as (kind, id, offset, reason, sequence), sorted by offset. Which of two equal
    ids a shard rejects depends on where shards end (the pipeline dedupes across shards afterwards), so
    within-shard duplicate rejects count as records here."""
    items = []
    shards = plan_shards(paths, shard_bytes, index_dir=index_dir)
    for shard in shards:
        for x in read_shard(shard):
            dup = isinstance(x, Reject) and x.code == "duplicate_id"
            kind = "Record" if dup else type(x).__name__
            items.append((kind, x.id, x.offset, "" if dup else getattr(x, "reason", ""), getattr(x, "sequence", "")))
    counts: dict[str, int] = {}
    for item in items:
        counts[item[1]] = counts.get(item[1], 0) + 1
    # a duplicate rejected within its shard carries no sequence: compare repeated ids without it
    items = [(k, i, o, r, "" if counts[i] > 1 else seq) for k, i, o, r, seq in items]
    return shards, sorted(items, key=lambda t: t[2])


def test_plain_gzip_split_into_many_shards_matches_uncompressed(tmp_path, s3, monkeypatch):
    text = _fasta_text(3000)
    plain, gz = tmp_path / "x.fasta", tmp_path / "x.fasta.gz"
    plain.write_text(text)
    gz.write_bytes(gzip.compress(text.encode(), compresslevel=6))
    shard_bytes = 1 << 16
    _, expected = _items([str(plain)], shard_bytes)
    from rdscale.io import gzindex

    builds = []
    real = gzindex.build_index
    monkeypatch.setattr(gzindex, "build_index", lambda *a: builds.append(a) or real(*a))
    shards, got = _items([str(gz)], shard_bytes, index_dir=tmp_path / "idx")
    assert len(shards) >= 5 and all(s.fmt == "gzip" and s.gzip_index for s in shards)
    assert got == expected and len(got) == 3000
    assert len(builds) == 1
    again, _ = _items([str(gz)], shard_bytes, index_dir=tmp_path / "idx")
    assert again == shards and len(builds) == 1  # reused, not rebuilt
    # the same file on S3, its index stored on S3 beside a run
    uri = s3.uri("gz", "x.fasta.gz")
    Location.parse(uri).write_bytes(gz.read_bytes())
    shards_s3, got_s3 = _items([uri], shard_bytes, index_dir=s3.uri("gz", "run", "gzip_index"))
    assert [(s.start, s.end) for s in shards_s3] == [(s.start, s.end) for s in shards]
    assert got_s3 == got


def test_plain_and_bgzf_on_s3_split_exactly_as_local(tmp_path, s3):
    """Byte-range shards of an object are read with ranged reads and give the records of the same local file."""
    from bgzf_util import write_bgzf

    text = _fasta_text(1200, seed=5).encode()
    plain, bgzf = tmp_path / "p.fasta", tmp_path / "b.fasta.gz"
    plain.write_bytes(text)
    write_bgzf(bgzf, text, block_sizes=[7000] * (len(text) // 7000 + 1))
    for path in (plain, bgzf):
        uri = s3.uri("split", path.name)
        Location.parse(uri).write_bytes(path.read_bytes())
        local_shards, local_items = _items([str(path)], 20_000)
        remote_shards, remote_items = _items([uri], 20_000)
        assert len(local_shards) > 4 and [(s.fmt, s.start, s.end) for s in remote_shards] == \
            [(s.fmt, s.start, s.end) for s in local_shards]
        assert remote_items == local_items and len(remote_items) == 1200


@pytest.mark.parametrize("ending", ["\r", "mixed"])
def test_old_line_endings_read_like_unix_everywhere(tmp_path, s3, ending):
    """Lone CR (classic Mac) or a mix of CR, LF and CRLF: plain, BGZF and index-split gzip, local and on S3 (ranged
    reads), at shard sizes that cut lines and line breaks, give the records of the same file with Unix endings."""
    from bgzf_util import write_bgzf

    unix = _fasta_text(1500, seed=8)
    rng = random.Random(3)
    other = unix.replace("\n", "\r") if ending == "\r" else \
        "".join(rng.choice(["\n", "\r", "\r\n"]) if c == "\n" else c for c in unix)
    (tmp_path / "unix.fasta").write_text(unix)
    _, expected = _items([str(tmp_path / "unix.fasta")], 1 << 30)
    expected = [(k, i, r, seq) for k, i, _, r, seq in expected]
    assert len(expected) == 1500
    data = other.encode()
    plain, bgzf, gz = tmp_path / "p.fasta", tmp_path / "b.fasta.gz", tmp_path / "g.fasta.gz"
    plain.write_bytes(data)
    write_bgzf(bgzf, data, block_sizes=[3001] * (len(data) // 3001 + 1))
    gz.write_bytes(gzip.compress(data))
    sources = [(str(plain), None), (str(bgzf), None), (str(gz), tmp_path / "idx")]
    for path in (plain, bgzf):
        uri = s3.uri("endings", path.name)
        Location.parse(uri).write_bytes(path.read_bytes())
        sources.append((uri, None))
    for source, index_dir in sources:
        shards, got = _items([source], 7001, index_dir=index_dir)
        assert len(shards) > 1, source
        assert [(k, i, r, seq) for k, i, _, r, seq in got] == expected, source


def test_truncated_plain_gzip_is_refused(tmp_path):
    data = gzip.compress(_fasta_text(3000).encode())
    bad = tmp_path / "cut.fasta.gz"
    bad.write_bytes(data[: len(data) - 200])
    from rdscale.io.fasta import FastaFormatError

    with pytest.raises(FastaFormatError) as err:
        plan_shards([str(bad)], 1 << 16, index_dir=tmp_path / "idx")
    assert "truncated" in str(err.value) and str(bad) in str(err.value)


def test_gzip_run_killed_after_some_shards_resumes(tmp_path, tiny_family):
    text = _fasta_text(1100, seed=3, lengths=(8, 30), pad=220)
    gz = tmp_path / "db.fasta.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    (tmp_path / "db.fasta").write_text(text)
    out = tmp_path / "run"
    marker = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rdscale", "-q", "run", "--local", "--fasta", str(gz),
           "--models", *map(str, tiny_family[:2]), "-o", str(out),
           "--set", "input.shard_mb=0.0625", "--set", "fit.sample_sequences=20",
           "--set", "output.records_per_batch=16", "--set", "output.residues=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # fragment_rows 1: each shard committed as it completes, so the process killed mid-run has some committed
    kill = ["--set", f"ray.fault_injection={{exit_on_batch: 40, marker: {marker}}}", "--set", "output.fragment_rows=1"]
    first = subprocess.run(cmd + kill, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode != 0 and marker.exists()
    committed = open_dataset(Run(out).table("shards")).count_rows()
    second = subprocess.run(cmd + kill, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    shards_line = next(line for line in second.stdout.splitlines() if line.startswith("shards:"))
    total = int(shards_line.split()[1])
    assert total >= 4 and committed >= 1 and f"({committed} already committed" in shards_line
    expected = list(read_fasta([str(tmp_path / "db.fasta")]))
    proteins = open_dataset(Run(out).table("proteins")).to_table(columns=["id", "sequence"])
    rejects = open_dataset(Run(out).table("rejects")).to_table(columns=["id"])
    assert sorted(proteins["id"].to_pylist()) == sorted(r.id for r in expected if not isinstance(r, Reject))
    assert rejects.num_rows == sum(isinstance(r, Reject) for r in expected)


# ------------------------------------------------------------------------------------------- bad locations


def _one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    return err[0]


def test_bad_locations_one_line_errors(s3, capsys, tmp_path, monkeypatch):
    line = _one_line_error(capsys, "info", "-o", "ftp://host/run")
    assert "ftp://host/run" in line and "unknown location scheme" in line
    line = _one_line_error(capsys, "run", "--local", "--fasta", s3.uri("nope", "missing.fasta"),
                           "--models", "8M", "35M", "-o", str(tmp_path / "o"))
    assert s3.uri("nope", "missing.fasta") in line and "not found" in line
    line = _one_line_error(capsys, "info", "-o", "s3://no-such-bucket/run")
    assert "no-such-bucket" in line and "does not exist" in line
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    line = _one_line_error(capsys, "info", "-o", s3.uri("runs", "r1"))
    assert s3.uri("runs", "r1") in line and "access denied" in line
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env()["AWS_SECRET_ACCESS_KEY"])
    from s3 import free_ports

    dead = free_ports(1)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    started = time.monotonic()
    line = _one_line_error(capsys, "info", "-o", s3.uri("runs", "r1"))
    assert "cannot reach" in line and s3.uri("runs", "r1") in line
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_writing_a_run_where_no_lease_exists_is_refused_before_any_work(scheme, capsys, tmp_path, tiny_family):
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    line = _one_line_error(capsys, "run", "--local", "--fasta", str(fasta), "--models", *map(str, tiny_family[:2]),
                           "-o", f"{scheme}://bucket/run")
    assert f"{scheme}://bucket/run" in line and "s3://" in line and "cannot be written" in line


def test_packaged_configs_resolve_by_name(tmp_path, monkeypatch):
    from rdscale.config import ConfigError, load_config, packaged_configs

    monkeypatch.chdir(tmp_path)  # not the repository: the configs come from the package
    assert {"demo", "demo_s3", "single_gpu", "uniref50_cluster"} <= set(packaged_configs())
    cfg = load_config("demo_s3")
    assert cfg.output.dir.startswith("s3://") and all(m.startswith("s3://") for m in cfg.models)
    assert cfg.input.paths == ["s3://rdscale-demo/in/example.fasta"]
    assert load_config(REPO / "conf" / "demo.yaml").models == load_config("demo").models
    with pytest.raises(ConfigError, match="packaged configs: demo"):
        load_config("no_such_config")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_executor_run_on_s3(s3_runs, s3, tiny_family, tmp_path):
    """The Ray executor (its own private Ray, in a subprocess so it does not clash with the session's) writes
    an S3 run whose rows equal the local run's."""
    out = s3.uri("runs", "ray")
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    cmd = [sys.executable, "-m", "rdscale", "-v", "-q", "run", "--fasta", s3.uri("in", "in.fasta"),
           "--models", *s3_runs["models_s3"], "-o", out, "--fit", str(s3_runs["local"] / "fit"),
           "--set", "output.residue_dtype=float32", "--set", "input.shard_mb=0.004",
           "--set", "ray.cpus_per_actor=1", "--set", f"storage.options={{aws_secret_access_key: {secret}}}"]
    cmd[cmd.index("--fit"):cmd.index("--fit") + 2] = ["--set", f"fit.artifact={s3_runs['local'] / 'fit'}"]
    # the secret only in storage.options: the driver, the read tasks and the actors all get it from there
    env = {k: v for k, v in os.environ.items() if k != "AWS_SECRET_ACCESS_KEY"}
    env.update({"PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "RDSCALE_CACHE_DIR": str(tmp_path / "c")})
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr  # debug logging on: options are never logged
    for table, keys in (("proteins", ["id"]), ("residues", ["id", "pos"])):
        a, b = _rows(s3_runs["local"], table, keys), _rows(out, table, keys)
        assert a[keys[0]].to_pylist() == b[keys[0]].to_pylist()
        np.testing.assert_allclose(np.asarray(b["embedding"].to_pylist(), np.float32),
                                   np.asarray(a["embedding"].to_pylist(), np.float32), atol=1e-5, rtol=0)
    # extend through Ray actors over the S3 run's fragments, the secret again only in --set storage.options
    from rdscale.model.loading import build_tiny_family

    wider = build_tiny_family(tmp_path / "wider", widths=(32, 48, 64, 80), layers=(2, 3, 4, 4), seed=0)[-1]
    wider_uri = s3.uri("models", "ray-" + wider.name)
    Location.parse(wider_uri).write_bytes(wider.read_bytes())
    grow = [sys.executable, "-m", "rdscale", "-q", "extend", out, "--model", wider_uri, "--sample", "10",
            "--set", "ray.cpus_per_actor=1", "--set", f"storage.options={{aws_secret_access_key: {secret}}}"]
    done = subprocess.run(grow, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    assert Run(out).metadata()["levels"] == [32, 48, 64, 80]
    assert _rows(out, "proteins", ["id"])["embedding"].type.list_size == 80


def test_run_finds_its_fits_relative_to_itself(tmp_path):
    """Recorded references resolve against the run; a copy beside the run wins over an absolute path recorded by
    an older run; an external fit recorded absolutely is used when the run has none of its own."""
    run = Run(tmp_path / "moved_run")
    for sub in ("fit", "fit_ext_48", "fit_ext_64"):
        (tmp_path / "moved_run" / sub).mkdir(parents=True)
        (tmp_path / "moved_run" / sub / "manifest.json").write_text("{}")
    assert run.fit_location({"artifact": "fit"}, {}) == run.fit
    assert run.fit_location({"artifact": "/old/place/run/fit"}, {}) == run.fit
    # a 32 -> 48 chain extended to 64 (step folder named after the level it extended from: fit_ext_48), then to 80
    ext = {"models": [{"width": 32}, {"width": 48}],
           "extensions": [{"width": 64, "step": "/old/place/run/fit_ext_48"}, {"width": 80, "step": "fit_ext_64"}]}
    assert run.extension_steps(ext) == [run.fit_ext(48), run.fit_ext(64)]
    ext["extensions"][1]["step"] = "/old/place/run/fit_ext_64"
    assert run.extension_steps(ext) == [run.fit_ext(48), run.fit_ext(64)]
    external = tmp_path / "shared_fit"
    external.mkdir()
    (external / "manifest.json").write_text("{}")
    bare = Run(tmp_path / "bare_run")
    assert bare.fit_location({"artifact": str(external)}, {}) == Location.parse(str(external))
    assert bare.fit_location({}, {"fit": {"artifact": str(external)}}) == Location.parse(str(external))
    assert bare.fit_location({"artifact": "fit"}, {}) is None
    assert run.ref(run.fit_ext(64)) == "fit_ext_64" and run.ref(str(external)) == str(external)


def test_a_worker_lacking_s3_settings_says_so(monkeypatch):
    """Settings in the driver's environment only: the worker on another node says what it is, where, what its
    environment lacks and that storage.options carries settings to every worker (names only, no values)."""
    from rdscale.io import location as loc_mod
    from rdscale.io.location import LocationError, set_storage_options, set_worker_context

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
                "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    set_storage_options(None)
    monkeypatch.setattr(loc_mod, "_WORKER", [])
    try:
        set_worker_context("Ray worker on node 10.0.0.7")
        with pytest.raises(LocationError) as err:
            Location.parse("s3://bucket/in.fasta").read_bytes()
        message = str(err.value)
        assert "\n" not in message and "cannot reach the object store" in message
        assert ("this is a Ray worker on node 10.0.0.7 whose environment lacks AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_REGION") in message and "storage.options" in message
        set_storage_options({"aws_access_key_id": "KEY-ID-VALUE", "aws_secret_access_key": "SECRET-VALUE",
                             "region": "us-east-1"})
        with pytest.raises(LocationError) as err:  # the settings given: no hint, and no value shown
            Location.parse("s3://bucket/in.fasta").read_bytes()
        assert "worker" not in str(err.value) and "VALUE" not in str(err.value)
    finally:
        set_worker_context(None)
        set_storage_options(None)


_WORKER_CHILD = """
import os, sys
import ray

# the Ray node starts without the credentials (a node started from another shell, without the AWS_* variables);
# the driver gets them afterwards, as a user exporting them in the driver's shell only would
ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 << 20)
os.environ.update(AWS_ACCESS_KEY_ID=sys.argv[4], AWS_SECRET_ACCESS_KEY=sys.argv[5])
from rdscale.cli.main import main
sys.exit(main(["extract", "--fasta", sys.argv[1], "--models", sys.argv[2], "-o", sys.argv[3]]))
"""


@pytest.mark.ray
def test_a_ray_worker_lacking_the_drivers_s3_settings_says_so(tmp_path, s3, tiny_family):
    """A real Ray worker reading an S3 FASTA with credentials only in the driver's environment: one line saying
    it is a worker on which node, what its environment lacks, and that storage.options carries the settings."""
    uri = s3.uri("worker", "in.fasta")
    Location.parse(uri).write_text(_fasta_text(20))
    env = {k: v for k, v in s3.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **env, "RAY_ADDRESS": "",
           "PYTHONPATH": str(root)}
    keys = s3.env()
    done = subprocess.run([sys.executable, "-c", _WORKER_CHILD, uri, str(tiny_family[0]), str(tmp_path / "out"),
                           keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"]], capture_output=True, text=True,
                          env=env, check=False, timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rdscale extract: error: "), done.stderr[-3000:]
    assert "this is a Ray worker on node" in lines[0] and "lacks AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in \
        lines[0] and "storage.options" in lines[0], lines[0]
    assert keys["AWS_SECRET_ACCESS_KEY"] not in done.stderr
