"""`fedlora site review`: the site's expert rates two models' outputs blind, on the site's own machine.

A small HTTP server on 127.0.0.1 only (reach it from another desk through an SSH tunnel, never by opening
a port): a list of the reviews the site holds, and for each, its rows with outputs A and B and three
links (A better, tie, B better). Which model is A is drawn per row and kept at the site
(fedlora.client.review). The page carries no script and loads nothing from elsewhere; each link holds a
token drawn when the server starts, and a request for another host name is refused, so a web page open in
the same browser cannot rate on the expert's behalf. Verdicts stay at the site; only the counts go upstream.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fedlora.client import review

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.row{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}.prompt{white-space:pre-wrap}
.outputs{display:grid;grid-template-columns:1fr 1fr;gap:1rem}.out{background:#f4f4f4;padding:.5rem;
white-space:pre-wrap}.rate a{margin-right:1rem}.chosen{font-weight:bold;text-decoration:none;color:#063}"""
LABELS = {"A": "A is better", "tie": "tie", "B": "B is better"}


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>").encode()


class ReviewServer(HTTPServer):  # one request at a time: verdicts are written in the order they come
    def __init__(self, state: Path, port: int = 0):
        self.state = Path(state)
        self.token = secrets.token_urlsafe(16)
        super().__init__((LOOPBACK, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}/?token={self.token}"


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer

    def log_message(self, format, *args):  # noqa: A002 - http.server's name; requests are not logged with rows
        log.debug("review page: %s", format % args)

    def _send(self, status: int, body: bytes = b"", location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the token stays on this page
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        token = (query.get("token") or [""])[-1]
        if host not in (LOOPBACK, "localhost") or not secrets.compare_digest(token, self.server.token):
            self._send(HTTPStatus.FORBIDDEN, _page("Not allowed", "<p>Open the address the command printed.</p>"))
            return
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts:
                self._send(HTTPStatus.OK, self._index())
            elif parts[0] == "review" and len(parts) == 2:
                self._send(HTTPStatus.OK, self._review(parts[1]))
            elif parts[0] == "rate" and len(parts) == 4 and re.fullmatch(r"[0-9]{1,6}", parts[2]):
                review.rate(self.server.state, parts[1], int(parts[2]), parts[3])
                self._send(HTTPStatus.SEE_OTHER, location=f"/review/{parts[1]}?token={self.server.token}#row-{parts[2]}")
            else:
                self._send(HTTPStatus.NOT_FOUND, _page("Not found", ""))
        except review.ReviewError as err:
            self._send(HTTPStatus.BAD_REQUEST, _page("Not possible", f"<p>{html.escape(str(err))}</p>"))

    def _link(self, path: str) -> str:
        return html.escape(f"{path}?token={self.server.token}")

    def _index(self) -> bytes:
        reviews = review.pending(self.server.state)
        if not reviews:
            return _page("Nothing to review", "<p>No evaluation-only run has left two models' outputs here yet.</p>")
        rows = []
        for pair in reviews:
            c = review.counts(self.server.state, pair) or {}
            rated = c.get("wins", 0) + c.get("ties", 0) + c.get("losses", 0)
            rows.append(f'<li><a href="{self._link(f"/review/{pair}")}">review {html.escape(pair)}</a>: '
                        f"{rated} of {rated + c.get('unrated', 0)} rows rated</li>")
        return _page("Reviews at this site", f"<ul id=reviews>{''.join(rows)}</ul>")

    def _review(self, pair: str) -> bytes:
        shown = review.items(self.server.state, pair)
        rated = sum(item["verdict"] is not None for item in shown)
        body = [f"<p id=progress>{rated} of {len(shown)} rated. Each row shows what two models output for one "
                "of this site's held-out records; which model is A is drawn per row. Choose the better output, "
                f'or a tie. <a href="{self._link("/")}">All reviews</a></p>']
        for item in shown:
            index, verdict = item["index"], item["verdict"]
            links = " ".join(
                f'<a class="{"chosen" if verdict == v else ""}" data-verdict="{v}" '
                f'href="{self._link(f"/rate/{pair}/{index}/{v}")}">{LABELS[v]}</a>' for v in review.VERDICTS)
            prompt, a, b = (html.escape(item[k]) for k in ("prompt", "A", "B"))
            body.append(f'<div class=row id="row-{index}" data-verdict="{verdict or ""}">'
                        f"<div class=prompt>{prompt}</div><div class=outputs>"
                        f"<div class=out><b>A</b><br>{a}</div><div class=out><b>B</b><br>{b}</div></div>"
                        f"<p class=rate>{links}</p></div>")
        return _page(f"Review {pair}", "".join(body))


def serve(state: Path, port: int = 0) -> None:
    """Serve the review page until interrupted (Ctrl-C)."""
    server = ReviewServer(state, port)
    print(f"review page for {state}: {server.url}\n(on this machine only; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
