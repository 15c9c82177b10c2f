"""A hospital's own PKI: certificates made here with `cryptography` (not fedlora's generator),
accepted by `coordinator init`, or refused with one line naming what is wrong; a site's own key."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.cli import main as fedlora_main
from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome, init_coordinator
from fedlora.deploy.keys import fingerprint
from fedlora.deploy.pki import OwnTls, own_pki
from fedlora.deploy.site_home import SiteError, init_site

HOSTS = ["fl.hospital.example", "10.1.2.3"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Hospital"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, signer=None):
    """A CA (RSA, as many hospital PKIs are), self-signed or signed by `signer` (key, cert)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    issuer_key, issuer_name = (key, _name(cn)) if signer is None else (signer[0], signer[1].subject)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return key, cert


def _server(signer, names: list[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(signer[1].subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signer[0], hashes.SHA256()))
    return key, cert


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _files(folder, ca, server, chain=(), key=None) -> OwnTls:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(_pem(ca[1]))
    (folder / "server.pem").write_bytes(_pem(server[1]) + b"".join(_pem(c) for c in chain))
    (folder / "server-key.pem").write_bytes(_key_pem(key or server[0]))
    return OwnTls(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")


def test_coordinator_init_takes_the_hospitals_certificates(tmp_path, capsys):
    root = _ca("Example Hospital Root CA")
    issuing = _ca("Example Hospital Issuing CA", signer=root)
    server = _server(issuing, [*HOSTS, "localhost", "127.0.0.1"])
    own = _files(tmp_path / "pki", root, server, chain=[issuing[1]])  # leaf then intermediate, root trusted
    assert fedlora_main(["coordinator", "init", str(tmp_path / "c"), *sum((["--host", h] for h in HOSTS), []),
                         "--ca-cert", str(own.ca_cert), "--server-cert", str(own.server_cert),
                         "--server-key", str(own.server_key)]) == 0
    out = capsys.readouterr().out
    assert "your PKI's" in out and "ca.key" not in out
    home = CoordinatorHome.load(tmp_path / "c")
    assert home.tls.ca_cert.read_bytes() == own.ca_cert.read_bytes()
    assert home.tls.server_cert.read_bytes() == own.server_cert.read_bytes()
    assert stat.S_IMODE(home.tls.server_key.stat().st_mode) == 0o600
    assert not home.tls.ca_key.exists() and not (tmp_path / "c" / "ca" / "ca.key").exists()
    assert own_pki(home.tls)
    assert "root-certificates" in (home.flwr_home / "config.toml").read_text()
    # Renewal belongs to the hospital's PKI.
    assert fedlora_main(["coordinator", "renew-certificate", "--dir", str(home.path)]) == 1
    err = capsys.readouterr().err
    assert "your own PKI" in err and "renew it there" in err
    assert home.tls.server_cert.read_bytes() == own.server_cert.read_bytes()


def test_a_wildcard_certificate_names_the_host(tmp_path):
    ca = _ca("Example Hospital CA")
    own = _files(tmp_path / "pki", ca, _server(ca, ["*.hospital.example", "localhost", "127.0.0.1"]))
    home = init_coordinator(tmp_path / "c", ["fl.hospital.example"], own_tls=own)
    assert own_pki(home.tls)
    with pytest.raises(CoordinatorError, match=r"does not name a\.b\.hospital\.example \(a --host\)"):
        init_coordinator(tmp_path / "c2", ["a.b.hospital.example"], own_tls=own)  # one label only


@pytest.mark.parametrize("case, message", [
    ("mismatched key", r"--server-key \S+ is not the private key of --server-cert"),
    ("wrong CA", r"--server-cert \S+ \(issued by .*Other CA.*\) does not verify against --ca-cert"),
    ("missing host", r"does not name 10\.1\.2\.3 \(a --host\); it names fl\.hospital\.example, localhost, 127\.0\.0\.1"),
    ("missing loopback", r"does not name 127\.0\.0\.1 \(the coordinator dials its own SuperLink there\)"),
    ("not a certificate", r"--server-cert \S+: not a PEM certificate"),
])
def test_bad_certificates_are_refused_with_one_clear_line(tmp_path, capsys, case, message):
    ca = _ca("Example Hospital CA")
    server = _server(ca, [*HOSTS, "localhost", "127.0.0.1"])
    if case == "mismatched key":
        own = _files(tmp_path / "pki", ca, server, key=ec.generate_private_key(ec.SECP256R1()))
    elif case == "wrong CA":
        own = _files(tmp_path / "pki", ca, _server(_ca("Other CA"), [*HOSTS, "localhost", "127.0.0.1"]))
    elif case == "missing host":
        own = _files(tmp_path / "pki", ca, _server(ca, ["fl.hospital.example", "localhost", "127.0.0.1"]))
    elif case == "missing loopback":
        own = _files(tmp_path / "pki", ca, _server(ca, [*HOSTS, "localhost"]))
    else:
        own = _files(tmp_path / "pki", ca, server)
        own.server_cert.write_text("hello\n")
    with pytest.raises(CoordinatorError, match=message):
        init_coordinator(tmp_path / "c", HOSTS, own_tls=own)
    assert not (tmp_path / "c").exists()  # refused before anything was written
    argv = ["coordinator", "init", str(tmp_path / "c"), *sum((["--host", h] for h in HOSTS), []),
            "--ca-cert", str(own.ca_cert), "--server-cert", str(own.server_cert), "--server-key", str(own.server_key)]
    assert fedlora_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedlora coordinator init: ")


def test_own_certificates_come_as_three(tmp_path, capsys):
    ca = _ca("Example Hospital CA")
    own = _files(tmp_path / "pki", ca, _server(ca, ["localhost", "127.0.0.1"]))
    assert fedlora_main(["coordinator", "init", str(tmp_path / "c"), "--ca-cert", str(own.ca_cert),
                         "--server-cert", str(own.server_cert)]) == 1
    assert "missing --server-key" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# -- a site's own key ---------------------------------------------------------------------
def _openssh(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


@pytest.fixture()
def site_inputs(tmp_path):
    coord = init_coordinator(tmp_path / "c", [])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "x", "label": "y"}\n')
    return coord.tls.ca_cert, data


def test_site_init_takes_an_existing_key(tmp_path, site_inputs, capsys):
    ca, data = site_inputs
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "mine.key").write_bytes(_openssh(key))
    assert fedlora_main(["site", "init", str(tmp_path / "s"), "--name", "hospital-a", "--data", str(data),
                         "--superlink", "fl.example.org:9092", "--ca", str(ca), "--key", str(tmp_path / "mine.key")]) == 0
    private = tmp_path / "s" / "keys" / "site.key"
    assert private.read_bytes() == (tmp_path / "mine.key").read_bytes()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert (tmp_path / "s" / "keys" / "site.key.pub").read_bytes().split()[1] == public.split()[1]
    assert fingerprint(tmp_path / "s" / "keys" / "site.key.pub") in capsys.readouterr().out


@pytest.mark.parametrize("key, message", [
    (ec.generate_private_key(ec.SECP256R1()), "a ECDSA secp256r1 key; a site key is ECDSA on P-384"),
    (ed25519.Ed25519PrivateKey.generate(), "a Ed25519PrivateKey key; a site key is ECDSA on P-384"),
    (None, "not an OpenSSH private key"),
])
def test_site_init_refuses_a_key_flower_cannot_use(tmp_path, site_inputs, key, message):
    ca, data = site_inputs
    path = tmp_path / "bad.key"
    path.write_bytes(_openssh(key) if key is not None else _key_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(SiteError, match=message):
        init_site(tmp_path / "s", "hospital-a", data, "fl.example.org:9092", ca, key=path)
    assert not (tmp_path / "s").exists()
