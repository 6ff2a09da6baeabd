"""Hugging Face interop: `CosmoeConfig` and `CosmoeForCausalLM` (save/load, generate with a KV cache, Mixtral-style
router logits) wrapping the plain `cosmoes.model.Transformer` (§2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from cosmoes.config import ModelConfig
from cosmoes.model import RMSNorm, Transformer

# the output's KV-cache field: `cache` from transformers 5.24 on, `past_key_values` before (the old name warns)
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CosmoeConfig(PreTrainedConfig):
    """transformers config of a CoSMoEs model; the fields map one-to-one onto `ModelConfig`."""

    model_type = "cosmoe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 8192
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 256
    num_experts: int = 0
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_temperature: float = 1.0
    wd_rank: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    preset_name: str = "custom"
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "CosmoeConfig":
        return cls(**cfg.to_hf_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.to_dict())


class CosmoeForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM head over `Transformer`; returns Mixtral-style outputs (router logits, aux loss)."""

    config_class = CosmoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _can_compile_fullgraph = False

    def __init__(self, config: CosmoeConfig, model: Transformer | None = None):
        super().__init__(config)
        self.model = model if model is not None else Transformer(config.to_model_config())
        if model is not None:
            # a given model holds trained weights: post_init() would otherwise re-initialise every module in place
            for module in model.modules():
                module._is_hf_initialized = True
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}
        self.post_init()

    @classmethod
    def from_transformer(cls, model: Transformer, **config_kwargs) -> "CosmoeForCausalLM":
        return cls(CosmoeConfig.from_model_config(model.config, **config_kwargs), model=model)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None,
                use_cache=None, output_router_logits=None, logits_to_keep=0, past_key_values=None,
                **kwargs) -> MoeCausalLMOutputWithPast:
        # transformers 5.24 renamed the KV cache argument `past_key_values` -> `cache` (generate passes the new
        # name); an unrecognised name would silently start an empty cache at every decode step
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        out = self.model(input_ids, positions_BT=position_ids, cache=cache if use_cache else None,
                         attention_mask_BS=attention_mask)
        logits = out.logits
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        aux_loss = None
        if want_router and out.router_logits:
            from cosmoes.losses import load_balancing_loss_layers

            aux_loss = load_balancing_loss_layers(out.router_logits, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         router_logits=out.router_logits if want_router else None,
                                         **{_CACHE_FIELD: cache if use_cache else None})


def register() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` resolve model_type "cosmoe" (done on `import cosmoes.hf`)."""
    # exist_ok: idempotent, and a reloaded module's classes replace the old ones
    AutoConfig.register(CosmoeConfig.model_type, CosmoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(CosmoeConfig, CosmoeForCausalLM, exist_ok=True)


# here rather than on `import cosmoes`, which stays free of torch and transformers: every loader of a checkpoint
# imports this module first
register()
