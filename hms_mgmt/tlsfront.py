"""A real TLS endpoint for Temporal on one machine, for tests and scripts.

The dev server speaks only plaintext gRPC, so :class:`TlsFront` puts HAProxy in ``mode tcp``
before it: it terminates TLS (ALPN ``h2``, which gRPC clients require), with
``verify required`` against a client CA for mTLS, and pipes the bytes to the dev server.
:func:`make_pki` writes the certificates it needs: a CA, a server certificate for chosen names,
a client certificate, and a second CA that signed none of them.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hms_mgmt.devserver import end_process, free_port, require_program, start_listener
from hms_mgmt.errors import HmsError
from hms_mgmt.files import atomic_write


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca`` signed ``server`` (cert + key in one file, for HAProxy) and
    ``client_cert``/``client_key``; ``other_ca`` signed nothing here."""

    ca: Path
    ca_key: Path
    server: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_pki(directory: Path, server_names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pki:
    """A CA and the certificates it signs, written under ``directory``; ``server_names`` are the
    server certificate's subject alternative names (IP addresses or DNS names)."""
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("hms test CA")
    _, other_ca_cert = _ca("another CA")
    server_key, server_cert = _leaf(server_names[0], ca_key, ca_cert, server_names=server_names)
    client_key, client_cert = _leaf("hms-client", ca_key, ca_cert, server_names=())

    def pem(obj: object) -> bytes:
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                     serialization.NoEncryption())
        return obj.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]

    pki = Pki(ca=directory / "ca.pem", ca_key=directory / "ca.key", server=directory / "server.pem",
              client_cert=directory / "client.pem", client_key=directory / "client.key",
              other_ca=directory / "other-ca.pem")
    atomic_write(pki.ca, pem(ca_cert), mode=0o644)
    atomic_write(pki.ca_key, pem(ca_key), mode=0o600)
    atomic_write(pki.server, pem(server_cert) + pem(server_key), mode=0o600)
    atomic_write(pki.client_cert, pem(client_cert), mode=0o644)
    atomic_write(pki.client_key, pem(client_key), mode=0o600)
    atomic_write(pki.other_ca, pem(other_ca_cert), mode=0o644)
    return pki


def _ca(name: str):  # -> (private key, certificate)
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, builder.sign(key, _sha256())


def _leaf(name: str, ca_key, ca_cert, *, server_names: tuple[str, ...]):  # -> (private key, certificate)
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                                        critical=False)
    return key, builder.sign(ca_key, _sha256())


def _general_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _validity(builder):
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


class TlsFront:
    """HAProxy terminating TLS on ``127.0.0.1:<port>`` and forwarding to ``target`` (host:port):
    server TLS with ``server_pem``, and with ``client_ca`` a client certificate signed by it is
    required (mTLS)."""

    def __init__(self, *, target: str, server_pem: Path, work_dir: Path, client_ca: Path | None = None) -> None:
        self.target = target
        self.server_pem = server_pem
        self.client_ca = client_ca
        self.work_dir = work_dir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def config(self) -> str:
        verify = f" ca-file {self.client_ca} verify required" if self.client_ca else ""
        return (
            "global\n  log stderr format raw local0 err\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"
            f"frontend temporal_tls\n  bind {self.address} ssl crt {self.server_pem} alpn h2{verify}\n"
            "  default_backend temporal\n"
            f"backend temporal\n  server dev {self.target}\n"
        )

    def start(self, timeout: float = 10.0) -> None:
        binary = require_program("haproxy", "haproxy")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.work_dir / "haproxy.cfg"
        atomic_write(cfg, self.config().encode(), mode=0o600)
        log = self.work_dir / "haproxy.log"
        self.proc, listening = start_listener([binary, "-db", "-f", str(cfg)], log, self.host, self.port, timeout,
                                              stdin=subprocess.DEVNULL)
        if not listening:
            self.stop()
            raise HmsError(f"haproxy did not listen on {self.address}:\n{log.read_text(errors='replace')}")

    def stop(self) -> None:
        end_process(self.proc, 5)

    def __enter__(self) -> TlsFront:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
