"""A site's folder: its key pair, its settings and node configuration, its state.

    site.toml        where the coordinator is, which key and CA to use, and the
                     node configuration the ClientApp sees (data, budget, state)
    keys/site.key    the site's private key (never leaves the site)
    keys/site.key.pub  the public key: send it to the coordinator
    ca.crt           the consortium CA certificate (from the coordinator)
    state/           the privacy ledger, the training snapshot (drift), the worker socket, per-message timings
    logs/            SuperNode and worker logs
    systemd/         fedlora-site-NAME.service, to run the site as a service
    flwr-home/       Flower's own files when run as that service (FLWR_HOME)
"""

from __future__ import annotations

import shutil
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.client.drift import NODE_SHARE_DRIFT
from fedlora.deploy.keys import fingerprint, generate_key_pair
from fedlora.deploy.pki import PkiError, check_site_key, install_site_key
from fedlora.deploy.relay import NODE_STATE_DIR, NODE_WORKER_SOCKET
from fedlora.deploy.systemd import UnitError, check_account_name, site_unit
from fedlora.privacy.budget import NODE_DELTA, NODE_EPSILON, NODE_EPSILON_PER_RUN, NODE_PER_RUN, NODE_UNIT_COLUMN

SETTINGS = "site.toml"
NODE_DATA_PATH = "data-path"     # read by fedlora.client.runtime
NODE_SITE = "site"
NODE_SITE_INDEX = "site-index"   # mixes into the site's training seeds
DEFAULT_RUNTIME_PORT = 9094


class SiteError(RuntimeError):
    pass


@dataclass(frozen=True)
class SiteHome:
    path: Path
    name: str
    superlink: str
    root_certificates: Path
    private_key: Path
    runtime_port: int
    worker: bool
    node_config: dict[str, Any]

    @property
    def state(self) -> Path:
        return Path(str(self.node_config.get(NODE_STATE_DIR, self.path / "state")))

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def pid_file(self) -> Path:
        return self.state / "site.pid"

    @property
    def data_path(self) -> Path:
        return Path(str(self.node_config[NODE_DATA_PATH]))

    @classmethod
    def load(cls, path: str | Path) -> "SiteHome":
        path = Path(path).expanduser().resolve()
        settings_file = path / SETTINGS
        if not settings_file.is_file():
            raise SiteError(f"{path} is not a site folder (no {SETTINGS}); create one with `fedlora site init`")
        try:
            doc = tomllib.loads(settings_file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise SiteError(f"{settings_file}: not valid TOML: {err}") from None
        site, node = doc.get("site", {}), dict(doc.get("node-config", {}))
        problems = [f"[site] {k} is missing" for k in ("name", "superlink") if k not in site]
        problems += [f"[node-config] {k} is missing" for k in (NODE_DATA_PATH, NODE_SITE) if k not in node]
        if problems:
            raise SiteError(f"{settings_file}: " + "; ".join(problems))

        def local(value: str) -> Path:
            return (path / value).resolve()

        return cls(path, str(site["name"]), str(site["superlink"]),
                   local(site.get("root-certificates", "ca.crt")), local(site.get("private-key", "keys/site.key")),
                   int(site.get("runtime-port", DEFAULT_RUNTIME_PORT)), bool(site.get("worker", True)), node)

    def flower_node_config(self) -> dict[str, Any]:
        """What the SuperNode passes to the ClientApp as context.node_config."""
        node = {**self.node_config, NODE_STATE_DIR: str(self.state)}
        if self.worker:
            node[NODE_WORKER_SOCKET] = str(self.state / "worker.sock")
        return node


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _settings_text(name: str, superlink: str, runtime_port: int, data: Path, state: Path, index: int,
                   epsilon: float | None, delta: float | None, per_run: float | None) -> str:
    budget = (f"{NODE_EPSILON} = {epsilon!r}\n{NODE_DELTA} = {delta!r}\n" if epsilon else
              f"# {NODE_EPSILON} = 8.0\n# {NODE_DELTA} = 1e-5\n")
    share = (f"{NODE_EPSILON_PER_RUN} = {per_run!r}\n{NODE_PER_RUN} = \"refuse\"\n" if per_run else
             f"# {NODE_EPSILON_PER_RUN} = 2.0\n# {NODE_PER_RUN} = \"refuse\"\n")
    return f"""\
# fedlora site settings (`fedlora site init`). Paths in [site] are relative to this folder.
[site]
name = {_toml_value(name)}
# The coordinator's public address (HOST:PORT), as the coordinator told you.
superlink = {_toml_value(superlink)}
# The consortium CA certificate: the only authority this site trusts for the coordinator.
root-certificates = "ca.crt"
# This site's private key (never share it). Send keys/site.key.pub to the coordinator.
private-key = "keys/site.key"
# Local port of this SuperNode's ClientApp API on 127.0.0.1 (not opened to the network);
# give each site on one machine its own.
runtime-port = {runtime_port}
# Keep the base model loaded between rounds in a site worker process (recommended).
worker = true

# What the fedlora ClientApp sees as its node configuration. Nothing here is sent anywhere.
[node-config]
{NODE_SITE} = {_toml_value(name)}
# The site's data file (.jsonl, .csv or .parquet); check it with `fedlora site check-data`.
{NODE_DATA_PATH} = {_toml_value(str(data))}
{NODE_SITE_INDEX} = {index}
# The site's persistent folder: its privacy ledger (spent budget) lives here. Back it up.
{NODE_STATE_DIR} = {_toml_value(str(state))}
# The site's own privacy budget for the whole collaboration. Setting it makes DP-SGD
# mandatory at this site, and the stricter of this and the run's budget applies.
{budget}# The most epsilon one run may spend here, so a short test run cannot spend the whole
# budget: sigma is calibrated to fit it, and a run whose fixed sigma would pass it is
# refused ("warn": train anyway and warn loudly). `fedlora privacy plan --site .` shows
# what is spent and what remains.
{share}# The column naming the unit of privacy (e.g. a patient id); empty: each record.
# {NODE_UNIT_COLUMN} = "patient-id"
# Answer the coordinator's drift query with aggregate figures (no record, word or label;
# docs/drift.md). Off unless set.
# {NODE_SHARE_DRIFT} = true
"""


def init_site(path: str | Path, name: str, data: Path, superlink: str, ca_cert: Path,
              epsilon: float | None = 8.0, delta: float | None = 1e-5,
              runtime_port: int = DEFAULT_RUNTIME_PORT, epsilon_per_run: float | None = None,
              key: Path | None = None, service_user: str | None = None, gpu: bool = False) -> SiteHome:
    """Create a site folder with a new key pair (or a copy of `key`, an existing OpenSSH ECDSA P-384
    private key) and its systemd unit (systemd/, run as `service_user`; `gpu`: the unit leaves
    /dev reachable); returns it (print its public key's fingerprint).
    `epsilon_per_run`: the most one run may spend (default: a quarter of `epsilon`; 0: no cap)."""
    path = Path(path).expanduser().resolve()
    if (path / SETTINGS).exists():
        raise SiteError(f"{path} already holds a site")
    if not Path(ca_cert).is_file():
        raise SiteError(f"{ca_cert}: no such file (the coordinator's ca/ca.crt)")
    try:
        if key is not None:
            check_site_key(key)
        if service_user is not None:
            check_account_name(service_user)
    except (PkiError, UnitError) as err:
        raise SiteError(str(err)) from None
    if epsilon is not None and epsilon <= 0:
        raise SiteError(f"--epsilon {epsilon}: must be > 0")
    if epsilon_per_run is None:
        epsilon_per_run = epsilon / 4 if epsilon else 0.0
    if epsilon_per_run < 0 or (epsilon and epsilon_per_run > epsilon):
        raise SiteError(f"--epsilon-per-run {epsilon_per_run}: must be between 0 (no cap) and --epsilon")
    path.mkdir(parents=True, exist_ok=True)
    state = path / "state"
    for folder in (state, path / "logs"):
        folder.mkdir(exist_ok=True)
    shutil.copyfile(ca_cert, path / "ca.crt")
    if key is None:
        generate_key_pair(path / "keys" / "site.key", comment=name)
    else:
        install_site_key(key, path / "keys" / "site.key", comment=name)
    index = zlib.crc32(name.encode()) % 100_000  # distinct seeds per site, stable across restarts
    (path / SETTINGS).write_text(_settings_text(name, superlink, runtime_port, Path(data).expanduser().resolve(),
                                                state, index, epsilon, delta if epsilon else None,
                                                epsilon_per_run or None))
    home = SiteHome.load(path)
    site_unit(home, service_user, gpu)
    return home


def privacy_state(path: str) -> tuple[Path, dict[str, Any]]:
    """A site folder's ledger folder and node config, for `fedlora privacy plan --site`."""
    home = SiteHome.load(path)
    return home.state, home.flower_node_config()


def public_key_line(home: SiteHome) -> str:
    pub = home.private_key.with_name(home.private_key.name + ".pub")
    return f"{pub} ({fingerprint(pub)})"
