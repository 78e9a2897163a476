"""GPU throughput of rdscale, one script: forwards, extraction end to end, reverse-distillation chains.

Runs where only torch (with CUDA), numpy, pyarrow, pylance and fair-esm are installed: no Ray (never imported on
this path; the script checks), no PyYAML, no safetensors. Everything runs in this process (the `--local` executor).

Models are randomly initialised ESM-2 of the real shapes (8M, 35M, 150M, 650M, 3B; built on the device from
fair-esm's `ESM2` class, bf16), so no download is needed; throughput does not depend on the weights' values. The
input is a FASTA of real proteins (default: examples/example.fasta, its records repeated with new ids until
`--residues` is reached; it holds proteins longer than 1,022 residues, embedded through windows).

Rows of the table (residues/s = per-residue rows produced per second; MFU = useful model FLOPs per second over
`--peak-tflops`, 989 for bf16 dense on H100/H200; useful FLOPs count no padding, 2 per multiply-add):

- `fair-esm autocast loop`: esm-extract's loop (FastaBatchedDataset batches, batch converter truncating at
  1022, `model(tokens, repr_layers=[last])`) on a float32 650M under `torch.autocast(bfloat16)`, on a subset;
- `forward plain` / `forward fast`: `Embedder.embed` alone (padded batches vs packed, unpadded batches);
- `extract`: `rdscale.run.pipeline.embed` with one model (what `rdscale extract --local` runs): FASTA -> shards ->
  forward -> Arrow -> Lance fragments -> commit, at three outputs: per-residue full width, per-residue prefix
  640 in float16, per-protein only; `cold` runs the prefix-640 one in a fresh process (CUDA context, model load,
  first-shape costs included), the others are warm;
- `fit pass`: the chain's forwards plus float64 moments on the device over `--fit-sequences` sequences, once per
  Gram mode (`float64`; `float32`: exact 8-bit slices multiplied in float32, folded into float64), each with its
  rate against the chain's apply on the same sequences (`rate_vs_apply_same_sequences`) and on the whole input
  (`rate_vs_chain_apply`); `checks` records how far the two modes' moments and fitted outputs differ;
- `rd chain`: every model of the chain (per-model token budgets) plus the fitted map, against the largest
  model's fast forward alone on the same sequences; the FLOP bound is the chain's FLOPs over the largest's;
- `forward fast + torch.compile` (last, if time is left; `--no-compile` and `--smoke` skip it): the elementwise
  work fused.

Each part of the run (ALL_SECTIONS) runs on its own: an error is recorded in the JSON (`sections`) and the rest
runs; a part whose inputs failed, or that would end past `--max-seconds` (default 480 s, by a rough H100/H200
estimate per part), is skipped and says why; a part still running 60 s past the budget is interrupted. The JSON is
rewritten after every part, so a run killed at any point leaves what it measured. Fields: bench/README.md.

    python bench/bench_gpu.py --local                    # on a GPU machine: writes bench/results/bench_gpu.json
    python bench/bench_gpu.py --local --smoke            # CPU check with tiny shapes (bench_gpu_smoke_cpu.json)
    python bench/bench_gpu.py --table results.json       # the summary table of a (possibly partial) run

About 5-6 minutes on one H100/H200 at the default sizes (1M residues; 3B rows on a third of them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Packages the benchmark's path must not need. Refused at import time (--strict-imports, the default), so a run on
# a full development environment proves the path works on a bare GPU machine too.
NOT_NEEDED = ("ray", "yaml", "safetensors", "scipy", "tqdm", "faiss", "duckdb", "polars", "hypothesis", "httpx",
              "lance_namespace")


def refuse_unneeded_packages() -> None:
    """Make the packages above unimportable in this process (a None entry in sys.modules is how Python marks a
    module as absent: `import` raises ModuleNotFoundError and importlib.util.find_spec answers None)."""
    for name in NOT_NEEDED:
        if sys.modules.get(name) is None:
            sys.modules[name] = None


REAL_SHAPES = {  # name: (layers, width, heads), fair-esm's ESM-2 family
    "8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20), "3B": (36, 2560, 40),
}
SMOKE_SHAPES = {"8M": (1, 32, 4), "35M": (2, 48, 4), "150M": (2, 64, 4), "650M": (3, 96, 4), "3B": (3, 128, 4)}
CHAINS = {"rd.650M": ["8M", "35M", "150M", "650M"], "rd.3B": ["8M", "35M", "150M", "650M", "3B"]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local", action="store_true", help="run in this process without Ray (the only mode)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and inputs on the CPU: checks the script runs")
    p.add_argument("--fasta", type=Path, default=REPO / "examples/example.fasta")
    p.add_argument("--residues", type=int, default=None, help="residues of input (default 1,000,000; smoke 6,000)")
    p.add_argument("--residues-3b", type=int, default=None, help="residues for 3B rows (default a third)")
    p.add_argument("--esm-residues", type=int, default=None, help="subset for the fair-esm loop (default 150,000)")
    p.add_argument("--fit-sequences", type=int, default=None, help="fit-pass sample (default 1,000; smoke 20)")
    p.add_argument("--toks-per-batch", type=int, default=None, help="token budget (default 32,768; smoke 1,024)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (bf16 H100/H200: 989)")
    p.add_argument("--max-seconds", type=float, default=480.0,
                   help="time budget: a part that would end past it (by its rough H100/H200 estimate) is skipped; "
                        "a part still running 60 s past it is interrupted (default 480, inside a 600 s device call)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (the last row)")
    p.add_argument("--no-strict-imports", action="store_true", help="do not refuse packages the path must not need")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--table", type=Path, default=None, help="print the summary table of a results JSON and exit")
    p.add_argument("--cold-extract", nargs=3, metavar=("CHECKPOINT", "FASTA", "ATTENTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table is not None:
        return args
    if not args.local:
        p.error("only --local is supported: the benchmark measures one device in this process")
    smoke = args.smoke
    args.residues = args.residues or (6_000 if smoke else 1_000_000)
    args.residues_3b = args.residues_3b or args.residues // 3
    args.esm_residues = args.esm_residues or (3_000 if smoke else 150_000)
    args.fit_sequences = args.fit_sequences or (20 if smoke else 1_000)
    args.toks_per_batch = args.toks_per_batch or (1_024 if smoke else 32_768)
    name = "bench_gpu_smoke_cpu.json" if smoke else "bench_gpu.json"
    args.out = args.out or REPO / "bench/results" / name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table is not None:  # no torch needed: runs after a failed or killed run too
        print_table(json.loads(args.table.read_text()))
        return 0
    if not args.no_strict_imports:
        refuse_unneeded_packages()
    bench = Bench(args)
    if args.cold_extract:  # internal: one extract in a fresh process (the cold row), result as JSON on stdout
        checkpoint, fasta, bench.attention = args.cold_extract
        lengths = [len(s) for s in bench.read_fasta_sequences(Path(fasta))]
        row = bench.extract("extract cold, prefix 640 fp16", Path(checkpoint), Path(fasta), True,
                            min(640, bench.shapes["650M"][1]), lengths)
        shutil.rmtree(bench.scratch, ignore_errors=True)
        print("COLD " + json.dumps(row))
        return 0
    _start_watchdog(args.max_seconds + WATCHDOG_GRACE)
    return bench.run()


WATCHDOG_GRACE = 60.0


def _start_watchdog(seconds: float) -> None:
    """Past `seconds`, raise BudgetExceeded in the main thread (recorded as the running part's error; the parts
    after it are then skipped by the budget), so the run ends with its JSON written instead of being killed."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        return

    def fire(signum, frame):
        raise BudgetExceeded(f"interrupted: still running {seconds:.0f} s after the start (--max-seconds + "
                             f"{WATCHDOG_GRACE:.0f} s)")

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))


def _stop_watchdog() -> None:
    import signal

    if hasattr(signal, "SIGALRM"):
        signal.setitimer(signal.ITIMER_REAL, 0)


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.started = time.perf_counter()
        if args.smoke:
            self.device, self.dtype = torch.device("cpu"), torch.float32
            self.shapes = SMOKE_SHAPES
            torch.set_num_threads(1)  # CI-like machines are small and shared
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run with --smoke on a CPU")
            self.device = torch.device("cuda")
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.shapes = REAL_SHAPES
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.processor() or "cpu")
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}  # part name -> {status: ok|error|skipped, seconds, error | reason}
        self.state: dict = {}  # what finished parts hand on to later ones (models, checkpoint, reference rows)
        self.input: dict = {}
        self.finished = False
        self.attention = "auto"  # until pick_attention has measured the backends
        self.load_seconds: float | None = None  # load_model of the 650M checkpoint, warm page cache
        self.checks: dict = {}
        self.scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        os.environ.setdefault("RDSCALE_CACHE_DIR", str(self.scratch / "cache"))

    # ------------------------------------------------------------------------------------------------ helpers

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def flops(self, names, lengths, window=1022, overlap=256) -> float:
        """Useful forward FLOPs of the models `names` over sequences of `lengths` (windows for long ones)."""
        from rdscale.model.embed import plan_windows

        total = 0.0
        for n in lengths:
            for s, e in plan_windows(n, window, overlap):
                t = e - s + 2
                for name in names:
                    layers, width, _ = self.shapes[name]
                    total += layers * (24.0 * width * width * t + 4.0 * width * t * t)
        return total

    def add(self, variant, model, residues, seconds, flops, **extra):
        rate = residues / seconds if seconds > 0 else 0.0
        tflops = flops / seconds / 1e12 if seconds > 0 else 0.0
        row = {"variant": variant, "model": model, "residues": residues, "seconds": round(seconds, 4),
               "residues_per_s": rate, "model_tflops_per_s": tflops,
               "mfu": tflops / self.args.peak_tflops if not self.args.smoke else None, **extra}
        self.rows.append(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"  {variant:<44} {model:<8} {residues:>10,} {seconds:>8.2f}s {rate:>12,.0f}/s {tflops:>8.2f} TF/s {mfu:>6}")
        return row

    # ------------------------------------------------------------------------------------------------- inputs

    @staticmethod
    def read_fasta_sequences(path: Path) -> list[str]:
        from rdscale.io.fasta import Record, read_fasta

        return [r.sequence for r in read_fasta(path) if isinstance(r, Record)]

    def cold_extract(self, checkpoint: Path, fasta: Path) -> dict:
        """The cold row: the same extract in a fresh process (CUDA context, model load, first shapes included)."""
        import subprocess

        # the interpreter's own flags too (-S, -I, ...): the child sees the packages this process sees
        flags = getattr(subprocess, "_args_from_interpreter_flags", list)()
        command = [sys.executable, *flags, str(Path(__file__).resolve()), "--local", "--cold-extract", str(checkpoint),
                   str(fasta), self.attention, "--toks-per-batch", str(self.args.toks_per_batch)]
        command += ["--smoke"] if self.args.smoke else []
        command += ["--no-strict-imports"] if self.args.no_strict_imports else []
        start = time.perf_counter()
        # bounded by what is left of the budget (plus the watchdog's grace), so a hung child cannot eat the run
        left = self.args.max_seconds + WATCHDOG_GRACE - (start - self.started)
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(),
                              timeout=max(30.0, left))
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("COLD ")), None)
        if done.returncode != 0 or line is None:
            tail = " ".join(done.stderr[-1500:].split())
            raise RuntimeError(f"the fresh process exited with {done.returncode}: {tail}")
        row = json.loads(line[5:])
        row["process_wall_seconds"] = time.perf_counter() - start
        self.rows.append(row)
        print(f"  {row['variant']:<44} {row['model']:<8} {row['residues']:>10,} {row['seconds']:>8.2f}s "
              f"{row['residues_per_s']:>12,.0f}/s  (fresh process)")
        return row

    def sequences(self) -> list[tuple[str, str]]:
        from rdscale.io.fasta import Record, read_fasta

        base = [(r.id, r.sequence) for r in read_fasta(self.args.fasta) if isinstance(r, Record)]
        if not base:
            raise SystemExit(f"{self.args.fasta} holds no protein")
        out, total, copy = [], 0, 0
        while total < self.args.residues:
            for rid, seq in base:
                out.append((f"{rid}#{copy}", seq))
                total += len(seq)
                if total >= self.args.residues:
                    break
            copy += 1
        return out

    def build(self, name: str):
        """A random-init ESM-2 of the named shape on the device, as a LoadedModel."""
        import esm
        from esm.model.esm2 import ESM2

        from rdscale.model.loading import LoadedModel, ModelSpec

        torch = self.torch
        layers, width, heads = self.shapes[name]
        alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        torch.manual_seed(list(self.shapes).index(name))
        # Built on the device in the run dtype: no float32 copy (12 GB for 3B) and no host-to-device transfer.
        # fair-esm's rotary inverse frequencies are made in float32 explicitly, whatever the default dtype.
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(self.dtype)
        except (TypeError, ValueError):  # a torch that refuses a half default dtype: float32, cast below
            pass
        try:
            with torch.device(self.device):
                model = ESM2(num_layers=layers, embed_dim=width, attention_heads=heads, alphabet=alphabet)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(self.dtype).eval()
        spec = ModelSpec.of(f"random_{name}", layers, width, heads)
        return LoadedModel(model=model, alphabet=alphabet, spec=spec, source=f"random {name}", sha256="",
                           device=self.device, dtype=self.dtype)

    def save_checkpoint(self, loaded, path: Path) -> Path:
        """fair-esm's file format (as rdscale.model.loading.build_tiny_family writes it), in the run dtype."""
        from rdscale.model.loading import _CONTACT_REGRESSION_KEYS, _tiny_cfg

        state = {}
        for key, value in loaded.model.state_dict().items():
            if key in _CONTACT_REGRESSION_KEYS:
                continue
            prefix = "encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder."
            state[prefix + key] = value.detach().to("cpu")
        spec = loaded.spec
        self.torch.save({"model": state, "cfg": {"model": _tiny_cfg(spec.layers, spec.width, spec.heads)}}, path)
        return path

    # ---------------------------------------------------------------------------------------------- variants

    def embed_rows(self, loaded, seqs, forward, label, names, budget=None, compile=False):
        from rdscale.model.embed import Embedder

        emb = Embedder(loaded, toks_per_batch=budget or self.args.toks_per_batch, forward=forward,
                       fast_attention=self.attention, compile=compile)
        if compile:  # compile (and first-run autotuning) outside the timed pass, reported separately
            seconds, _ = self.timed(lambda: emb.embed([s for _, s in seqs[:64]]))
            self.checks[f"compile_seconds_{names[-1]}"] = seconds
        strs = [s for _, s in seqs]
        seconds, out = self.timed(lambda: emb.embed(strs))
        residues = sum(t.shape[0] for t in out)
        extra = {"attention": emb._fast.attention if emb._fast is not None else "sdpa-padded"}
        return self.add(label, names[-1], residues, seconds, self.flops(names, [len(s) for s in strs]), **extra)

    def fair_esm_loop(self, name, seqs):
        """esm-extract's loop on a float32 copy under autocast (bf16 on CUDA; plain float32 in smoke mode)."""
        import esm

        torch = self.torch
        model = self.build(name).model.float()
        alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        subset, total = [], 0
        for rid, s in seqs:
            if total >= self.args.esm_residues:
                break
            subset.append((rid, s))
            total += len(s)
        dataset = esm.data.FastaBatchedDataset([r for r, _ in subset], [s for _, s in subset])
        batches = dataset.get_batch_indices(self.args.toks_per_batch // 4, extra_toks_per_seq=1)
        loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022),
                                             batch_sampler=batches)
        last = model.num_layers

        def run():
            residues = 0
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.device.type == "cuda"):
                for _, strs, toks in loader:
                    rep = model(toks.to(self.device, non_blocking=True), repr_layers=[last])["representations"][last]
                    rep = rep.to("cpu")
                    for i, s in enumerate(strs):
                        residues += rep[i, 1 : min(1022, len(s)) + 1].clone().shape[0]
            return residues

        seconds, residues = self.timed(run)
        lengths = [min(1022, len(s)) for _, s in subset]
        return self.add("fair-esm autocast loop (esm-extract)", name, residues, seconds, self.flops([name], lengths),
                        note="toks_per_batch/4 (esm-extract's memory use at this budget), truncation 1022")

    def extract(self, label, checkpoint, fasta, residues_setting, width, lengths):
        from rdscale.config import (
            Config,
            EmbeddingConfig,
            InputConfig,
            OutputConfig,
            RayConfig,
        )
        from rdscale.run.executor import LocalExecutor
        from rdscale.run.pipeline import embed

        out_dir = self.scratch / f"run_{len(self.rows)}"
        cfg = Config(
            models=[str(checkpoint)],
            input=InputConfig(paths=[str(fasta)], shard_mb=64.0),
            embedding=EmbeddingConfig(toks_per_batch=self.args.toks_per_batch, device=self.device.type,
                                      dtype=str(self.dtype).removeprefix("torch."), attention=self.attention),
            # one call per shard: the writer is drained once per call, so fewer calls overlap more
            output=OutputConfig(dir=str(out_dir), residues=residues_setting, storage_width=width,
                                residue_dtype="float16", records_per_batch=8192),
            ray=RayConfig(address="local"),
        ).validate()
        wall, summary = self.timed(lambda: embed(cfg, executor=LocalExecutor(), progress=False))
        shutil.rmtree(out_dir, ignore_errors=True)
        residues = sum(lengths)
        extra = {}
        if self.load_seconds is not None:  # the run includes one model load; a long run amortises it
            extra["residues_per_s_without_model_load"] = residues / max(summary.seconds - self.load_seconds, 1e-9)
        return self.add(label, "650M", residues, summary.seconds, self.flops(["650M"], lengths),
                        wall_seconds=round(wall, 3), rows_written=summary.residues, proteins=summary.proteins,
                        output={"residues": residues_setting, "storage_width": width, "dtype": "float16"},
                        model_load_seconds=self.load_seconds, **extra)

    def chain(self, chain_name, loaded, seqs, alone_row):
        # (model_budgets from fast_esm, not run.stages: the chains need no Lance)
        from rdscale.fit.chain import fit_chain
        from rdscale.fit.moments import Moments
        from rdscale.model.embed import Embedder
        from rdscale.model.fast_esm import model_budgets

        torch = self.torch
        names = CHAINS[chain_name]
        models = [loaded[n] for n in names]
        widths = [m.spec.width for m in models]
        budgets = model_budgets(self.args.toks_per_batch, widths)
        embedders = [Embedder(m, toks_per_batch=b, forward="fast", fast_attention=self.attention)
                     for m, b in zip(models, budgets)]
        strs = [s for _, s in seqs]

        # fit pass: forwards + float64 moments of the concatenation, on the device, for each Gram mode
        sample = strs[: self.args.fit_sequences]

        def fit_pass(moments):
            step = 4 * self.args.toks_per_batch
            i = 0
            while i < len(sample):
                j, tokens = i, 0
                while j < len(sample) and tokens < step:
                    tokens += len(sample[j])
                    j += 1
                blocks = [e.embed(sample[i:j]) for e in embedders]
                x = torch.cat([torch.cat([b[s].float() for b in blocks], dim=1) for s in range(j - i)])
                moments.update(x)
                i = j
            return moments.count

        lengths_fit = [len(s) for s in sample]
        fit_rows, fits = {}, {}
        for mode, label in (("float64", "float64 moments"), ("float32", "float32 Gram folded into float64")):
            moments = Moments(sum(widths), device=self.device, gram=mode)
            fit_seconds, fit_res = self.timed(lambda moments=moments: fit_pass(moments))
            fit_rows[mode] = self.add(f"fit pass {chain_name} ({label})", chain_name, int(fit_res), fit_seconds,
                                      self.flops(names, lengths_fit), budgets=budgets, gram=mode)
            fits[mode] = (moments, fit_chain(moments, widths))
        fit = fits["float64"][1]
        # the two modes against each other: moments (relative to sqrt(C_ii C_jj)) and the fitted chain's output
        (m64, fit64), (m32, fit32) = fits["float64"], fits["float32"]
        c64, c32 = m64.comoment, m32.comoment
        d = c64.diagonal() ** 0.5
        probe = [torch.cat(b[:8]).double() for b in ([e.embed(sample[:8]) for e in embedders])]
        rd64, rd32 = fit64.apply(probe, dtype=torch.float64), fit32.apply(probe, dtype=torch.float64)
        col = rd64.abs().amax(dim=0).clamp_min(1e-300)
        self.checks[f"fit_gram_float32_vs_float64_{chain_name}"] = {
            "comoment_max_rel_diff": float((abs(c32 - c64) / (d[:, None] * d[None, :] + 1e-300)).max()),
            "rd_output_max_rel_diff_per_column": float(((rd32 - rd64).abs().amax(dim=0) / col).max()),
            "components_kept_agree": [s.components_kept for s in fit32.steps] == [s.components_kept for s in fit64.steps],
        }

        def apply_sample():  # the apply pass on the fit pass's very sequences
            blocks = [e.embed(sample) for e in embedders]
            return fit.apply([torch.cat(b) for b in blocks]).shape[0]

        same_seconds, same_res = self.timed(apply_sample)
        same_row = self.add(f"{chain_name} chain on the fit sample: forwards + rd map", chain_name, same_res,
                            same_seconds, self.flops(names, lengths_fit), budgets=budgets)
        for row in fit_rows.values():
            row["rate_vs_apply_same_sequences"] = row["residues_per_s"] / same_row["residues_per_s"]

        def apply():
            blocks = [e.embed(strs) for e in embedders]  # [model][seq] (L, k_i)
            stacked = [torch.cat(b) for b in blocks]
            rd = fit.apply(stacked)  # (sum L, k_m)
            return rd.shape[0]

        seconds, residues = self.timed(apply)
        lengths = [len(s) for s in strs]
        bound = self.flops(names, lengths) / self.flops(names[-1:], lengths)
        row = self.add(f"{chain_name} chain: forwards + rd map", chain_name, residues, seconds,
                       self.flops(names, lengths), budgets=budgets,
                       time_vs_largest_alone=seconds / alone_row["seconds"] * alone_row["residues"] / residues,
                       flop_bound=bound)
        for fit_row in fit_rows.values():
            fit_row["rate_vs_chain_apply"] = fit_row["residues_per_s"] / row["residues_per_s"]
        return row

    def pick_attention(self, loaded, seqs) -> str:
        """Try every attention backend of the fast forward that can run here: its output against the plain
        forward (run dtype), its speed on a subset; the fastest that agrees is used for the rest of the run."""
        from rdscale.model.embed import Embedder
        from rdscale.model.fast_esm import ATTENTION_BACKENDS, resolve_attention

        probe = [s for _, s in seqs[:24]]
        subset, total = [], 0
        for _, s in seqs:
            if total >= max(self.args.residues // 10, 1):
                break
            subset.append(s)
            total += len(s)
        reference = Embedder(loaded, forward="plain").embed(probe)
        scale = max(float(r.float().abs().max()) for r in reference)
        results, best = {}, None
        for backend in ATTENTION_BACKENDS[1:]:
            try:
                resolve_attention(backend, self.device, self.dtype)
                emb = Embedder(loaded, forward="fast", fast_attention=backend, toks_per_batch=self.args.toks_per_batch)
                out = emb.embed(probe)
                diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(out, reference))
                emb.embed(subset[:8])  # warm-up
                seconds, _ = self.timed(lambda emb=emb: emb.embed(subset))
                ok = diff == diff and diff <= 0.05 * scale  # finite, and within low-precision noise
                results[backend] = {"max_abs_diff_vs_plain": diff, "plain_max_abs": scale, "agrees": ok,
                                    "residues_per_s_on_subset": total / seconds}
                if ok and (best is None or seconds < results[best]["seconds"]):
                    best = backend
                results[backend]["seconds"] = seconds
            except Exception as e:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
                results[backend] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        self.checks["attention_backends_650M"] = results
        if best is None:  # none agreed (or none ran): what "auto" picks here, so the rows still measure the default
            chosen = resolve_attention("auto", self.device, self.dtype)
            self.checks["attention_note"] = f"no backend agreed with the plain forward; using auto's {chosen}"
        else:
            chosen = best
        self.checks["attention_used"] = chosen
        print("  attention backends: " + ", ".join(
            f"{b}: {r.get('residues_per_s_on_subset', 0):,.0f}/s diff {r.get('max_abs_diff_vs_plain', float('nan')):.3g}"
            if "error" not in r else f"{b}: unavailable" for b, r in results.items()) + f"  -> {chosen}")
        return chosen

    # -------------------------------------------------------------------------------------------------- main

    def sync_check(self, loaded, seqs) -> None:
        """The fast and plain forwards' batch loops queue their work without a host synchronisation (a blocking
        copy, .item(), a data-dependent shape): run under torch.cuda.set_sync_debug_mode("error"), which raises at
        the first one. Recorded in checks (ok, or the error naming the operation)."""
        from rdscale.model.embed import Embedder

        torch = self.torch
        if self.device.type != "cuda":
            self.checks["no_host_sync_in_forward"] = "not checked (CPU)"
            return
        probe = [s for _, s in seqs[:48]]
        results = {}
        for forward in ("fast", "plain"):
            emb = Embedder(loaded, forward=forward, fast_attention=self.attention,
                           toks_per_batch=self.args.toks_per_batch)
            emb.embed(probe[:4])  # first call: rotary tables, workspace allocations
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                emb.embed(probe)
                results[forward] = "ok"
            except RuntimeError as e:
                results[forward] = f"synchronises: {' '.join(str(e).split())[:400]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        self.checks["no_host_sync_in_forward"] = results

    # -------------------------------------------------------------------------------------------------- main

    @property
    def size_factor(self) -> float:
        """Part estimates are for the default 1M residues; most of a part's time scales with the input."""
        return max(0.25, self.args.residues / 1e6)

    def section(self, name: str, fn, needs=(), estimate: float = 0.0) -> None:
        """Run one part of the benchmark on its own: an error is recorded (and the rest runs), a part whose inputs
        failed or that would not finish inside --max-seconds (by its rough `estimate` on an H100/H200 at 1M
        residues, mostly generous: the FLOPs of all parts together are ~14 PFLOP, ~40 s at 35% MFU; the rest is
        model builds, Arrow/Lance writes, process start and compilation) is skipped; the JSON is rewritten after
        every part, so a run killed at any point leaves what it measured."""
        elapsed = time.perf_counter() - self.started
        missing = [n for n in needs if n not in self.state]
        record: dict = {"status": "skipped"}
        if missing:
            record["reason"] = f"needs {', '.join(missing)}"
        elif elapsed + (0.0 if self.args.smoke else estimate * self.size_factor) > self.args.max_seconds:
            record["reason"] = (f"time budget: {elapsed:.0f} s spent + ~{estimate * self.size_factor:.0f} s > "
                                f"--max-seconds {self.args.max_seconds:.0f}")
        else:
            print(f"-- {name} ({elapsed:.0f} s)", flush=True)
            start = time.perf_counter()
            try:
                fn()
                record = {"status": "ok"}
            except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
                record = {"status": "error", "error": _error_text(e)}
                print(f"  {name} FAILED: {record['error'][:600]}", flush=True)
                self.free_memory()
            record["seconds"] = round(time.perf_counter() - start, 2)
        if record["status"] == "skipped":
            print(f"-- {name}: skipped ({record['reason']})", flush=True)
        self.sections[name] = record
        self.write_report()

    def free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def run(self) -> int:
        args = self.args
        self.write_report()  # the environment first: a run that dies at once still says where it ran
        seqs = self.sequences()
        lengths = [len(s) for _, s in seqs]
        self.input = {"fasta": str(args.fasta), "proteins": len(seqs), "residues": sum(lengths),
                      "longer_than_1022": sum(n > 1022 for n in lengths), "residues_3b": args.residues_3b}
        fasta = self.scratch / "input.fasta"
        with open(fasta, "w") as f:
            for rid, s in seqs:
                f.write(f">{rid}\n{s}\n")
        subset_3b, total = [], 0
        for item in seqs:
            if total >= args.residues_3b:
                break
            subset_3b.append(item)
            total += len(item[1])
        print(f"{self.device_name}: {len(seqs):,} proteins, {sum(lengths):,} residues "
              f"({self.input['longer_than_1022']} > 1022), {self.dtype}, toks_per_batch {args.toks_per_batch}, "
              f"budget {args.max_seconds:.0f} s")
        print(f"  {'variant':<44} {'model':<8} {'residues':>10} {'time':>9} {'rate':>14} {'model':>11} {'MFU':>6}")
        st = self.state  # what the parts hand on: models, the checkpoint, rows later parts compare against

        def build_small():
            for name in ("8M", "35M", "150M", "650M"):
                st.setdefault("models", {})[name] = self.build(name)
            st["models_built"] = True

        def checkpoint():
            st["checkpoint"] = self.save_checkpoint(st["models"]["650M"], self.scratch / "esm2_650M_random.pt")

        def attention():
            self.attention = self.pick_attention(st["models"]["650M"], seqs)

        def warm_up():
            self.embed_rows(st["models"]["650M"], seqs, "fast", "forward fast (warm-up)", ["650M"])
            self.rows.pop()

        def forward(kind, name, items, key):
            def part():
                st[key] = self.embed_rows(st["models"][name], items, kind, f"forward {kind}", [name])
            return part

        def model_load():
            from rdscale.model.loading import load_model

            device, dtype = self.device.type, str(self.dtype).removeprefix("torch.")
            self.load_seconds, lm = self.timed(lambda: load_model(st["checkpoint"], device=device, dtype=dtype))
            self.checks["model_load_seconds_650M_warm_cache"] = self.load_seconds
            del lm

        def extract(label, residues_setting, width):
            def part():
                w = min(width, self.shapes["650M"][1]) if width else None
                row = self.extract(label, st["checkpoint"], fasta, residues_setting, w, lengths)
                if "fast650" in st:
                    row["rate_vs_forward_fast"] = row["residues_per_s"] / st["fast650"]["residues_per_s"]
                st.setdefault("extract_rows", {})[label] = row
            return part

        def cold():
            row = self.cold_extract(st["checkpoint"], fasta)
            warm = st.get("extract_rows", {}).get("extract warm, prefix 640 fp16")
            if warm:
                row["cold_seconds_vs_warm"] = row["seconds"] / warm["seconds"]

        def small_models():
            for name in ("8M", "35M", "150M"):
                self.embed_rows(st["models"][name], seqs, "fast", "forward fast", [name])

        def build_3b():
            st.setdefault("models", {})["3B"] = self.build("3B")
            self.embed_rows(st["models"]["3B"], subset_3b[:32], "fast", "forward fast (warm-up)", ["3B"])
            self.rows.pop()
            st["models_3b"] = True

        def compiled():
            self.embed_rows(st["models"]["650M"], seqs, "fast", "forward fast + torch.compile", ["650M"],
                            compile=True)

        try:
            # Most valuable first: the 650M forward (MFU target), extract end to end, the rd.650M chain; then 3B,
            # cold start, small models, the fair-esm baseline; torch.compile last (it compiles for a minute).
            self.section("build models 8M..650M", build_small, estimate=15)
            self.section("save 650M checkpoint", checkpoint, needs=["models_built"], estimate=10)
            self.section("attention backends 650M", attention, needs=["models_built"], estimate=20)
            self.section("host-sync check", lambda: self.sync_check(st["models"]["650M"], seqs),
                         needs=["models_built"], estimate=5)
            self.section("warm-up 650M", warm_up, needs=["models_built"], estimate=10)
            self.section("forward fast 650M", forward("fast", "650M", seqs, "fast650"), needs=["models_built"],
                         estimate=10)
            self.section("forward plain 650M", forward("plain", "650M", seqs, "plain650"), needs=["models_built"],
                         estimate=15)
            self.section("model load 650M", model_load, needs=["checkpoint"], estimate=10)
            for label, residues_setting, width in (("extract warm, per-protein only", False, None),
                                                   ("extract warm, prefix 640 fp16", True, 640),
                                                   ("extract warm, per-residue full width fp16", True, None)):
                self.section(label, extract(label, residues_setting, width), needs=["checkpoint"], estimate=30)
            self.section("rd.650M chain", lambda: self.chain("rd.650M", st["models"], seqs, st["fast650"]),
                         needs=["models_built", "fast650"], estimate=40)
            self.section("build 3B", build_3b, estimate=25)
            self.section("forward fast 3B", forward("fast", "3B", subset_3b, "fast3b"), needs=["models_3b"],
                         estimate=15)
            self.section("forward plain 3B", forward("plain", "3B", subset_3b, "plain3b"), needs=["models_3b"],
                         estimate=25)
            self.section("rd.3B chain", lambda: self.chain("rd.3B", st["models"], subset_3b, st["fast3b"]),
                         needs=["models_built", "models_3b", "fast3b"], estimate=60)
            self.section("extract cold (fresh process)", cold, needs=["checkpoint"], estimate=45)
            self.section("forward fast 8M/35M/150M", small_models, needs=["models_built"], estimate=15)
            self.section("fair-esm autocast loop 650M", lambda: self.fair_esm_loop("650M", seqs), estimate=20)
            if args.no_compile or args.smoke:
                self.sections["forward fast + torch.compile 650M"] = {
                    "status": "skipped", "reason": "--smoke" if args.smoke else "--no-compile"}
            else:
                self.section("forward fast + torch.compile 650M", compiled, needs=["models_built"], estimate=90)
        except BudgetExceeded as e:  # the watchdog fired outside a part (a part records it as its own error)
            self.sections["watchdog"] = {"status": "error", "error": str(e)}
        finally:
            _stop_watchdog()
            for name in ALL_SECTIONS:
                self.sections.setdefault(name, {"status": "skipped", "reason": "not reached"})
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.finished = True
            self.write_report()
        print(f"wrote {args.out} ({time.perf_counter() - self.started:.0f} s)")
        print_table(self.report())
        if sys.modules.get("ray") is not None:
            print("error: Ray was imported on the benchmark's path", file=sys.stderr)
            return 1
        return 0 if all(r["status"] != "error" for r in self.sections.values()) else 2

    def report(self) -> dict:
        args = self.args
        return {
            "benchmark": "bench_gpu",
            "label": "CPU SMOKE RUN (tiny shapes, float32): checks the script, not GPU figures" if args.smoke
            else "GPU run",
            "finished": self.finished,
            "device": self.device.type,
            "device_name": self.device_name,
            "dtype": str(self.dtype),
            "torch": self.torch.__version__,
            "cuda": self.torch.version.cuda,
            "flash_attn_installed": _installed("flash_attn"),
            "python": platform.python_version(),
            "peak_tflops": args.peak_tflops,
            "max_seconds": args.max_seconds,
            "shapes": self.shapes,
            "toks_per_batch": args.toks_per_batch,
            "input": self.input,
            "attention_used": self.attention,
            "ray_imported": sys.modules.get("ray") is not None,
            "seconds_total": round(time.perf_counter() - self.started, 2),
            "sections": self.sections,
            "checks": self.checks,
            "rows": self.rows,
        }

    def write_report(self) -> None:
        """The JSON as it stands, replacing the last one atomically (a kill mid-write leaves the previous one)."""
        out = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.report(), indent=2, default=str) + "\n")
        tmp.replace(out)


ALL_SECTIONS = (
    "build models 8M..650M", "save 650M checkpoint", "attention backends 650M", "host-sync check", "warm-up 650M",
    "forward fast 650M", "forward plain 650M", "model load 650M", "extract warm, per-protein only",
    "extract warm, prefix 640 fp16", "extract warm, per-residue full width fp16", "rd.650M chain", "build 3B",
    "forward fast 3B", "forward plain 3B", "rd.3B chain", "extract cold (fresh process)", "forward fast 8M/35M/150M",
    "fair-esm autocast loop 650M", "forward fast + torch.compile 650M",
)


class BudgetExceeded(Exception):
    """Raised in the main thread by the watchdog (SIGALRM) once the run is past --max-seconds plus its grace."""


def _error_text(e: BaseException) -> str:
    """The exception and where it was raised (the innermost frames), short enough for a JSON field."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(e).__name__}: {' '.join(str(e).split())[:1200]} [at {where}]"


def print_table(report: dict) -> None:
    """A compact summary of a report (stdout of a device run is short: rows, ratios, part statuses)."""
    print(f"\n== bench_gpu: {report.get('device_name')} | torch {report.get('torch')} cuda {report.get('cuda')} | "
          f"{report.get('dtype')} | attention {report.get('attention_used')} | "
          f"{report.get('seconds_total', 0):.0f} s{'' if report.get('finished') else ' | NOT FINISHED'}")
    print(f"{'variant':<46} {'model':<8} {'residues':>10} {'s':>7} {'res/s':>11} {'MFU':>6}  ratios")
    ratio_keys = ("rate_vs_forward_fast", "time_vs_largest_alone", "flop_bound", "rate_vs_chain_apply",
                  "rate_vs_apply_same_sequences", "cold_seconds_vs_warm")
    for r in report.get("rows", []):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        ratios = " ".join(f"{k}={r[k]:.3g}" for k in ratio_keys if isinstance(r.get(k), (int, float)))
        print(f"{r['variant'][:46]:<46} {r['model']:<8} {r['residues']:>10,} {r['seconds']:>7.2f} "
              f"{r['residues_per_s']:>11,.0f} {mfu:>6}  {ratios}")
    checks = report.get("checks", {})
    for key in ("no_host_sync_in_forward", "attention_used", "model_load_seconds_650M_warm_cache"):
        if key in checks:
            print(f"{key}: {checks[key]}")
    for key, value in checks.items():
        if key.startswith("fit_gram"):
            print(f"{key}: {value}")
    for name, rec in report.get("sections", {}).items():
        if rec.get("status") != "ok":
            detail = rec.get("error") or rec.get("reason") or ""
            print(f"[{rec.get('status')}] {name}: {detail[:300]}")


def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
