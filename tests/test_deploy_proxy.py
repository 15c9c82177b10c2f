"""The coordinator's Fleet-only proxy, both kinds: the Python proxy (fleet_proxy.py, served by uvicorn)
and nginx (deploy/nginx.py, its generated config run by a real nginx), put through the SAME probes
in front of a small HTTPS upstream that records what reaches it.

What every probe checks: a request reaches the SuperLink only as a POST to exactly one of Flower's
Fleet routes, with its `flwr-*` authentication headers and body unchanged; everything else (Control
and Runtime APIs, other methods, query strings, path tricks that normalize to a Fleet route) is
refused and logged with the client's address and the request target as sent.

The nginx half is skipped when nginx is not installed, unless FEDLORA_REQUIRE_NGINX is set (CI).
"""

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from fedlora.cli import main as fedlora_main
from fedlora.deploy import fleet_proxy, nginx
from fedlora.deploy.certificates import create_tls
from fedlora.deploy.coordinator_home import (
    CoordinatorError,
    CoordinatorHome,
    init_coordinator,
)
from fedlora.deploy.fleet_proxy import create_proxy_app, fleet_paths, is_forwarded
from fedlora.processes import free_ports, port_open, wait_for_port

AUTH_HEADERS = {  # what a SuperNode sends (flwr.common.constant): forwarded byte for byte
    "flwr-public-key": "LS0tLS1CRUdJTiBQVUJMSUMgS0VZLS0tLS0KTUhZd0VBWUhLb1pJemowQ0FRWUZLNEVF+/=",
    "flwr-timestamp": "2026-01-01T00:00:00.123456+00:00",
    "flwr-signature": "MGUCMQD3c2lnbmF0dXJl/+AbCdEf==",
}
PULL = "/v1/fleet/pull-messages"

# Refused outright: never forwarded, answered 403 (400 where the server rejects the request line itself).
REFUSED = [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/runtime/push-messages"),
    ("GET", PULL),
    ("HEAD", PULL),
    ("PUT", PULL),
    ("DELETE", PULL),
    ("OPTIONS", PULL),
    ("POST", PULL + "?x=1"),
    ("POST", "/v1/fleet/push-messages?run_id=1"),
    ("POST", PULL + "/"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet"),
    ("POST", "/"),
    ("POST", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/V1/FLEET/PULL-MESSAGES"),
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ("POST", "/v1/fleet/%2E%2E/control/start-run"),
    ("POST", "/v1/fleet/..%2Fcontrol/start-run"),
    ("POST", "/v1/fleet/%2e%2e%2fcontrol%2fstart-run"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", PULL + ";x=1"),
    ("POST", PULL + "%3Fx=1"),
    ("POST", PULL + "%00"),
    ("POST", PULL + "%20"),
    ("POST", "*"),
    ("TRACE", PULL),
    ("PROPFIND", PULL),
]
# Forms that a server may normalize to a Fleet route: refused, or forwarded as exactly that route.
TRICKS = [
    "/v1/control/../fleet/pull-messages",
    "/v1/control/%2e%2e/fleet/pull-messages",
    "/v1/runtime/..%2Ffleet/pull-messages",
    "//v1/fleet/pull-messages",
    "/v1//fleet/pull-messages",
    "/v1/fleet//pull-messages",
    "/v1/./fleet/pull-messages",
    "/v1/fleet/./pull-messages",
    "/v1/fleet%2Fpull-messages",
    "/v1%2ffleet%2fpull-messages",
    "/v1/fleet/pull%2Dmessages",
    "/%76%31/fleet/pull-messages",
    "/v1/fleet/pull-messages#frag",
    "/v1/fleet/pull-messages?",
    "https://127.0.0.1/v1/fleet/pull-messages",
]


# -- the upstream: an HTTPS stand-in for the SuperLink that records what reaches it -----------------
class Upstream:
    def __init__(self, cert: Path, key: Path, port: int):
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status = int(self.headers.get("x-test-status", 200))
                out = b"upstream answer\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_POST = do_GET = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _answer

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Proxy:
    def __init__(self, kind: str, port: int, ca_cert: Path, log_file: Path):
        self.kind, self.port, self.log_file = kind, port, log_file
        self.client_tls = ssl.create_default_context(cafile=str(ca_cert))

    def request(self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"x" * 64,
                tls: bool = True) -> tuple[int | None, bytes]:
        """Send the request line exactly as given (no client-side normalization); (status, raw answer)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}",
                 "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        answer = b""
        try:
            if tls:
                sock = self.client_tls.wrap_socket(sock, server_hostname="localhost")
            sock.sendall(raw)
            while chunk := sock.recv(65536):
                answer += chunk
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass
        finally:
            sock.close()
        if not answer.startswith(b"HTTP/"):
            return None, answer
        return int(answer.split(b" ", 2)[1]), answer

    def log_lines(self, *needles: str, timeout: float = 5.0) -> list[str]:
        """The lines of the proxy's refusal log that hold every one of `needles` (waits for one)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_file.read_text() if self.log_file.exists() else ""
            lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def _nginx_or_skip() -> None:
    if shutil.which("nginx") or any(os.access(p, os.X_OK) for p in nginx.SEARCH):
        return
    if os.environ.get("FEDLORA_REQUIRE_NGINX"):
        pytest.fail("nginx is not installed and FEDLORA_REQUIRE_NGINX is set")
    pytest.skip("nginx is not installed (set FEDLORA_REQUIRE_NGINX=1 to make this a failure)")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> tuple[CoordinatorHome, int]:
    """A coordinator folder (proxy = "nginx") whose superlink-port is the recording upstream's,
    and a free port for the Python proxy."""
    listen_python, listen_nginx, upstream_port = free_ports(3)
    home = init_coordinator(tmp_path_factory.mktemp("proxy") / "coordinator", [], f"127.0.0.1:{listen_nginx}",
                            upstream_port, proxy="nginx")
    return home, listen_python


@pytest.fixture(scope="module")
def upstream(coordinator):
    home, _ = coordinator
    server = Upstream(home.tls.server_cert, home.tls.server_key, home.superlink_port)
    yield server
    server.close()


@pytest.fixture(scope="module", params=["python", "nginx"])
def proxy(request, coordinator, upstream):
    home, listen_python = coordinator
    stop = threading.Event()
    if request.param == "python":
        args = ("127.0.0.1", listen_python, f"https://127.0.0.1:{home.superlink_port}", home.tls.server_cert,
                home.tls.server_key, home.tls.ca_cert)
        thread = threading.Thread(target=fleet_proxy.serve, args=args, daemon=True,
                                  kwargs={"keep_running": lambda: not stop.is_set(),
                                          "log_file": home.logs / "proxy.log"})
        thread.start()
        wait_for_port("127.0.0.1", listen_python, timeout=20, what="the Python proxy")
        served = Proxy("python", listen_python, home.tls.ca_cert, home.logs / "proxy.log")
    else:
        _nginx_or_skip()
        command = nginx.prepare(home, workers=1)
        result: list[bool] = []
        thread = threading.Thread(target=lambda: result.append(nginx.serve(command, home, lambda: not stop.is_set())),
                                  daemon=True)
        thread.start()
        port = int(home.listen.rpartition(":")[2])
        wait_for_port("127.0.0.1", port, timeout=20, what="nginx")
        served = Proxy("nginx", port, home.tls.ca_cert, home.logs / "nginx-refused.log")
    yield served
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"the {request.param} proxy did not stop"
    if request.param == "nginx":
        assert result == [True]  # it stopped because asked to, not because nginx died


# -- the same probes, both proxies ------------------------------------------------------------------
def test_every_fleet_route_is_forwarded_exactly_with_its_auth_headers_and_body(proxy, upstream):
    for route in sorted(fleet_paths()):
        upstream.seen.clear()
        body = os.urandom(3000)
        status, answer = proxy.request("POST", route, AUTH_HEADERS, body)
        assert status == 200 and answer.endswith(b"upstream answer\n"), (route, answer[:200])
        [(method, path, headers, received)] = upstream.seen
        assert (method, path, received) == ("POST", route, body)
        assert {k: headers.get(k) for k in AUTH_HEADERS} == AUTH_HEADERS


def test_a_large_body_is_forwarded_whole(proxy, upstream):
    upstream.seen.clear()
    body = os.urandom(24 * 1024 * 1024)  # an adapter update of a few million parameters
    status, _ = proxy.request("POST", "/v1/fleet/push-messages", AUTH_HEADERS, body)
    assert status == 200
    assert [(p, len(b), b == body) for _, p, _, b in upstream.seen] == [("/v1/fleet/push-messages", len(body), True)]


@pytest.mark.parametrize("method,target", REFUSED, ids=[f"{m} {t}" for m, t in REFUSED])
def test_everything_but_the_fleet_routes_is_refused(proxy, upstream, method, target):
    upstream.seen.clear()
    status, answer = proxy.request(method, target, AUTH_HEADERS)
    assert status in (400, 403, 405), (status, answer[:300])  # 400/405: rejected by nginx itself
    assert upstream.seen == []


@pytest.mark.parametrize("target", TRICKS)
def test_path_tricks_reach_the_superlink_only_as_an_exact_fleet_route(proxy, upstream, target):
    upstream.seen.clear()
    status, answer = proxy.request("POST", target, AUTH_HEADERS)
    if status == 200:
        assert [(m, p) for m, p, _, _ in upstream.seen] == [("POST", PULL)], target
    else:
        assert status in (400, 403), (status, answer[:300])
        assert upstream.seen == []


def test_refusals_are_logged_with_the_client_address_and_the_query_string(proxy, upstream):
    marker = uuid.uuid4().hex
    status, _ = proxy.request("POST", f"{PULL}?probe={marker}")
    assert status == 403
    assert proxy.log_lines(f"POST {PULL}?probe={marker}", "127.0.0.1"), proxy.log_file
    status, _ = proxy.request("GET", f"/v1/control/list-runs?probe={marker}&b=%2e")
    assert status == 403
    assert proxy.log_lines(f"GET /v1/control/list-runs?probe={marker}&b=%2e", "127.0.0.1")


def test_a_failed_site_login_at_the_superlink_is_logged_with_the_client_address(proxy, upstream):
    for code in (401, 403):
        upstream.seen.clear()
        status, _ = proxy.request("POST", "/v1/fleet/send-node-heartbeat", {**AUTH_HEADERS, "x-test-status": str(code)})
        assert status == code and len(upstream.seen) == 1
        assert proxy.log_lines("POST /v1/fleet/send-node-heartbeat", f" {code}", "127.0.0.1"), proxy.log_file


def test_plain_http_to_the_tls_port_gets_no_http_answer(proxy, upstream):
    upstream.seen.clear()
    status, answer = proxy.request("POST", PULL, AUTH_HEADERS, tls=False)
    assert status is None and b"HTTP/" not in answer, answer[:300]
    assert upstream.seen == []


# -- the Python proxy's routing without a network ----------------------------------------------------
def test_proxy_allowlist_is_flowers_fleet_routes_only():
    paths = fleet_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/push-messages" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)
    assert is_forwarded("POST", "/v1/fleet/pull-messages", paths)
    for method, path in (("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/control/start-run"),
                         ("POST", "/v1/runtime/pull-messages"), ("POST", "/v1/fleet/../control/start-run"),
                         ("POST", "/v1/fleet/pull-messages/"), ("POST", "/docs")):
        assert not is_forwarded(method, path, paths), (method, path)


def test_proxy_forwards_fleet_requests_and_refuses_the_rest(tmp_path):
    files = create_tls(tmp_path, [])
    with socket.socket() as s:  # a port nobody listens on: forwarded requests fail upstream (502)
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    app = create_proxy_app(f"https://127.0.0.1:{dead}", files.ca_cert, timeout=2)
    transport = httpx.ASGITransport(app=app)

    async def probe() -> dict[str, int]:
        async with httpx.AsyncClient(transport=transport, base_url="https://proxy") as client:
            return {
                "fleet": (await client.post("/v1/fleet/pull-messages", content=b"x")).status_code,
                "fleet with query": (await client.post("/v1/fleet/pull-messages?x=1")).status_code,
                "control": (await client.post("/v1/control/start-run", content=b"x")).status_code,
                "runtime": (await client.post("/v1/runtime/push-messages")).status_code,
                "get fleet": (await client.get("/v1/fleet/pull-messages")).status_code,
            }

    assert asyncio.run(probe()) == {"fleet": 502, "fleet with query": 403, "control": 403, "runtime": 403,
                                    "get fleet": 403}


# -- choosing nginx, and its config ------------------------------------------------------------------
def test_proxy_setting_is_python_by_default_and_nginx_on_request(tmp_path):
    assert init_coordinator(tmp_path / "a", []).proxy == "python"
    assert fedlora_main(["coordinator", "init", str(tmp_path / "b"), "--proxy", "nginx"]) == 0
    assert CoordinatorHome.load(tmp_path / "b").proxy == "nginx"
    assert 'proxy = "nginx"' in (tmp_path / "b" / "coordinator.toml").read_text()
    settings = tmp_path / "a" / "coordinator.toml"
    settings.write_text(settings.read_text().replace('proxy = "python"', 'proxy = "apache"'))
    with pytest.raises(CoordinatorError, match="apache"):
        CoordinatorHome.load(tmp_path / "a")
    with pytest.raises(CoordinatorError, match="proxy"):
        init_coordinator(tmp_path / "c", [], proxy="haproxy")


@pytest.mark.parametrize("proxy", ["nginx"], indirect=True)
def test_nginx_workers_started_by_root_run_as_nobody_and_write_no_file(proxy, coordinator):
    """The network-facing processes hold no privilege and need no file of the coordinator's (the 24 MB
    body above streamed through without a temporary file)."""
    home, _ = coordinator
    master = psutil.Process(int((nginx.folder(home) / "nginx.pid").read_text()))
    workers = master.children()
    assert workers and {w.username() for w in workers} == {"nobody" if os.geteuid() == 0 else master.username()}
    assert not [f for f in (nginx.folder(home) / "tmp").rglob("*") if f.is_file()]


def test_generated_config_forwards_each_route_to_its_own_uri_and_verifies_the_superlink(tmp_path):
    home = init_coordinator(tmp_path / "c", [], "0.0.0.0:9092", 9093, proxy="nginx")
    config = nginx.render(home.listen, home.superlink_port, home.tls.server_cert, home.tls.server_key,
                          home.tls.ca_cert, home.logs, nginx.folder(home))
    for route in fleet_paths():
        assert f"location = {route} {{" in config
        assert f'if ($request_uri != "{route}")' in config
        assert f"proxy_pass https://fedlora_superlink{route};" in config
    assert config.count("proxy_pass ") == len(fleet_paths())
    for line in ("proxy_ssl_verify on;", f'proxy_ssl_trusted_certificate "{home.tls.ca_cert}";',
                 "proxy_ssl_name localhost;", "server 127.0.0.1:9093;", "listen *:9092 ssl default_server;",
                 "client_max_body_size 2g;", f'error_log "{home.logs / "nginx-error.log"}"',
                 f'pid "{nginx.folder(home) / "nginx.pid"}";'):
        assert line in config, line
    with pytest.raises(CoordinatorError, match="nginx configuration"):
        nginx.render(home.listen, 9093, Path("/srv/a$b/server.crt"), home.tls.server_key, home.tls.ca_cert,
                     home.logs, nginx.folder(home))


def test_missing_nginx_is_one_clear_line(tmp_path, monkeypatch):
    home = init_coordinator(tmp_path / "c", [], proxy="nginx")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(nginx, "SEARCH", ())
    with pytest.raises(CoordinatorError, match="nginx is not installed") as err:
        nginx.prepare(home)
    assert "\n" not in str(err.value)


def test_a_config_nginx_rejects_is_one_clear_line(tmp_path):
    _nginx_or_skip()
    home = init_coordinator(tmp_path / "c", [], "127.0.0.1:1", 9093, proxy="nginx")
    home.tls.server_key.write_text("not a key\n")
    with pytest.raises(CoordinatorError, match="nginx rejected") as err:
        nginx.prepare(home)
    assert "\n" not in str(err.value) and "server.key" in str(err.value)


def test_the_coordinator_hears_when_nginx_dies(tmp_path, caplog):
    """nginx.serve returns False, naming nginx's log, when nginx exits on its own (before or after it
    listens); the coordinator then stops."""
    port = free_ports(1)[0]
    home = init_coordinator(tmp_path / "c", [], f"127.0.0.1:{port}", free_ports(1)[0], proxy="nginx")
    nginx.folder(home).mkdir(parents=True, exist_ok=True)
    listens_then_dies = [sys.executable, "-c", ("import socket, time; s = socket.create_server(('127.0.0.1', "
                                                f"{port})); time.sleep(1.5); raise SystemExit(3)")]
    with caplog.at_level("INFO", logger="fedlora"):
        assert nginx.serve(listens_then_dies, home) is False
        assert nginx.serve([sys.executable, "-c", "raise SystemExit(4)"], home) is False
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "nginx exited with code 3" in errors[0] and str(nginx.error_log(home)) in errors[0]
    assert "exited with code 4" in errors[1] and str(nginx.error_log(home)) in errors[1]


def test_an_nginx_left_running_is_found_by_its_pid_file_and_stopped(tmp_path):
    """nginx rewrites its environment (the supervisor's mark is lost), so a coordinator killed outright
    leaves an nginx that only its pid file names: `coordinator stop` and `start` end it by that."""
    _nginx_or_skip()
    port = free_ports(1)[0]
    home = init_coordinator(tmp_path / "c", [], f"127.0.0.1:{port}", free_ports(1)[0], proxy="nginx")
    command = nginx.prepare(home, workers=1)
    orphan = subprocess.Popen(command, cwd=nginx.folder(home), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, orphan, timeout=20, what="nginx")
        assert nginx.end_leftover(home)[0] == orphan.pid
        assert orphan.wait(timeout=30) is not None and not port_open("127.0.0.1", port)
        assert nginx.end_leftover(home) == []  # nothing left; a stale pid file names no nginx
    finally:
        orphan.kill()
