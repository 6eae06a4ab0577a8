"""An OpenAPI 3.1 document from a route table of dalle_plugin.http_router: each route's parameters from its
path and query models, its body and answers from pydantic's JSON schemas of their models. Only
``make openapi`` loads this module (and the answers' models): serving never pays for the document."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema

from dalle_plugin.http_router import JSON_TYPE, Route, model_of

REF = "#/components/schemas/{model}"


class _InOrder(GenerateJsonSchema):
    """Pydantic's JSON schema with each schema's keys as generated (type first), not sorted."""

    def sort(self, value: JsonSchemaValue, parent_key: str | None = None) -> JsonSchemaValue:
        return value


def document(
    routes: Iterable[Route],
    *,
    answers: ModuleType,
    info: Mapping[str, Any],
    servers: list[Mapping[str, Any]],
    security_schemes: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The document of ``routes``; an answer's model is looked up by name in ``answers``. Every route
    requires every security scheme."""
    routes = list(routes)
    bodies = {model for route in routes if (model := model_of(route.body_model))}
    answered = {
        getattr(answers, doc.model) for route in routes for doc in route.responses.values() if doc.model
    }
    refs, definitions = models_json_schema(
        [(model, "validation") for model in sorted(bodies, key=_name)]
        + [(model, "serialization") for model in sorted(answered, key=_name)],
        ref_template=REF,
        schema_generator=_InOrder,
    )
    schemas = {model: refs[(model, mode)] for (model, mode) in refs}  # each a {"$ref": ...}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas, answers)
    return {
        "openapi": "3.1.0",
        "info": dict(info),
        "servers": list(servers),
        "paths": paths,
        "components": {
            "schemas": {
                name: _without_null_defaults(schema)
                for name, schema in sorted(definitions.get("$defs", {}).items())
            },
            "securitySchemes": dict(security_schemes),
        },
        "security": [{name: []} for name in security_schemes],
    }


def _name(model: type[BaseModel]) -> str:
    return model.__name__


def _operation(route: Route, schemas: Mapping[Any, Any], answers: ModuleType) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary}
    if route.description:
        operation["description"] = route.description
    operation["operationId"] = route.operation_id
    parameters = _parameters(model_of(route.path_model), "path") + _parameters(
        model_of(route.query_model), "query"
    )
    if parameters:
        operation["parameters"] = parameters
    if route.body_model:
        schema = dict(schemas[model_of(route.body_model)])
        if not route.body_required:  # an absent body is JSON null to the route
            schema = {"anyOf": [schema, {"type": "null"}]}
        body: dict[str, Any] = {"content": {JSON_TYPE: {"schema": schema}}}
        if route.body_description:
            body = {"description": route.body_description, **body}
            schema["description"] = route.body_description
        if route.body_required:
            body["required"] = True
        operation["requestBody"] = body
    operation["responses"] = {
        str(status): {
            "description": doc.description,
            "content": {JSON_TYPE: {"schema": dict(doc.schema or schemas[getattr(answers, str(doc.model))])}},
        }
        for status, doc in route.responses.items()
    }
    return operation


def _parameters(model: type[BaseModel] | None, where: str) -> list[dict[str, Any]]:
    """One parameter per field of ``model``, its schema pydantic's."""
    if model is None:
        return []
    schema = model.model_json_schema(schema_generator=_InOrder)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in _without_null_defaults(schema)["properties"].items():
        parameter = {"description": field.get("description"), "required": name in required, "schema": field}
        parameters.append({key: value for key, value in parameter.items() if value is not None})
        parameters[-1] |= {"name": name, "in": where}
    return parameters


def _without_null_defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A model's schema without ``default: null`` on its properties: an optional field is simply not
    required (the document has always said it so)."""
    properties = {
        name: {key: value for key, value in field.items() if not (key == "default" and value is None)}
        for name, field in schema.get("properties", {}).items()
    }
    return {**schema, "properties": properties} if "properties" in schema else dict(schema)
