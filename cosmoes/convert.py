"""Conversion to and from transformers' own Mixtral (plain MoE) and Llama (dense) checkpoints (§2).

The CoSMoEs decoder is a Llama-3 stack whose sparse FFN is a Mixtral-style token-choice MoE, so both map exactly.
Both directions go through transformers' model classes (build in memory, copy weights, `save_pretrained` /
`from_pretrained`), so the on-disk layout is whatever the installed transformers writes and reads for its own models.
Our RoPE is the rotate-half layout transformers uses, so q/k projections map one-to-one, without permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cosmoes.checkpoint import atomic_dir, check_checkpoint_dir, load_hf_model, load_tokenizer_of, save_checkpoint
from cosmoes.config import ModelConfig, load_model_config
from cosmoes.errors import CosmoesError

KINDS = ("mixtral", "llama")


# -- cosmoes -> transformers ---------------------------------------------------------------------------------------

def to_transformers(src: Path, kind: str, out: Path) -> Path:
    """Write the cosmoes checkpoint ``src`` as a transformers ``kind`` ("mixtral" or "llama") checkpoint at ``out``."""
    kind = _check_kind(kind)
    src = check_checkpoint_dir(src)
    _check_distinct(src, out)
    cfg = load_model_config(src)  # refuses non-cosmoes checkpoints with a pointer to --from
    _check_exportable(cfg, kind)
    ours = load_hf_model(src)
    hf_config = _hf_config(cfg, kind, token_ids=_token_ids(ours.config))
    state = _to_hf_state(ours.model.state_dict(), cfg, kind)
    hf_model = _build_on_meta(kind, hf_config)
    # assign=True adopts our tensors instead of allocating a second copy of a phone-sized model
    hf_model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    tokenizer = load_tokenizer_of(src, required=False)
    with atomic_dir(out) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _check_exportable(cfg: ModelConfig, kind: str) -> None:
    if kind == "llama" and cfg.is_moe:
        raise CosmoesError(f"{cfg.name} is an MoE model ({cfg.num_experts} experts); convert it to mixtral, "
                           "not llama")
    if kind == "mixtral":
        if not cfg.is_moe:
            raise CosmoesError(f"{cfg.name} is a dense model; convert it to llama, not mixtral")
        if cfg.is_wd:
            raise CosmoesError(f"{cfg.name} has weight-decomposed (low-rank, wd_rank={cfg.wd_rank}) experts, which "
                               "have no Mixtral equivalent: Mixtral experts are full-rank")
        if not cfg.norm_topk_prob:
            raise CosmoesError(f"{cfg.name} uses un-normalised top-k routing weights (norm_topk_prob=false); "
                               "Mixtral always renormalises them, so the converted model would compute differently")
        if cfg.router_temperature <= 0:
            raise CosmoesError(f"router_temperature must be positive to convert, got {cfg.router_temperature}")


def _token_ids(config) -> dict:
    return {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _hf_config(cfg: ModelConfig, kind: str, token_ids: dict):
    from transformers import LlamaConfig, MixtralConfig

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings, **token_ids)
    if kind == "llama":
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    return MixtralConfig(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, sliding_window=None,
                         router_jitter_noise=0.0, **common)


def _build_on_meta(kind: str, hf_config):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    cls = MixtralForCausalLM if kind == "mixtral" else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(hf_config)
    # non-persistent buffers (RoPE frequencies) are not in the state dict; rebuild them off the meta device
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            inv_freq, _ = module.compute_default_rope_parameters(hf_config)
            module.inv_freq, module.original_inv_freq = inv_freq, inv_freq.clone()
    return model.eval()


def _to_hf_state(sd: dict, cfg: ModelConfig, kind: str) -> dict:
    out = {theirs: sd[ours] for ours, theirs in _one_to_one_names(cfg, kind)}
    if kind == "llama":
        return out
    for i in range(cfg.n_layers):
        ff, theirs = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
        # softmax(tau * R x) == softmax((tau * R) x): the temperature folds exactly into the router weight
        out[f"{theirs}gate.weight"] = sd[f"{ff}router.weight"] * cfg.router_temperature
        experts = range(cfg.num_experts)
        # gate_up_proj[e] is [w1; w3] stacked along the output dim (MixtralExperts chunks it into gate, up)
        out[f"{theirs}experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{ff}experts.{e}.w1.weight"], sd[f"{ff}experts.{e}.w3.weight"]], dim=0) for e in experts])
        out[f"{theirs}experts.down_proj"] = torch.stack([sd[f"{ff}experts.{e}.w2.weight"] for e in experts])
    return out


def _one_to_one_names(cfg: ModelConfig, kind: str) -> list[tuple[str, str]]:
    """(our key, transformers' key) of every weight that maps unchanged: all but the router and the experts."""
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
             ("output.weight", "lm_head.weight")]
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(f"{ours}{a}.weight", f"{theirs}{b}.weight") for a, b in _ATTN_NAMES.items()]
        if kind == "llama":
            pairs += [(f"{ours}feed_forward.{a}.weight", f"{theirs}mlp.{b}.weight") for a, b in _DENSE_FFN_NAMES.items()]
    return pairs


_ATTN_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_DENSE_FFN_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


# -- transformers -> cosmoes ---------------------------------------------------------------------------------------

def from_transformers(src: Path, kind: str, out: Path) -> Path:
    """Bring a transformers ``kind`` ("mixtral" or "llama") checkpoint ``src`` in as a cosmoes checkpoint at ``out``."""
    from cosmoes.model import Transformer

    kind = _check_kind(kind)
    src = Path(src)
    if not src.exists():
        raise CosmoesError(f"checkpoint not found: {src}")
    _check_distinct(src, out)
    hf_config = _read_hf_config(src, kind)
    cfg = _model_config(hf_config, kind, name=src.name)
    hf_model = _load_hf(src, kind, hf_config)
    model = Transformer(cfg)
    model.load_state_dict(_from_hf_state(hf_model.state_dict(), cfg, kind), strict=True)
    return save_checkpoint(model.eval(), out, tokenizer=load_tokenizer_of(src, required=False))


def _read_hf_config(src: Path, kind: str):
    from transformers import LlamaConfig, MixtralConfig

    path = src / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except FileNotFoundError:
        raise CosmoesError(f"no config.json in {src}: not a transformers checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CosmoesError(f"corrupt config {path}: {exc}") from None
    if model_type != kind:
        hint = "; it is already a cosmoes checkpoint" if model_type == "cosmoe" else ""
        raise CosmoesError(f"{src} is a {model_type!r} checkpoint, not {kind!r}{hint}")
    try:
        hf_config = (MixtralConfig if kind == "mixtral" else LlamaConfig).from_pretrained(src)
    except Exception as exc:  # transformers' strict config validation raises several types
        raise CosmoesError(f"invalid {kind} config {path}: {str(exc).splitlines()[0]}") from None
    _check_importable(hf_config, kind)
    return hf_config


def _check_importable(c, kind: str) -> None:
    """Refuse features the CoSMoEs decoder does not have, instead of silently computing something else."""
    unsupported = []
    if getattr(c, "sliding_window", None) is not None:
        unsupported.append(f"sliding_window={c.sliding_window}")
    if getattr(c, "attention_bias", False):
        unsupported.append("attention_bias")
    if getattr(c, "mlp_bias", False):
        unsupported.append("mlp_bias")
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope scaling ({rope.get('rope_type')})")
    if c.hidden_act != "silu":
        unsupported.append(f"hidden_act={c.hidden_act}")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        unsupported.append(f"head_dim={head_dim} != hidden_size/num_attention_heads")
    if unsupported:
        raise CosmoesError(f"cannot convert this {kind} checkpoint: unsupported {', '.join(unsupported)}")


def _model_config(c, kind: str, name: str) -> ModelConfig:
    fields = dict(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                  n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                  ffn_dim=c.intermediate_size, norm_eps=c.rms_norm_eps,
                  rope_theta=float(c.rope_parameters["rope_theta"]),
                  max_seq_len=c.max_position_embeddings, tie_embeddings=bool(c.tie_word_embeddings), name=name)
    if kind == "mixtral":
        fields.update(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, norm_topk_prob=True,
                      router_temperature=1.0)
    return ModelConfig(**fields)


def _load_hf(src: Path, kind: str, hf_config):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    cls = MixtralForCausalLM if kind == "mixtral" else LlamaForCausalLM
    try:
        return cls.from_pretrained(src, config=hf_config, dtype=torch.float32).eval()
    except Exception as exc:  # safetensors/transformers raise many types for missing, truncated or bad files
        raise CosmoesError(f"cannot load {kind} weights from {src}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]}") from None


def _from_hf_state(sd: dict, cfg: ModelConfig, kind: str) -> dict:
    out = {ours: sd[theirs] for ours, theirs in _one_to_one_names(cfg, kind)}
    if kind == "llama":
        return out
    for i in range(cfg.n_layers):
        ff, theirs = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
        out[f"{ff}router.weight"] = sd[f"{theirs}gate.weight"]
        gate_up_EFD, down_EDF = sd[f"{theirs}experts.gate_up_proj"], sd[f"{theirs}experts.down_proj"]
        for e in range(cfg.num_experts):
            out[f"{ff}experts.{e}.w1.weight"], out[f"{ff}experts.{e}.w3.weight"] = gate_up_EFD[e].chunk(2, dim=0)
            out[f"{ff}experts.{e}.w2.weight"] = down_EDF[e]
    return out


# -- shared --------------------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CosmoesError(f"unknown checkpoint kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return kind


def _check_distinct(src: Path, out: Path) -> None:
    # atomic_dir would replace src with the converted copy
    if Path(out).resolve() == Path(src).resolve():
        raise CosmoesError(f"OUT must differ from SRC ({src})")


__all__ = ["KINDS", "to_transformers", "from_transformers"]
