"""The schemas of the JSON files cosmoes reads back — a model's config.json and a bundle's manifest.json — and the one
place their rules live: types, ranges and cross-field rules, as pydantic v2 models.

Every reader goes through here (`load_model_config`, `ModelConfig.validate`, `load_manifest`), so a command never
meets a value these rules refuse. A refusal is one line naming the file, the field and the value:

    runs/x/checkpoint/config.json: num_attention_heads = 0 must be at least 1
    b/manifest.json: config.top_k = 100 must be between 1 and num_experts (8)

`python -m cosmoes.schema` writes the JSON Schemas to docs/schema/ (a test checks they are current). Imported lazily
(pydantic costs ~0.1 s, which `cosmoes --help` should not pay).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import math
import re
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      model_validator)
from pydantic_core import PydanticCustomError

from cosmoes.errors import CosmoesError
from cosmoes.formats import (KV_DTYPES, EMBEDDING_QUANT_MODES, EXPERT_LAYOUTS, FORMAT_NAME, FORMAT_VERSION, HF_NAMES, MAX_SEQ_LEN, MAX_THREADS,
                             MIN_GROUP, QUANT_MODES, TARGETS)

# Bumped when a rule changes what a config.json may hold; recorded in docs/schema/config.schema.json. (The manifest
# carries its own format_version, which load_manifest compares with FORMAT_VERSION.)
CONFIG_SCHEMA_VERSION = 1
MAX_JSON_BYTES = 256 << 20  # far above any real manifest (1024 layers x 1024 experts is ~80 MB); refuses a stray file
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"

_NO_VALUE = object()  # a rule about a whole table, not one value
_TO_HF = {ours: theirs for theirs, ours in HF_NAMES.items()}
# What a key the file leaves out means. The schema is the files' definition, so it states them; the dataclasses
# (ModelConfig, Manifest) carry the same defaults, which tests/test_schema.py holds equal.
MODEL_DEFAULTS = {"n_kv_heads": None, "num_experts": 0, "top_k": 2, "norm_topk_prob": True, "router_temperature": 1.0,
                  "wd_rank": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "max_seq_len": 2048,
                  "tie_embeddings": False, "name": "custom"}
MANIFEST_DEFAULTS = {"backend": "xnnpack", "export_seconds": None, "cosmoes_version": "", "created": ""}


def _fail(field: str, value: Any, problem: str):
    """Raise a rule's refusal; ``field`` (dotted, relative to the model being checked) is appended to the location."""
    raise PydanticCustomError("cosmoes_rule", "{problem}", {"field": field, "value": value, "problem": problem})


# -- config.json -----------------------------------------------------------------------------------------------------

def _bounded(default, low: int, high: int, ours: str, doc: str):
    """An integer field in [low, high]; its transformers-style name is the alias (how a checkpoint spells it)."""
    return Field(default, ge=low, le=high, alias=_TO_HF[ours], description=doc)


def _positive(default, high: float, ours: str, doc: str):
    # finite (allow_inf_nan=False below) and > 0: norm_eps, rope_theta and tau all divide or scale; past `high`
    # no model is meaningful, and export's constant folding of such a model ran for minutes without end
    return Field(default, gt=0, le=high, alias=_TO_HF[ours], description=doc)


class ModelConfigSchema(BaseModel):
    """A model's shape in cosmoes' own names (ModelConfig): a config.json without model_type, or manifest.config.

    Beyond each field's type and range: n_heads divides dim, leaving an even head_dim (RoPE); n_kv_heads divides
    n_heads; an MoE (num_experts >= 1) has 1 <= top_k <= num_experts; wd_rank only with experts.
    """

    # strict: an int field takes an int only (not true, 2.0 or "2"); floats must be finite (1e400 parses as inf)
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", loc_by_alias=False,
                              validate_by_name=True, validate_by_alias=True, title="cosmoes model config")

    vocab_size: int = _bounded(..., 1, 1 << 24, "vocab_size", "tokens in the vocabulary")
    dim: int = _bounded(..., 1, 65536, "dim", "hidden size")
    n_layers: int = _bounded(..., 1, 1024, "n_layers", "decoder layers")
    n_heads: int = _bounded(..., 1, 65536, "n_heads", "attention heads; must divide dim")
    n_kv_heads: int | None = _bounded(MODEL_DEFAULTS["n_kv_heads"], 1, 65536, "n_kv_heads",
                                      "key/value heads (null: one per head); must divide n_heads")
    ffn_dim: int = _bounded(..., 1, 1 << 20, "ffn_dim", "hidden width of the dense FFN or of each expert")
    num_experts: int = _bounded(MODEL_DEFAULTS["num_experts"], 0, 1024, "num_experts", "experts per layer; 0 = dense")
    top_k: int = _bounded(MODEL_DEFAULTS["top_k"], 0, 1024, "top_k", "experts per token; 1..num_experts for an MoE")
    norm_topk_prob: bool = Field(MODEL_DEFAULTS["norm_topk_prob"], alias=_TO_HF["norm_topk_prob"])
    router_temperature: float = _positive(MODEL_DEFAULTS["router_temperature"], 1e4, "router_temperature",
                                          "tau of Eq. 2")
    wd_rank: int | None = _bounded(MODEL_DEFAULTS["wd_rank"], 1, 1 << 20, "wd_rank",
                                   "rank of weight-decomposed experts (null: full rank); MoE only")
    norm_eps: float = _positive(MODEL_DEFAULTS["norm_eps"], 1.0, "norm_eps", "RMSNorm epsilon")
    rope_theta: float = _positive(MODEL_DEFAULTS["rope_theta"], 1e12, "rope_theta", "RoPE base")
    max_seq_len: int = _bounded(MODEL_DEFAULTS["max_seq_len"], 1, MAX_SEQ_LEN, "max_seq_len", "longest sequence")
    tie_embeddings: bool = Field(MODEL_DEFAULTS["tie_embeddings"], alias=_TO_HF["tie_embeddings"])
    name: str = Field(MODEL_DEFAULTS["name"], max_length=256, alias=_TO_HF["name"])

    @model_validator(mode="after")
    def _shape_rules(self):
        if self.dim % self.n_heads:
            _fail("n_heads", self.n_heads, f"must divide dim ({self.dim})")
        if (self.dim // self.n_heads) % 2:  # RoPE rotates pairs of channels
            _fail("n_heads", self.n_heads, f"must leave an even head_dim (dim {self.dim} / n_heads = "
                                           f"{self.dim // self.n_heads})")
        kv_heads = self.n_kv_heads or self.n_heads
        if self.n_heads % kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads ({self.n_heads})")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"must be between 1 and num_experts ({self.num_experts})")
        if self.wd_rank is not None and not self.num_experts:
            _fail("wd_rank", self.wd_rank, "needs an MoE model (num_experts >= 1)")
        return self


class CheckpointConfigSchema(ModelConfigSchema):
    """A checkpoint's config.json: transformers' names (CosmoeConfig); keys transformers adds are ignored.

    The same rules as cosmoes' own names: num_attention_heads divides hidden_size, leaving an even head_dim;
    num_key_value_heads divides num_attention_heads; 1 <= num_experts_per_tok <= num_experts for an MoE; wd_rank
    only with experts.
    """

    model_config = ConfigDict(extra="ignore", title="cosmoes checkpoint config.json (transformers names)")

    model_type: Literal["cosmoe"]


def check_model_config(fields: dict) -> None:
    """ModelConfig.validate: the same rules as a config.json, in one line without a file name."""
    _validate(ModelConfigSchema, fields, "", by_alias=False)


def model_config_fields(data: Any, path: str | Path) -> dict:
    """A config.json's content checked against the schema, as ModelConfig keyword arguments (cosmoes' names)."""
    if not isinstance(data, dict):
        raise CosmoesError(one_line(f"{path}: must hold a JSON object, not {_show(data)}"))
    model_type = data.get("model_type")
    if isinstance(model_type, str) and model_type != "cosmoe":
        raise CosmoesError(one_line(f"{path} is a {model_type!r} checkpoint; bring it in with "
                                     f"`cosmoes convert --from`"))
    checkpoint = "model_type" in data
    schema = CheckpointConfigSchema if checkpoint else ModelConfigSchema
    checked = _validate(schema, data, path, by_alias=checkpoint)
    return checked.model_dump(include=set(ModelConfigSchema.model_fields))


# -- manifest.json ---------------------------------------------------------------------------------------------------

def _plain_file_name(name: str) -> str:
    """A name inside the bundle directory itself: no directories, no way out of it (a manifest is untrusted)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name \
            or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        raise PydanticCustomError("cosmoes_name", "must be a plain file name inside the bundle")
    return name


FileName = Annotated[str, AfterValidator(_plain_file_name)]
MAX_BYTES = 2 ** 40  # 1 TiB: no file of a bundle is larger; the native reader uses the same bound
Count = Annotated[int, Field(ge=0, le=MAX_BYTES)]


class ProgramSchema(BaseModel):
    """One ExecuTorch program of the bundle."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    file: FileName
    bytes: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    methods: list[str]
    export_seconds: float | None = Field(None, ge=0)


class ExpertSchema(BaseModel):
    """Where one expert lives and its stored weight bytes: a segment of expert_file (offset, sha256; layout int4)
    or a method of a program (layout xnnpack)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    program: str | None = None
    method: str | None = None
    offset: int | None = Field(None, ge=0, le=MAX_BYTES)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1, le=MAX_BYTES)  # every expert holds weights


class ExpertFileSchema(BaseModel):
    """The file of the experts' int4 segments (layout int4)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    file: FileName
    bytes: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    alignment: int = Field(ge=64, le=1 << 20)  # every segment's offset is a multiple of it


MAX_PLANNED_BUFFERS = 64  # memory-planned buffer ids per program; the native reader uses the same bound


class KvBufferSchema(BaseModel):
    """Which planned buffer holds the KV caches."""

    model_config = ConfigDict(strict=True, extra="forbid")

    program: str
    id: int = Field(ge=0, le=MAX_PLANNED_BUFFERS - 1)  # index into memory.planned_bytes[program]


class MemorySchema(BaseModel):
    """What a runtime reserves besides weights: the KV caches and every program's memory plan (bytes per id)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    kv_bytes_per_position: int = Field(ge=1, le=MAX_BYTES)
    kv_dtype: Literal["fp32", "fp16"] = "fp32"
    kv_buffer: KvBufferSchema
    planned_bytes: dict[str, Annotated[list[Count], Field(max_length=MAX_PLANNED_BUFFERS)]]


class SourceSchema(BaseModel):
    """Where the bundle's weights came from: {"checkpoint": path} or {"preset": name, "seed": n}."""

    model_config = ConfigDict(strict=True, extra="forbid")

    checkpoint: str | None = None
    preset: str | None = None
    seed: int | None = None




def _bundle_dir(info: ValidationInfo) -> str:
    path = (info.context or {}).get("path")
    return str(Path(path).parent) if path else "BUNDLE_DIR"


def reexport_command(data: dict, out: str = "BUNDLE_DIR") -> str:
    """The command that writes a bundle like this (older) manifest's, from what it says of its source and target."""
    source, target = data.get("source"), data.get("target")
    source = source if isinstance(source, dict) else {}
    what = next((v for k in ("checkpoint", "preset") if isinstance(v := source.get(k), str) and v), "CHECKPOINT")
    seed = source.get("seed")
    cmd = f"cosmoes export {shlex.quote(what)}"
    if isinstance(seed, int) and not isinstance(seed, bool) and seed and "preset" in source:
        cmd += f" --seed {seed}"
    if isinstance(target, str) and target in TARGETS:
        cmd += f" --target {target}"
    return f"`{cmd} --out {shlex.quote(out)}`"


class ManifestSchema(BaseModel):
    """A bundle's manifest.json (cosmoes.export.manifest.Manifest).

    Beyond each field's type and range: format_version is this cosmoes' (newer: upgrade; older: re-export);
    max_seq_len equals config.max_seq_len and max_chunk is at most it; 8da4w has a group_size; the programs' methods
    include embed, context, head and layer_i (and layer_i_ffn for a dense model) for every layer; an MoE's experts
    table has exactly n_layers layers of num_experts experts, each naming a program of the bundle and a method that
    program lists; a dense model's table is empty. File names are plain names in the bundle folder, and load_manifest
    refuses a symlink that leads out of it.
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", title="cosmoes bundle manifest.json")

    format: Literal["cosmoes-executorch-bundle"]
    format_version: int = Field(json_schema_extra={"const": FORMAT_VERSION})
    target: Literal[TARGETS]
    quant: Literal[QUANT_MODES]
    group_size: int | None = Field(ge=MIN_GROUP, le=1 << 20, multiple_of=MIN_GROUP)  # as the native reader bounds it
    quant_embedding: Literal[EMBEDDING_QUANT_MODES]
    max_seq_len: int = Field(ge=1, le=MAX_SEQ_LEN)
    max_chunk: int = Field(ge=1, le=MAX_SEQ_LEN)
    config: ModelConfigSchema
    programs: dict[str, ProgramSchema] = Field(min_length=1)
    experts: dict[str, dict[str, ExpertSchema]]
    expert_layout: Literal[EXPERT_LAYOUTS]
    expert_file: ExpertFileSchema | None = None
    non_expert_bytes: dict[str, Count]
    memory: MemorySchema
    threads: int = Field(ge=0, le=MAX_THREADS)  # 0 = one per core
    tokenizer: FileName | None
    fp32_linears: list[str] = Field(default_factory=list)
    padded_linears: dict[str, list[Annotated[int, Field(ge=1)]]] = Field(default_factory=dict)
    backend: str = MANIFEST_DEFAULTS["backend"]
    export_seconds: float | None = Field(MANIFEST_DEFAULTS["export_seconds"], ge=0)
    source: SourceSchema = Field(default_factory=lambda: SourceSchema())
    cosmoes_version: str = MANIFEST_DEFAULTS["cosmoes_version"]
    created: str = MANIFEST_DEFAULTS["created"]

    @model_validator(mode="before")
    @classmethod
    def _format_first(cls, data: Any, info: ValidationInfo) -> Any:
        # What a file is decides which other rules apply: an older or newer manifest is named as such, not as a
        # list of fields that changed between formats.
        if not isinstance(data, dict):
            raise PydanticCustomError("cosmoes_root", "must hold a JSON object")
        if "format" not in data:
            _fail("format", _NO_VALUE, "is missing: not a cosmoes bundle manifest")
        if data["format"] != FORMAT_NAME:
            _fail("format", data["format"], f"is not {json.dumps(FORMAT_NAME)}: not a cosmoes bundle manifest")
        version = data.get("format_version", _NO_VALUE)
        if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
            newer = version > FORMAT_VERSION
            _fail("format_version", version, f"is {'newer' if newer else 'older'} than this cosmoes supports "
                                             f"({FORMAT_VERSION}); " + ("upgrade cosmoes" if newer else
                                                                        "re-export it: " + reexport_command(data, _bundle_dir(info))))
        return data

    @model_validator(mode="after")
    def _bundle_rules(self):
        cfg = self.config
        if self.max_seq_len != cfg.max_seq_len:
            _fail("max_seq_len", self.max_seq_len, f"must equal config.max_seq_len ({cfg.max_seq_len})")
        if self.max_chunk > self.max_seq_len:
            _fail("max_chunk", self.max_chunk, f"must be between 1 and max_seq_len ({self.max_seq_len})")
        if self.quant == "8da4w" and self.group_size is None:
            _fail("group_size", None, "must be set for quant 8da4w")
        self._experts_match_the_config()
        self._methods_cover_the_model()
        self._memory_matches_the_programs()
        return self

    def _memory_matches_the_programs(self) -> None:
        mem, cfg = self.memory, self.config
        per_position = (cfg.n_layers * 2 * (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
                        * KV_DTYPES[mem.kv_dtype])
        if mem.kv_bytes_per_position != per_position:
            _fail("memory.kv_bytes_per_position", mem.kv_bytes_per_position,
                  f"must be {per_position} ({mem.kv_dtype} keys and values of config.n_layers layers)")
        extra = next((name for name in mem.planned_bytes if name not in self.programs), None)
        if extra is not None:
            _fail("memory.planned_bytes", _NO_VALUE, f"names {json.dumps(extra)}, not a program of this bundle")
        plan = mem.planned_bytes.get(mem.kv_buffer.program)
        if plan is None or mem.kv_buffer.id >= len(plan):
            _fail("memory.kv_buffer", _NO_VALUE, "is not a buffer of memory.planned_bytes")
        if plan[mem.kv_buffer.id] != per_position * self.max_seq_len:
            _fail(f"memory.planned_bytes.{mem.kv_buffer.program}", _NO_VALUE,
                  f"buffer {mem.kv_buffer.id} has {plan[mem.kv_buffer.id]} bytes, not the "
                  f"{per_position * self.max_seq_len} of the KV caches for max_seq_len {self.max_seq_len}")

    def _methods_cover_the_model(self) -> None:
        have = {m for p in self.programs.values() for m in p.methods}
        needed = ["embed", "context", "head"]
        for i in range(self.config.n_layers):  # a dense layer's FFN is its own method; an MoE's are the experts
            needed += [f"layer_{i}"] + ([] if self.config.num_experts else [f"layer_{i}_ffn"])
        missing = [m for m in needed if m not in have]
        if missing:
            ffn = "" if self.config.num_experts else ", layer_i_ffn"
            _fail("programs", _NO_VALUE, f"have no method {json.dumps(missing[0])} (the config needs embed, context, "
                                         f"head, layer_i{ffn} for i < n_layers {self.config.n_layers})")

    def _experts_match_the_config(self) -> None:
        cfg = self.config
        if not cfg.num_experts:
            if self.experts:
                _fail("experts", _NO_VALUE, "must be empty for a dense model (config.num_experts = 0)")
            if self.expert_layout != "none" or self.expert_file is not None:
                _fail("expert_layout", self.expert_layout, 'must be "none" with no expert_file for a dense model')
            return
        if self.expert_layout == "none":
            _fail("expert_layout", "none", "must be int4 or xnnpack for an MoE model (config.num_experts > 0)")
        if (self.expert_layout == "int4") != (self.expert_file is not None):
            _fail("expert_file", _NO_VALUE, f"must be {'given' if self.expert_layout == 'int4' else 'null'} for "
                                            f"expert_layout {self.expert_layout}")
        if self.expert_layout == "int4" and self.quant != "8da4w":
            _fail("expert_layout", "int4", f"holds 8da4w experts, but quant is {self.quant}")
        layers = [str(i) for i in range(cfg.n_layers)]
        experts = [str(e) for e in range(cfg.num_experts)]
        _same_keys("experts", self.experts, layers, f"config.n_layers = {cfg.n_layers}")
        for layer in layers:
            table = self.experts[layer]
            _same_keys(f"experts.{layer}", table, experts, f"config.num_experts = {cfg.num_experts}")
            for e in experts:
                if self.expert_file is not None:
                    self._segment_fits(f"experts.{layer}.{e}", table[e])
                else:
                    self._expert_entry_exists(f"experts.{layer}.{e}", table[e])
        if self.expert_file is not None:
            self._segments_apart()

    def _segment_fits(self, where: str, entry: ExpertSchema) -> None:
        from cosmoes.export.segments import expert_matrices

        spec, cfg = self.expert_file, self.config
        for name in ("offset", "sha256"):
            if getattr(entry, name) is None:
                _fail(f"{where}.{name}", _NO_VALUE, "is missing (expert_layout int4)")
        if entry.program is not None or entry.method is not None:
            _fail(f"{where}.method", entry.method, "must not be given for expert_layout int4")
        size = expert_matrices(cfg.dim, cfg.ffn_dim, cfg.wd_rank, self.group_size)[1]
        if entry.bytes != size:
            _fail(f"{where}.bytes", entry.bytes, f"must be {size} (an int4 expert of this config, group "
                                                 f"{self.group_size})")
        if entry.offset % spec.alignment:
            _fail(f"{where}.offset", entry.offset, f"must be a multiple of expert_file.alignment {spec.alignment}")
        if entry.offset + entry.bytes > spec.bytes:
            _fail(f"{where}.offset", entry.offset, f"puts the segment past the end of {spec.file} "
                                                   f"({spec.bytes} bytes)")

    def _segments_apart(self) -> None:
        spans = sorted((e.offset, e.bytes, f"experts.{layer}.{i}")
                       for layer, table in self.experts.items() for i, e in table.items())
        for (a, n, _), (b, _, where) in zip(spans, spans[1:]):
            if b < a + n:
                _fail(f"{where}.offset", b, "overlaps another expert's segment")

    def _expert_entry_exists(self, where: str, entry: ExpertSchema) -> None:
        if entry.offset is not None or entry.sha256 is not None:
            _fail(f"{where}.offset", entry.offset, "must not be given for expert_layout xnnpack")
        program = self.programs.get(entry.program)
        if program is None:
            _fail(f"{where}.program", entry.program, f"is not a program of this bundle ({', '.join(self.programs)})")
        if entry.method not in program.methods:
            _fail(f"{where}.method", entry.method, f"is not a method of program {json.dumps(entry.program)}")


def _same_keys(where: str, table: dict, wanted: list[str], because: str) -> None:
    """A layer or expert table has exactly the keys 0..n-1 (JSON object keys are strings)."""
    for key in wanted:
        if key not in table:
            _fail(f"{where}.{key}", _NO_VALUE, f"is missing ({because})")
    extra = next((k for k in table if k not in wanted), None)
    if extra is not None:
        _fail(where, _NO_VALUE, f"has an entry {json.dumps(extra)} beyond {because}")


def check_manifest(data: Any, path: str | Path) -> dict:
    """A manifest.json's content against the schema; CosmoesError names the file, the field and the value.

    Returns its model config with every default filled in (ModelConfig keyword arguments)."""
    return _validate(ManifestSchema, data, path, by_alias=False).config.model_dump()


# -- reading JSON and reporting in one line ------------------------------------------------------------------------

def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable, oversized, non-UTF-8, malformed or too deeply nested is one line."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block and /dev/zero never end
        raise CosmoesError(one_line(f"{path}: not a regular file"))
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CosmoesError(one_line(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})")) from None
    if len(raw) > MAX_JSON_BYTES:
        raise CosmoesError(one_line(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, too large for a cosmoes "
                                     "JSON file"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CosmoesError(one_line(f"{path}: not valid UTF-8 (byte {exc.start})")) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        # "\ud800" is valid JSON but no text: a lone surrogate cannot be printed or passed on as UTF-8
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return data
    except RecursionError:  # the C scanner recurses per nesting level
        raise CosmoesError(one_line(f"{path}: not valid JSON (nested too deeply)")) from None
    except UnicodeEncodeError:
        raise CosmoesError(one_line(f"{path}: not valid JSON text (a \\u escape of a lone surrogate)")) from None
    except ValueError as exc:  # JSONDecodeError, a duplicate key, an integer of more than 4300 digits
        raise CosmoesError(one_line(f"{path}: not valid JSON ({exc})")) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads would keep the last of two "dim" keys silently; a hand-edited file may mean the first
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {json.dumps(key)}")
        out[key] = value
    return out


def _validate(schema: type[BaseModel], data: Any, path: str | Path, by_alias: bool) -> BaseModel:
    try:
        return schema.model_validate(data, by_alias=by_alias, by_name=not by_alias, context={"path": str(path)})
    except ValidationError as exc:
        names = _TO_HF if by_alias else {}
        prefix = f"{path}: " if str(path) else ""
        raise CosmoesError(one_line(prefix + _first_error(exc, names))) from None
    except RecursionError:  # a value nested thousands deep where a list or object is expected
        raise CosmoesError(one_line(f"{path}: nested too deeply")) from None


_PROBLEMS = {
    "int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "model_attributes_type": "must be an object",
    "finite_number": "must be a finite number", "extra_forbidden": "is not a known field",
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
    "greater_than": "must be greater than {gt}", "less_than": "must be less than {lt}",
    "multiple_of": "must be a multiple of {multiple_of}", "literal_error": "must be {expected}",
    "string_pattern_mismatch": "must match {pattern}", "string_too_long": "must be at most {max_length} characters",
    "too_short": "must have at least {min_length} entries", "none_required": "must be null",
}


def _first_error(exc: ValidationError, names: dict[str, str]) -> str:
    """pydantic's first error as `field = value problem`, in the file's own field names."""
    err = exc.errors(include_url=False)[0]
    loc, ctx, kind = [str(part) for part in err["loc"]], err.get("ctx") or {}, err["type"]
    value = err.get("input", _NO_VALUE)
    if kind == "cosmoes_rule":
        loc += ctx["field"].split(".")
        value, problem = ctx["value"], ctx["problem"]
    elif kind == "missing":
        value, problem = _NO_VALUE, "is missing"
    elif kind in _PROBLEMS:
        problem = _PROBLEMS[kind].format(**_plain(ctx))
    else:  # pydantic's own words (never formatted: they may hold braces)
        problem = err["msg"][:1].lower() + err["msg"][1:]
    if not loc:  # only the top level's type can fail there
        return f"must hold a JSON object, not {_show(value)}"
    where = ".".join(names.get(part, part) for part in loc)
    problem = _rename(problem, names)
    return f"{where} {problem}" if value is _NO_VALUE else f"{where} = {_show(value)} {problem}"


def _plain(ctx: dict) -> dict:
    """Bounds as a person writes them (0, not 0.0) and choices quoted as JSON quotes them."""
    out = {}
    for key, value in ctx.items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value.replace("'", '"') if key == "expected" else value
    return out


def _rename(text: str, names: dict[str, str]) -> str:
    """Other fields a message names, in the file's spelling (a checkpoint says hidden_size, not dim)."""
    if not names:
        return text
    return re.sub(r"\b[a-z_]+\b", lambda m: names.get(m[0], m[0]), text)


def _show(value: Any) -> str:
    """A value as the file spells it, short enough for one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {_digits(value)}-digit integer"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = "[...]" if isinstance(value, list) else "{...}" if isinstance(value, dict) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _digits(value: int) -> int:
    try:
        return len(str(abs(value)))
    except ValueError:  # past Python's int-to-str limit (4300 digits): an estimate is enough
        return int(value.bit_length() * math.log10(2)) + 1


def one_line(text: str) -> str:
    """Control characters and line breaks escaped, so the message stays one line and prints on any terminal."""
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape): show the byte
        return f"\\x{ord(ch) - 0xDC00:02x}"
    if unicodedata.category(ch)[0] == "C":  # control, format, lone surrogate, unassigned
        return ch.encode("unicode_escape").decode("ascii")
    return ch


# -- the published JSON Schemas ------------------------------------------------------------------------------------

def json_schemas() -> dict[str, dict]:
    """file name -> JSON Schema, as written to docs/schema/."""
    config = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cosmoes config.json",
              "description": f"A model configuration (schema version {CONFIG_SCHEMA_VERSION}): a checkpoint's "
                             "config.json in transformers' names, or a config.json in cosmoes' own names.",
              "anyOf": [CheckpointConfigSchema.model_json_schema(by_alias=True),
                        ModelConfigSchema.model_json_schema(by_alias=False)]}
    manifest = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                **ManifestSchema.model_json_schema(by_alias=False),
                "description": f"An exported bundle's manifest.json, format_version {FORMAT_VERSION}."}
    return {"config.schema.json": config, "manifest.schema.json": manifest}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def write_json_schemas(out: Path = SCHEMA_DIR) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        (out / name).write_text(render(schema))
        written.append(out / name)
    return written


if __name__ == "__main__":
    for written in write_json_schemas():
        print(f"wrote {written}")


__all__ = ["ModelConfigSchema", "CheckpointConfigSchema", "ManifestSchema", "ProgramSchema", "ExpertSchema",
           "CONFIG_SCHEMA_VERSION", "check_model_config", "model_config_fields", "check_manifest", "read_json", "one_line",
           "json_schemas", "write_json_schemas"]
