"""Talk to systemd: readiness, status and the watchdog (``Type=notify``, ``WatchdogSec=``).

The sd_notify protocol is one datagram of ``KEY=value`` lines on the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a dozen lines of standard library replace libsystemd (gunicorn does the
same). Outside systemd (a shell, the tests, the sandbox) there is no socket and every call is a
no-op, so the agent never has to ask whether it runs under systemd.

Nothing here raises: a lost notification must not take the agent down. systemd will notice
what matters (a missing ``READY=1`` or ``WATCHDOG=1``) and act on it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["SYSTEMD_ENV_VARS", "Notifier", "notify", "watchdog_interval"]

log = logging.getLogger("agent.systemd")

SYSTEMD_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""Drop these from handlers' environments: they are the agent's channel to systemd, not theirs."""


def _address(raw: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or ``@name`` for the abstract namespace."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None  # vsock: and other transports of newer systemd: not ours to guess at


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) to systemd as one datagram; True if sent.

    One datagram, because systemd applies it atomically: ``READY=1`` with its ``STATUS=`` never
    arrives half. The socket is non-blocking so that a stuck manager can never stall the
    agent's event loop; such a failure, like any other, is logged at debug and returns False.
    """
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET")
    if not raw or not lines:
        return False
    address = _address(raw)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address, not notifying", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(lines).encode(), address)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in a path
        log.debug("sd_notify to %r failed: %s", raw, exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), None if not watched.

    Half, as sd_watchdog_enabled(3) recommends, so that one late loop tick is not yet a
    restart. ``WATCHDOG_PID`` naming another process means the variables were inherited from
    a parent that systemd watches, not us: pinging for it would hide its death.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else os.getpid()
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """What the agent's main loop tells systemd: ready, status, stopping, and that it is alive.

    The environment is read once, here, so the agent may then remove :data:`SYSTEMD_ENV_VARS`
    from ``os.environ`` and no handler inherits them.

    Send :meth:`ready` once the main loop runs rather than once the broker answers:
    multi-user.target is ordered after the agent, so an offline device would hold up its boot
    for ``TimeoutStartSec=`` and then be restarted for nothing. Say "connecting" in the status.

    Watchdog contract: the loop calls :meth:`watchdog` on every tick (at least every
    ``interval / 2``), and only while the loop and the MQTT connection are healthy; this object
    rate-limits the pings itself. ``WatchdogSec=`` after the last ping systemd kills the agent
    and ``Restart=on-failure`` starts it again, which cures a wedged loop or a connection that
    can no longer recover. "Healthy" must include reconnecting with backoff: a restart does not
    cure a network outage, so withholding pings for one only restarts the agent in a loop.
    """

    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self._env = {"NOTIFY_SOCKET": env.get("NOTIFY_SOCKET", "")}
        self._interval = watchdog_interval(env) if self.enabled else None
        self._clock = clock
        self._last_ping: float | None = None
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket (``Type=notify``)."""
        return bool(self._env["NOTIFY_SOCKET"])

    @property
    def interval(self) -> float | None:
        """:func:`watchdog_interval`: the longest gap between pings; None: no watchdog."""
        return self._interval

    def _send(self, *lines: str, status: str) -> bool:
        """Send ``lines`` and ``STATUS=status``, kept to one line: a newline would smuggle in
        another assignment. The status is remembered only once systemd has it."""
        status = " ".join(status.splitlines())
        sent = notify(*lines, f"STATUS={status}", environ=self._env)
        if sent:
            self._status = status
        return sent

    def ready(self, status: str = "running") -> bool:
        """Startup is over: systemd marks the unit active and starts the units ordered after."""
        return self._send("READY=1", status=status)

    def status(self, text: str) -> bool:
        """Show ``text`` in ``systemctl status``; a repeat of the current text is not re-sent."""
        if " ".join(text.splitlines()) == self._status:
            return False
        return self._send(status=text)

    def reloading(self, status: str = "reloading the configuration") -> bool:
        """A reload began (SIGHUP): ``RELOADING=1``; send :meth:`ready` when it is over.

        With ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` now, in microseconds) in the same datagram:
        systemd 253 and later need it for ``Type=notify-reload``, to tell this reload's
        notifications from an earlier one's. systemd 252 (Debian 12) has no notify-reload and
        ignores the field; under ``Type=notify`` a ``RELOADING=1`` that arrives while the unit
        is running shows it "reloading" until the ``READY=1``.
        """
        return self._send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                          status=status)

    def stopping(self, status: str = "stopping") -> bool:
        """Shutdown has begun, so systemd shows "deactivating" instead of a silent wait."""
        return self._send("STOPPING=1", status=status)

    def watchdog(self) -> bool:
        """Ping the watchdog unless it was pinged less than ``interval / 2`` ago; True if sent.

        Half again, so that a caller ticking every ``interval / 2`` with a little jitter still
        pings at least once per ``interval``. A failed ping does not count: the next tick retries.
        """
        if self._interval is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._interval / 2:
            return False
        if not notify("WATCHDOG=1", environ=self._env):
            return False
        self._last_ping = now
        return True
