"""Bundle size and resident memory of the wearable presets exported at 8da4w (§3.4.2, expert offloading).

For each preset (random init) and embedding quantisation this exports a bundle for the android recipe and reports:
- export time, bundle bytes (the .pte programs) and the *ideal* bytes: 4-bit weights + one bf16 scale per group
  for the quantised linears, the embedding at its own quantisation, fp32 for the rest (norms, routers);
  target: bundle <= 1.3x ideal;
- the stored bytes of the active parameters (backbone + top_k experts per layer, from the manifest) and the memory
  a process really holds under the swap policy: a fresh process opens the bundle, loads every backbone method and
  top_k experts per layer, runs one token through each, and the growth of its RSS is measured; target <= 1.15x.
  The activation arena ExecuTorch plans for the programs (max over methods, for max_chunk tokens) is reported
  beside it, since it is memory the runtime holds that is not weights.

    nohup python benchmarks/export_size.py > benchmarks/results/export_size.log 2>&1 &
    python benchmarks/export_size.py --presets tiny-moe --quant-embedding none   # a quick check (~6 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ideal_bytes(preset: str, group: int, quant_embedding: str) -> dict:
    """Ideal stored bytes per kind, from the model's parameter shapes (built on the meta device: no memory)."""
    import torch
    import torch.nn as nn

    from cosmoes.config import get_preset
    from cosmoes.model import Transformer

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    out = {"embedding": 0, "expert": 0, "other": 0}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not fqn.endswith("router"):
            n = mod.weight.numel()
            nbytes = n // 2 + n // group * 2  # int4 + bf16 scale per group (XNNPACK's layout)
        elif isinstance(mod, nn.Embedding):
            n = mod.weight.numel()
            nbytes = {"none": 4 * n, "int8": n + mod.num_embeddings * 4, "int4": n // 2 + n // 32 * 4}[quant_embedding]
        else:
            nbytes = sum(p.numel() * 4 for p in mod.parameters(recurse=False))
        if not nbytes:
            continue
        kind = "embedding" if isinstance(mod, nn.Embedding) else ("expert" if ".experts." in fqn else "other")
        out[kind] += nbytes
    per_expert = out["expert"] // (cfg.n_layers * cfg.num_experts)
    out["total"] = out["embedding"] + out["expert"] + out["other"]
    out["active"] = out["embedding"] + out["other"] + cfg.n_layers * cfg.top_k * per_expert
    return out


def kv_cache_bytes(cfg: dict, max_seq_len: int | None) -> int:
    """fp32 K and V caches of every layer: part of the planned arena, not of the weights."""
    kv_heads = cfg["n_kv_heads"] or cfg["n_heads"]
    return 2 * cfg["n_layers"] * kv_heads * (cfg["dim"] // cfg["n_heads"]) * (max_seq_len or cfg["max_seq_len"]) * 4


def _rss() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _planned_arena(pte: Path) -> int:
    """Bytes of the activation arena a program needs: the largest planned buffer set over its methods."""
    from executorch.exir._serialize.generated.executorch_flatbuffer.ExecutionPlan import ExecutionPlan
    from flatbuffers import encode, packer
    from flatbuffers.table import Table

    buf = pte.read_bytes()[: int.from_bytes(pte.read_bytes()[16:24], "little")]
    root = Table(buf, encode.Get(packer.uoffset, buf, 0))
    slot = root.Offset(6)
    vec, best = root.Vector(slot), 0
    for j in range(root.VectorLen(slot)):
        plan = ExecutionPlan()
        plan.Init(buf, root.Indirect(vec + 4 * j))
        best = max(best, sum(plan.NonConstBufferSizes(i) for i in range(plan.NonConstBufferSizesLength())))
    return best


def _open_and_run(bundle: Path, m, per_layer: int) -> tuple:
    """Open both programs, load the backbone and ``per_layer`` experts per layer, run one token through them."""
    import torch
    from executorch.runtime import Runtime

    cfg = m.config
    rt = Runtime.get()
    backbone, experts = rt.load_program(bundle / "backbone.pte"), rt.load_program(bundle / "experts.pte")
    # the low-level program hands out methods we own; runtime.Program would cache them forever
    methods = {name: backbone._program.load_method(name) for name in m.programs["backbone"]["methods"]}
    loaded = {(i, e): experts._program.load_method(m.expert_method(i, e))
              for i in range(cfg["n_layers"]) for e in range(per_layer)}
    start = torch.zeros(1, dtype=torch.long)
    h = methods["embed"].call([torch.tensor([[1]])])[0]
    for i in range(cfg["n_layers"]):
        h, x = methods[f"layer_{i}"].call([h, start])[:2]
        for e in range(per_layer):
            h = h + loaded[(i, e)].call([x[0]])[0][None] / per_layer
    methods["head"].call([h])
    return backbone, experts, methods, loaded


def measure(bundle: Path, policy: str) -> dict:
    """RSS growth of a process that opens the bundle and runs one token with the experts of ``policy``.

    A warm-up pass (then freed) first pages in the runtime's own libraries (XNNPACK, kernels), which would
    otherwise count as ~10 MB of file-backed RSS that has nothing to do with the bundle.
    """
    import executorch.kernels.quantized  # noqa: F401  (quantized embedding kernels)

    from cosmoes.export.manifest import load_manifest

    m = load_manifest(bundle, verify=False)
    cfg = m.config
    per_layer = cfg["top_k"] if policy == "swap" else cfg["num_experts"]
    from cosmoes.runtime.python import release_heap

    warm = _open_and_run(bundle, m, 1)
    del warm
    release_heap()
    before = _rss()
    state = _open_and_run(bundle, m, per_layer)
    release_heap()
    after = _rss()
    del state
    arena = sum(_planned_arena(bundle / p["file"]) for p in m.programs.values())
    return {"policy": policy, "rss_bytes": after["VmRSS"] - before["VmRSS"],
            "anon_bytes": after["RssAnon"] - before["RssAnon"], "file_bytes": after["RssFile"] - before["RssFile"],
            "arena_bytes": arena}


def measure_in_fresh_process(bundle: Path, policy: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(bundle), "--policy", policy]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_one(preset: str, quant_embedding: str, work: Path, reuse: bool) -> dict:
    from cosmoes.export.bundle import ExportConfig, export_bundle, resident_bytes
    from cosmoes.export.manifest import load_manifest

    out = work / f"{preset}-8da4w-emb-{quant_embedding}"
    seconds = None
    if not (reuse and (out / "manifest.json").exists()):
        t0 = time.time()
        export_bundle(preset, out, ExportConfig(target="android", quant="8da4w", quant_embedding=quant_embedding))
        seconds = time.time() - t0
    m = load_manifest(out, verify=False)
    ideal = ideal_bytes(preset, m.group_size, quant_embedding)
    programs = sum(p["bytes"] for p in m.programs.values())
    swap = measure_in_fresh_process(out, "swap")
    row = {"preset": preset, "quant_embedding": quant_embedding, "group_size": m.group_size,
           "padded_linears": len(m.padded_linears), "export_s": seconds or m.export_seconds,
           "bundle_bytes": programs, "ideal_bytes": ideal["total"], "size_ratio": programs / ideal["total"],
           "stored_active_bytes": resident_bytes(m, "swap"), "ideal_active_bytes": ideal["active"],
           "swap_rss_bytes": swap["rss_bytes"], "swap_anon_bytes": swap["anon_bytes"],
           "swap_file_bytes": swap["file_bytes"], "arena_bytes": swap["arena_bytes"]}
    row["kv_cache_bytes"] = kv_cache_bytes(m.config, m.max_seq_len)
    row["resident_ratio"] = row["swap_rss_bytes"] / row["stored_active_bytes"]
    row["resident_ratio_without_arena"] = (row["swap_rss_bytes"] - row["arena_bytes"]) / row["stored_active_bytes"]
    print(json.dumps(row), flush=True)
    return row


def write_markdown(rows: list[dict], path: Path, command: str, started: str, took: float) -> None:
    mb = lambda n: f"{n / 1e6:.1f}"  # noqa: E731
    lines = ["# Export size and resident memory (8da4w, android recipe)", "",
             f"Produced by `benchmarks/export_size.py` ({command}), started {started}"
             + (f", took {took / 60:.0f} min." if took else "."),
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; Python {platform.python_version()}.",
             "Random-init presets (sizes do not depend on the weights' values). MB = 10^6 bytes.", "",
             "| preset | embedding | group | padded linears | export s | bundle MB | ideal MB | bundle/ideal "
             "| stored active MB | swap RSS MB | RSS/active | arena MB (KV cache MB) | (RSS-arena)/active |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['quant_embedding']} | {r['group_size']} | {r['padded_linears']} | "
                     f"{r['export_s']:.0f} | {mb(r['bundle_bytes'])} | {mb(r['ideal_bytes'])} | "
                     f"{r['size_ratio']:.3f} | {mb(r['stored_active_bytes'])} | {mb(r['swap_rss_bytes'])} | "
                     f"{r['resident_ratio']:.3f} | {mb(r['arena_bytes'])} ({mb(r.get('kv_cache_bytes', 0))}) | "
                     f"{r['resident_ratio_without_arena']:.3f} |")
    lines += ["", "Targets: bundle/ideal <= 1.3; resident under swap / stored active bytes <= 1.15.", "",
              "Columns: *bundle* = backbone.pte + experts.pte; *ideal* = 4-bit weights + one bf16 scale per 32 "
              "weights for every quantised linear at its unpadded width, the embedding at its quantisation (int8: + "
              "one fp32 scale per row), fp32 norms and routers; *stored active* = backbone + top_k experts per layer "
              "as stored in the bundle (manifest); *swap RSS* = RSS growth of a fresh process (after a warm-up pass "
              "that pages in the runtime libraries) that opens both programs, loads every backbone method and top_k "
              "experts per layer and runs one token; *arena* = the activation memory ExecuTorch plans for the two "
              "programs (max over methods, for max_chunk = 128 tokens), which includes the fp32 KV caches for "
              "max_seq_len tokens (in brackets) and the head's 128 x vocab logits; it is runtime memory, not weights, "
              "so the last column compares like with like.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["wearable-moe", "wearable-wd"])
    ap.add_argument("--quant-embedding", nargs="+", default=["none", "int8"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "export_size", help="where the bundles go")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_size.md")
    ap.add_argument("--reuse", action="store_true", help="measure existing bundles instead of re-exporting")
    ap.add_argument("--render", type=Path, nargs="+", help="only rewrite --out from the JSON rows of earlier logs")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="swap", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.policy)))
        return
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    from cosmoes.config import get_preset

    if args.render:
        rows = [json.loads(line) for log in args.render for line in log.read_text().splitlines()
                if line.startswith("{")]
        for r in rows:
            r.setdefault("kv_cache_bytes", kv_cache_bytes(get_preset(r["preset"]).to_dict(), None))
        names = ", ".join(log.name for log in args.render)
        write_markdown(rows, args.out, f"`--render` of the rows in {names}", started, 0.0)
        return
    t0 = time.time()
    rows = []
    for preset in args.presets:
        for qe in args.quant_embedding:
            rows.append(run_one(preset, qe, args.work, args.reuse))
            write_markdown(rows, args.out, command, started, time.time() - t0)  # keep partial results
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
