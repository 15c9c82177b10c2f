"""A TLS reverse proxy that puts only Flower's Fleet API on the network.

In open-source Flower 1.42 one SuperLink port serves the Fleet API (sites),
the Control API (run submission, node registration: no authentication) and the
Runtime API (the ServerApp's own channel). `fedlora coordinator start` binds
the SuperLink to 127.0.0.1 and puts this proxy on the public address: it
forwards a request only when it is a POST to one of the Fleet routes of the
installed Flower (an exact allowlist taken from Flower's own Fleet router, so
no path trick like `/v1/fleet/../control` can match) and answers 403 to
everything else.

Every refusal is logged with the client's address and the request target as
sent (path and query string), and so is every forwarded request the SuperLink
answered 401/403 (a site that failed to authenticate): behind this proxy the
SuperLink sees every site as 127.0.0.1. `fedlora coordinator start` writes
these lines to logs/proxy.log.

TLS is terminated here and re-originated to the loopback SuperLink (which must
run TLS itself: Flower refuses `--enable-supernode-auth` without it). SuperNode
authentication survives the hop: a site signs a timestamp with its key and
sends key, timestamp and signature as `flwr-*` headers, which are forwarded
unchanged, so the SuperLink still verifies every request against the
registered keys.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fedlora import flower

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# Headers that belong to one connection hop and must not be copied (RFC 9110 §7.6.1),
# plus those httpx recomputes for the body it sends.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


def fleet_paths() -> frozenset[str]:
    """The Fleet API's POST routes in the installed Flower, e.g. /v1/fleet/pull-messages."""
    paths = flower.fleet_post_paths()
    if not paths or not all(p.startswith(FLEET_PREFIX) for p in paths):
        raise RuntimeError(f"unexpected Fleet routes in this Flower version: {sorted(paths)}")
    return paths


def is_forwarded(method: str, path: str, allowed: frozenset[str]) -> bool:
    return method == "POST" and path in allowed


def upstream_tls(ca_cert: Path) -> ssl.SSLContext:
    """Verify the loopback SuperLink against the coordinator's own CA."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def request_target(request: Request) -> str:
    """The request target as the client sent it: raw path (not percent-decoded) and query string."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return (raw + (b"?" + query if query else b"")).decode("latin-1").encode("unicode_escape").decode("ascii")


def create_proxy_app(upstream: str, ca_cert: Path, timeout: float = 120.0) -> Starlette:
    """The proxy as an ASGI app; `upstream` is the SuperLink's https://127.0.0.1:PORT."""
    allowed = fleet_paths()
    client = httpx.AsyncClient(base_url=upstream, verify=upstream_tls(ca_cert), timeout=timeout,
                               follow_redirects=False)

    def peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "?"

    async def refuse(request: Request, _exc: Exception | None = None) -> Response:
        log.warning("refused %s %s from %s: only the Fleet API is served on this address",
                    request.method, request_target(request), peer(request))
        return PlainTextResponse("forbidden: only the Flower Fleet API is served on this address\n",
                                 status_code=403)

    async def forward(request: Request) -> Response:
        path = request.url.path
        raw = request.scope.get("raw_path")  # as sent: no percent-encoded form of a route either
        if (request.url.query or not is_forwarded(request.method, path, allowed)
                or (raw is not None and raw != path.encode())):
            return await refuse(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            reply = await client.post(path, content=await request.body(), headers=headers)
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return PlainTextResponse("SuperLink unavailable\n", status_code=502)
        if reply.status_code in (401, 403):
            log.warning("SuperLink refused %s %s from %s with %d (site authentication failed?)",
                        request.method, path, peer(request), reply.status_code)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    # What the route does not match (a target not starting with "/", another method) is refused the same way.
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan,
                     exception_handlers={404: refuse, 405: refuse})


def log_to_file(path: Path) -> logging.Handler:
    """Also write this proxy's log lines (refusals, failed site logins) to `path`; returns the handler
    (remove it from `log` when done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.WARNING:
        log.setLevel(logging.WARNING)
    return handler


def serve(listen_host: str, listen_port: int, upstream: str, cert: Path, key: Path, ca_cert: Path,
          keep_running: Callable[[], bool] = lambda: True, log_file: Path | None = None) -> None:
    """Serve the proxy over TLS until SIGINT/SIGTERM or until keep_running() turns false (blocking);
    with `log_file`, refusals are written there too."""
    config = uvicorn.Config(create_proxy_app(upstream, ca_cert), host=listen_host, port=listen_port,
                            ssl_certfile=str(cert), ssl_keyfile=str(key), log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)

    def watch() -> None:
        while not server.should_exit:
            if not keep_running():
                server.should_exit = True
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()
    handler = log_to_file(log_file) if log_file is not None else None
    try:
        server.run()
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
