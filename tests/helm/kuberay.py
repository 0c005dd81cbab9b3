"""Offline checks of rendered resources against the custom resources' own schemas, as the
Kubernetes API server applies them (tests/helm/schemas/README.md): structural schemas, where
an unknown field is pruned without a word. Here it is an error, so a chart that sets a field
its operator does not know (or no longer knows) fails its test instead of silently losing it."""

import json
from functools import cache
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).parent / "schemas"
RAYSERVICE_SCHEMAS = {"v1.5.1": "rayservice-v1.5.1-schema.min.json", "v1.7.0": "rayservice-v1.7.0-schema.min.json"}
SERVICEMONITOR_SCHEMA = "servicemonitor-v1-schema.min.json"


@cache
def validator(file: str) -> jsonschema.Draft7Validator:
    schema = _closed(json.loads((SCHEMAS / file).read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server checks it itself
    return jsonschema.Draft7Validator(schema)


def errors(resource: dict, file: str) -> list[str]:
    """Every violation, each as "path: message"; empty when the API server keeps all of it."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(file).iter_errors(resource)]


def _closed(schema: dict) -> dict:
    """The schema with unknown fields refused wherever the API server would prune them (every
    object without ``additionalProperties``; none of these schemas preserves unknown fields),
    and ``nullable`` spelled as JSON Schema does."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _closed(s) for name, s in schema["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _closed(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_closed(s) for s in schema[key]]
    if schema.get("type") == "object" and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    if schema.pop("nullable", False):
        schema = {"anyOf": [schema, {"type": "null"}]}
    return schema
