"""Baseline webhook receiver for the end-to-end benchmark.

The least a correct receiver can do: read the raw body, verify the
``Livepeer-Signature: t=<ms>,v1=<hex>`` HMAC-SHA256 over the raw body bytes in constant
time (any of several ``v1=`` values may match), append ``body + b"\\n"`` to a file with
one ``write(2)`` per request (no fsync unless ``--fsync``), answer 204; 401 on a missing
or bad signature. No parsing, no dedup, no database.

Single process, aiohttp on uvloop when it is installed, like ``phasewatch serve``: both
sides of the comparison run on the same event loop.
Access logging is off. ``GET /healthz`` answers 200 for readiness probes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import sys
from pathlib import Path

from aiohttp import web

WEBHOOK_PATH = "/webhooks/livepeer"
SIGNATURE_HEADER = "Livepeer-Signature"

SECRET_KEY: web.AppKey[bytes] = web.AppKey("secret", bytes)
FD_KEY: web.AppKey[int] = web.AppKey("fd", int)
FSYNC_KEY: web.AppKey[bool] = web.AppKey("fsync", bool)


def signature_ok(secret: bytes, header: str, body: bytes) -> bool:
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    ok = False
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "v1":
            ok |= hmac.compare_digest(value, expected)
    return ok


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    header = request.headers.get(SIGNATURE_HEADER, "")
    if not signature_ok(request.app[SECRET_KEY], header, body):
        return web.Response(status=401, text="bad signature\n")
    fd = request.app[FD_KEY]
    os.write(fd, body + b"\n")
    if request.app[FSYNC_KEY]:
        os.fsync(fd)
    return web.Response(status=204)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(secret: bytes, out_file: Path, fsync: bool = False) -> web.Application:
    app = web.Application()
    app[SECRET_KEY] = secret
    app[FSYNC_KEY] = fsync
    # O_APPEND + one os.write per body: each line lands whole, in arrival order.
    app[FD_KEY] = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def close_fd(app: web.Application) -> None:
        os.close(app[FD_KEY])

    app.on_cleanup.append(close_fd)
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_get("/healthz", healthz)
    return app


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bare HMAC-checking webhook receiver (baseline)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--secret", default=os.environ.get("PHASEWATCH_WEBHOOK_SECRET", ""))
    ap.add_argument("--out-file", type=Path, required=True, help="append bodies here")
    ap.add_argument("--fsync", action="store_true", help="fsync the file after every body")
    args = ap.parse_args(argv)
    if not args.secret:
        ap.error("--secret (or PHASEWATCH_WEBHOOK_SECRET) is required")
    loop = _loop()
    print(
        f"bare receiver on http://{args.host}:{args.port}{WEBHOOK_PATH} "
        f"(loop {type(loop).__module__}, out {args.out_file})",
        file=sys.stderr,
        flush=True,
    )
    app = make_app(args.secret.encode("utf-8"), args.out_file, args.fsync)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
