"""cosmoes.schema: the published JSON Schemas (docs/schema/) are the ones the code checks with."""

import pytest

from cosmoes.schema import SCHEMA_DIR, json_schemas, render


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_published_json_schemas_are_current(name):
    assert (SCHEMA_DIR / name).read_text() == render(json_schemas()[name]), \
        f"docs/schema/{name} is stale: run `python -m cosmoes.schema`"
