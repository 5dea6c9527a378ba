"""A private Mosquitto broker on loopback that authenticates and authorises like AWS IoT Core.

The sandbox needs a broker that behaves like AWS IoT for the parts the agent depends on: mutual
TLS, the certificate's CN as the client's identity, and a per-thing topic policy. Mosquitto 2.x
does all of that with a small generated config:

* one TLS listener on ``127.0.0.1:<port>`` with ``require_certificate true`` and
  ``use_identity_as_username true``: the client certificate's CN becomes the MQTT user name;
* an ACL file: ``pattern readwrite $aws/things/%u/jobs/#`` (and
  ``$aws/commands/things/%u/executions/#``) confines every thing to its own Jobs (and Commands)
  topics (a refused QoS 1 publish gets PUBACK reason code 135, *not authorized*), and each service
  identity (the Jobs emulator) may use ``$aws/things/+/jobs/#`` for all things.

Mosquitto quirks this module works around (2.0.11):

* Started as root, Mosquitto drops privileges to user ``mosquitto`` *before* reading the
  certificates, which then sit unreadable in our 0700 directory. The config therefore names the
  current user (``user root`` makes it keep root, with a warning in the log; as a normal user the
  option is ignored).
* A subscription the ACL forbids still gets a *successful* SUBACK; the ACL is applied per message
  at delivery, so the subscriber simply receives nothing.
* ``log_dest file`` only starts logging after the config is parsed, so config and bind errors
  would be lost. We log to stderr and point the child's stderr at ``mosquitto.log`` instead.

The broker runs as a child process in our process group (not daemonised), so a Ctrl-C in a
terminal stops it together with the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agent.sandbox.pki import Pki

__all__ = ["Broker", "start_broker"]

HOST = "127.0.0.1"
"""Loopback only: the sandbox broker must never be reachable from the network."""

READY_TIMEOUT = 10.0
"""Seconds to wait for a freshly started broker to accept TCP connections."""

STOP_TIMEOUT = 5.0
"""Seconds between SIGTERM and SIGKILL; Mosquitto normally exits within milliseconds."""

START_ATTEMPTS = 5
"""Tries when the port is taken (a picked port raced away, or a restart found it briefly busy)."""

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
"""Debian and Ubuntu install ``mosquitto`` in /usr/sbin, which a normal user's PATH often lacks."""

_INSTALL_HINT = "install it with `apt-get install -y mosquitto`"
_MISSING = f"mosquitto not found: {_INSTALL_HINT}"
_ADDRESS_IN_USE = "Address already in use"


class _PortBusyError(RuntimeError):
    """Mosquitto could not bind its port; worth retrying (same port after a pause, or a new one)."""


@dataclass
class Broker:
    """A running Mosquitto child process (see :func:`start_broker`).

    Use it as a context manager, or call :meth:`stop`. :meth:`restart` keeps the port, so
    connected clients can find the broker again, as they would after an AWS IoT endpoint blip.

    Parameters:
        host: always ``127.0.0.1``.
        port: the TLS listener's port.
        pki: the certificates the broker serves and trusts.
        dir: holds ``mosquitto.conf``, ``acl`` and ``mosquitto.log``.
        process: the current Mosquitto process (replaced by :meth:`restart`).
        service_identities: CNs allowed to use every thing's Jobs topics.
    """

    host: str
    port: int
    pki: Pki
    dir: Path
    process: subprocess.Popen[bytes]
    service_identities: tuple[str, ...] = field(default=("jobs-emulator",))

    @property
    def conf_path(self) -> Path:
        """The generated ``mosquitto.conf``."""
        return self.dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """Mosquitto's log (all its runs appended): the first place to look when a test fails."""
        return self.dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        """Whether the Mosquitto process is alive."""
        return self.process.poll() is None

    def start(self) -> None:
        """Start Mosquitto again on the same port and wait until it accepts TCP connections.

        A no-op if it is running. Retries for a few seconds if the port is still busy.

        Raises:
            RuntimeError: Mosquitto is missing or exited; the message carries its log's tail.
        """
        if self.running:
            return
        for attempt in range(START_ATTEMPTS):
            try:
                self.process = _launch(self.conf_path, self.log_path, self.port)
                return
            except _PortBusyError:
                if attempt == START_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def stop(self) -> None:
        """Stop Mosquitto: SIGTERM, wait, then SIGKILL. Idempotent.

        Connected clients see the connection drop (as in a broker outage); nothing persists.
        """
        process = self.process
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port; returns once the broker accepts TCP again."""
        self.stop()
        self.start()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_broker(
    directory: Path,
    pki: Pki,
    *,
    port: int | None = None,
    service_identities: Sequence[str] = ("jobs-emulator",),
) -> Broker:
    """Write ``mosquitto.conf`` and ``acl`` into ``directory``, start Mosquitto and wait for it.

    Parameters:
        directory: created with mode 0700 if missing; config and log go here.
        pki: from :func:`agent.sandbox.pki.create_pki`; ``pki.server`` is the broker's identity.
        port: the loopback port to listen on; ``None`` picks a free one.
        service_identities: certificate CNs that may read and write every thing's Jobs topics.

    Raises:
        RuntimeError: Mosquitto is missing, or failed to start (the message has its log's tail).
        ValueError: a service identity is not a valid name.
    """
    directory = Path(directory).absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    services = tuple(service_identities)
    acl = directory / "acl"
    acl.write_text(_acl_text(services))
    conf = directory / "mosquitto.conf"
    log = directory / "mosquitto.log"
    for attempt in range(START_ATTEMPTS):
        chosen = port if port is not None else _free_port()
        conf.write_text(_conf_text(chosen, pki, acl))
        try:
            process = _launch(conf, log, chosen)
        except _PortBusyError:
            if attempt == START_ATTEMPTS - 1:
                raise
            if port is not None:  # the caller's port: wait for it; a picked one: pick again
                time.sleep(0.2 * (attempt + 1))
            continue
        return Broker(
            host=HOST,
            port=chosen,
            pki=pki,
            dir=directory,
            process=process,
            service_identities=services,
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found is None:
        found = shutil.which("mosquitto", path=os.pathsep.join(_SBIN_DIRS))
    if found is None:
        raise RuntimeError(_MISSING)
    return found


def _free_port() -> int:
    """Ask the kernel for a free loopback port (it can race away before Mosquitto binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _current_user() -> str | None:
    """The user Mosquitto should run as: ourselves (see the module docstring); None if unnamed.

    Only root's value matters (Mosquitto ignores ``user`` unless started as root); for anyone
    else the line just documents who ran it.
    """
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # an arbitrary container uid without a passwd entry
        return "root" if os.geteuid() == 0 else None


def _port_free(port: int) -> bool:
    """Whether we could bind ``port`` now, with SO_REUSEADDR as Mosquitto does.

    Checked before spawning because the readiness probe cannot tell Mosquitto's listener from
    someone else's: on a taken port it would succeed just before Mosquitto dies of EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _check_conf_value(value: str) -> str:
    if "\n" in value or "\r" in value or value != value.strip():
        raise ValueError(f"cannot write {value!r} into mosquitto.conf")
    return value


def _conf_text(port: int, pki: Pki, acl: Path) -> str:
    user = _current_user()
    lines = [
        "# Generated by agent.sandbox.broker; rewritten on every start_broker().",
        "persistence false",
        # See the module docstring: keep our own uid so the 0700 PKI directory stays readable.
        f"user {user}" if user else "# user: unnamed uid, Mosquitto keeps it",
        "log_dest stderr",
        "log_type all",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
        "allow_anonymous false",
        f"acl_file {_check_conf_value(str(acl))}",
        "",
        f"listener {port} {HOST}",
        "set_tcp_nodelay true",
        f"cafile {_check_conf_value(str(pki.ca_cert))}",
        f"certfile {_check_conf_value(str(pki.server.cert))}",
        f"keyfile {_check_conf_value(str(pki.server.key))}",
        "require_certificate true",
        "use_identity_as_username true",
        "",
    ]
    return "\n".join(lines)


def _acl_text(service_identities: Sequence[str]) -> str:
    lines = [
        "# Generated by agent.sandbox.broker. %u is the client certificate's CN (the thing name).",
        "# Like an AWS IoT policy scoped to iot:Connection.Thing.ThingName: own Jobs topics only.",
        "pattern readwrite $aws/things/%u/jobs/#",
        "# ... and its own AWS IoT Commands topics.",
        "pattern readwrite $aws/commands/things/%u/executions/#",
    ]
    for name in service_identities:
        if not name or any(c.isspace() or c in "+#/" for c in name):
            raise ValueError(f"invalid service identity {name!r}")
        lines += ["", f"user {name}", "topic readwrite $aws/things/+/jobs/#",
                  "topic readwrite $aws/commands/things/+/executions/#"]
    return "\n".join(lines) + "\n"


def _log_tail(log: Path, offset: int, lines: int = 15) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _launch(conf: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    """Start ``mosquitto -c conf`` and return once ``port`` accepts TCP connections.

    Raises:
        _PortBusyError: the port is taken.
        RuntimeError: Mosquitto is missing, exited, or did not listen within READY_TIMEOUT.
    """
    exe = _find_mosquitto()
    if not _port_free(port):
        raise _PortBusyError(f"{HOST}:{port} is in use by another process")
    with open(log, "ab") as out:
        offset = out.tell()
        # Mark each run; the readiness probe (a bare TCP connect) shows up in the log as one
        # "Client connection from 127.0.0.1 failed: ... unexpected eof" line right after startup.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        out.write(f"=== {stamp} starting {exe} -c {conf} (then 1 readiness probe)\n".encode())
        out.flush()
        try:
            process = subprocess.Popen(
                [exe, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                close_fds=True,
            )
        except OSError as exc:
            raise RuntimeError(f"mosquitto could not be started ({exc}); {_INSTALL_HINT}") from exc
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        code = process.poll()
        if code is not None:
            tail = _log_tail(log, offset)
            cls = _PortBusyError if _ADDRESS_IN_USE in tail else RuntimeError
            raise cls(f"mosquitto exited with status {code} on port {port}; log {log}:\n{tail}")
        if _accepts(port):
            # Mosquitto binds its listener before it loads the TLS files, so a connect can
            # succeed just before it exits over a bad key: only a broker still up a moment
            # after accepting is ready.
            time.sleep(0.2)
            if process.poll() is None:
                return process
            continue
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"mosquitto did not listen on {HOST}:{port} within {READY_TIMEOUT:.0f} s; "
                f"log {log}:\n{_log_tail(log, offset)}"
            )
        time.sleep(0.02)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False
