"""How the API reads JSON request bodies, and what it says when one cannot be read.

`JsonRoute` (every route of the app) hands its endpoint a `JsonRequest`, whose `json()` parses with
two differences from `json.loads`: an integer too long for Python to convert (over 4300 digits, a
ValueError that would read as "not JSON") becomes OUT_OF_RANGE with its sign, so the field's range
check names the field; and nothing else changes (NaN and Infinity still parse, and the request
schema refuses them as not finite). The `describe_*` functions write the 422 texts for bodies that
are not JSON objects: where the JSON breaks (line, column, character), a missing or wrong
`Content-Type`, an empty body.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

EXAMPLE_BODY = '{"prompt": "a red circle on a blue background"}'
# Larger than every bound of an integer field (the largest is a seed's, 2**32 - 1), yet printable.
OUT_OF_RANGE = 10**30


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > min(sys.get_int_max_str_digits() or 4300, 4300):
        return -OUT_OF_RANGE if text.startswith("-") else OUT_OF_RANGE
    return int(text)


def parse_json(body: bytes | str) -> Any:
    """json.loads, except that integers too long to convert read as +-OUT_OF_RANGE."""
    return json.loads(body, parse_int=_bounded_int)


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """An APIRoute whose endpoint reads the body through JsonRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_with_json_request(request: Request) -> Response:
            return await handler(JsonRequest(request.scope, request.receive))

        return read_with_json_request


def describe_json_error(doc: str | bytes | None, pos: int, reason: str) -> str:
    """'the body is not valid JSON: Expecting value at line 2, column 8 (character 21)'."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else (doc or "")
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return (f"the body is not valid JSON: {reason} at line {line}, column {column} (character {pos}); "
            f"send a JSON object, e.g. {EXAMPLE_BODY}")


def is_json_content_type(value: str | None) -> bool:
    media = (value or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def describe_unreadable_body(content_type: str | None, body: object, *, empty: bool = False) -> str:
    """The text for a body that is not a JSON object: no body, the wrong header, or other JSON."""
    if empty or body in (b"", ""):
        return f"the request body is empty; send a JSON object with Content-Type: application/json, e.g. {EXAMPLE_BODY}"
    if not is_json_content_type(content_type):
        sent = f"Content-Type: {content_type}" if content_type else "no Content-Type header"
        return (f"the body was sent with {sent}, so it was not read as JSON; send the header "
                f"Content-Type: application/json with a JSON object, e.g. {EXAMPLE_BODY}")
    kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(body), "not an object")
    return f"the body must be a JSON object, e.g. {EXAMPLE_BODY}; it is {kind}"
