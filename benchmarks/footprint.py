"""What a device must hold for a bundle (issue #20): stored and resident bytes by kind, against llama.cpp's GGUF.

One run prints and records, for one exported bundle:
- stored bytes per kind (manifest) and the bundle's size against the GGUF of the same weights (Q4_0 linears, q8_0
  token embedding, written by benchmarks/gguf_peer.py with the `gguf` package);
- `cosmoes bench` under each policy (64 prompt + 64 new tokens by default): RSS right after load and at its peak,
  resident MB by kind (anonymous and file-backed apart);
- the targets: bundle <= 1.05x GGUF; RSS after load <= the non-expert weights the runtime holds (attention, head:
  the embedding is read in place) + 10 MB; swap peak <= 150 MB and within 1.1x of resident weights + KV of the
  positions used + one chunk's activations + the process before loading.

    python benchmarks/footprint.py bundles/wearable-moe --threads 1 --out benchmarks/results/footprint_wearable-moe
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = ("embedding", "attention", "head", "dense_ffn", "experts", "kv_cache", "activations", "runtime")


def cpu_line() -> str:
    from cosmoes.system import cpu_description

    return cpu_description()


def gguf_row(manifest, bundle: Path, work: Path) -> dict:
    from gguf_peer import write_gguf

    source = manifest.source.get("checkpoint") or manifest.source.get("preset")
    out = work / f"{Path(source).name}.gguf"
    tokenizer = bundle / manifest.tokenizer if manifest.tokenizer else None
    info = write_gguf(source, out, seed=manifest.source.get("seed") or 0, tokenizer_dir=tokenizer)
    bundle_bytes = manifest.stored_bytes()  # the programs and, int4, experts.bin
    return {"gguf": info["path"], "gguf_bytes": info["bytes"], "bundle_bytes": bundle_bytes,
            "ratio": bundle_bytes / info["bytes"]}


def peer_row(gguf: str, args) -> dict:
    """llama.cpp on the same weights (mmap on, context prompt + gen): peak RSS and speeds, or the failure's reason."""
    # In a process of its own: a child's peak RSS (ru_maxrss) starts from its parent's at fork/exec, and this one
    # has held the model's fp32 weights to write the GGUF.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "llamacpp.py"), gguf, "--threads", str(args.threads or 1),
           "--prompt-tokens", str(args.prompt_len), "--gen", str(args.gen)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):  # a peer that does not build is a failed row; the cosmoes rows stay
        return {"error": (proc.stderr.strip().splitlines() or ["llama.cpp produced no result"])[-1]}


def run_bench(bundle: Path, policies: list[str], args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "cosmoes.cli", "bench", str(bundle), "--prompt-len", str(args.prompt_len),
           "--gen", str(args.gen), "--repeats", str(args.repeats), "--out", str(out / "bench")]
    cmd += [a for p in policies for a in ("--policy", p)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ cosmoes " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "bench" / "bench.json").read_text())


def expected_peak(row: dict, manifest) -> float:
    """MB a run holds in steady state: resident weights (as measured by kind) + the KV of the positions used +
    the activations resident + the runtime's fixed overhead (its "runtime" kind: code pages, heap, XNNPACK's
    workspace, measured in the same run). Peak RSS above this is transient memory (e.g. during prefill)."""
    weights = sum(v["anon"] + v["file"] for k, v in row["resident_mb"].items()
                  if k in ("embedding", "attention", "head", "dense_ffn", "experts"))
    kv = manifest.memory["kv_bytes_per_position"] * (row["prompt_tokens"] + row["generated_tokens"]) / 1e6
    runtime = row["resident_mb"]["runtime"]
    return weights + kv + row["resident_mb"]["activations"]["anon"] + runtime["anon"] + runtime["file"]


def render(bundle: Path, manifest, size: dict, bench: dict, args) -> str:
    from cosmoes.export.bundle import footprint

    fp = footprint(manifest)
    held = sum(v for k, v in manifest.non_expert_bytes.items() if k != "embedding") / 1e6
    lines = [f"# Footprint of {manifest.config.get('name')} ({bundle.name})", "",
             f"`python {' '.join(sys.argv)}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{cpu_line()}, {platform.machine()}; {args.prompt_len} + {args.gen} tokens, "
             f"{bench['rows'][0].get('threads')} thread(s), median of {args.repeats} runs.", "",
             f"Bundle: quant {manifest.quant}, embedding {manifest.quant_embedding}, context {manifest.max_seq_len}, "
             f"chunk {manifest.max_chunk}.", "", "## Stored", "",
             "| kind | stored MB | held as |", "|---|---:|---|"]
    for kind, v in fp.items():
        if "stored" in v:
            lines.append(f"| {kind} | {v['stored'] / 1e6:.1f} | {'file-backed, read in place' if v['backing'] == 'file' else 'anonymous (packed at load)'} |")
    lines.append(f"| kv_cache | {fp['kv_cache']['reserved'] / 1e6:.1f} reserved | anonymous, "
                 f"{fp['kv_cache']['per_1k_positions'] / 1e6:.1f} MB per 1k positions as they fill |")
    lines.append(f"| activations | {fp['activations']['reserved'] / 1e6:.1f} reserved | anonymous, as used |")
    lines += ["", f"Bundle {size['bundle_bytes'] / 1e6:.1f} MB against the GGUF of the same weights "
                  f"{size['gguf_bytes'] / 1e6:.1f} MB (Q4_0, q8_0 token embedding): **{size['ratio']:.3f}x** "
                  "(target <= 1.05).", "", "## Resident (end of the last run; anonymous + file-backed MB)", "",
              "| policy | " + " | ".join(KINDS) + " | after load | peak | expected | peak/expected |",
              "|---|" + "---:|" * (len(KINDS) + 4)]
    for row in bench["rows"]:
        if "error" in row:
            lines.append(f"| {row.get('policy')} | failed: {row['error']} |")
            continue
        cells = []
        for k in KINDS:
            v = row["resident_mb"].get(k)
            cells.append("-" if v is None else f"{v['anon']:.1f}" + (f" + {v['file']:.1f}" if v["file"] > 0.05 else ""))
        exp = expected_peak(row, manifest)
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + f" | {row['rss_after_load_mb']:.1f} | "
                     f"{row['peak_rss_mb']:.1f} | {exp:.1f} | {row['peak_rss_mb'] / exp:.2f} |")
    ok = [r for r in bench["rows"] if "error" not in r]
    if not ok:
        return "\n".join(lines) + "\n\nEvery policy failed: no resident figures.\n"
    after = min(r["rss_after_load_mb"] for r in ok)
    # what the runtime holds of the non-expert weights: their packed (anonymous) bytes as loaded, measured
    held_now = min(sum(r["resident_mb"][k]["anon"] for k in ("embedding", "attention", "head", "dense_ffn")
                       if k in r["resident_mb"]) for r in ok)
    swap = next((r for r in bench["rows"] if r.get("policy") == "swap" and "error" not in r), None)
    peer = getattr(args, "peer_result", None)
    if peer is not None:
        lines += ["", "## llama.cpp on the same weights", ""]
        if "error" in peer:
            lines.append(f"failed: {peer['error']}")
        else:
            lines.append(f"llama.cpp {peer.get('llamacpp_version')} (`{peer.get('rss_cmd')}`, mmap on): peak RSS "
                         f"{peer['peak_rss_mb']:.1f} MB (from {peer.get('rss_from')}); llama-bench "
                         f"{peer.get('threads')} thread(s): decode {peer['decode_tok_s']:.1f} tok/s, prefill "
                         f"{peer['prefill_tok_s']:.0f} tok/s.")
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|",
              f"| bundle <= 1.05x GGUF | {size['ratio']:.3f}x | {'met' if size['ratio'] <= 1.05 else 'NOT met'} |",
              f"| RSS after load <= non-expert weights the runtime holds {held_now:.1f} MB (packed; stored "
              f"{held:.1f} MB) + 10 | {after:.1f} MB | {'met' if after <= held_now + 10 else 'NOT met'} |"]
    if swap:
        ratio = swap["peak_rss_mb"] / expected_peak(swap, manifest)
        lines += [f"| swap peak <= 150 MB | {swap['peak_rss_mb']:.1f} MB | "
                  f"{'met' if swap['peak_rss_mb'] <= 150 else 'NOT met'} |",
                  f"| swap peak <= 1.1x expected | {ratio:.2f}x | {'met' if ratio <= 1.1 else 'NOT met'} |"]
    all_row = next((r for r in ok if r.get("policy") == "all"), None)
    if peer is not None and "error" not in peer and all_row:
        met = all_row["peak_rss_mb"] <= peer["peak_rss_mb"]
        lines.append(f"| all peak <= llama.cpp's | {all_row['peak_rss_mb']:.1f} vs {peer['peak_rss_mb']:.1f} MB | "
                     f"{'met' if met else 'NOT met'} |")
    lines += ["", "expected = resident weights by kind + KV of the positions used + activations resident + the "
                  "runtime's fixed overhead (the runtime column: code pages, heap, XNNPACK workspace), all from the "
                  "same run; peak/expected above 1 is memory held only for a moment (prefill)."]
    return "\n".join(lines) + "\n"


def plot(bench: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in bench["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, row in enumerate(rows):
        bottom = 0.0
        for j, kind in enumerate(KINDS):
            v = row["resident_mb"].get(kind)
            if not v:
                continue
            for part, hatch in (("anon", None), ("file", "//")):
                if v[part] > 0:
                    ax.bar(i, v[part], bottom=bottom, color=f"C{j}", hatch=hatch,
                           label=kind if (i == 0 and part == "anon") else None)
                    bottom += v[part]
        ax.plot([i - 0.4, i + 0.4], [row["peak_rss_mb"]] * 2, "k--", lw=1)
    ax.set_xticks(range(len(rows)), [r["policy"] for r in rows])
    ax.set_ylabel("resident MB (hatched: file-backed)")
    ax.set_title("resident memory by kind; dashed: peak RSS")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def estimate(presets: list[str]) -> str:
    """Stored and resident weight MB of presets not exported here (the phone sizes: hours to lower on 2 cores),
    from their parameter shapes at the android recipe's quantisation (export_size.ideal_bytes: int4 + bf16 group
    scales, int8 embedding; the wearable bundles come within 1.03-1.07x of it), with the KV cache per 1k positions."""
    from export_size import ideal_bytes

    from cosmoes.config import get_preset
    from cosmoes.export.policy import parse_policy

    lines = ["| preset (estimated, not exported) | embedding MB (in place) | backbone MB held | per expert MB | "
             "swap MB | lru:4 MB | all MB | KV MB per 1k positions | KV MB at 2048 |", "|---|" + "---:|" * 8]
    for name in presets:
        cfg = get_preset(name)
        b = ideal_bytes(name, 32, "int8")
        per_expert = b["expert"] / (cfg.n_layers * cfg.num_experts) if cfg.num_experts else 0
        held = b["other"]
        row = [b["embedding"] / 1e6, held / 1e6, per_expert / 1e6]
        for policy in ("swap", "lru:4", "all"):
            if not cfg.num_experts:
                row.append(held / 1e6)
                continue
            k = parse_policy(policy, cfg.top_k).experts_per_layer(cfg.top_k, cfg.num_experts)
            row.append((held + cfg.n_layers * k * per_expert) / 1e6)
        row += [cfg.kv_bytes_per_position * 1024 / 1e6, cfg.kv_bytes_per_position * 2048 / 1e6]
        lines.append(f"| {name} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
    lines.append("\nresident weights = held backbone (attention, norms, routers, head) + experts kept per layer; the "
                 "embedding's rows are read in place from the file as tokens use them.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="an exported bundle (or --estimate only)")
    ap.add_argument("--estimate", nargs="*", default=[], help="presets to estimate from their shapes, not exported")
    ap.add_argument("--policies", nargs="+", default=["swap", "lru:4", "all"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="where the GGUF is written (default: a new temporary directory)")
    ap.add_argument("--peer", action="store_true", help="also build llama.cpp (benchmarks/llamacpp.py) and run it on "
                                                        "the GGUF: its peak RSS beside the bundle's")
    args = ap.parse_args(argv)
    from cosmoes.export.manifest import load_manifest

    if args.estimate:
        text = estimate(args.estimate)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimate.md").write_text(text)
        print(text)
    if args.bundle is None:
        return

    manifest = load_manifest(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="cosmoes-footprint-"))  # the GGUF is as large as the bundle
    work.mkdir(parents=True, exist_ok=True)
    size = gguf_row(manifest, args.bundle, work)
    print(json.dumps(size), flush=True)
    args.peer_result = peer_row(size["gguf"], args) if args.peer else None
    print(json.dumps({"llama.cpp": args.peer_result}), flush=True)
    bench = run_bench(args.bundle, args.policies, args, args.out)
    text = render(args.bundle, manifest, size, bench, args)
    (args.out / "footprint.md").write_text(text)
    (args.out / "footprint.json").write_text(json.dumps({"size": size, "bench": bench, "llama.cpp": args.peer_result},
                                                        indent=2) + "\n")
    plot(bench, args.out / "footprint.png")
    print(text)


if __name__ == "__main__":
    main()
