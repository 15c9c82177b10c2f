"""A site's authentication key pair, in the format Flower's SuperNode expects.

ECDSA on NIST P-384, written exactly as `ssh-keygen -t ecdsa -b 384 -N ""`
would: an OpenSSH private key (owner-readable only) and a one-line
`ecdsa-sha2-nistp384 ...` public key. The private key never leaves the site;
the coordinator registers the public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def generate_key_pair(private_path: Path, comment: str = "") -> Path:
    """Write private_path and private_path + '.pub'; returns the public key's path."""
    private_path = Path(private_path)
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists; refusing to overwrite a site key")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(public + (f" {comment}".encode() if comment else b"") + b"\n")
    return public_path


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site public key, checked to be what Flower accepts (ECDSA on P-384, P-256 or P-521)."""
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: not an ECDSA key ({type(key).__name__}); create one with `fedlora site init`")
    return key


def fingerprint(path: Path) -> str:
    """OpenSSH-style SHA256 fingerprint, to compare keys over the phone before registering one."""
    blob = Path(path).read_text().split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
