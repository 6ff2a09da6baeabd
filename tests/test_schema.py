"""cosmoes.schema: the published JSON Schemas (docs/schema/) are the ones the code checks with."""

import pytest

from cosmoes.schema import SCHEMA_DIR, json_schemas, render


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_published_json_schemas_are_current(name):
    assert (SCHEMA_DIR / name).read_text() == render(json_schemas()[name]), \
        f"docs/schema/{name} is stale: run `python -m cosmoes.schema`"


def test_a_key_left_out_means_what_the_dataclasses_default_to():
    import dataclasses

    from cosmoes.config import ModelConfig
    from cosmoes.export.manifest import Manifest
    from cosmoes.schema import MANIFEST_DEFAULTS, MODEL_DEFAULTS

    model = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    required = {"vocab_size", "dim", "n_layers", "n_heads", "ffn_dim"}  # the schema has no default for these
    assert MODEL_DEFAULTS == {k: v for k, v in model.items() if k not in required}
    manifest = {f.name: f.default for f in dataclasses.fields(Manifest)}
    assert MANIFEST_DEFAULTS == {k: manifest[k] for k in MANIFEST_DEFAULTS}


def test_the_schema_knows_no_dataclass():
    """The schema sits below the dataclasses it checks: it imports neither (no import circle)."""
    import ast
    import inspect

    import cosmoes.schema

    tree = ast.parse(inspect.getsource(cosmoes.schema))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"cosmoes.config", "cosmoes.export.manifest"}
