"""A throwaway certificate authority for the local sandbox, built with the ``openssl`` CLI.

The sandbox broker (Mosquitto) and every sandbox client authenticate with X.509 certificates,
exactly as AWS IoT Core does, so the agent's mTLS code path is the one that runs in production.
The facts that shape the certificates (see ``jobs-mqtt-api.md`` section 3.3):

* awscrt always verifies the server's hostname, and the sandbox connects to ``127.0.0.1``, so the
  server certificate carries ``IP:127.0.0.1`` (and ``DNS:localhost``) as subject alternative names.
* Mosquitto's ``use_identity_as_username`` turns a client certificate's CN into the MQTT user name
  that the ACL's ``%u`` pattern matches, so a client certificate's CN *is* its thing name.

We shell out to ``openssl`` rather than use the ``cryptography`` package because the sandbox ships
in the agent's package and the agent's runtime dependencies stay small. Keys are EC P-256: key
generation is instant (RSA 2048 takes a noticeable fraction of a second per key) and both
awscrt (s2n) and Mosquitto (OpenSSL) accept it.

Everything is idempotent: files already on disk are reused as long as they still chain to the CA,
so a sandbox directory survives restarts and the clients' trust configuration stays valid.
Concurrent creators (two test workers, a test run next to a user's sandbox) are serialised with an
``flock`` on ``<dir>/.lock`` and files appear atomically (written aside, then renamed).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Identity", "Pki", "certificate_id", "create_pki"]

VALIDITY_DAYS = 3650
"""About ten years: sandbox certificates must never expire under a long-lived checkout."""

SERVER_STEM = "server"
"""File stem of the broker's identity (``server.pem``/``server.key``); its CN is ``localhost``."""

_NAME_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
"""AWS IoT's thing-name alphabet. It is also safe as a file name, as an unquoted openssl config
value and as a Mosquitto user name (which must not contain ``+``, ``#`` or ``/`` for ``%u``)."""

_INSTALL_HINT = "install it with `apt-get install -y openssl`"
_CA_CN = "iot-jobs-agent sandbox CA"
_FOREIGN_CA_CN = "iot-jobs-agent sandbox FOREIGN CA (untrusted)"

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
# Our own minimal config instead of the system openssl.cnf: its location and defaults differ
# between distributions (and OPENSSL_CONF may point anywhere), which would make the CA differ too.

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
# digitalSignature alone is right for an EC key (ECDHE_ECDSA signs; there is no RSA key transport).

_CSR_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
"""


@dataclass(frozen=True)
class Identity:
    """One certificate and its private key, as file paths (what both awscrt and Mosquitto take).

    Parameters:
        name: the certificate's subject CN: for a client, its thing name and MQTT user name;
            ``localhost`` for the broker.
        cert: PEM certificate (leaf only; the CA is ``Pki.ca_cert``).
        key: PEM private key, mode 0600.
    """

    name: str
    cert: Path
    key: Path

    @property
    def certificate_id(self) -> str:
        """AWS IoT's certificateId: the SHA-256 of the DER certificate, in lowercase hex."""
        return certificate_id(self.cert.read_text())


@dataclass(frozen=True)
class Pki:
    """The sandbox CA, the broker's identity, and a factory for client identities.

    Parameters:
        dir: directory holding everything (mode 0700).
        ca_cert: the CA certificate: the broker's ``cafile`` and the clients' ``ca_filepath``.
        ca_key: the CA's private key, kept so clients can be issued later.
        server: the broker's identity (SAN ``DNS:localhost``, ``IP:127.0.0.1``; serverAuth).
    """

    dir: Path
    ca_cert: Path
    ca_key: Path
    server: Identity

    def client(self, name: str) -> Identity:
        """Return the client identity ``name`` (CN=name, clientAuth), issuing it if needed.

        A certificate already on disk is reused when it still chains to this CA, so a thing keeps
        its identity across sandbox runs; a stale one (the CA was recreated) is replaced.
        """
        _check_name(name)
        clients = self.dir / "clients"
        with _locked(self.dir):
            _make_dir(clients)
            return _leaf(
                clients, name, cn=name, eku="clientAuth", ca_cert=self.ca_cert, ca_key=self.ca_key
            )

    def foreign_client(self, name: str) -> Identity:
        """Return a client identity ``name`` signed by another CA, one the broker never trusts.

        It exists for "bad certificate" tests: the certificate is well formed and has the right CN,
        so the only reason the broker can refuse it is the untrusted issuer.
        """
        _check_name(name)
        foreign = self.dir / "foreign"
        with _locked(self.dir):
            _make_dir(foreign / "clients")  # leaves apart from ca.pem: "ca" is a valid thing name
            ca_cert, ca_key = _ca(foreign, cn=_FOREIGN_CA_CN)
            return _leaf(
                foreign / "clients", name, cn=name, eku="clientAuth", ca_cert=ca_cert, ca_key=ca_key
            )

    @property
    def foreign_ca_cert(self) -> Path:
        """The foreign CA's certificate (created on demand): a trust store the broker fails.

        A client given this as ``ca_filepath`` must refuse the broker, which tests the
        server-certificate side of certificate validation.
        """
        foreign = self.dir / "foreign"
        with _locked(self.dir):
            _make_dir(foreign)
            ca_cert, _ = _ca(foreign, cn=_FOREIGN_CA_CN)
        return ca_cert


def certificate_id(pem: str) -> str:
    """The SHA-256 of the first certificate in ``pem``'s DER bytes, as AWS IoT names it."""
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----")[0]
    return hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest()


def create_pki(directory: Path) -> Pki:
    """Create (or reuse) the sandbox CA and the broker's certificate under ``directory``.

    Raises:
        RuntimeError: ``openssl`` is missing or failed; the message says what to install or fix.
    """
    directory = Path(directory).absolute()
    _make_dir(directory)
    with _locked(directory):
        ca_cert, ca_key = _ca(directory, cn=_CA_CN)
        server = _leaf(
            directory,
            SERVER_STEM,
            cn="localhost",
            eku="serverAuth",
            ca_cert=ca_cert,
            ca_key=ca_key,
            san="DNS:localhost, IP:127.0.0.1",
        )
    return Pki(dir=directory, ca_cert=ca_cert, ca_key=ca_key, server=server)


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid identity name {name!r}: use 1-128 characters from A-Z a-z 0-9 : _ -"
        )


def _make_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (and tighten an existing one): it holds private keys."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    """Run ``openssl args...``, return its stdout; any failure becomes a one-line RuntimeError."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError(f"openssl not found: {_INSTALL_HINT}")
    env = dict(os.environ, OPENSSL_CONF=os.devnull)  # no surprises from a site-wide config
    try:
        done = subprocess.run(
            [exe, *args], input=stdin, capture_output=True, env=env, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"openssl {args[0]} could not run ({exc}): {_INSTALL_HINT}") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[0] if lines else f"exit status {done.returncode}"
        raise RuntimeError(
            f"openssl {args[0]} failed: {detail} (needs OpenSSL >= 1.1.1; {_INSTALL_HINT})"
        )
    return done.stdout


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` beside ``path`` with ``mode`` from the start, then rename it into place.

    The mode is set at creation (never a world-readable key, even briefly) and the rename means a
    crash can leave a stray temporary file but never a truncated key or certificate.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _new_key(path: Path) -> None:
    pem = _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _write_atomic(path, pem, 0o600)


def _serial() -> str:
    # Random 63-bit serials (no .srl file to keep in sync); RFC 5280 wants them positive and unique.
    return str(secrets.randbits(63) | 1)


def _ca(directory: Path, *, cn: str) -> tuple[Path, Path]:
    """Return ``(ca.pem, ca.key)`` in ``directory``; create a new CA if either is missing."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    if cert.is_file() and key.is_file():
        os.chmod(key, 0o600)
        return cert, key
    _new_key(key)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        config = Path(tmp) / "ca.cnf"
        config.write_text(_CA_CONFIG.format(cn=cn))
        pem = _openssl(
            "req", "-new", "-x509", "-config", str(config), "-key", str(key),
            "-sha256", "-days", str(VALIDITY_DAYS), "-set_serial", _serial(),
        )  # fmt: skip
    _write_atomic(cert, pem, 0o644)
    return cert, key


def _chains_to(cert: Path, ca_cert: Path) -> bool:
    """True if ``cert`` was issued by ``ca_cert`` and is currently valid."""
    try:
        _openssl("verify", "-CAfile", str(ca_cert), str(cert))
    except RuntimeError:
        return False
    return True


def _leaf(
    directory: Path,
    stem: str,
    *,
    cn: str,
    eku: str,
    ca_cert: Path,
    ca_key: Path,
    san: str | None = None,
) -> Identity:
    """Return the identity ``<stem>.pem``/``<stem>.key`` in ``directory``, issued if needed."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    if cert.is_file() and key.is_file() and _chains_to(cert, ca_cert):
        os.chmod(key, 0o600)
        return Identity(name=cn, cert=cert, key=key)
    _new_key(key)
    extensions = _LEAF_EXTENSIONS.format(eku=eku)
    if san:
        extensions += f"subjectAltName = {san}\n"
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        config, extfile = Path(tmp) / "csr.cnf", Path(tmp) / "leaf.ext"
        config.write_text(_CSR_CONFIG.format(cn=cn))
        extfile.write_text(extensions)
        csr = _openssl("req", "-new", "-config", str(config), "-key", str(key))
        pem = _openssl(
            "x509", "-req", "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", _serial(), "-days", str(VALIDITY_DAYS), "-sha256",
            "-extfile", str(extfile),
            stdin=csr,
        )  # fmt: skip
    _write_atomic(cert, pem, 0o644)
    return Identity(name=cn, cert=cert, key=key)
