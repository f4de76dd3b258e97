"""JSON into msgspec Structs, with msgspec's errors turned into OpenAI-shaped errors naming the field.

Pure: no HTTP here, so services (the feedback service converts a body for its kind) and handlers share it.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from alignd.errors import AlignError, InvalidRequest

T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
_UNKNOWN = re.compile(r"unknown field `(?P<field>[^`]+)`")


def decode(body: bytes, type_: type[T], *, invalid: type[AlignError] = InvalidRequest) -> T:
    """Decode JSON into ``type_``. Malformed JSON is a 400; a schema violation is an ``invalid`` (default 400)
    naming the field."""
    if not body.strip():
        raise InvalidRequest("Request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise _invalid(e, invalid) from e
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"Request body is not valid JSON: {e}.") from e


def convert(obj: Any, type_: type[T], *, invalid: type[AlignError] = InvalidRequest, strict: bool = True) -> T:
    """Convert already-decoded data (a JSON object, query parameters) into ``type_``; violations name the field."""
    try:
        return msgspec.convert(obj, type_, strict=strict)
    except msgspec.ValidationError as e:
        raise _invalid(e, invalid) from e


def convert_query(values: dict[str, str], type_: type[T], *, invalid: type[AlignError] = InvalidRequest) -> T:
    """Query parameters (strings) into the Struct ``type_``, numbers and dates parsed from their text. A parameter
    that is given must have a value: msgspec's lax mode reads ``null`` as None for a non-string field, which would
    make ``?policy=null`` mean no filter at all."""
    converted = convert(values, type_, invalid=invalid, strict=False)
    for name in values:
        if getattr(converted, name, "") is None:
            raise invalid(f"Invalid request: '{name}' has no value ({values[name]!r}).", param=name)
    return converted


def _invalid(e: msgspec.ValidationError, invalid: type[AlignError]) -> AlignError:
    message = str(e)
    match = _AT.search(message)
    param = match.group("path") if match else None
    if missing := _MISSING.search(message):  # the missing field, not the object that lacks it
        param = f"{param}.{missing.group('field')}" if param else missing.group("field")
    elif unknown := _UNKNOWN.search(message):
        param = f"{param}.{unknown.group('field')}" if param else unknown.group("field")
    text = _AT.sub("", message)
    if param:
        text = f"{text} at '{param}'"
    return invalid(f"Invalid request: {text}.", param=param or None)
