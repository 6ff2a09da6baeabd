"""cosmoes: compact sparse Mixture-of-Experts (Huber et al., 2025) — models, training, evaluation, on-device export."""

__version__ = "0.1.0"


def _quiet_import_noise() -> None:
    # transformers imports torchao, which logs about CUDA-only kernels and deprecated pytree registrations on every
    # start; none of it concerns a user of this CLI.
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _register_with_transformers() -> None:
    # `import cosmoes` makes AutoConfig/AutoModelForCausalLM know model_type "cosmoe", as the HF ecosystem expects.
    from cosmoes.hf import register

    register()


_quiet_import_noise()
_register_with_transformers()
