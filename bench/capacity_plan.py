"""A capacity plan for UniRef50 and UniRef100, written as docs/capacity.md from the scale bench's JSON.

Every number is labelled: *measured* (taken from bench/results/*.json on this repository's machine), *extrapolated*
(a measured per-row or per-record figure times a UniRef size) or *estimate* (from published model sizes and an
assumed GPU efficiency, no measurement behind it). Inputs: bench/results/bench_scale.json (bench/bench_scale.py),
bench/results/bench_driver.json (driver memory of the dedupe pass at 1e7 ids), and bench/results/bench_gpu*.json
when a GPU run left one there (a file whose device is not `cuda` is not a GPU figure and is not used).

    python bench/capacity_plan.py            # rewrites docs/capacity.md
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import numpy as np
import uniref_gen as gen
from benchkit import ROOT

sys.path.insert(0, str(ROOT))

from rdscale.model.loading import ESM2_FAMILY  # noqa: E402

# The databases (UniProt release notes, 2024-2025; rounded). Residues of UniRef100 from its mean length ~330.
DATABASES = {"UniRef50": {"proteins": 6.5e7, "residues": 1.9e10}, "UniRef100": {"proteins": 4.0e8, "residues": 1.3e11}}
FASTA_BYTES_PER_RESIDUE = 1.35  # plain FASTA: the residues, line breaks every 60 and a ~100-byte header per record
CHAINS = {
    "8M > 650M (2 models)": ["esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"],
    "8M > 35M > 150M > 650M": ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D",
                               "esm2_t33_650M_UR50D"],
    "8M > ... > 3B (uniref50_cluster.yaml)": ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D",
                                              "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"],
}
GPU = {"name": "H100 SXM", "bf16_dense_tflops": 989.0, "mfu": 0.35}  # assumed model FLOP utilisation (estimate)
WINDOW = 1022
SHARD_MB = 64
COMPACT_ROWS = 1_000_000  # rows per fragment after `rdscale compact` (Lance's default target)
FRAGMENT_ROWS, FRAGMENT_MB = 1_000_000, 128  # output.fragment_rows / fragment_mb defaults (rdscale/config.py)


def fmt(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {suffix}{unit}".strip()
    return f"{x:.3g} {unit}".strip()


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def row_costs(scale: dict) -> dict:
    """Measured bytes per row of each table, split into the embedding (scaled to other widths below) and the rest
    (ids, descriptions, sequences as Lance stores them, compressed, sources, shard numbers), from the largest size
    of each variant."""
    out = {}
    chain_width = int(scale["chain"][-1].split(":")[1])
    prot = max((s for s in scale["sizes"] if not s["residues"]), key=lambda s: s["n"])
    t = prot["verbs"]["run"]["tables"]["proteins"]
    other = t["bytes_live"] - 4 * chain_width * t["rows"]  # float32 per-protein vectors are stored raw
    out["proteins"] = {"n": prot["n"], "rows": t["rows"], "residues": prot["residues_total"],
                       "other_per_row": other / t["rows"], "fragments": t["fragments"],
                       "mean_length": prot["residues_total"] / t["rows"],
                       "manifest_bytes": t["manifest_bytes"], "shards": prot["shards"],
                       "commit_ms": prot["commit_latency_median_ms"], "peak_rss_mb": max(
                           v["peak_rss_mb"] for v in prot["verbs"].values())}
    res = [s for s in scale["sizes"] if s["residues"]]
    if res:
        r = max(res, key=lambda s: s["n"])
        t = r["verbs"]["run"]["tables"]["residues"]
        out["residues"] = {"n": r["n"], "rows": t["rows"], "other_per_row": t["bytes_live"] / t["rows"] - 16 * 2,
                           "fragments": t["fragments"]}
    return out


def context(n: int = 200_000) -> float:
    """Mean attention context per token under window 1022: sum(min(L, W) * L) / sum(L) over UniRef50-like
    lengths (bench/uniref_gen.py)."""
    lengths = gen.lengths(np.random.default_rng(0), n).astype(float)
    return float((np.minimum(lengths, WINDOW) * lengths).sum() / lengths.sum())


def flops_per_token(model: str, ctx: float) -> float:
    """2 x parameters (every matrix product once per token) + attention's QK^T and AV: 4 x layers x width x
    context. Windows overlap by 256 of 1022 on long proteins: +~5% tokens over all, folded into the MFU."""
    spec = ESM2_FAMILY[model]
    return 2.0 * spec.params + 4.0 * spec.layers * spec.width * ctx


def gpu_files() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(str(ROOT / "bench" / "results" / "bench_gpu*.json"))):
        data = json.loads(Path(path).read_text())
        out.append((Path(path).name, data))
    return out


def _written(variant: dict) -> float:
    """Bytes written over final live bytes, the larger of proteins and residues (the ledger is kilobytes)."""
    return max(v for t, v in variant["written_over_final"].items() if t in ("proteins", "residues"))


# S3 Standard request prices, USD per 1,000 requests (AWS list prices, us-east-1, 2024): writes and lists, reads
S3_PRICE = {"write": 0.005, "read": 0.0004}
_S3_WRITES = ("PUT", "POST", "LIST", "COPY")


def s3_requests(s3: dict | None) -> list[str]:
    """The object-store requests per verb (bench_scale.py --s3), and what they would cost at UniRef50's size."""
    if not s3 or not s3.get("s3"):
        return []
    size = max(s3["s3"], key=lambda s: s["n"])
    n, kinds = size["n"], ("GET", "LIST", "HEAD", "PUT", "POST", "DELETE")
    lines = ["## Object-store requests", "",
             f"Every verb at N = {n:,} per-protein proteins on a SeaweedFS server through a counting proxy "
             "(`bench/bench_scale.py --s3`, bench/results/bench_scale_s3.json; the inputs read from the same "
             "store): requests by kind (**measured**). UniRef50 columns: the count scaled by records "
             "(**extrapolated**, an upper bound: most requests come per shard, per commit and per table open, and "
             f"the bench's shards are 0.25 MB against {SHARD_MB} MB in the cluster config), priced at S3 Standard "
             f"list prices (${S3_PRICE['write']} per 1,000 PUT / POST / LIST, ${S3_PRICE['read']} per 1,000 GET / "
             "HEAD; **estimate**).", "",
             "| verb | " + " | ".join(kinds) + " | total | per 1,000 records | UniRef50 requests | UniRef50 USD |",
             "|---|" + "---|" * (len(kinds) + 4)]
    scale = DATABASES["UniRef50"]["proteins"] / n
    for verb, row in size["verbs"].items():
        req = row.get("requests")
        if req is None:
            continue
        total = sum(req.values())
        usd = sum(v * scale / 1e3 * S3_PRICE["write" if k in _S3_WRITES else "read"] for k, v in req.items())
        lines.append(f"| {verb} | " + " | ".join(str(req.get(k, 0)) for k in kinds) +
                     f" | {total:,} | {1e3 * total / n:.1f} | {fmt(total * scale)} | {usd:,.0f} |")
    return lines + [""]


def plan(scale: dict, driver: dict | None) -> str:
    costs = row_costs(scale)
    p = costs["proteins"]
    ctx = context()
    lines = ["# Capacity plan: UniRef50 and UniRef100", "",
             "Generated by `python bench/capacity_plan.py` from `bench/results/bench_scale.json` (and "
             "`bench_driver.json`); do not edit by hand. Labels: **measured** on this repository's 2-core CI-class "
             "machine (stub embedder, LocalExecutor, local disk), **extrapolated** (a measured per-row figure "
             "times a UniRef size), **estimate** (published model sizes and an assumed GPU efficiency; nothing "
             "measured).", "",
             f"Databases assumed: UniRef50 {fmt(DATABASES['UniRef50']['proteins'])} proteins, "
             f"{fmt(DATABASES['UniRef50']['residues'])} residues; UniRef100 "
             f"{fmt(DATABASES['UniRef100']['proteins'])} proteins, {fmt(DATABASES['UniRef100']['residues'])} "
             "residues (UniProt release statistics, rounded).", ""]
    gpus = gpu_files()
    real_gpu = [(name, d) for name, d in gpus if str(d.get("device", "")).startswith("cuda")]
    if real_gpu:
        lines += ["GPU benchmark files found: " + ", ".join(f"`{n}` ({d.get('device_name')}, {d.get('dtype')})"
                                                          for n, d in real_gpu) +
                  ". The GPU-hours below are still FLOP estimates; compare them with those files' rates.", ""]
    else:
        lines += ["**No GPU figure was measured**: " + (
            "the only GPU benchmark file here, " + ", ".join(f"`{n}`" for n, _ in gpus) + ", is the CPU smoke run "
            "of bench/bench_gpu.py" if gpus else "no bench/results/bench_gpu*.json exists") +
            ". Every GPU number below is an estimate from FLOPs.", ""]

    # ---------------------------------------------------------------------------------------------- storage
    lines += ["## Tables: rows and bytes", "",
              f"Per-protein row (measured at N = {p['n']:,}, mean length {p['mean_length']:.0f}): "
              f"{p['other_per_row']:.0f} bytes of id, description, length, source, shard and the sequence (Lance "
              "compresses it in fragments of this size), plus the embedding (4 bytes x width, float32); "
              "UniRef50's mean length is ~290, so its rows are a little smaller. Per-residue row (measured at N = "
              + (f"{costs['residues']['n']:,}): {costs['residues']['other_per_row']:.1f} bytes of id, pos, aa and "
                 "shard, plus the stored prefix: width x 2 bytes (float16) or x 4 (float32)."
                 if "residues" in costs else "not measured).") + " All **extrapolated**.", "",
              "| database | table | prefix / dtype | rows | bytes |", "|---|---|---|---|---|"]
    for db, size in DATABASES.items():
        for width in (1280, 2560):
            rows = size["proteins"]
            b = rows * (p["other_per_row"] + 4 * width)
            lines.append(f"| {db} | proteins | k_m = {width}, float32 | {fmt(rows)} | {fmt(b, 'B')} |")
        if "residues" in costs:
            other = costs["residues"]["other_per_row"]
            for width, dtype, nbytes in ((16, "float16", 2), (64, "float16", 2), (320, "float16", 2),
                                         (1280, "float16", 2), (1280, "float32", 4)):
                b = size["residues"] * (other + width * nbytes)
                lines.append(f"| {db} | residues | {width}, {dtype} | {fmt(size['residues'])} | {fmt(b, 'B')} |")
    lines += ["", "Rejects: a few hundred bytes per rejected record (UniRef holds few: non-standard letters are "
              "valid amino-acid codes); the ledger: one row per shard.", ""]

    # ------------------------------------------------------------------------------------------ fragments / commits
    frag_per_record = p["fragments"] / p["rows"]
    lines += ["## Fragments and commits", "",
              "A run commits finished shards in groups: when some table has `output.fragment_rows` rows "
              f"(default {FRAGMENT_ROWS:,}) or `output.fragment_mb` MiB ({FRAGMENT_MB}) of Arrow data buffered, "
              "each table gets one fragment and the ledger one append for every shard finished by then "
              "(docs/outputs.md, *Fragments*). So every table has as many fragments as there are groups: the "
              "largest table by rows or bytes sets them, and no `compact` is needed (no rewrite: every row is "
              "written once). **Extrapolated** (rows and bytes per row above, cluster config `shard_mb` "
              f"{SHARD_MB}):", "",
              "| database | output | groups = fragments per table = commits | rows per proteins fragment |",
              "|---|---|---|---|"]
    for db, size in DATABASES.items():
        # the buffer's Arrow bytes: sequences uncompressed (a byte per residue), ~100 bytes of id and description
        prot_bytes = size["proteins"] * (100 + 4 * 1280) + size["residues"]
        outputs = [("per-protein, k_m 1280 float32", 0.0)]
        if "residues" in costs:
            outputs += [(f"+ residues {w}, float16", size["residues"] * (costs["residues"]["other_per_row"] + 2 * w))
                        for w in (64, 1280)]
        for what, res_bytes in outputs:
            res_rows = size["residues"] if res_bytes else 0.0
            groups = max(size["proteins"] / FRAGMENT_ROWS, prot_bytes / (FRAGMENT_MB * 2**20),
                         res_rows / FRAGMENT_ROWS, res_bytes / (FRAGMENT_MB * 2**20))
            lines.append(f"| {db} | {what} | {fmt(groups)} | {fmt(size['proteins'] / groups)} |")
    lines += ["", "Wide per-residue output is bound by bytes: 128 MiB fragments of a 50 TB table are ~4e5; raise "
              "`output.fragment_mb` (e.g. 1024) for fewer, larger fragments. The driver buffers at most about one "
              "target's worth of rows per table (plus, on Ray, the parts of shards still running).", "",
              f"**Measured** at N = {p['n']:,} (bench shards of 0.25 MB, defaults otherwise): {p['fragments']:,} "
              f"proteins fragments for {p['shards']:,} shards ({frag_per_record * 1e6:.1f} per 1,000,000 records), "
              f"latest manifest {p['manifest_bytes']:,} bytes, median group commit {p['commit_ms']:.0f} ms (a "
              "group's commit writes its data files). `output.fragment_rows: 0` gives the layout before groups, a "
              "fragment per batch and shard (the ungrouped rows below); `rdscale compact` then merges to "
              f"~{COMPACT_ROWS:,} rows per fragment by rewriting every table.", ""]
    frag = load(ROOT / "bench" / "results" / "bench_fragments.json")
    if frag:
        lines += ["Grouped vs ungrouped, side by side (**measured**, `bench/bench_scale.py --fragments`, "
                  "bench/results/bench_fragments.json, on 2 shared cores under load; a grouped commit's time "
                  "includes writing the group's data files, which the workers wrote for an ungrouped one; bytes: "
                  "proteins and residues data files of every version over the live ones):", "",
                  "| N | output | variant | commits | proteins fragments | residues fragments | commit ms, first / "
                  "last tenth | bytes written / final |", "|---|---|---|---|---|---|---|---|"]
        for case in frag["cases"]:
            for name, v in case["variants"].items():
                lat = v["commit_latency"]
                lines.append(
                    f"| {case['n']:,} | {'residues' if case['residues'] else 'per-protein'} | {name} "
                    f"(fragment_rows {v['fragment_rows']:,}) | {lat['commits']} | {v['fragments'].get('proteins')} "
                    f"| {v['fragments'].get('residues', '-')} | {lat.get('first_decile_ms', 0):.0f} / "
                    f"{lat.get('last_decile_ms', 0):.0f} | {_written(v):.2f} |")
                if "after_compact" in v:
                    c = v["after_compact"]
                    lines.append(f"| {case['n']:,} | {'residues' if case['residues'] else 'per-protein'} | "
                                 f"{name}, then `compact` | - | {c['fragments'].get('proteins')} | "
                                 f"{c['fragments'].get('residues', '-')} | - | "
                                 f"{_written(c):.2f} |")
        lines.append("")
    lines += ["Lance's commit cost grows with the fragments already listed (~2.7 us each, measured for "
              "issue 27); with groups a table lists thousands of fragments, so a commit stays in the "
              "milliseconds for the whole run.", ""]

    # ---------------------------------------------------------------------------------------------- verbs
    growth = scale.get("growth", {})
    sizes = sorted({s["n"] for s in scale["sizes"] if not s["residues"]})
    lines += ["## How each verb grows (measured)", "",
              f"Per-protein runs at N = {', '.join(f'{n:,}' for n in sizes)} (stub chain {' > '.join(scale['chain'])}, "
              "LocalExecutor). `seconds = fixed + per_record x N` fitted on the sizes; the exponent is that of "
              "seconds ~ N^k between the two largest sizes, fixed cost included (a fixed cost pulls it below 1).",
              "", "| verb | fixed s | us per record | exponent | UniRef50 (extrapolated, this machine) |",
              "|---|---|---|---|---|"]
    for key, g in growth.items():
        if not key.startswith("proteins:"):
            continue
        verb = key.split(":", 1)[1]
        t50 = g["fixed_seconds"] + g["per_record_us"] * 1e-6 * DATABASES["UniRef50"]["proteins"]
        k = "n/a" if g["exponent"] is None else f"{g['exponent']:.2f}"
        lines.append(f"| {verb} | {g['fixed_seconds']:.2f} | {g['per_record_us']:.1f} | {k} | "
                     f"{fmt(max(t50, 0), 's')} |")
    upd = [s["update"] for s in scale["sizes"] if not s["residues"] and "update" in s]
    if upd:
        big = max((s for s in scale["sizes"] if not s["residues"]), key=lambda s: s["n"])
        lines += ["", f"Update with 1% changed, 0.5% removed, 1% added at N = {big['n']:,}: "
                  f"{big['update']['ratio_to_run']:.2f} of the run's wall time (**measured**; on this machine the "
                  "stub embeds for free, so the ratio is the release diff's own scan and the deletes, not the GPU "
                  "work, which is ~2.5% of a run's)."]
    if scale.get("real"):
        rates = ", ".join(f"{r['residues_per_s']:,.0f} residues/s at N = {r['n']:,} ({r['seconds']:,.0f} s)"
                          for r in scale["real"])
        lines += ["", f"Real forwards (tiny random ESM-2 32/48/64, CPU): {rates} (**measured**; no bearing on GPU "
                  "rates)."]
    lines.append("")

    lines += s3_requests(load(ROOT / "bench" / "results" / "bench_scale_s3.json"))

    # ---------------------------------------------------------------------------------------------- driver
    lines += ["## Driver memory", ""]
    lines.append(f"- Peak RSS of the whole run in one process (driver and the in-process stage) at N = {p['n']:,}: "
                 f"{p['peak_rss_mb']:.0f} MB (**measured**).")
    if driver:
        dd = [r for r in driver.get("results", []) if r.get("step") == "dedupe" and r.get("method") == "after"]
        if dd:
            top = max(dd, key=lambda r: r["ids"])
            lines.append(f"- Dedupe across shards of {top['ids']:,} ids: {top['driver_peak_mb']:.0f} MB above the "
                         f"driver's start, {top['seconds']:.1f} s (**measured**, bench/results/bench_driver.json).")
    lines += ["- The dedupe passes hold one hash partition of <= 1,000,000 rows whatever N is: **flat in N**; "
              "their partitions spill ~30 bytes per protein to `TMPDIR` (UniRef50: ~2 GB, UniRef100: ~12 GB of "
              "scratch disk, **extrapolated**).",
              "- What grows with the run: the shard plan and ledger (O(shards): ~400 shards for UniRef50, kB), "
              "the grouping plan of identical sequences (O(copies): ~100 bytes each), and the manifest of each "
              "table (O(fragments), see above).", ""]

    # ---------------------------------------------------------------------------------------------- GPU
    lines += ["## GPU-hours per chain (estimate)", "",
              f"FLOPs per residue per model: 2 x parameters + 4 x layers x width x context, with the mean context "
              f"under window {WINDOW} over UniRef50-like lengths = {ctx:.0f} tokens; on an {GPU['name']} at "
              f"{GPU['bf16_dense_tflops']:.0f} TFLOPS bf16 dense and an assumed {GPU['mfu']:.0%} utilisation. "
              "The fit pass (1,000 sequences) and the RD apply (a (K, k_m) product per residue) are < 1% of it. "
              "**Estimates**: replace with bench/bench_gpu.py's measured rates when a GPU run exists.", "",
              "| chain | TFLOP per 1e6 residues | UniRef50 GPU-hours | UniRef100 GPU-hours |", "|---|---|---|---|"]
    hours = {}
    for name, models in CHAINS.items():
        f = sum(flops_per_token(m, ctx) for m in models)
        per_hour = GPU["bf16_dense_tflops"] * 1e12 * GPU["mfu"] * 3600
        h50 = DATABASES["UniRef50"]["residues"] * f / per_hour
        h100 = DATABASES["UniRef100"]["residues"] * f / per_hour
        hours[name] = h50
        lines.append(f"| {name} | {f * 1e6 / 1e12:,.0f} | {h50:,.0f} | {h100:,.0f} |")
    lines.append("")

    # ---------------------------------------------------------------------------------------------- cluster
    name = "8M > ... > 3B (uniref50_cluster.yaml)"
    gpus = math.ceil(hours[name] / 24 / 0.8)  # 80%: stragglers, the fit pass, restarts
    nodes = math.ceil(gpus / 8)
    actors = nodes * 8  # whole nodes: every GPU of them an actor
    out_bytes = DATABASES["UniRef50"]["proteins"] * (p["other_per_row"] + 4 * 2560)
    lines += ["## A Ray cluster for UniRef50 in a day (estimate)", "",
              f"Chain `{name}`, per-protein output at k_m = 2560: ~{fmt(hours[name])} GPU-hours (above). At 80% "
              f"of the day busy: **{gpus} GPUs**, i.e. {nodes} node{'s' if nodes > 1 else ''} of 8 x H100 "
              f"(`ray.num_actors: {actors}`, "
              "`gpus_per_actor: 1`, `cpus_per_actor: 4`: 32 CPUs per node for readers and writers). The head node "
              "(driver): 8 CPUs, 16 GB of memory (the driver needs < 1 GB, measured above; Ray's own processes "
              "the rest), 50 GB of local disk for the dedupe scratch and the gzip index. Output: "
              f"{fmt(out_bytes, 'B')} written over the day, {fmt(out_bytes / 86400, 'B')}/s on average, to an "
              "object store or shared filesystem every node can write. Input: the gzip FASTA on the same store, "
              "read once for the gzip index and once by the workers (plus once for `input.dedupe_sequences`). The "
              f"GPU count scales with 1 / utilisation: at 15% instead of {GPU['mfu']:.0%}, "
              f"{math.ceil(gpus * GPU['mfu'] / 0.15)} GPUs.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default=str(ROOT / "bench" / "results" / "bench_scale.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "capacity.md"))
    args = ap.parse_args()
    scale = load(Path(args.scale))
    if scale is None:
        raise SystemExit(f"{args.scale} not found: run bench/bench_scale.py first")
    text = plan(scale, load(ROOT / "bench" / "results" / "bench_driver.json"))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
