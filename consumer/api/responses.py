"""JSON responses, and the one shape of every error body:
``{"error": <code>, "message": <what was wrong>}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = ["error", "json_response"]


def json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status=status)
