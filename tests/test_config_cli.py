"""Configs are data (yaml.safe_load, checked keys and types); the CLI turns user errors into one line + exit code."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from rdscale.cli.main import main
from rdscale.config import Config, ConfigError, load_config


def test_unknown_keys_and_bad_types_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("embedding:\n  toks_per_bach: 10\n")
    with pytest.raises(ConfigError, match="embedding.toks_per_bach"):
        load_config(bad)
    with pytest.raises(ConfigError, match="embedding.window must be an integer"):
        load_config(None, ["embedding.window=10.5"])
    with pytest.raises(ConfigError, match="output.residues must be true or false"):
        load_config(None, ["output.residues=maybe"])
    with pytest.raises(ConfigError, match="long_policy"):
        load_config(None, ["embedding.long_policy=chop"])
    with pytest.raises(ConfigError, match=r"output.fragment_seconds must be .*seconds"):
        load_config(None, ["output.fragment_seconds=-1"])


def test_yaml_numbers_and_overrides(tmp_path):
    cfg = load_config(None, ["input.shard_mb=5e-5", "ray.address=local", "models=[a.pt, b.pt]"])
    assert cfg.input.shard_mb == pytest.approx(5e-5) and cfg.ray.address == "local"
    assert cfg.models == [os.path.abspath("a.pt"), os.path.abspath("b.pt")]  # command-line paths: from the cwd
    again = Config.from_dict(cfg.to_dict(), ["fit.regression=ols"])
    assert again.input == cfg.input and again.fit.regression == "ols"


def test_python_tags_in_yaml_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("models: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_bundled_configs_load():
    for name in ("demo", "single_gpu", "uniref50_cluster"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / f"{name}.yaml")
        assert cfg.models


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_missing_input_is_a_config_error(capsys, tmp_path, tiny_family):
    code, err = run_cli(capsys, "run", "--local", "--fasta", str(tmp_path / "nope.fasta"),
                        "--models", *map(str, tiny_family), "-o", str(tmp_path / "o"))
    assert code == 2 and "nope.fasta" in err


def test_cli_corrupt_gzip_names_the_file(capsys, tmp_path, tiny_family):
    data = gzip.compress(b">a\nMKTAYIAKQR\n" * 200)
    broken = tmp_path / "broken.fasta.gz"
    broken.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "extract", "--local", "--fasta", str(broken), "--models", str(tiny_family[0]),
                        "-o", str(tmp_path / "o"))
    assert code == 1 and "broken.fasta.gz" in err and len(err.strip().splitlines()) == 1


def test_cli_not_fasta_and_unknown_model(capsys, tmp_path, tiny_family):
    notfasta = tmp_path / "table.csv"
    notfasta.write_text("id,seq\n1,MKT\n")
    code, err = run_cli(capsys, "extract", "--local", "--fasta", str(notfasta), "--models", str(tiny_family[0]),
                        "-o", str(tmp_path / "o"))
    assert code == 1 and "table.csv" in err
    good = tmp_path / "ok.fasta"
    good.write_text(">a\nMKTAYIAKQR\n")
    code, err = run_cli(capsys, "extract", "--local", "--fasta", str(good), "--models", "esm2_t99_1T_UR50D",
                        "-o", str(tmp_path / "o2"))
    assert code == 1 and "unknown ESM-2 model" in err


def test_cli_extract_then_info(capsys, tmp_path, tiny_family):
    good = tmp_path / "ok.fasta"
    good.write_text(">a first\nMKTAYIAKQR\n>b\nmktay*\n>c\nMK1\n")
    assert main(["-q", "extract", "--local", "--fasta", str(good), "--models", str(tiny_family[0]),
                 "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "records: 3 (proteins 2 + rejects 1)" in out
    assert main(["info", "-o", str(tmp_path / "o")]) == 0
    assert "proteins: 2 rows" in capsys.readouterr().out


def test_writing_verb_loads_its_config_once(capsys, tmp_path, tiny_family, monkeypatch):
    """The output checks, the Ray log routing and the verb share one loaded Config (it was loaded three times)."""
    import rdscale.config

    calls = []
    real = rdscale.config.load_config

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(rdscale.config, "load_config", counting)
    good = tmp_path / "ok.fasta"
    good.write_text(">a\nMKTAYIAKQR\n")
    assert main(["-q", "extract", "--local", "--fasta", str(good), "--models", str(tiny_family[0]),
                 "-o", str(tmp_path / "o")]) == 0
    assert len(calls) == 1
    calls.clear()
    code, err = run_cli(capsys, "extract", "--local", "--fasta", str(good), "--models", *map(str, tiny_family[:2]),
                        "-o", str(tmp_path / "o2"))
    assert code == 2 and "extract embeds with one model" in err and len(calls) == 1


def test_extract_with_a_chain_config_takes_its_last_model(tmp_path, tiny_family):
    """`rdscale extract -c demo` works: a config naming a chain gives extract its last (largest) model."""
    import lance
    import yaml

    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n")
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump({"models": [str(p) for p in tiny_family], "input": {"paths": [str(fasta)]},
                                      "output": {"dir": str(tmp_path / "out")}}))
    assert main(["-q", "extract", "-c", str(config), "--local"]) == 0
    proteins = lance.dataset(str(tmp_path / "out" / "proteins.lance"))
    assert proteins.schema.field("embedding").type.list_size == 64  # the widest of 32, 48, 64
    assert proteins.count_rows() == 2
