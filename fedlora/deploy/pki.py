"""A hospital's own certificates for the coordinator, instead of fedlora's private CA.

`fedlora coordinator init --ca-cert CA --server-cert CERT --server-key KEY` checks
the three files before anything is written, with one line naming what is wrong:

- each parses (PEM; CERT may carry the intermediate certificates after the leaf);
- KEY is the private key of CERT;
- CERT verifies against CA (the chain, its validity dates, its use for TLS servers);
- CERT names every `--host` sites dial, and both loopback names the coordinator dials
  itself: 127.0.0.1 (`fedlora run` and `flwr` reach the SuperLink there, and so does the
  built-in Fleet proxy) and localhost (the nginx proxy's upstream name);

then copies them to ca/ca.crt, tls/server.crt and tls/server.key (mode 600) and
writes tls/own-pki.txt, which tells `coordinator renew-certificate` that renewal
is the hospital PKI's job. No ca/ca.key exists in such a folder.

A site's own key (`fedlora site init --key FILE`) is checked here too: an OpenSSH
private key, ECDSA on P-384, unencrypted (the SuperNode reads it unattended).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.deploy.certificates import LOOPBACK_NAMES, TlsFiles, san_names

MARKER = "own-pki.txt"   # in tls/: the certificates came from the hospital's PKI


class PkiError(ValueError):
    pass


@dataclass(frozen=True)
class OwnTls:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PkiError(f"{what} {path}: {err.strerror or err}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PkiError(f"{what} {path}: not a PEM certificate (convert DER with "
                       "`openssl x509 -inform der -in FILE -out FILE.pem`)") from None


def _private_key(path: Path):
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PkiError(f"--server-key {path}: {err.strerror or err}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"--server-key {path}: the key is encrypted; the coordinator starts unattended, so give "
                       "it unencrypted (`openssl pkey -in KEY -out server.key`) and keep it mode 600") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"--server-key {path}: not a PEM private key") from None


def _public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def handshake(files, server_name: str) -> None:
    """A TLS handshake in memory, as a site (or the coordinator itself) makes it: the server with
    `files.server_cert` and `.server_key`, the client trusting only `.ca_cert` and checking
    `server_name` (OwnTls, or the TlsFiles fedlora generates). Raises ssl.SSLError."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(10):
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
                done.add(id(side))
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if side is client:
                    raise
            peer_in.write(out.read())
        if len(done) == 2:
            return
    raise ssl.SSLError("the TLS handshake did not complete")


def names_host(cert: x509.Certificate, host: str) -> bool:
    """Whether a TLS client dialling `host` accepts `cert`'s names (subjectAltName; a wildcard
    stands for one leftmost label of a DNS name)."""
    dns, ips = san_names(cert)
    dns = [name.lower() for name in dns]
    try:
        return ipaddress.ip_address(host) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    return any(host == name or (name.startswith("*.") and host.count(".") == name.count(".")
                                and fnmatch.fnmatchcase(host, name)) for name in dns)


def _listed_names(cert: x509.Certificate) -> str:
    dns, ips = san_names(cert)
    return ", ".join([*(name.lower() for name in dns), *(str(ip) for ip in ips)]) or "nothing (no subjectAltName)"


def _short(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def check_own_tls(files: OwnTls, hosts: list[str]) -> None:
    """Raise PkiError (one line) unless the three files make a server certificate sites and the
    coordinator itself can use."""
    cas = _certificates(files.ca_cert, "--ca-cert")
    chain = _certificates(files.server_cert, "--server-cert")
    leaf = chain[0]
    key = _private_key(files.server_key)
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise PkiError(f"--server-key {files.server_key} is not the private key of --server-cert "
                       f"{files.server_cert} ({_short(leaf)})")
    now = dt.datetime.now(dt.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise PkiError(f"--server-cert {files.server_cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        raise PkiError(f"--server-cert {files.server_cert} is not valid before "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this host's clock)")
    required = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    missing = [h for h in required if not names_host(leaf, h)]
    if missing:
        why = [f"{h} (a --host)" if h in hosts else
               f"{h} (the coordinator dials its own SuperLink there)" for h in missing]
        raise PkiError(f"--server-cert {files.server_cert} does not name {', '.join(why)}; it names "
                       f"{_listed_names(leaf)}: have your PKI "
                       "issue one with these subjectAltNames")
    try:
        handshake(files, LOOPBACK_NAMES[1])
    except ssl.SSLCertVerificationError as err:
        issuer = leaf.issuer.rfc4514_string()
        subjects = "; ".join(_short(c) for c in cas)
        raise PkiError(f"--server-cert {files.server_cert} (issued by {issuer}) does not verify against "
                       f"--ca-cert {files.ca_cert} ({subjects}): {err.verify_message}") from None
    except ssl.SSLError as err:
        raise PkiError(f"--server-cert {files.server_cert} with --server-key {files.server_key}: a TLS handshake "
                       f"fails: {err.reason or err}") from None


def import_tls(folder: Path, files: OwnTls, hosts: list[str]) -> TlsFiles:
    """Check, then copy the hospital's certificates into folder/ca and folder/tls (no CA key)."""
    check_own_tls(files, hosts)
    target = TlsFiles(folder / "ca" / "ca.crt", folder / "ca" / "ca.key",
                      folder / "tls" / "server.crt", folder / "tls" / "server.key")
    for path in (target.ca_cert, target.server_cert):
        path.parent.mkdir(parents=True, exist_ok=True)
    target.ca_cert.write_bytes(Path(files.ca_cert).read_bytes())
    target.server_cert.write_bytes(Path(files.server_cert).read_bytes())
    fd = os.open(target.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(Path(files.server_key).read_bytes())
    os.chmod(target.server_key, 0o600)
    (target.server_cert.parent / MARKER).write_text(
        "The TLS certificate and key in this folder, and ../ca/ca.crt, come from the hospital's own PKI\n"
        f"(copied by `fedlora coordinator init` from {files.server_cert}, {files.server_key}, {files.ca_cert}).\n"
        "fedlora holds no CA key for them: renew server.crt with that PKI, naming the same hosts\n"
        "plus localhost and 127.0.0.1, copy it and its key here (key mode 600), restart the coordinator.\n")
    return target


def own_pki(tls: TlsFiles) -> bool:
    """Whether a coordinator's certificates came from the hospital's PKI (`init --ca-cert ...`)."""
    return (tls.server_cert.parent / MARKER).exists()


# -- a site's own key -------------------------------------------------------------------------
def check_site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An existing site key for `fedlora site init --key`: OpenSSH private key, ECDSA P-384,
    not encrypted."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PkiError(f"--key {path}: {err.strerror or err}") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"--key {path}: the key is encrypted; the SuperNode reads it unattended, so remove the "
                       "passphrase (`ssh-keygen -p -N \"\" -f KEY`)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"--key {path}: not an OpenSSH private key (make one with "
                       "`ssh-keygen -t ecdsa -b 384 -N \"\" -f site.key`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        kind = f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise PkiError(f"--key {path}: a {kind} key; a site key is ECDSA on P-384 "
                       "(`ssh-keygen -t ecdsa -b 384`)")
    return key


def install_site_key(source: Path, private_path: Path, comment: str = "") -> Path:
    """Copy a checked site key to private_path (mode 600) and write its public key beside it."""
    key = check_site_key(source)
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists; refusing to overwrite a site key")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(Path(source).read_bytes())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(public + (f" {comment}".encode() if comment else b"") + b"\n")
    return public_path

