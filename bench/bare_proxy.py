"""The floor for the gateway's CPU: the smallest honest reverse proxy on aiohttp and uvloop.

    .venv/bin/python bench/bare_proxy.py --port 8081 --backend http://127.0.0.1:8000

Every POST goes to the backend with the same path and query, body and end-to-end headers, over
one ClientSession's keep-alive pool. JSON answers are read whole and returned; `text/event-stream`
answers are relayed chunk by chunk as they arrive. Nothing else: no auth, no logging, no
metrics, no model rewrite, no retries and no read timeouts. bench/proxy_bench.py runs it beside
nginx and the gateway (issue #7), so that the gateway's CPU per request can be split into what
aiohttp itself costs and what the gateway adds.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

# Hop-by-hop headers (RFC 9110 7.6.1), and Host and Content-Length, which aiohttp sets itself.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length")
)  # fmt: skip
BACKEND = web.AppKey("backend", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    # A multidict, not a dict: repeated headers (Set-Cookie, ...) must all pass.
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = request.app[BACKEND] + request.path_qs
    try:
        async with request.app[SESSION].post(
            url, data=body, headers=end_to_end(request.headers)
        ) as upstream:
            headers = end_to_end(upstream.headers)
            if upstream.content_type != "text/event-stream":
                payload = await upstream.read()
                return web.Response(status=upstream.status, body=payload, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            # iter_any: whatever has arrived, as soon as it has; no event waits for the next.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        # Before the answer's head went out (after it, aiohttp drops the client's connection).
        return web.Response(status=502, text=f"bad gateway: {exc!r}\n")


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # limit=0: no cap on pooled connections, as in the gateway. No total timeout, since a
    # stream lasts as long as its backend talks. Compressed bodies pass through untouched.
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, connect=10),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--backend", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    args = parser.parse_args()
    app = web.Application()
    app[BACKEND] = args.backend.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_post("/{tail:.*}", proxy)
    web.run_app(
        app, host=args.host, port=args.port, access_log=None, print=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


if __name__ == "__main__":
    main()
