"""The coordinator's folder: its settings, TLS material, registered site keys and state.

    coordinator.toml   settings (addresses, host names); read by every `fedlora coordinator` command
    run.toml           a fedlora run configuration to edit, for `fedlora run --config`
    ca/ca.crt          the consortium CA certificate: give it to every site
    ca/ca.key          the CA private key: keep it offline once certificates are issued
                       (none with the hospital's own certificates: tls/own-pki.txt says so)
    tls/server.*       the coordinator's TLS certificate and key
    sites/NAME.pub     registered site public keys; sites/registry.json their Flower node ids
    state/             the SuperLink database, pid file, the sites' last ledger heads (ledger-heads.json),
                       nginx/ (the generated nginx.conf when proxy = "nginx")
    flwr-home/         Flower CLI connection to the loopback SuperLink
    systemd/           fedlora-coordinator.service, to run the coordinator as a service
    logs/, runs/       SuperLink and proxy logs (proxy.log or nginx-*.log); run directories
    models/            the model registry: every finished run's adapter as a version (`fedlora models`)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedlora.deploy.certificates import TlsFiles, create_tls
from fedlora.deploy.flwr_cli import write_connection
from fedlora.deploy.pki import OwnTls, PkiError, check_own_tls, import_tls
from fedlora.deploy.systemd import UnitError, check_account_name, coordinator_unit

SETTINGS = "coordinator.toml"
DEFAULT_LISTEN = "0.0.0.0:9092"
DEFAULT_SUPERLINK_PORT = 9093
PROXIES = ("python", "nginx")  # what serves `listen`: fleet_proxy.py (default) or nginx (deploy/nginx.py)


class CoordinatorError(RuntimeError):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise CoordinatorError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class CoordinatorHome:
    path: Path
    listen: str
    superlink_port: int
    hosts: list[str]
    database: Path
    runs: Path
    proxy: str = "python"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.path / "ca" / "ca.crt", self.path / "ca" / "ca.key",
                        self.path / "tls" / "server.crt", self.path / "tls" / "server.key")

    @property
    def sites(self) -> Path:
        return self.path / "sites"

    @property
    def flwr_home(self) -> Path:
        return self.path / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def pid_file(self) -> Path:
        return self.path / "state" / "coordinator.pid"

    @property
    def ledger_heads(self) -> Path:
        """The last privacy-ledger head each site reported, kept across runs (privacy.ledger-heads)."""
        return self.path / "state" / "ledger-heads.json"

    @property
    def models(self) -> Path:
        """The model registry every finished run is registered in (`fedlora models --registry`)."""
        return self.path / "models"

    @property
    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    @classmethod
    def load(cls, path: str | Path) -> "CoordinatorHome":
        path = Path(path).expanduser().resolve()
        settings_file = path / SETTINGS
        if not settings_file.is_file():
            raise CoordinatorError(f"{path} is not a coordinator folder (no {SETTINGS}); "
                                   "create one with `fedlora coordinator init`")
        try:
            table = tomllib.loads(settings_file.read_text()).get("coordinator", {})
        except tomllib.TOMLDecodeError as err:
            raise CoordinatorError(f"{settings_file}: not valid TOML: {err}") from None
        home = cls(path, str(table.get("listen", DEFAULT_LISTEN)),
                   int(table.get("superlink-port", DEFAULT_SUPERLINK_PORT)),
                   [str(h) for h in table.get("hosts", [])],
                   path / str(table.get("database", "state/superlink.db")), path / str(table.get("runs", "runs")),
                   str(table.get("proxy", "python")))
        if home.proxy not in PROXIES:
            raise CoordinatorError(f"{settings_file}: proxy = {home.proxy!r}: use one of {', '.join(PROXIES)}")
        listen_host, listen_port = split_address(home.listen)
        if listen_port == home.superlink_port and listen_host in ("127.0.0.1", "localhost", "0.0.0.0", "::"):
            raise CoordinatorError(f"{settings_file}: listen port {listen_port} is also the SuperLink's port")
        return home


def _settings_text(listen: str, superlink_port: int, hosts: list[str], proxy: str = "python") -> str:
    host_list = ", ".join(f'"{h}"' for h in hosts)
    return f"""\
# fedlora coordinator settings (`fedlora coordinator init`). Paths are relative to this folder.
[coordinator]
# The address sites connect to. A TLS proxy listens here and forwards ONLY Flower's
# Fleet API (what SuperNodes use); run submission and node registration are refused.
# Open this port (and only this one) to the sites in the firewall.
listen = "{listen}"
# What serves `listen`: "python" (built in, nothing to install) or "nginx" (the same policy
# in an nginx the coordinator writes to state/nginx/nginx.conf and runs; logs/nginx-*.log).
proxy = "{proxy}"
# Flower's SuperLink (Fleet + Control + Runtime APIs on one port) listens on 127.0.0.1
# only, on this port: run submission (`fedlora run`) works from this host alone.
superlink-port = {superlink_port}
# The names (DNS) or IP addresses sites use to reach `listen`. They are in
# tls/server.crt; after changing them run `fedlora coordinator renew-certificate`.
hosts = [{host_list}]
# The SuperLink's state (registered sites, runs): on disk, so a restart keeps it.
database = "state/superlink.db"
# Where `fedlora run` writes run directories by default.
runs = "runs"
"""


RUN_SKELETON = """\
# A fedlora run configuration for `fedlora run --config run.toml` (all keys: `fedlora simulate --help`).
# Every site receives this configuration; each site's own data, privacy budget and
# state folder come from its node configuration (`fedlora site init`), never from here.

[model]
# The base model: a local directory or a model id already in the local Hugging Face cache,
# the SAME files at the coordinator and at every site (the sites check a fingerprint).
name = "minilm"
max-length = 64

[task]
type = "classification"
# Every site must use this label list, in this order.
labels = ["cardiology", "neurology", "orthopedics", "gastroenterology", "pulmonology"]

[federation]
rounds = 5
# Fewest sites a round needs; a round waits up to round-timeout seconds for replies.
min-sites = 2
round-timeout = 900.0
wait-for-sites = 300.0

[train]
local-epochs = 2.0
batch-size = 16

[privacy]
# DP-SGD at every site; a site's own node-config budget (privacy-epsilon) may be stricter.
enabled = true
epsilon = 8.0
delta = 1e-5
"""


def init_coordinator(path: str | Path, hosts: list[str], listen: str = DEFAULT_LISTEN,
                     superlink_port: int = DEFAULT_SUPERLINK_PORT, proxy: str = "python", *,
                     own_tls: OwnTls | None = None, service_user: str | None = None) -> CoordinatorHome:
    """Create a coordinator folder: CA, server certificate, settings, run skeleton, systemd unit
    (run as `service_user`). `own_tls`: the hospital's CA and server certificate and key, checked
    and copied instead of creating a CA."""
    path = Path(path).expanduser().resolve()
    if (path / SETTINGS).exists():
        raise CoordinatorError(f"{path} already holds a coordinator; `fedlora coordinator renew-certificate` "
                               "reissues its TLS certificate")
    split_address(listen)
    try:
        if own_tls is not None:
            check_own_tls(own_tls, hosts)
        if service_user is not None:
            check_account_name(service_user)
    except (PkiError, UnitError) as err:
        raise CoordinatorError(str(err)) from None
    if proxy not in PROXIES:
        raise CoordinatorError(f"proxy {proxy!r}: use one of {', '.join(PROXIES)}")
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS).write_text(_settings_text(listen, superlink_port, hosts, proxy))
    (path / "run.toml").write_text(RUN_SKELETON)
    home = CoordinatorHome.load(path)
    if own_tls is None:
        create_tls(path, hosts)
    else:
        import_tls(path, own_tls, hosts)
    for folder in (home.sites, home.database.parent, home.logs, home.runs, home.models):
        folder.mkdir(parents=True, exist_ok=True)
    write_connection(home.flwr_home, superlink_port, home.tls.ca_cert)
    coordinator_unit(home, service_user)
    return home
