"""JSON responses, and the one shape of every error body:
``{"error": <code>, "message": <what was wrong>}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = ["bad_encoding", "error", "json_response"]


def json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status=status)


def bad_encoding() -> web.Response:
    """A body whose Content-Encoding does not decode: 400, and the connection closed, since
    the rest of that request's bytes cannot be told apart from the next request's."""
    response = error(400, "bad_encoding", "the body does not decode per its Content-Encoding")
    response.force_close()
    return response
