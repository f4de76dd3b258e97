"""What the OpenAPI schema says of a route that Litestar cannot see: the handlers read their bodies and query strings
themselves (size limits, OpenAI-shaped errors naming the field), so Litestar finds no ``data`` or query parameters to
describe, and it knows nothing of the refusals our guards, checks and services make.

``documented(...)`` returns decorator keywords (``operation_class`` and ``responses``) that add the request body and
query parameters (JSON Schema from the msgspec Structs that decode them) and the error responses (OpenAI's shape),
so clients and schema-driven tools (tests/test_fuzz.py runs schemathesis against it) see the real contract.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Parameter, RequestBody

from alignd.protocol import ErrorResponse

# Why each status is answered (the descriptions of the error responses).
_WHY = {
    400: "Invalid request: malformed JSON, a value the server cannot serve, or a disallowed Host header.",
    401: "Missing or invalid API key.",
    403: "The key's role may not do this, or operator endpoints are disabled (no admin key).",
    404: "No such resource.",
    409: "The resource's state forbids this now.",
    413: "The request body is over the limit.",
    415: "The request body is not JSON.",
    422: "A field or parameter fails validation (named in 'param').",
    429: "Over the caller's rate or concurrency limit (see Retry-After).",
    503: "Not ready: the engine is loading or failed, or the server is stopping (see Retry-After).",
}
BODY_ERRORS = (400, 413, 415, 422)  # any route that reads a body
USER = (401,)  # the client API: 401 once client keys exist
ADMIN = (401, 403)


def inline_schema(type_: Any) -> dict[str, Any]:
    """``type_``'s JSON Schema with its ``$defs`` resolved in place (a schema inside an OpenAPI document cannot
    refer to definitions of its own). The Structs of the wire types are not recursive."""
    schema = msgspec.json.schema(type_)
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def query_parameters(type_: Any) -> list[Parameter]:
    """One query parameter per field of the Struct ``type_`` that a handler converts the query string into."""
    schema = inline_schema(type_)
    required = set(schema.get("required", ()))
    return [Parameter(name=name, param_in="query", required=name in required, schema=_drop_null(prop),
                      description=prop.get("description"))
            for name, prop in schema["properties"].items()]


def _drop_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: ``X | None`` is X there (null has no query-string spelling)."""
    options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
    if len(options) == 1:
        rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
        return {**rest, **options[0]}
    return {k: v for k, v in prop.items() if k != "default" or v is not None}


def sse_events(type_: Any, done: str | None = "[DONE]") -> dict[str, dict[str, Any]]:
    """A ``text/event-stream`` of ``type_`` as JSON, then the ``done`` sentinel: before OpenAPI 3.2 the schema of
    an event stream describes one event (its ``data`` a string holding the JSON)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": inline_schema(type_)}
    data = {"anyOf": [json_data, {"const": done}]} if done is not None else json_data
    return {"text/event-stream": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def json_lines(*types: Any) -> dict[str, dict[str, Any]]:
    """``application/x-ndjson``: one of ``types`` per line (the schema describes a line)."""
    schemas = [inline_schema(t) for t in types]
    return {"application/x-ndjson": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}


def documented(*, body: Any = None, body_optional: bool = False, query: Any = None,
               parameters: Iterable[Parameter] = (), errors: Iterable[int] = (),
               returns: Any = None, streams: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Keywords for a route decorator: ``body`` (a type: the JSON body, required unless ``body_optional``),
    ``query`` (a Struct: the query parameters) and ``parameters`` (more of them), the error statuses the
    route answers in OpenAI's shape (body errors are added when there is a body); ``returns``, the JSON type of the
    success response where the handler's annotation does not say (a union with a stream), and ``streams``, the
    media types it may have instead, each with the schema of one item (:func:`sse_events`, :func:`json_lines`)."""
    statuses = set(errors) | (set(BODY_ERRORS) if body is not None else set())
    extra_parameters = [*(query_parameters(query) if query is not None else ()), *parameters]
    request_body = (RequestBody(required=not body_optional,
                                content={"application/json": OpenAPIMediaType(schema=inline_schema(body))})
                    if body is not None else None)

    @dataclass
    class DocumentedOperation(Operation):
        def __post_init__(self) -> None:
            if request_body is not None:
                self.request_body = request_body
            if extra_parameters:
                self.parameters = [*(self.parameters or ()), *extra_parameters]
            # The success response is the first: Litestar lists it before the errors.
            success = next(iter((self.responses or {}).values()), None)
            if isinstance(success, OpenAPIResponse) and (returns is not None or streams):
                # What Litestar guessed from a Stream (or a union with one) is replaced, not added to.
                success.content = {
                    **({"application/json": OpenAPIMediaType(schema=inline_schema(returns))} if returns else {}),
                    **{media_type: OpenAPIMediaType(schema=item) for media_type, item in (streams or {}).items()}}

    return {
        "operation_class": DocumentedOperation,
        "responses": {status: ResponseSpec(ErrorResponse, description=_WHY[status], generate_examples=False)
                      for status in sorted(statuses)},
    }
