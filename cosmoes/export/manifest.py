"""The bundle manifest (manifest.json): what an exported bundle holds and the checks run before loading it (§3.4.2).

A bundle is a directory with ExecuTorch programs (backbone.pte, and experts.pte for `--experts xnnpack`), the
int4 expert file (experts.bin, one segment per expert) for the default 8da4w layout, the tokenizer and this manifest.
`load_manifest` validates everything it can without running a model — missing files, truncated or altered
files (size, sha256), a newer bundle format, a quantisation the target does not allow, a program that is not a
valid .pte or lacks a listed method — and reports each as a one-line `CosmoesError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.errors import CosmoesError
from cosmoes.formats import FORMAT_NAME, FORMAT_VERSION


@dataclass
class Manifest:
    """Everything a runtime needs to know about a bundle before opening its programs."""

    target: str
    quant: str
    group_size: int | None
    quant_embedding: str
    max_seq_len: int
    max_chunk: int
    config: dict  # ModelConfig.to_dict()
    # name -> {"file": "experts.pte", "bytes": int, "sha256": hex, "methods": [...]}
    programs: dict[str, dict] = field(default_factory=dict)
    # layer -> expert: with expert_layout "int4" {"offset": byte offset in expert_file, "bytes": segment bytes,
    # "sha256": of the segment}; with "xnnpack" {"program": "experts", "method": "layer_0_expert_1", "bytes": ...}
    experts: dict[int, dict[int, dict]] = field(default_factory=dict)
    # how the experts are stored (format 4): int4 (segments of expert_file, cosmoes.export.segments), xnnpack (one
    # method each in programs.experts) or none (a dense model)
    expert_layout: str = "none"
    # {"file": "experts.bin", "bytes": int, "sha256": hex, "alignment": segment start multiple} for layout int4
    expert_file: dict | None = None
    # stored weight bytes outside the experts, per kind: embedding, attention (+ norms, router, RoPE), head, dense_ffn
    non_expert_bytes: dict[str, int] = field(default_factory=dict)
    fp32_linears: list[str] = field(default_factory=list)  # linears kept in fp32 (the routers)
    padded_linears: dict[str, list[int]] = field(default_factory=dict)  # fqn -> [in_features, padded to group]
    # what a runtime reserves besides weights (format 3): {"kv_bytes_per_position": fp32 K+V of all layers,
    # "kv_buffer": {"program": "backbone", "id": planned buffer id of the KV caches},
    # "planned_bytes": program -> bytes per planned buffer id}
    memory: dict = field(default_factory=dict)
    threads: int = 1
    tokenizer: str | None = "tokenizer"  # directory inside the bundle, None if the bundle has none
    backend: str = "xnnpack"
    export_seconds: float | None = None
    # where the weights came from, so a benchmark can rebuild them for eager comparison:
    # {"checkpoint": "/abs/path"} or {"preset": "wearable-moe", "seed": 0}
    source: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    cosmoes_version: str = ""
    created: str = ""

    # -- convenience accessors (the runtime and `inspect` use these) -------------------------------------------
    def model_config(self):
        from cosmoes.config import ModelConfig

        return ModelConfig.from_dict(self.config)

    def expert(self, layer: int, expert: int) -> dict:
        try:
            return self.experts[layer][expert]
        except KeyError:
            raise CosmoesError(f"bundle has no expert {expert} in layer {layer}") from None

    def expert_method(self, layer: int, expert: int) -> str:
        return self.expert(layer, expert)["method"]

    @property
    def packed_experts(self) -> bool:
        """The experts are int4 segments of expert_file (no ExecuTorch program holds them)."""
        return self.expert_layout == "int4"

    def tokenizer_dir(self, bundle_dir: str | Path) -> Path:
        """The tokenizer directory shipped inside the bundle; CosmoesError if it has none (text needs it)."""
        if not self.tokenizer or not (Path(bundle_dir) / self.tokenizer).is_dir():
            raise CosmoesError(f"bundle {bundle_dir} has no tokenizer; re-export it from a checkpoint with one")
        return Path(bundle_dir) / self.tokenizer

    def stored_files(self) -> list[dict]:
        """Every file the manifest sizes and hashes ({"file", "bytes", "sha256", ...}): the programs, then the
        experts' segment file when there is one."""
        return [*self.programs.values(), *([self.expert_file] if self.expert_file else [])]

    def stored_bytes(self) -> int:
        return sum(f["bytes"] for f in self.stored_files())

    def program_path(self, bundle_dir: str | Path, name: str) -> Path:
        return Path(bundle_dir) / self.programs[name]["file"]

    def expert_bytes(self) -> int:
        return sum(e["bytes"] for layer in self.experts.values() for e in layer.values())

    def non_expert_total(self) -> int:
        return sum(self.non_expert_bytes.values())

    def kv_cache_bytes(self) -> int:
        """The KV caches for every position of the context (reserved; resident only as positions fill)."""
        return self.memory["kv_bytes_per_position"] * self.max_seq_len

    def activation_bytes(self) -> int:
        """Planned buffers other than the KV caches: the activations of one max_chunk call, per program."""
        return sum(sum(sizes) for sizes in self.memory["planned_bytes"].values()) - self.kv_cache_bytes()

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # JSON object keys are strings; keep layers/experts in numeric order for people reading the file
        d["experts"] = {str(i): {str(e): v for e, v in sorted(lay.items())} for i, lay in sorted(self.experts.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["experts"] = {int(i): {int(e): v for e, v in lay.items()} for i, lay in d.get("experts", {}).items()}
        return cls(**d)


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Fill in version/creation stamps and the size + sha256 of every program file, then write manifest.json."""
    from cosmoes import __version__

    bundle_dir = Path(bundle_dir)
    manifest.format_version = FORMAT_VERSION
    manifest.cosmoes_version = __version__
    manifest.created = manifest.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for prog in manifest.stored_files():
        path = bundle_dir / prog["file"]
        prog["bytes"] = path.stat().st_size
        prog["sha256"] = sha256_file(path)
    out = bundle_dir / MANIFEST_NAME
    out.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; every problem is a one-line CosmoesError.

    Always checked: the manifest obeys the schema (cosmoes.schema.ManifestSchema: format and version, types, ranges,
    the expert table against the config), no file it names leads outside the bundle, the quantisation is one the
    target allows, every program file exists with the recorded size. With ``verify`` also: each file's sha256,
    that it is a well-formed .pte, and that it has every method the manifest lists (read from the program itself).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise CosmoesError(f"bundle not found: {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise CosmoesError(f"not a cosmoes bundle (no {MANIFEST_NAME}): {bundle_dir}")
    from cosmoes.schema import check_manifest, read_json

    data = read_json(path)
    # every type, range and cross-field rule (cosmoes.schema.ManifestSchema); the config comes back with every
    # default filled in, as the runtimes read it
    config = check_manifest(data, path)
    manifest = Manifest.from_dict({**data, "config": config})
    _check_inside(bundle_dir, manifest)
    _check_quant(manifest)
    for name, prog in manifest.programs.items():
        _check_program(bundle_dir, name, prog, verify)
    if manifest.expert_file:
        _check_segment_file(bundle_dir, manifest, verify)
    ensure_runtime_kernels(manifest)
    return manifest


def _check_inside(bundle_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest names stays inside the bundle, symlinks followed, before anything is opened.

    The schema already refuses names with a directory part; a symlink inside the bundle could still point anywhere.
    """
    from cosmoes.schema import one_line

    root = bundle_dir.resolve()
    names = [(f"programs.{name}.file", prog["file"]) for name, prog in manifest.programs.items()]
    names += [("tokenizer", manifest.tokenizer)] if manifest.tokenizer else []
    names += [("expert_file.file", manifest.expert_file["file"])] if manifest.expert_file else []
    for field_name, file_name in names:
        where = f"{bundle_dir / MANIFEST_NAME}: {field_name} = {json.dumps(file_name, ensure_ascii=False)}"
        try:
            target = (bundle_dir / file_name).resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            raise CosmoesError(one_line(f"{where} is a symlink that cannot be resolved")) from None
        if root not in target.parents:
            raise CosmoesError(one_line(f"{where} links to {target}, outside the bundle"))


def ensure_runtime_kernels(manifest: Manifest) -> None:
    """Register the ExecuTorch kernels a bundle needs beyond the default set, before any method is loaded.

    Quantised embeddings run ExecuTorch's quantized_decomposed::embedding_byte/_4bit kernels, which the Python
    runtime only knows once executorch.kernels.quantized is imported (otherwise: "Missing operator").
    """
    if manifest.quant_embedding != "none":
        import executorch.kernels.quantized  # noqa: F401  (registers the kernels as a side effect)


def _check_quant(manifest: Manifest) -> None:
    from cosmoes.export.recipes import check_quant

    check_quant(manifest.target, manifest.quant, manifest.quant_embedding)


def _check_program(bundle_dir: Path, name: str, prog: dict, verify: bool) -> None:
    path = bundle_dir / prog["file"]
    _check_file(path, prog["bytes"], prog["sha256"] if verify else None)
    if not verify:
        return
    methods = set(pte_method_names(path))
    missing = [m for m in prog["methods"] if m not in methods]
    if missing:
        raise CosmoesError(f"program {path} lacks method {missing[0]!r} listed in the manifest"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    _check_runtime_opens(path)


def _check_file(path: Path, size: int, sha256: str | None) -> None:
    if not path.is_file():
        raise CosmoesError(f"bundle file missing: {path}")
    have = path.stat().st_size
    if have != size:
        raise CosmoesError(f"bundle file {path} has {have} bytes, the manifest says {size} "
                           "(truncated or replaced); re-export the bundle")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CosmoesError(f"bundle file {path} is corrupt (sha256 differs from the manifest); re-export the bundle")


def _check_segment_file(bundle_dir: Path, manifest: Manifest, verify: bool) -> None:
    """experts.bin has its recorded size (every segment lies inside it: the schema checked the offsets against
    it) and, with ``verify``, its sha256 and every segment's own."""
    spec = manifest.expert_file
    path = bundle_dir / spec["file"]
    _check_file(path, spec["bytes"], spec["sha256"] if verify else None)
    if not verify:
        return
    with open(path, "rb") as f:
        for layer, table in sorted(manifest.experts.items()):
            for e, entry in sorted(table.items()):
                f.seek(entry["offset"])
                if hashlib.sha256(f.read(entry["bytes"])).hexdigest() != entry["sha256"]:
                    raise CosmoesError(f"bundle file {path}: the segment of expert {e} in layer {layer} is corrupt "
                                       f"(sha256 differs from experts.{layer}.{e}.sha256); re-export the bundle")


# -- .pte structure ---------------------------------------------------------------------------------------------
# A .pte file is a flatbuffer (file identifier "ET" + 2 digits at bytes 4..8) followed by an extended header
# ("eh00" at byte 8: flatbuffer size, segment offset, segment size) and the data segments. We read it in Python
# first because the native loader aborts the whole process on some malformed files instead of raising.

def _pte_header(path: Path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 40 or head[4:6] != b"ET" or not head[6:8].isdigit() or head[8:12] != b"eh00":
        raise CosmoesError(f"{path} is not an ExecuTorch program (.pte); re-export the bundle")
    program_size = int.from_bytes(head[16:24], "little")
    segment_base = int.from_bytes(head[24:32], "little")
    segment_size = int.from_bytes(head[32:40], "little")
    return program_size, segment_base, segment_size


def pte_method_names(path: str | Path) -> list[str]:
    """Method names stored in a .pte, read without the native runtime; CosmoesError if malformed or truncated."""
    path = Path(path)
    program_size, segment_base, segment_size = _pte_header(path)
    size = path.stat().st_size
    if program_size > size or (segment_base and segment_base + segment_size > size):
        raise CosmoesError(f"{path} is truncated ({size} bytes, the program needs "
                           f"{max(program_size, segment_base + segment_size)}); re-export the bundle")
    with open(path, "rb") as f:
        buf = f.read(program_size)
    try:
        return _flatbuffer_method_names(buf)
    except Exception as exc:  # flatbuffers raises IndexError/struct.error/UnicodeDecodeError on garbage
        raise CosmoesError(f"{path} is a corrupt ExecuTorch program (unreadable method table: "
                           f"{type(exc).__name__}); re-export the bundle") from None


def _flatbuffer_method_names(buf: bytes) -> list[str]:
    from flatbuffers import encode, packer
    from flatbuffers.table import Table

    # schema/program.fbs: Program.execution_plan is field 1 (vtable slot 6), ExecutionPlan.name field 0 (slot 4)
    root = Table(buf, encode.Get(packer.uoffset, buf, 0))
    slot = root.Offset(6)
    if not slot:
        return []
    vec, n = root.Vector(slot), root.VectorLen(slot)
    if vec + 4 * n > len(buf):
        raise IndexError("execution plan vector runs past the program")
    names = []
    for j in range(n):
        plan = Table(buf, root.Indirect(vec + 4 * j))
        names.append(plan.String(plan.Offset(4) + plan.Pos).decode())
    return names


def _check_runtime_opens(path: Path) -> None:
    from executorch.runtime import Runtime

    try:
        # Opening maps the file lazily (no weights are read), so this is cheap even for large programs.
        Runtime.get().load_program(path)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CosmoesError(f"ExecuTorch cannot open {path}: {first}") from None


__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "write_manifest", "load_manifest", "sha256_file",
           "pte_method_names", "ensure_runtime_kernels"]
