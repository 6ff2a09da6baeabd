"""Decode speed and expert traffic of a bundle under each cache policy, on the Python ExecuTorch runtime (§3.4.2–3.4.3).

The on-device numbers come from the native runner; this is the same measurement on the host through
`BundleRuntime`, used by `cosmoes demo` and the small-scale reproduction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PyBenchConfig:
    """One prompt, greedy generation, the policies compared side by side."""

    policies: list[str] = field(default_factory=lambda: ["all", "swap"])
    prompt: str = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    gen: int = 64
    warmup: int = 1
    threads: int | None = None


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc (0, 0 where unavailable)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def bench_policy(bundle: str | Path, policy: str, cfg: PyBenchConfig) -> dict:
    """Open the bundle under ``policy``, generate cfg.gen tokens (after warm-up runs), report speed and traffic."""
    from cosmoes.export.runtime import BundleRuntime

    t0 = time.perf_counter()
    rt = BundleRuntime(bundle, policy=policy, threads=cfg.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt_ids = rt.tokenizer().encode(cfg.prompt)
    for _ in range(cfg.warmup):
        rt.generate(prompt_ids, 4)
    loads0, evict0, load_ms0 = rt.stats.loads, rt.stats.evictions, rt.stats.load_ms
    t0 = time.perf_counter()
    token = int(rt.prefill(prompt_ids).argmax())
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg.gen - 1):
        token = int(rt.decode(token).argmax())
    decode_s = time.perf_counter() - t0
    stats = rt.stats.to_dict()
    rss, _ = rss_bytes()
    return {"policy": policy, "model_load_ms": round(load_ms, 1), "prompt_tokens": len(prompt_ids),
            "prefill_tok_s": len(prompt_ids) / prefill_s, "decode_tok_s": (cfg.gen - 1) / decode_s,
            "expert_loads": rt.stats.loads - loads0, "expert_evictions": rt.stats.evictions - evict0,
            "expert_load_ms": round(rt.stats.load_ms - load_ms0, 1), "exrep_mean": stats["exrep_mean"],
            "rss_mb": round(rss / 2**20, 1)}


def bench_policies(bundle: str | Path, cfg: PyBenchConfig | None = None) -> list[dict]:
    """`bench_policy` for each policy, one after the other in this process."""
    cfg = cfg or PyBenchConfig()
    return [bench_policy(bundle, policy, cfg) for policy in cfg.policies]


def format_rows(rows: list[dict]) -> str:
    header = f"{'policy':>8} {'decode tok/s':>12} {'prefill tok/s':>13} {'loads':>6} {'evict':>6} {'load ms':>8} {'ExRep':>6}"
    lines = [header]
    for r in rows:
        lines.append(f"{r['policy']:>8} {r['decode_tok_s']:>12.1f} {r['prefill_tok_s']:>13.1f} {r['expert_loads']:>6} "
                     f"{r['expert_evictions']:>6} {r['expert_load_ms']:>8.1f} {r['exrep_mean']:>6.3f}")
    return "\n".join(lines)
