"""Model, data and training configuration, parameter-count formulas and the named presets of Table 1 (§3.1).

No torch import here: configs are plain data that the CLI, the exporter and the docs can read cheaply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from cosmoes.artifacts import config_path
from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.formats import HF_NAMES

LLAMA3_VOCAB = 128256


@dataclass
class ModelConfig:
    """Shape of one Llama-3-style decoder whose FFNs are dense SwiGLU or sparse MoE layers (§2)."""

    vocab_size: int = LLAMA3_VOCAB
    dim: int = 512  # the paper's "Hid"
    n_layers: int = 19
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = multi-head attention; fewer = grouped-query attention
    ffn_dim: int = 1296  # hidden width of the dense FFN or of each expert
    num_experts: int = 0  # 0 = dense FFN
    top_k: int = 2
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1 (Mixtral)
    router_temperature: float = 1.0  # the tau of W = softmax(tau * R), Eq. 2
    wd_rank: int | None = None  # weight-decomposed experts (Eq. 1): each n x m matrix -> n x r . r x m
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        if _CHECK_ON_INIT:
            self.validate()
        # a config.json may spell a float as an integer (1 for tau); torch's kernels take these as doubles
        for name in ("norm_eps", "rope_theta", "router_temperature"):
            setattr(self, name, float(getattr(self, name)))

    # -- derived shapes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_bytes_per_position(self) -> int:
        """fp32 keys + values of every layer for one position: what each token of context costs at run time."""
        return self.kv_values_per_position * 4

    @property
    def kv_values_per_position(self) -> int:
        """Keys + values of every layer for one position (times the cache's element size: its bytes)."""
        return self.n_layers * 2 * self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_wd(self) -> bool:
        return self.is_moe and self.wd_rank is not None

    @property
    def kind(self) -> str:
        return "wd-moe" if self.is_wd else ("moe" if self.is_moe else "dense")

    def validate(self) -> None:
        """The rules of a config.json (types, ranges, cross-field), from the one schema in cosmoes.schema."""
        from cosmoes.schema import check_model_config

        check_model_config(self.to_dict())

    # -- parameter counts (closed form; tests check them against the built model) ----------
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert (or of the dense FFN): three matrices dim x ffn_dim."""
        if self.is_wd:
            return 3 * self.wd_rank * (self.dim + self.ffn_dim)
        return 3 * self.dim * self.ffn_dim

    def attention_params(self) -> int:
        q_and_o = 2 * self.dim * self.n_heads * self.head_dim
        k_and_v = 2 * self.dim * self.kv_heads * self.head_dim
        return q_and_o + k_and_v

    def embedding_params(self) -> int:
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)

    def layer_params(self, active: bool) -> int:
        norms = 2 * self.dim
        if not self.is_moe:
            return self.attention_params() + norms + self.expert_params()
        experts = self.top_k if active else self.num_experts
        router = self.dim * self.num_experts
        return self.attention_params() + norms + router + experts * self.expert_params()

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or those a token touches (active: top-k experts per layer)."""
        return self.embedding_params() + self.dim + self.n_layers * self.layer_params(active)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_hf_dict(self) -> dict:
        """The fields of `CosmoeConfig` (transformers' names, so generic tooling reads them)."""
        return {field: getattr(self, ours) for field, ours in HF_NAMES.items()}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{ours: d[field] for field, ours in HF_NAMES.items() if field in d})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The presets below are built unchecked: checking imports pydantic (~0.1 s), which `cosmoes --help` should not pay.
# tests/test_config.py checks every preset against the schema; every other ModelConfig is checked when built.
_CHECK_ON_INIT = False



# Table 1 of the paper. FFN widths and kv-head counts are not stated there; they are solved so that the
# active (total) counts land on the table with the Llama-3 vocabulary and untied embeddings. The two
# dense phone models come out as Llama-3.2-1B and -3B (GQA with 8 kv heads) with untied embeddings.
PAPER_TABLE1 = {
    # name: (active, total)
    "phone-dense": (1.50e9, 1.50e9),
    "phone-moe": (1.37e9, 3.75e9),
    "phone-wd": (1.42e9, 3.65e9),
    "phone-dense-pa": (3.61e9, 3.61e9),
    "wearable-dense": (189e6, 189e6),
    "wearable-moe": (188e6, 377e6),
    "wearable-wd": (188e6, 377e6),
    "wearable-dense-pa": (380e6, 380e6),
}

_MOE = dict(num_experts=8, top_k=2)
PRESETS: dict[str, ModelConfig] = {
    "phone-dense": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
    "phone-moe": ModelConfig(dim=1440, n_layers=24, n_heads=18, ffn_dim=3824, **_MOE),
    "phone-wd": ModelConfig(dim=1600, n_layers=26, n_heads=20, ffn_dim=4352, wd_rank=800, **_MOE),
    "phone-dense-pa": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192),
    "wearable-dense": ModelConfig(dim=512, n_layers=19, n_heads=8, ffn_dim=1296),
    "wearable-moe": ModelConfig(dim=432, n_layers=19, n_heads=8, ffn_dim=1280, **_MOE),
    "wearable-wd": ModelConfig(dim=400, n_layers=32, n_heads=10, ffn_dim=1248, wd_rank=200, **_MOE),
    "wearable-dense-pa": ModelConfig(dim=768, n_layers=29, n_heads=12, ffn_dim=1712),
    # CPU-sized members of the same family, for tests and the small-scale reproduction.
    "tiny-moe": ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                            max_seq_len=512, **_MOE),
    "tiny-wd": ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=448,
                           wd_rank=64, max_seq_len=512, **_MOE),
    "tiny-dense": ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                              max_seq_len=512),
}
for _name, _cfg in PRESETS.items():
    _cfg.name = _name
_CHECK_ON_INIT = True


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset called exactly ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise CosmoesError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def load_model_config(source: str | Path) -> ModelConfig:
    """A preset name, a checkpoint or run directory (its config.json) or a config.json file."""
    path = config_path(source)
    if path is None:
        return get_preset(str(source))
    if not path.exists():
        raise CosmoesError(f"no config.json at {path}: not a cosmoes checkpoint")
    from cosmoes.schema import model_config_fields, read_json

    # the raw JSON is checked first, so an error names the key as the file spells it (hidden_size, not dim)
    return ModelConfig(**model_config_fields(read_json(path), path))


def solve_ffn_dim(cfg: ModelConfig, target_params: float, active: bool, multiple_of: int = 16) -> int:
    """The FFN width that brings ``cfg``'s active (or total) parameter count closest to the target."""
    base = cfg.replace(ffn_dim=1).num_params(active)
    slope = cfg.replace(ffn_dim=2).num_params(active) - base
    width = max(1.0, 1 + (target_params - base) / slope)
    return max(multiple_of, int(round(width / multiple_of)) * multiple_of)


@dataclass
class Alignment:
    """The dense counterparts of an MoE model under the paper's fair-comparison rule (§3)."""

    moe: ModelConfig
    flop_aligned: ModelConfig = field(repr=False)
    param_aligned: ModelConfig = field(repr=False)


def align(moe: ModelConfig) -> Alignment:
    """FA dense = same depth, heads and hidden size with the MoE's active count; PA = its total count."""
    if not moe.is_moe:
        raise CosmoesError(f"{moe.name} is dense: align takes an MoE configuration")
    dense = moe.replace(num_experts=0, wd_rank=None)
    fa = dense.replace(ffn_dim=solve_ffn_dim(dense, moe.num_params(active=True), active=True),
                       name=f"{moe.name}-fa-dense")
    pa = dense.replace(ffn_dim=solve_ffn_dim(dense, moe.num_params(active=False), active=False),
                       name=f"{moe.name}-pa-dense")
    return Alignment(moe=moe, flop_aligned=fa, param_aligned=pa)


@dataclass
class DataConfig:
    """Where the pre-training text comes from and how it is cut into blocks (read by ``cosmoes.data``)."""

    sources: list[str] = field(default_factory=list)  # empty = the embedded corpus
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out for validation
    seed: int = 0
    text_field: str = "text"  # record field for .jsonl/.parquet/Hub sources
    hf_split: str = "train"
    max_docs: int | None = None  # cap on documents read in total (Hub default: data.HUB_DEFAULT_MAX_DOCS)
    doc_chars: int = 2000  # .txt paragraphs are grouped into documents of at least this many characters


@dataclass
class TrainConfig:
    """Everything a training run (``cosmoes.train``) needs besides the data; saved as OUT/train_config.json."""

    preset: str = "tiny-moe"  # preset name or config.json
    out: str = "runs/tiny-moe"
    steps: int = 200
    batch_size: int = 16  # sequences per optimiser step (global, before data-parallel split)
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    lb_coef: float = 0.01
    bles_coef: float = 0.0
    bles_temperature: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    tokenizer: str | None = None  # None = the tokenizer shipped with cosmoes
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse numbers no run can use (InvalidValue names the field; the CLI shows it as its flag)."""
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "save_every"):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_int("seq_len", self.seq_len, low=2)  # a block needs an input token and the token it predicts
        check_number("lr", self.lr, low=0.0, inclusive=False)
        check_number("bles_temperature", self.bles_temperature, low=0.0, inclusive=False)
        for name in ("lb_coef", "bles_coef", "weight_decay", "min_lr_ratio"):
            check_number(name, getattr(self, name), low=0.0)
        check_number("grad_clip", self.grad_clip, low=0.0, inclusive=False)
        check_out_dir("out", self.out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        return cls(**d)


# -- numbers and paths a user gives ------------------------------------------------------------------------------
# Library configs (TrainConfig, ExportConfig, BenchConfig, the runtime) refuse bad values with InvalidValue, so the
# library and the command line say the same thing; the CLI shows the name as the flag (`--lr must be ...`).

def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An integer (not a bool or float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(name, f"must be an integer, got {value!r}")
    if value < low:
        raise InvalidValue(name, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise InvalidValue(name, f"must be at most {high}, got {value}")


def check_number(name: str, value, low: float, inclusive: bool = True) -> None:
    """A finite number >= low (> low unless inclusive); NaN and inf typed on a command line arrive as floats."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= low if inclusive else value > low)
    if not ok:
        raise InvalidValue(name, f"must be finite and {'>=' if inclusive else '>'} {low:g}, got {value}")


def check_generation(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The numbers of a generation request, checked before any work (InvalidValue: the CLI names the flag)."""
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_number("temperature", temperature, low=0.0)
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):  # NaN fails both comparisons
        raise InvalidValue("top_p", f"must be in (0, 1], got {top_p}")


def check_threads(threads, most: int) -> None:
    """A thread count for a runtime: 0 (one per usable core) up to ``most`` (usually the usable cores)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= most:
        raise InvalidValue("threads", f"must be between 0 (one per core) and {most}, got {threads}")


def check_out_dir(name: str, path: str | Path) -> None:
    """An output directory that can be created: neither it nor its nearest existing ancestor is a regular file."""
    blocker = _file_in_the_way(Path(path))
    if blocker is not None:
        raise InvalidValue(name, f"must be a directory, but {blocker} is an existing file")


def check_out_file(name: str, path: str | Path) -> None:
    """An output file that can be written: not a directory, and no regular file where its folders would go."""
    path = Path(path)
    if path.is_dir():
        raise InvalidValue(name, f"must be a file, but {path} is a directory")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise InvalidValue(name, f"must be a file in a directory, but {blocker} is an existing file")


def _file_in_the_way(folder: Path) -> Path | None:
    # mkdir(parents=True) fails with a traceback-worthy OSError when any of these is a file; say so up front
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def human(n: float) -> str:
    """1.37B / 188M / 4.2M style counts, as the paper prints them."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(int(n))


def describe(cfg: ModelConfig) -> dict:
    """The summary `cosmoes info --json` prints."""
    return {
        "name": cfg.name,
        "kind": cfg.kind,
        "active_params": cfg.num_params(active=True),
        "total_params": cfg.num_params(active=False),
        "num_layers": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "num_kv_heads": cfg.kv_heads,
        "hidden_size": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k if cfg.is_moe else 0,
        "wd_rank": cfg.wd_rank,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "expected": _table1(cfg.name),
    }


def _table1(name: str) -> dict | None:
    if name not in PAPER_TABLE1:
        return None
    active, total = PAPER_TABLE1[name]
    return {"active_params": active, "total_params": total}


__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "PRESETS", "get_preset", "load_model_config", "align",
           "solve_ffn_dim", "describe", "human", "check_int", "check_number", "check_threads", "check_out_dir",
           "check_out_file"]
