"""Key material for a test deployment: a CA, a SuperLink certificate, SuperNode keys.

Everything is made with the ``cryptography`` package; nothing here implements a primitive.

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384, SHA-384). Give
  ``ca.crt`` to every site (``--root-certificates``); keep ``ca.key`` offline.
* ``server.crt`` / ``server.key``: the SuperLink's TLS certificate signed by the CA, with the
  given host names and IP addresses as subject alternative names (``localhost``,
  ``127.0.0.1`` and ``::1`` are always included).
* ``superexec.secret``: 32 random bytes that authenticate privml's ServerApp executor to the
  SuperLink's Runtime API (Flower's ``--superexec-auth-secret-file``). Without it, anyone who
  can reach the SuperLink port can claim the ServerApp task of a run.
* ``supernode-<site>.key`` / ``.pub`` (one pair per site named with ``sites``): ECDSA P-384 keys
  in OpenSSH format for Flower's SuperNode authentication (``--enable-supernode-auth``). The
  coordinator registers each ``.pub`` with ``privml flower register-node``; the site keeps its
  ``.key``.

Private keys are written with mode 0600. These certificates are for test deployments: a real
deployment should take the SuperLink certificate from the organisation's own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privml.errors import UsageError

__all__ = ["DeploymentKeys", "generate_certificates"]

_SITE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$"
)
_ALWAYS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DeploymentKeys:
    """Paths of the files :func:`generate_certificates` wrote."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    supernode_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """site name -> (private key, public key), OpenSSH format."""


def _write(path: Path, data: bytes, *, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _split_hosts(
    hosts: Sequence[str],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    bad: list[str] = []
    for h in [*_ALWAYS, *hosts]:
        if not isinstance(h, str):
            raise TypeError(
                f"The 'hosts' parameter of generate_certificates must hold strings. Got {h!r}."
            )
        h = h.strip()
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            if not _HOST_RE.match(h):
                bad.append(h)
            elif h.lower() not in names:
                names.append(h.lower())
        else:
            if ip not in ips:
                ips.append(ip)
    if bad:
        raise UsageError(
            f"The 'hosts' parameter of generate_certificates must hold DNS names or IP "
            f"addresses. Got {bad} instead; pass e.g. --host coordinator.example.org "
            "--host 10.0.0.5."
        )
    return names, ips


def generate_certificates(
    folder: str | Path,
    *,
    hosts: Sequence[str] = (),
    sites: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> DeploymentKeys:
    """Write a test CA, a SuperLink certificate, a SuperExec secret and SuperNode keys.

    Args:
        folder: where to write (created if missing).
        hosts: extra DNS names / IP addresses the SuperLink is reached at (subject alternative
            names); ``localhost``, ``127.0.0.1`` and ``::1`` are always included.
        sites: site names to make a SuperNode authentication key pair for.
        days: validity of the certificates, in days (1..3650).
        overwrite: replace existing files; otherwise an existing CA or server key is an error
            (so a deployment's keys are never silently rotated).

    Returns:
        The paths written, as :class:`DeploymentKeys`.
    """
    if isinstance(days, bool) or not isinstance(days, int):
        raise TypeError(
            f"The 'days' parameter of generate_certificates must be an int. Got {days!r}."
        )
    if not 1 <= days <= 3650:
        raise UsageError(
            "The 'days' parameter of generate_certificates must be in [1, 3650]. "
            f"Got {days} instead."
        )
    if isinstance(sites, str):
        sites = [s for s in sites.split(",") if s]
    bad_sites = [s for s in sites if not isinstance(s, str) or not _SITE_RE.match(s)]
    if bad_sites:
        raise UsageError(
            f"The 'sites' parameter of generate_certificates must hold site names made of "
            f"letters, digits, '_', '.', '-'. Got {bad_sites} instead."
        )
    names, ips = _split_hosts(hosts)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"The certificate folder {str(out)!r} exists and is not a folder; pick another path."
        )
    out.mkdir(parents=True, exist_ok=True)
    keys = DeploymentKeys(
        folder=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        superexec_secret=out / "superexec.secret",
    )
    existing = [p.name for p in (keys.ca_key, keys.server_key, keys.superexec_secret) if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{str(out)!r} already holds {existing}; pass overwrite=True (--overwrite) to replace "
            "them, or choose an empty folder."
        )

    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privml test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ip) for ip in ips]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write(keys.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(keys.ca_key, _pem_key(ca_key), private=True)
    _write(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(keys.server_key, _pem_key(server_key), private=True)
    _write(keys.superexec_secret, secrets.token_bytes(32), private=True)

    for site in sites:
        node_key = ec.generate_private_key(ec.SECP384R1())
        priv = out / f"supernode-{site}.key"
        pub = out / f"supernode-{site}.pub"
        _write(
            priv,
            node_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            private=True,
        )
        _write(
            pub,
            node_key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" privml-{site}\n".encode(),
            private=False,
        )
        keys.supernode_keys[site] = (priv, pub)
    return keys
