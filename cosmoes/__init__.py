"""cosmoes: compact sparse Mixture-of-Experts (Huber et al., 2025) — models, training, evaluation, on-device export.

Importing the package loads neither torch nor transformers; `import cosmoes.hf` registers model_type "cosmoe" with
transformers' Auto classes.
"""

__version__ = "0.1.0"


def _quiet_import_noise() -> None:
    # set before any submodule imports transformers, which imports torchao, which logs on every start
    from cosmoes.quiet import quiet_logging

    quiet_logging()


_quiet_import_noise()
