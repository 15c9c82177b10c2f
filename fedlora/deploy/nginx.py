"""nginx as the coordinator's Fleet-only TLS proxy (`proxy = "nginx"` in coordinator.toml).

The same policy as fleet_proxy.py, in an nginx configuration that `fedlora
coordinator start` writes to state/nginx/nginx.conf, checks with `nginx -t` and
runs in the foreground as a supervised child (unprivileged: pid file, temporary
files and logs all inside the coordinator folder):

- TLS on `listen` with the coordinator's server certificate; plain HTTP sent to
  it gets no HTTP answer (the connection is closed);
- one exact `location =` per Fleet route of the installed Flower, which
  forwards a request only when it is a POST whose raw request target is
  exactly that route: no query string, and none of the forms nginx would
  normalize to it (`/v1/control/../fleet/...`, `//v1/fleet/...`, `%2e%2e`,
  `%2F`). The upstream URI is written out per location, so nothing but an
  allowed route ever reaches the SuperLink;
- everything else gets 403;
- the SuperLink is reached over TLS on 127.0.0.1 and verified against the
  consortium CA (its certificate names `localhost`, see certificates.py);
- request headers, the sites' `flwr-*` authentication headers among them, are
  forwarded unchanged (nginx drops only the hop-by-hop ones and sets Host);
- logs/nginx-access.log has every request, logs/nginx-refused.log the refused
  ones and those the SuperLink answered 401/403 (a failed site login), each
  with the client's address and the full request line, query string included;
  logs/nginx-error.log has nginx's own errors.

A site that prefers its own nginx can take the generated file as a reference:
the `server` block and the `map`/`upstream` blocks before it are what matters.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome, split_address
from fedlora.deploy.fleet_proxy import fleet_paths
from fedlora.processes import port_open, start_child, stop_tree, wait_for_port

log = logging.getLogger(__name__)

UPSTREAM_NAME = "localhost"  # a name the server certificate always carries (certificates.LOOPBACK_NAMES)
MAX_BODY = "2g"
TIMEOUT_S = 300  # proxy read/send and client body timeouts: above the Python proxy's 120 s
FORBIDDEN = "forbidden: only the Flower Fleet API is served on this address\\n"
SEARCH = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")  # often not on a user's PATH
MIN_VERSION_FOR_E = (1, 19, 5)  # `nginx -e FILE` (error log before the config is read)


def folder(home: CoordinatorHome) -> Path:
    """Where the generated config, pid file and temporary files live."""
    return home.path / "state" / "nginx"


def config_path(home: CoordinatorHome) -> Path:
    return folder(home) / "nginx.conf"


def error_log(home: CoordinatorHome) -> Path:
    return home.logs / "nginx-error.log"


def _q(value: str | Path) -> str:
    """A double-quoted nginx string; refuses what nginx would read as a variable or a syntax break."""
    text = str(value)
    if re.search(r'[$"\\\n\r{};]', text):
        raise CoordinatorError(f"{text!r}: this path cannot be written into an nginx configuration "
                               "(it contains $, quotes, braces, ; or a backslash); move the coordinator folder")
    return f'"{text}"'


def _listen(host: str, port: int) -> str:
    if host in ("0.0.0.0", "*"):
        return f"*:{port}"
    if ":" in host:  # IPv6
        return f"[{host}]:{port}" + (" ipv6only=off" if host == "::" else "")
    return f"{host}:{port}"


def _user_line() -> str:
    """Started as root, nginx's network-facing workers drop to `nobody` (the master keeps root to read
    the key). They need no file of the coordinator's: bodies stream through, nothing is buffered to
    disk. Unprivileged, workers run as the coordinator's own user and the directive is left out."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"


def render(listen: str, superlink_port: int, cert: Path, key: Path, ca_cert: Path, logs: Path, state: Path,
           routes: frozenset[str] | None = None, workers: int | str = "auto") -> str:
    """A complete nginx.conf for `nginx -c FILE -p STATE -g 'daemon off;'`."""
    routes = fleet_paths() if routes is None else routes
    for route in routes:
        if not re.fullmatch(r"/v1/fleet/[a-z0-9-]+", route):
            raise CoordinatorError(f"unexpected Fleet route {route!r}: not writing it into an nginx configuration")
    host, port = split_address(listen)
    tmp = state / "tmp"
    locations = "".join(f"""
        location = {route} {{
            if ($request_method != POST) {{ return 403 "{FORBIDDEN}"; }}
            if ($request_uri != "{route}") {{ return 403 "{FORBIDDEN}"; }}
            proxy_pass https://fedlora_superlink{route};
        }}
""" for route in sorted(routes))
    return f"""\
# Generated by `fedlora coordinator start` (fedlora/deploy/nginx.py); rewritten at every start.
# The coordinator's Fleet-only proxy: only POSTs to Flower's exact Fleet routes reach the SuperLink.
# Run: nginx -c THIS_FILE -p {state} -g 'daemon off;'
{_user_line()}worker_processes {workers};
pid {_q(state / "nginx.pid")};
error_log {_q(logs / "nginx-error.log")} notice;

events {{
    worker_connections 1024;
}}

http {{
    default_type text/plain;
    server_tokens off;
    client_body_temp_path {_q(tmp / "client-body")};
    proxy_temp_path {_q(tmp / "proxy")};
    fastcgi_temp_path {_q(tmp / "fastcgi")};
    uwsgi_temp_path {_q(tmp / "uwsgi")};
    scgi_temp_path {_q(tmp / "scgi")};

    log_format fedlora '$time_iso8601 $remote_addr:$remote_port "$request" $status '
                       'upstream=$upstream_status in=$request_length out=$bytes_sent $request_time s';
    # Refused here (a 4xx with no upstream answer), or refused by the SuperLink (401/403: a failed site login).
    map "$status:$upstream_status" $fedlora_refused {{
        default 0;
        "~^4[0-9][0-9]:$" 1;
        "~:40[13]$" 1;
    }}
    access_log {_q(logs / "nginx-access.log")} fedlora;
    access_log {_q(logs / "nginx-refused.log")} fedlora if=$fedlora_refused;

    upstream fedlora_superlink {{
        server 127.0.0.1:{superlink_port};  # Flower's SuperLink, loopback only
        keepalive 16;
    }}

    server {{
        listen {_listen(host, port)} ssl default_server;
        server_name _;
        ssl_certificate {_q(cert)};
        ssl_certificate_key {_q(key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        # Plain HTTP sent to this TLS port: close the connection, no HTTP answer.
        error_page 497 = @close;

        client_max_body_size {MAX_BODY};
        client_body_timeout {TIMEOUT_S}s;
        send_timeout {TIMEOUT_S}s;

        # Stream request and reply bodies (a site's update, the global adapter) instead of buffering
        # them in temporary files: the workers touch no file, so they can run as nobody.
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Host 127.0.0.1:{superlink_port};
        proxy_set_header Connection "";
        proxy_connect_timeout 10s;
        proxy_send_timeout {TIMEOUT_S}s;
        proxy_read_timeout {TIMEOUT_S}s;
        proxy_redirect off;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_q(ca_cert)};
        proxy_ssl_name {UPSTREAM_NAME};
        proxy_ssl_verify_depth 4;  # a hospital PKI's server certificate may come through intermediates
        proxy_ssl_server_name on;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_session_reuse on;
{locations}
        location / {{
            return 403 "{FORBIDDEN}";
        }}
        location @close {{
            return 444;
        }}
    }}
}}
"""


def write_config(home: CoordinatorHome, workers: int | str = "auto") -> Path:
    """Write state/nginx/nginx.conf for this coordinator (and the folders it names)."""
    state = folder(home)
    for sub in ("client-body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    home.logs.mkdir(parents=True, exist_ok=True)
    tls = home.tls
    path = config_path(home)
    path.write_text(render(home.listen, home.superlink_port, tls.server_cert, tls.server_key, tls.ca_cert,
                           home.logs, state, workers=workers))
    return path


def executable() -> str:
    found = shutil.which("nginx") or next((p for p in SEARCH if os.access(p, os.X_OK)), None)
    if not found:
        raise CoordinatorError('proxy = "nginx" in coordinator.toml, but nginx is not installed '
                               '(e.g. `apt-get install nginx`), or set proxy = "python"')
    return found


def _version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(g) for g in match.groups()) if match else (0, 0, 0)


def command(config: Path, state: Path, logs: Path, nginx: str | None = None) -> list[str]:
    """nginx in the foreground on `config`; `-t` is appended to only check it."""
    nginx = nginx or executable()
    early_log = ["-e", str(logs / "nginx-error.log")] if _version(nginx) >= MIN_VERSION_FOR_E else []
    return [nginx, *early_log, "-p", f"{state}/", "-c", str(config), "-g", "daemon off;"]


def check(cmd: list[str]) -> None:
    """`nginx -t` on the generated config; a one-line CoordinatorError if nginx rejects it."""
    result = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines()
                 if "[emerg]" in ln or "[alert]" in ln or "[crit]" in ln]
        reason = lines[0] if lines else (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CoordinatorError(f"nginx rejected {cmd[cmd.index('-c') + 1]}: {reason}")


def _local_address(listen: str) -> tuple[str, int]:
    """Where this host reaches the listen address."""
    host, port = split_address(listen)
    return ("127.0.0.1" if host in ("0.0.0.0", "*", "::") else host), port


def prepare(home: CoordinatorHome, workers: int | str = "auto") -> list[str]:
    """Write and check the config; returns the command that runs nginx in the foreground.
    Raises CoordinatorError (one line) when nginx is missing, rejects the config, or `listen` is taken."""
    nginx = executable()
    if port_open(*_local_address(home.listen)):
        raise CoordinatorError(f"{home.listen} is already in use (another coordinator or nginx?); "
                               "set listen in coordinator.toml")
    config = write_config(home, workers)
    cmd = command(config, folder(home), home.logs, nginx)
    check(cmd)
    return cmd


def end_leftover(home: CoordinatorHome) -> list[int]:
    """Stop an nginx a coordinator killed outright left running (its pid file names it; nginx rewrites
    its own process title and environment, so the supervisor's mark cannot find it). Returns its pids."""
    pid_file = folder(home) / "nginx.pid"
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    try:
        master = psutil.Process(int(text)) if text.isdigit() else None
        if master is None or not any("nginx" in part for part in master.cmdline()):
            return []
        pids = [master.pid, *(child.pid for child in master.children(recursive=True))]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    stop_tree(master.pid)
    return pids


def serve(cmd: list[str], home: CoordinatorHome, keep_running: Callable[[], bool] = lambda: True) -> bool:
    """Run nginx (`cmd` from prepare) as a supervised child until SIGINT/SIGTERM (KeyboardInterrupt),
    until keep_running() turns false (returns True), or until nginx exits (logged; returns False).
    nginx is stopped, with its workers, whichever way this returns."""
    host, port = _local_address(home.listen)
    with error_log(home).open("a") as out:  # what nginx prints before its own error log is open
        proc = start_child(cmd, out, cwd=folder(home))
        try:
            wait_for_port(host, port, proc, timeout=30, what=f"nginx (see {error_log(home)})")
            log.info("nginx serves %s (config %s; logs %s/nginx-*.log)", home.listen, config_path(home), home.logs)
            while keep_running():
                if proc.poll() is not None:
                    log.error("nginx exited with code %s; see %s", proc.returncode, error_log(home))
                    return False
                time.sleep(0.5)
            return True
        except RuntimeError as err:  # nginx exited before it listened
            log.error("%s", err)
            return False
        finally:
            stop_tree(proc.pid)
