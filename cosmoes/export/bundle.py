"""Write and describe on-device bundles: backbone.pte + the experts (experts.bin or experts.pte) + tokenizer + manifest.

§3.4.2 (expert offloading): every expert is its own segment — an int4 byte range of experts.bin that the runtimes'
kernels use in place (8da4w, the default), or its own ExecuTorch method of experts.pte (`--experts xnnpack`, fp32,
8da8w) — so a runtime can keep only the experts a step needs resident (Eq. 8) and load the others on demand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.export.manifest import Manifest, load_manifest, write_manifest
from cosmoes.export.policy import parse_policy, valid_policies
from cosmoes.export.recipes import Recipe, check_quant
from cosmoes.formats import KV_DTYPES, MIN_GROUP

TOKENIZER_DIR = "tokenizer"
PROGRAMS = ("backbone", "experts")


@dataclass
class ExportConfig:
    """How to export: target recipe plus overrides (None = the recipe's or the model's default)."""

    target: str = "host"
    quant: str | None = None  # none | 8da4w | 8da8w (4w is refused: wrong results under XNNPACK)
    group_size: int | None = None  # preferred 8da4w group; the rule in transforms.choose_group_size applies
    quant_embedding: str | None = None  # none | int8 | int4; None: the recipe's (none when quant is none)
    max_seq_len: int | None = None  # context (KV-cache) length; None = the recipe's, capped at the model's
    max_chunk: int | None = None  # most tokens per call (prefill is fed in chunks of this size)
    seed: int = 0  # random init of a preset source
    # int4: each expert a packed segment of experts.bin that the runtimes' kernels use in place (8da4w only);
    # xnnpack: each expert its own XNNPACK method of experts.pte (re-packed on every load). None: int4 for 8da4w.
    experts: str | None = None
    kv_cache: str = "fp32"  # element type of the KV caches: fp32 | fp16 (half the bytes a decode step reads)

    def resolve(self) -> tuple["ExportConfig", Recipe]:
        """The config with every default filled in from the target's recipe, validated."""
        from cosmoes.export.recipes import load_recipe
        from cosmoes.formats import MAX_SEQ_LEN

        recipe = load_recipe(self.target)
        cfg = dataclasses.replace(self)
        cfg.quant = recipe.quant if self.quant is None else self.quant
        # --quant none asks for an fp32 bundle (what correctness checks compare with): its embedding stays fp32 too
        # unless asked otherwise
        embedding_default = "none" if cfg.quant == "none" else recipe.quant_embedding
        cfg.quant_embedding = embedding_default if self.quant_embedding is None else self.quant_embedding
        cfg.group_size = recipe.group_size if self.group_size is None else self.group_size
        cfg.max_chunk = recipe.max_chunk if self.max_chunk is None else self.max_chunk
        check_quant(cfg.target, cfg.quant, cfg.quant_embedding)
        cfg.experts = _expert_layout(cfg.quant, self.experts)
        if cfg.kv_cache not in KV_DTYPES:
            raise InvalidValue("kv-cache", f"must be one of {', '.join(KV_DTYPES)}, got {cfg.kv_cache!r}")
        for name in ("max_chunk", "max_seq_len", "group_size"):
            value = getattr(cfg, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValue(name.replace("_", "-"), f"must be positive, got {value}")
            if name != "group_size" and value > MAX_SEQ_LEN:  # the manifest's bound: such a bundle would not load
                raise InvalidValue(name.replace("_", "-"), f"must be at most {MAX_SEQ_LEN}, got {value}")
        if cfg.quant == "8da4w" and cfg.group_size % MIN_GROUP:
            raise CosmoesError(f"group size {cfg.group_size} is not supported by XNNPACK's 4-bit kernels: "
                               f"use a multiple of {MIN_GROUP}")
        return cfg, recipe


EXPERT_LAYOUTS = ("int4", "xnnpack")


def _expert_layout(quant: str, asked: str | None) -> str:
    if asked is None:
        return "int4" if quant == "8da4w" else "xnnpack"
    if asked not in EXPERT_LAYOUTS:
        raise InvalidValue("experts", f"must be one of {', '.join(EXPERT_LAYOUTS)}, got {asked!r}")
    if asked == "int4" and quant != "8da4w":
        raise InvalidValue("experts", f"int4 segments hold 8da4w experts; quant {quant} needs --experts xnnpack")
    return asked


def _default_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def export_bundle(source: str | Path, out: str | Path, cfg: ExportConfig | None = None,
                  progress: Callable[[str], None] | None = _default_progress) -> Manifest:
    """Export a checkpoint directory or a preset (random init) to a bundle directory, atomically.

    The bundle appears at ``out`` only when complete; a failure leaves ``out`` as it was and no temp dir.
    """
    from cosmoes.checkpoint import atomic_dir

    cfg, recipe = (cfg or ExportConfig()).resolve()
    out = Path(out)
    _check_out_dir(out)
    from cosmoes.config import load_model_config

    context = context_length(cfg, recipe, load_model_config(source))  # refused before any weights load
    model, tokenizer = _load_source(source, cfg.seed)  # a private copy: quantisation edits it in place
    model.eval()
    model.config.max_seq_len = context
    tokenizer = _fitting_tokenizer(tokenizer, model.config.vocab_size, progress)
    t0 = time.time()
    with _terminate_as_exit(), atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp is owner-only; a bundle gets pushed to devices and shared
        manifest = _write_programs(model, tmp, cfg, recipe, progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest.tokenizer = TOKENIZER_DIR if tokenizer is not None else None
        manifest.export_seconds = round(time.time() - t0, 1)
        manifest.source = _source_record(source, cfg.seed)
        write_manifest(tmp, manifest)
    if progress:
        progress(f"wrote {out} ({manifest.stored_bytes() / 1e6:.1f} MB of programs and experts, "
                 f"{manifest.export_seconds:.0f} s)")
    return manifest


def context_length(cfg: ExportConfig, recipe: Recipe, model_cfg) -> int:
    """The bundle's context: --max-seq-len, else the recipe's default capped at what the model was trained for.

    Refused: a context longer than the model was trained for (RoPE positions it never saw), or one whose fp32 KV
    cache is larger than the target's device class holds (the runtime reserves it; it becomes resident as filled).
    """
    trained = model_cfg.max_seq_len
    if cfg.max_seq_len is None:
        n = min(recipe.max_seq_len or trained, trained)
    elif cfg.max_seq_len > trained:
        raise InvalidValue("max_seq_len", f"{cfg.max_seq_len} is longer than the {trained} positions the model "
                                          f"was trained for (config.json max_seq_len)")
    else:
        n = cfg.max_seq_len
    per_position = model_cfg.kv_values_per_position * KV_DTYPES[cfg.kv_cache]
    if recipe.max_kv_cache_mb is not None and n * per_position > recipe.max_kv_cache_mb * 1e6:
        fits = int(recipe.max_kv_cache_mb * 1e6 // per_position)
        raise InvalidValue("max_seq_len", f"{n} needs a {n * per_position / 1e6:.0f} MB KV cache; target "
                                          f"{recipe.target} holds at most {recipe.max_kv_cache_mb:g} MB "
                                          f"({fits} positions of this model)")
    return n


@contextlib.contextmanager
def _terminate_as_exit():
    """Turn SIGTERM into SystemExit while exporting, so atomic_dir removes its temp dir on `kill` too.

    (SIGKILL cannot be caught: a killed export leaves a `.NAME.tmp-*` directory beside the target, never a
    half-written bundle at the target.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_out_dir(out: Path) -> None:
    # Replacing an old bundle is fine; silently replacing some other directory is not.
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise CosmoesError(f"refusing to overwrite {out}: it exists and is not a cosmoes bundle")


def _load_source(source: str | Path, seed: int):
    """(model, tokenizer or None): a checkpoint with its tokenizer, or a random-init preset."""
    from cosmoes.checkpoint import check_checkpoint_dir, load_model, load_tokenizer_of, model_from_source

    path = Path(source)
    if path.exists():
        path = check_checkpoint_dir(path)
        return load_model(path), load_tokenizer_of(path, required=False)
    return model_from_source(str(source), seed=seed), None


def _source_record(source: str | Path, seed: int) -> dict:
    path = Path(source)
    return {"checkpoint": str(path.resolve())} if path.exists() else {"preset": str(source), "seed": seed}


def _fitting_tokenizer(tokenizer, vocab_size: int, progress):
    """The checkpoint's tokenizer, else the shipped default if every id it produces fits the model."""
    if tokenizer is not None:
        return tokenizer
    from cosmoes.tokenizer import default_tokenizer

    default = default_tokenizer()
    if len(default) <= vocab_size:
        return default
    if progress:
        progress(f"note: no tokenizer in the bundle (the default one has {len(default)} tokens, the model "
                 f"{vocab_size})")
    return None


def _write_programs(model, tmp: Path, cfg: ExportConfig, recipe: Recipe, progress) -> Manifest:
    from cosmoes.export.lower import NO_DELEGATE, lower_program
    from cosmoes.export.transforms import fuse_qkv, quantize_model, split_model

    mc = model.config
    packed = mc.is_moe and cfg.experts == "int4"
    fuse_qkv(model)
    report = quantize_model(model, cfg.quant, cfg.group_size, cfg.quant_embedding, skip_experts=packed,
                            int4_backbone=cfg.experts == "int4")
    stages = split_model(model, cfg.max_chunk, experts=not packed, kv_dtype=cfg.kv_cache)
    manifest = Manifest(target=cfg.target, quant=cfg.quant, group_size=report.group_size,
                        quant_embedding=cfg.quant_embedding, max_seq_len=mc.max_seq_len,
                        max_chunk=min(cfg.max_chunk, mc.max_seq_len), config=mc.to_dict(),
                        fp32_linears=report.fp32_linears, padded_linears=report.padded_linears,
                        threads=recipe.threads, backend=recipe.delegate.get("name", "xnnpack"),
                        expert_layout=cfg.experts if mc.is_moe else "none")
    if packed:
        _write_segments(model, tmp, manifest, report.group_size, progress)
    done, total = 0, len(stages)
    for name in PROGRAMS:
        members = [s for s in stages if s.program == name]
        if not members:
            continue
        tick = (lambda line, _name=name: progress(f"[{_name}] {line}")) if progress else None
        # with int4 experts every backbone linear is the project's operator (int4 projections and head, fp32
        # routers): XNNPACK would have only element-wise adds left, and lowering for it was a third of the export
        delegate = NO_DELEGATE if packed and name == "backbone" else recipe.delegate
        lowered = lower_program(members, share_state=(name == "backbone"), delegate=delegate, progress=tick)
        (tmp / f"{name}.pte").write_bytes(lowered.buffer)
        manifest.programs[name] = {"file": f"{name}.pte", "methods": lowered.methods,
                                   "export_seconds": round(lowered.seconds, 1)}
        manifest.memory.setdefault("planned_bytes", {})[name] = lowered.planned_bytes
        for s in members:
            nbytes = lowered.method_bytes[s.name]
            if s.kind == "expert":
                manifest.experts.setdefault(s.layer, {})[s.expert] = {"program": name, "method": s.name,
                                                                     "bytes": nbytes}
            else:
                manifest.non_expert_bytes[s.kind] = manifest.non_expert_bytes.get(s.kind, 0) + nbytes
        done += len(members)
        if progress:
            progress(f"[{name}] {len(members)} methods in {lowered.seconds:.0f} s ({done}/{total} done)")
    _record_kv_buffer(manifest, mc, cfg.kv_cache)
    return manifest


def _write_segments(model, tmp: Path, manifest: Manifest, group: int, progress) -> None:
    from cosmoes.export.segments import ALIGNMENT, SEGMENT_FILE, write_segments

    t0 = time.time()
    tick = (lambda line: progress(f"[experts] {line}")) if progress else None
    manifest.experts = write_segments(model, tmp / SEGMENT_FILE, group, tick)
    manifest.expert_file = {"file": SEGMENT_FILE, "alignment": ALIGNMENT}
    if progress:
        n = sum(len(lay) for lay in manifest.experts.values())
        progress(f"[experts] {n} int4 segments in {time.time() - t0:.0f} s")


def _record_kv_buffer(manifest: Manifest, mc, kv_dtype: str) -> None:
    # The KV caches are the backbone's mutable buffers, which share_mutable_buffers plans into an id of their own
    # (the last); checked here so a change in ExecuTorch's planner fails the export, not a phone's memory report.
    plan = manifest.memory["planned_bytes"]["backbone"]
    per_position = mc.kv_values_per_position * KV_DTYPES[kv_dtype]
    kv = per_position * mc.max_seq_len
    if not plan or plan[-1] != kv:
        raise CosmoesError(f"the backbone's memory plan {plan} has no buffer of the KV caches' {kv} bytes")
    manifest.memory.update(kv_bytes_per_position=per_position, kv_dtype=kv_dtype,
                           kv_buffer={"program": "backbone", "id": len(plan) - 1})


# -- inspection --------------------------------------------------------------------------------------------------

def resident_bytes(manifest: Manifest, policy: str) -> int:
    """Weight bytes resident under an expert cache policy once every layer's cache is full (worst case).

    all: every expert; swap: the top_k experts of the current step per layer (Eq. 8); lru:N: N per layer.
    """
    cfg = manifest.config
    per_layer = parse_policy(policy, cfg["top_k"]).experts_per_layer(cfg["top_k"], cfg["num_experts"])
    experts = sum(sum(sorted((e["bytes"] for e in lay.values()), reverse=True)[:per_layer])
                  for lay in manifest.experts.values())
    return manifest.non_expert_total() + experts


def inspect_bundle(bundle_dir: str | Path, verify: bool = False) -> dict:
    """Sizes of a bundle by segment kind and the weight bytes resident under each expert cache policy."""
    bundle_dir = Path(bundle_dir)
    m = load_manifest(bundle_dir, verify=verify)
    files = {p.relative_to(bundle_dir).as_posix(): p.stat().st_size for p in sorted(bundle_dir.rglob("*"))
             if p.is_file()}
    expert_sizes = [e["bytes"] for lay in m.experts.values() for e in lay.values()]
    segments = dict(m.non_expert_bytes)
    segments["backbone"] = m.non_expert_total()
    segments["experts"] = sum(expert_sizes)
    policies = valid_policies(m.config["top_k"], m.config["num_experts"]) if m.experts else ["all"]
    return {
        "bundle": str(bundle_dir), "model": m.config.get("name"), "format_version": m.format_version,
        "cosmoes_version": m.cosmoes_version, "created": m.created, "target": m.target, "quant": m.quant,
        "group_size": m.group_size, "quant_embedding": m.quant_embedding, "max_seq_len": m.max_seq_len,
        "max_chunk": m.max_chunk, "threads": m.threads, "tokenizer": m.tokenizer, "expert_layout": m.expert_layout,
        "programs": {name: {"file": p["file"], "bytes": p["bytes"], "methods": len(p["methods"])}
                     for name, p in m.programs.items()},
        "files": files, "total_bytes": sum(files.values()),
        "segments": segments,
        "experts": {"count": len(expert_sizes), "bytes_min": min(expert_sizes, default=0),
                    "bytes_max": max(expert_sizes, default=0)},
        "resident": {p: resident_bytes(m, p) for p in policies},
        "footprint": footprint(m),
        "fp32_linears": m.fp32_linears, "padded_linears": m.padded_linears,
    }


# How each kind of memory is held at run time: the embedding table is read in place from the mapped backbone.pte
# (only the rows of tokens seen become resident); XNNPACK packs every delegated weight into anonymous memory when
# its method loads; the planned buffers are anonymous and become resident as they are used.
_BACKING = {"embedding": "file", "attention": "anon", "head": "anon", "dense_ffn": "anon", "experts": "anon",
            "kv_cache": "anon", "activations": "anon"}


def footprint(m: Manifest) -> dict:
    """Stored bytes per kind (weights, from the lowered programs) and what the runtime reserves beside them.

    kv_cache: fp32 keys and values of every layer, per position and for the whole context (max_seq_len);
    activations: the planned buffers other than the KV caches (one max_chunk call's intermediates). Both are
    reserved address space that becomes resident only as positions fill and chunks run.
    """
    kinds = {kind: {"stored": n, "backing": _BACKING.get(kind, "anon")} for kind, n in m.non_expert_bytes.items()}
    if m.experts:  # int4 segments are used in place from the mapped file; XNNPACK packs a copy on every load
        kinds["experts"] = {"stored": m.expert_bytes(), "backing": "file" if m.packed_experts else "anon"}
    per_position = m.memory["kv_bytes_per_position"]
    kinds["kv_cache"] = {"reserved": m.kv_cache_bytes(), "per_position": per_position,
                         "per_1k_positions": per_position * 1024, "backing": "anon"}
    kinds["activations"] = {"reserved": m.activation_bytes(), "backing": "anon"}
    return kinds


def format_inspect(info: dict) -> str:
    """The human-readable form `cosmoes inspect` prints."""
    mb = lambda n: f"{n / 1e6:8.2f} MB"  # noqa: E731
    lines = [f"{info['bundle']}: {info['model']} for {info['target']}, quant {info['quant']}"
             f" (group {info['group_size']}), embedding {info['quant_embedding']}, "
             f"max_seq_len {info['max_seq_len']}, chunk {info['max_chunk']}, experts {info['expert_layout']}",
             f"  files on disk {mb(info['total_bytes'])}"]
    for name, p in info["programs"].items():
        lines.append(f"    {p['file']:<14} {mb(p['bytes'])}  {p['methods']} methods")
    lines.append("  stored weights by segment kind")
    for kind, n in info["segments"].items():
        lines.append(f"    {kind:<14} {mb(n)}")
    if info["experts"]["count"]:
        e = info["experts"]
        lines.append(f"    per expert     {mb(e['bytes_max'])}  ({e['count']} experts)")
    lines.append("  resident weights by expert cache policy")
    for policy, n in info["resident"].items():
        lines.append(f"    {policy:<14} {mb(n)}")
    fp = info["footprint"]
    kv, act = fp["kv_cache"], fp["activations"]
    lines.append("  runtime memory beside the weights (reserved; resident as used)")
    lines.append(f"    kv_cache       {mb(kv['reserved'])}  for {info['max_seq_len']} positions "
                 f"({kv['per_1k_positions'] / 1e6:.2f} MB per 1k positions, fp32)")
    lines.append(f"    activations    {mb(act['reserved'])}  for chunks of {info['max_chunk']} tokens")
    file_kinds = [k for k, v in fp.items() if v["backing"] == "file"]
    if file_kinds:
        lines.append(f"  read in place from the mapped file (resident as rows are used): {', '.join(file_kinds)}; "
                     "the rest is anonymous memory")
    return "\n".join(lines)


__all__ = ["ExportConfig", "export_bundle", "inspect_bundle", "format_inspect", "resident_bytes", "footprint",
           "context_length"]
