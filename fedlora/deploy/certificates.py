"""The coordinator's TLS material: a private CA and a server certificate it signs.

Sites trust the CA certificate (`ca.crt`, given to each hospital out of band)
and nothing else, so a public CA is not needed. The server certificate names
every address sites use to reach the coordinator (DNS names and IPs as
subjectAltNames) plus the loopback names the coordinator's own SuperLink,
ServerApp and `fedlora run` use. Keys are ECDSA P-384; private keys are written
readable by their owner only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1")  # the SuperLink is reached on loopback by the coordinator itself
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept; rotate yearly (docs/deployment.md)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """subjectAltNames for the given host names and IP addresses, loopback included, no duplicates."""
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_NAMES]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(common_name: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(common_name)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                     days: int = SERVER_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0] if hosts else LOOPBACK_NAMES[0]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def create_tls(folder: Path, hosts: list[str], ca_name: str = "fedlora coordinator CA") -> TlsFiles:
    """A new CA and a server certificate for `hosts`, under folder/ca and folder/tls."""
    files = TlsFiles(folder / "ca" / "ca.crt", folder / "ca" / "ca.key",
                     folder / "tls" / "server.crt", folder / "tls" / "server.key")
    ca_key, ca_cert = make_ca(ca_name)
    _write_private(files.ca_key, ca_key)
    _write_cert(files.ca_cert, ca_cert)
    renew_server_cert(files, hosts)
    return files


def renew_server_cert(files: TlsFiles, hosts: list[str]) -> None:
    """Issue a fresh server key and certificate from the existing CA (rotation, or new host names)."""
    if not files.ca_key.exists():
        raise FileNotFoundError(f"{files.ca_key}: the CA private key is needed to issue a server certificate "
                                "(bring it back from offline storage)")
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key, cert = make_server_cert(ca_key, ca_cert, hosts)
    _write_private(files.server_key, key)
    _write_cert(files.server_cert, cert)


def san_names(cert: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """A certificate's subjectAltName: its DNS names and IP addresses (none without the extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    dns, ips = san_names(x509.load_pem_x509_certificate(Path(path).read_bytes()))
    return [*dns, *(str(ip) for ip in ips)]
