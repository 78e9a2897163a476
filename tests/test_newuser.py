"""What a new user running the CLI as documented ran into (an outside check on data the other tests never use):
each test pins one case that used to give a traceback, a misleading message, or waste a fit pass. The CLI runs
in-process (rdscale.cli.main.main), `--local`, on the tiny family; the whole file takes seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke

SEQS = {"p1": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACVNDKALSIIIE",
        "p2": "MSHHWGYGKHNGPEHWHKDFPIAKGERQSPVDIDTHTAKYDPSLKPLSVSYDQATSLRILNNGHAFNVEFDDSQDKAVLKGGPLDGTYRLIQFHFHWGSLDGQGSEHTVDKKKYAAELHLVHWNTKYGDFGKAVQQPDGLAVLGIFLKVGSAKPGLQKVVDVLDSIKTKGKSADFTNFDPRGLLPESLDYWTYPGSLTTPPLLECVTWIVLKEPISVSSEQVLKFRKLNFNGEGEPEELMVDNWRPAQPLKNRQIKASFK",
        "p3": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKLRVDPVNFKLLSHCLLVTLAAHLPAEFTPAVHASLDKFLASVSTVLTSKYR"}


def write_fasta(path: Path, records) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def fasta(tmp_path):
    return write_fasta(tmp_path / "in.fa", SEQS.items())


def test_make_tiny_family_bad_arguments_are_one_line(tmp_path, capsys):
    # was: ValueError / ZeroDivisionError / RuntimeError tracebacks
    for argv in (["--widths", "32", "48", "--layers", "2"], ["--widths", "30", "--layers", "2"],
                 ["--widths", "0", "--layers", "2"], ["--widths", "-32", "--layers", "2"],
                 ["--widths", "32", "--layers", "0"]):
        code, _, err = invoke(capsys, ["make-tiny-family", tmp_path / "fam", *argv])
        assert code == 1, (argv, err)
        assert "make-tiny-family: error:" in one_line(err), err
    assert not any((tmp_path / "fam").glob("*.pt"))


def test_make_tiny_family_layers_default_follows_widths(tmp_path, capsys):
    # was: `--widths 32 48 64 80` alone failed (the default --layers had three entries)
    code, _, err = invoke(capsys, ["make-tiny-family", tmp_path / "fam", "--widths", "32", "48", "64", "80"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "fam").glob("*.pt")) == [
        "esm2_t2_32_tiny.pt", "esm2_t3_48_tiny.pt", "esm2_t4_64_tiny.pt", "esm2_t5_80_tiny.pt"]


@pytest.mark.parametrize("order", [(1, 0), (0, 0)])
def test_chain_order_refused_before_the_fit_pass(tmp_path, capsys, tiny_family, fasta, order):
    # was: the fit pass ran every model over the sample first, then "chain widths must strictly grow"
    models = [tiny_family[i] for i in order]
    out = tmp_path / "run"
    code, _, err = invoke(capsys, ["run", "--fasta", fasta, "--models", *models, "-o", out, "--local", "-q"])
    line = one_line(err)
    assert code == 2 and "smallest first" in line and "fit pass" not in err, err
    assert not out.exists()


def test_storage_width_wider_than_the_chain_refused_before_the_fit_pass(tmp_path, capsys, tiny_family, fasta):
    # was: refused after the fit pass, leaving <out>/fit behind
    out = tmp_path / "run"
    code, _, err = invoke(capsys, ["run", "--fasta", fasta, "--models", *tiny_family[:2], "-o", out, "--local",
                                   "-q", "--set", "output.storage_width=1000"])
    line = one_line(err)
    assert code == 2 and "output.storage_width=1000" in line and "48" in line, err
    assert not out.exists()


def test_directory_as_input_is_named_as_a_directory(tmp_path, capsys, tiny_family, fasta):
    # was: "input file(s) not found: DIR" for a folder that exists
    code, _, err = invoke(capsys, ["extract", "--fasta", tmp_path, "--models", tiny_family[0], "-o",
                                   tmp_path / "out", "--local", "-q"])
    line = one_line(err)
    assert code == 2 and "directories, not FASTA files" in line and str(tmp_path) in line, err


def test_embed_without_a_fit_says_how_to_make_one(tmp_path, capsys, tiny_family, fasta):
    # was: "... is not a directory; pass the fit artifact directory written by save_fit" (a Python function name)
    out = tmp_path / "run"
    code, _, err = invoke(capsys, ["embed", "--fasta", fasta, "--models", *tiny_family, "-o", out, "--local", "-q"])
    line = one_line(err)
    assert code == 1 and "--fit" in line and "rdscale fit" in line and "save_fit" not in line, err
    assert not out.exists()


def test_other_run_in_output_dir_names_restart(tmp_path, capsys, tiny_family, fasta):
    # was: only "delete DIR to start over", though run/embed have --restart for exactly this
    out = tmp_path / "run"
    base = ["run", "--models", *tiny_family[:2], "-o", out, "--local", "-q"]
    assert invoke(capsys, [*base, "--fasta", fasta])[0] == 0
    other = write_fasta(tmp_path / "other.fa", [(f"q{pid}", seq) for pid, seq in SEQS.items()])
    code, _, err = invoke(capsys, [*base, "--fasta", other])
    assert code == 1 and "--restart" in one_line(err), err
    code, _, err = invoke(capsys, [*base, "--fasta", other, "--restart"])
    assert code == 0, err
    import lance

    ids = lance.dataset(str(out / "proteins.lance")).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(f"q{pid}" for pid in SEQS)


def test_search_prints_no_negative_zero(tmp_path, capsys, tiny_family, fasta):
    # was: "-0.0000" for a row's distance to itself (1 - cos rounds to -1e-7)
    out = tmp_path / "run"
    assert invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                           "-q"])[0] == 0
    for pid in SEQS:
        code, text, err = invoke(capsys, ["search", out, "--id", pid, "-k", "3", "-q"])
        assert code == 0, err
        assert "-0.0000" not in text and " 0.0000" in text, text
    import pyarrow as pa

    from rdscale.search.results import format_results

    text = format_results(pa.table({"query": ["a", "a"], "id": ["a", "b"], "score": [-1.2e-7, -0.25], "rank": [1, 2]}))
    assert "-0.0000" not in text and "0.0000" in text and "-0.2500" in text, text


def test_search_help_examples_name_a_demo_protein(capsys):
    # the examples in `rdscale search --help` used P69905, which the bundled example data does not hold
    ids = {line[1:].split()[0] for line in Path(__file__).resolve().parents[1].joinpath(
        "examples", "example.fasta").read_text().splitlines() if line.startswith(">")}
    code, text, _ = invoke(capsys, ["search", "--help"])
    assert code == 0
    named = {tok.split(":")[0] for line in text.splitlines() if "--id" in line and line.strip().startswith("rdscale")
             for tok in line.split("--id", 1)[1].split()[:1]}
    assert named and named <= ids, named


def test_library_info_lines_stay_off_the_terminal():
    # was: "INFO botocore.credentials: Found credentials in environment variables." on every S3 compact/update,
    # "INFO pylance: Final create_index rust time: ..." on every `rdscale index --backend lance`
    import logging

    from rdscale.progress import _LibraryInfoFilter

    keep = _LibraryInfoFilter().filter

    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, "msg", None, None)

    assert not keep(record("botocore.credentials", logging.INFO))
    assert not keep(record("pylance", logging.INFO))
    assert keep(record("botocore.credentials", logging.WARNING))
    assert keep(record("rdscale.run.pipeline", logging.INFO))


def test_config_printout_masks_credentials(capsys):
    # was: `rdscale config --set storage.options={...}` printed the secret key in clear (output that gets pasted)
    options = '{"aws_secret_access_key": "SECRET-1", "aws_session_token": "TOKEN-2", "region": "us-east-1"}'
    code, out, err = invoke(capsys, ["config", "-c", "demo", "--set", f"storage.options={options}"])
    assert code == 0, err
    assert "SECRET-1" not in out and "TOKEN-2" not in out
    assert "aws_secret_access_key: '***'" in out and "region: us-east-1" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_is_named_before_anything_runs(tmp_path, capsys, tiny_family, fasta):
    # was: extract --device cuda started embedding first; search --fasta --device cuda blamed the models
    # ("... Pass models= (--models) with their current paths") and spoke Python (device='cpu')
    out = tmp_path / "run"
    code, _, err = invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                                   "--device", "cuda"])
    line = one_line(err)
    assert code == 1 and "--device cpu" in line and "embedding:" not in err, err
    assert not out.exists()
    code, _, err = invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                                   "--set", "embedding.dtype=float16"])
    assert code == 1 and "float16 on CPU" in one_line(err) and not out.exists(), err
    assert invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                           "-q"])[0] == 0
    code, _, err = invoke(capsys, ["search", out, "--fasta", fasta, "--device", "cuda"])
    line = one_line(err)
    assert code == 1 and "--device cpu" in line and "--models" not in line, err


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path, capsys, tiny_family, fasta):
    # was: `rdscale extract ... | head -1` printed a BrokenPipeError traceback when head left first
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    assert invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                           "-q"])[0] == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "rdscale", "info", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_bad_index_and_compact_parameters_are_one_line(tmp_path, capsys, tiny_family, fasta):
    # was: `index --param m=abc` (faiss) and `--backend lance --param num_partitions=abc|0` tracebacks;
    # `compact --target-rows 0` silently used Lance's default
    out = tmp_path / "run"
    assert invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                           "-q"])[0] == 0
    for extra in (["--param", "m=abc"], ["--param", "ef_construction=0"], ["--param", "m=2.5"],
                  ["--index-type", "IVF_PQ", "--param", "nlist=1", "--param", "pq_bits=20"],
                  ["--backend", "lance", "--param", "num_partitions=abc"],
                  ["--backend", "lance", "--param", "num_partitions=0"],
                  ["--backend", "lance", "--index-type", "IVF_PQ", "--param", "num_partitions=1",
                   "--param", "num_sub_vectors=7"]):
        code, _, err = invoke(capsys, ["index", out, "--width", "32", *extra])
        assert code == 1 and "index: error:" in one_line(err), (extra, err)
    code, _, err = invoke(capsys, ["compact", out, "--target-rows", "0"])
    assert code == 2 and "--target-rows" in one_line(err), err


def test_eval_dms_negative_seed_is_one_line(tmp_path, capsys):
    # was: "ValueError: expected non-negative integer" traceback from numpy
    root = Path(__file__).resolve().parents[1] / "examples" / "dms"
    code, _, err = invoke(capsys, ["eval", "dms", "--csv", root / "TOY_SYNTH.csv", "--wild-type",
                                   root / "wild_types.fasta", "--models", "8M", "-o", tmp_path / "d", "--seed", "-1"])
    assert code == 2 and "--seed" in one_line(err), err
    assert not (tmp_path / "d").exists()


def _broken_checkpoint(tiny_family, path: Path) -> Path:
    """A fair-esm checkpoint whose config reads fine (so no check before the run catches it) but whose weights do
    not fit: found only when a worker builds the model."""
    import torch

    ck = torch.load(tiny_family[0], weights_only=False)
    key = "encoder.sentence_encoder.layers.0.fc1.weight"
    ck["model"][key] = ck["model"][key][:, :5].clone()
    torch.save(ck, path)
    return path


def test_remote_rdscale_error_text_is_worded_as_one_line():
    from rdscale.errors import exit_code, user_facing

    class RemoteText(Exception):  # how Ray Data hands back a map_batches actor's error: text only
        pass

    RemoteText.__module__ = "ray.exceptions"
    text = ("ray::MapWorker(MapBatches(_ApplyActor)).submit() (pid=1)\n  File \"x.py\", line 1, in f\n"
            "rdscale.model.loading.CheckpointError: /m.pt: weights do not fit: Error(s) in loading state_dict:\n"
            "\tsize mismatch for layers.0.fc1.weight\n\n")
    assert user_facing(RemoteText(text)) == ("/m.pt: weights do not fit: Error(s) in loading state_dict: size "
                                             "mismatch for layers.0.fc1.weight")
    assert exit_code(RemoteText(text)) == 1
    assert exit_code(RemoteText(text.replace("model.loading.CheckpointError", "config.ConfigError"))) == 2
    assert user_facing(RemoteText("rdscale.nope.NoSuchError: x\nbuiltins.ValueError: y")) is None  # a bug


@pytest.mark.ray
def test_broken_checkpoint_in_ray_workers_is_one_line(ray_session, tmp_path, tiny_family, fasta):
    # was: an ActorDiedError / RayTaskError(UserCodeException) traceback (the apply actors' and the fit actors'
    # constructors load the models), and extract left its empty output directory behind
    from rdscale.config import load_config
    from rdscale.errors import user_facing
    from rdscale.run.pipeline import embed, fit

    bad = _broken_checkpoint(tiny_family, tmp_path / "bad.pt")
    common = [f"input.paths={[str(fasta)]}", "ray.address=null", "ray.num_actors=1", "ray.cpus_per_actor=0.5",
              "ray.max_restarts=0"]
    for step, models in ((embed, [bad]), (fit, [bad, tiny_family[1]])):
        cfg = load_config(None, [*common, f"models={[str(m) for m in models]}",
                                 f"output.dir={tmp_path / step.__name__}"])
        with pytest.raises(Exception) as caught:
            step(cfg, progress=False) if step is embed else step(cfg, out=str(tmp_path / "fit"))
        message = user_facing(caught.value)
        assert message is not None and "weights do not fit" in message and "\n" not in message, caught.value


def test_cut_short_checkpoint_is_named_as_such(tmp_path, capsys, tiny_family, fasta):
    # was: "... is not a readable torch checkpoint: [Errno 22] Invalid argument"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(tiny_family[0]).read_bytes()[:5000])
    code, _, err = invoke(capsys, ["extract", "--fasta", fasta, "--models", cut, "-o", tmp_path / "o", "--local"])
    assert code == 1 and "cut short" in one_line(err), err


def test_all_zero_query_under_cosine_is_refused(tmp_path, capsys, tiny_family, fasta):
    # was: every row at distance 1.0000, ranked by row order, as if they were hits
    import numpy as np

    out = tmp_path / "run"
    assert invoke(capsys, ["extract", "--fasta", fasta, "--models", tiny_family[0], "-o", out, "--local",
                           "-q"])[0] == 0
    np.save(tmp_path / "zero.npy", np.zeros(32, np.float32))
    code, _, err = invoke(capsys, ["search", out, "--vector", tmp_path / "zero.npy"])
    assert code == 1 and "all zeros" in one_line(err), err
    code, text, err = invoke(capsys, ["search", out, "--vector", tmp_path / "zero.npy", "--metric", "l2", "-k", "1"])
    assert code == 0 and "rank" in text, err
