"""The long-running agent: startup -> serve -> graceful shutdown (uvicorn's shape).

Signal handlers only set an event; everything else happens on the loop. ``READY=1`` goes to
systemd once the first connection is up and the pending jobs have been answered; ``WATCHDOG=1``
is sent from the loop itself, so a wedged loop stops the pings and systemd restarts us. SIGHUP
re-reads the configuration (:mod:`agent.reload`); :class:`agent.monitor.Monitor` keeps the
state file that ``iot-jobs-agent status`` reads, and the metrics file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Before anything opens a descriptor: importing the runner parks fd 3 for the handlers'
# progress pipe, which keeps every spawn a vfork (see runner._park_progress_fd). The connection
# below opens sockets as soon as it starts, before the dispatcher is imported.
import agent.runner  # noqa: F401  # isort: skip
from agent import backends
from agent._version import __version__
from agent.config import Config
from agent.connection import Connection, ConnectionEvent
from agent.errors import CertificateValidationException, ConfigError
from agent.jobs import JobsClient
from agent.paths import ensure_state_dir, job_logs_dir, state_dirs
from agent.systemd import Notifier

if TYPE_CHECKING:
    from agent.commands import CommandExecutor, CommandsClient
    from agent.dispatcher import Dispatcher
    from agent.journal import Journal
    from agent.monitor import Monitor

__all__ = ["EXIT_RESTART", "Agent"]

log = logging.getLogger("agent.app")

READY_TIMEOUT = 60.0  # below systemd's default TimeoutStartSec=90s
REFUSED_POLL = 30.0
"""The safety poll while the broker refuses a notification stream (no doorbell: ask often)."""
EXIT_RESTART = -1
"""What :meth:`Agent.serve` returns when a job step asked for the agent to restart itself: the
caller (``iot-jobs-agent run``) then executes the agent afresh in the same process."""


class Agent:
    """Runs the jobs of ``config.thing_name`` until SIGTERM/SIGINT; :meth:`serve` returns 0."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._reload = asyncio.Event()
        self._ready = False  # READY=1 sent: from then on a reload is RELOADING=1 ... READY=1
        self._failed = False
        self._restart = False
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: CommandExecutor | None = None

    def request_stop(self, signum: int | None = None) -> None:
        """Called from the signal handler: only record it (no I/O in a signal handler)."""
        self._signals += 1
        self._stop.set()
        if self._signals > 1:
            self._force.set()  # a second signal: stop handlers now, do not wait the grace

    def request_reload(self) -> None:
        """SIGHUP: only record it; :meth:`_reloader` does the work on the loop."""
        self._reload.set()
    def request_restart(self) -> None:
        """A job step asked for the agent to restart: stop as on SIGTERM, then start again."""
        self._restart = True
        self._stop.set()

    async def serve(self) -> int:
        job_logs = job_logs_dir(self.config.state_dir)
        self._prepare_state_dir(job_logs)
        # Chosen once: where every handler runs, and what stops all of its processes.
        backend = backends.choose(self.config)
        connection = Connection(self.config.mqtt, self.config.client_id)
        # Before the connection starts: Commands routes its topics to itself (no request may
        # arrive unrouted) and wants its subscriptions made with the first connect.
        commands = self._commands_client(connection)
        jobs = JobsClient(connection, request_timeout=self.config.mqtt.request_timeout,
                          max_concurrent_requests=max(4, self.config.max_concurrent_jobs + 2))
        jobs.open_streams(self.config.thing_name)
        # The listeners are called on the loop, so not before the first await below (the
        # journal's open), by which time everything they name exists.
        connection.add_listener(lambda ev: self._on_connection(ev, dispatcher, executor))
        connection.add_listener(lambda ev: monitor.on_connection(ev))
        # Connect first: the TLS handshake runs on the CRT's threads while the rest of the
        # agent is imported and the journal opened (issue 12: start-up, exec -> CONNACK).
        connection.start()
        try:
            journal, monitor, dispatcher, executor = self._components(jobs, commands, job_logs)
            await journal.open()
        except BaseException:
            await connection.stop()
            raise
        monitor.changed()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info("starting thing=%s handlers=%s state_dir=%s max_concurrent_jobs=%d",
                 self.config.thing_name, ",".join(sorted(self.config.handlers)) or "-",
                 self.config.state_dir, self.config.max_concurrent_jobs)
        self._spawn(dispatcher.run(), "agent.dispatcher")
        self._spawn(self._pump_events(jobs, dispatcher), "agent.events")
        self._spawn(self._ready_when_synced(dispatcher, monitor, commands), "agent.ready")
        self._spawn(self._watchdog(), "agent.watchdog")
        self._spawn(self._reloader(dispatcher, monitor), "agent.reload")
        if executor is not None:
            self._spawn(executor.run(), "agent.commands")
        await self._stop.wait()
        log.info("stopping: no new jobs; running=%d grace=%.0fs", len(dispatcher.running),
                 self.config.shutdown_grace)
        if self._restart:
            self.notifier.reloading("restarting, as a job asked")
        else:
            self.notifier.stopping(f"stopping, {len(dispatcher.running)} job(s) running")
        monitor.set_phase("stopping")
        await asyncio.gather(
            dispatcher.shutdown(self.config.shutdown_grace, self._force),
            *([executor.shutdown(self.config.shutdown_grace, self._force)]
              if executor is not None else []))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await backend.close()  # whatever a handler left: nothing outlives the agent's stop
        await connection.stop()
        await monitor.close()
        await journal.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")
        if self._failed:
            return 1
        return EXIT_RESTART if self._restart else 0

    # ------------------------------------------------------------------ helpers

    def _components(self, jobs: JobsClient, commands: CommandsClient | None,
                    job_logs: Path) -> tuple[Journal, Monitor, Dispatcher, CommandExecutor | None]:
        """The journal (not open yet), the monitor, the dispatcher and the Commands executor.

        Imported here, once the connection has started, so that importing them overlaps the
        TLS handshake.
        """
        from agent.dispatcher import Dispatcher
        from agent.journal import Journal
        from agent.monitor import Monitor

        # Whose journal it is: a state_dir reused for another thing (or another account's
        # endpoint) starts a fresh one rather than mistaking that thing's jobs for ours.
        journal = Journal(Path(self.config.state_dir) / "journal.db",
                          thing_name=self.config.thing_name,
                          endpoint=self.config.mqtt.endpoint.lower())
        monitor = Monitor(self.config, journal, job_logs=job_logs, version=__version__,
                          pid=os.getpid())
        dispatcher = Dispatcher(self.config, jobs, journal, job_logs=job_logs,
                                on_change=lambda: self._status(dispatcher, monitor),
                                on_outcome=monitor.on_outcome,
                                on_restart=self.request_restart)
        monitor.attach(dispatcher)
        executor = None
        if commands is not None:
            executor = self._commands_executor(commands, journal, job_logs,
                                               lambda: self._status(dispatcher, monitor))
            self._executor = executor
        return journal, monitor, dispatcher, executor

    def _prepare_state_dir(self, job_logs: Path) -> None:
        """Create the state directories private (or check that existing ones are: anyone who
        can write them can plant a journal or a log symlink; :mod:`agent.paths`)."""
        base = Path(self.config.state_dir)
        entry = None
        try:
            for entry in state_dirs(base, job_logs):
                entry.path.parent.mkdir(parents=True, exist_ok=True)
                ensure_state_dir(entry)
            entry = None
            probe = base / ".write-test"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            if isinstance(exc, PermissionError) and entry is not None and not exc.filename:
                raise ConfigError(str(exc)) from None  # state_dir_problem's own message
            raise ConfigError(f"state_dir {base} is not usable ({exc.strerror}): create it, "
                              f"writable by uid {os.geteuid()}, or set state_dir") from None

    def _commands_client(self, connection: Connection) -> CommandsClient | None:
        settings = self.config.commands
        if not settings.enabled:
            return None
        from agent.commands import CommandsClient  # only when enabled: memory, start-up

        return CommandsClient(connection, self.config.thing_name, settings.formats,
                              request_timeout=self.config.mqtt.request_timeout)

    def _commands_executor(self, client: CommandsClient, journal: Journal, job_logs: Path,
                           on_change: Callable[[], None]) -> CommandExecutor:
        from agent.commands import CommandExecutor, CommandJournal

        records = CommandJournal(journal)
        log.info("commands enabled thing=%s formats=%s max_concurrent=%d",
                 self.config.thing_name, ",".join(self.config.commands.formats),
                 self.config.commands.max_concurrent)
        return CommandExecutor(self.config, client, records, job_logs=job_logs,
                               on_change=on_change)

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.critical("internal task %s died: %s: %s; stopping", task.get_name(),
                     type(exc).__name__, exc)
        self._failed = True  # exit non-zero, so Restart=on-failure brings the agent back
        self._stop.set()

    def _on_connection(self, event: ConnectionEvent, dispatcher: Dispatcher,
                       executor: CommandExecutor | None) -> None:
        if event.kind == "connected":
            self.notifier.status("connected; syncing jobs")
            dispatcher.reconnected()
            if executor is not None:
                executor.nudge()
        elif event.kind == "disconnected":
            self.notifier.status("disconnected; reconnecting")
        elif event.kind == "failed" and isinstance(event.error, CertificateValidationException):
            log.error("%s", event.error)
            self.notifier.status("TLS handshake refused; check the certificate (see log)")

    async def _pump_events(self, jobs: JobsClient, dispatcher: Dispatcher) -> None:
        """Notifications go to the dispatcher, which claims from notify-next and syncs when a
        notify says something new; a (re-)established stream or an unreadable notification
        asks for a sync.

        A stream the broker refused (the policy lacks iot:Subscribe on it, logged once as an
        error) leaves no doorbell: until it is granted, the agent polls every
        :data:`REFUSED_POLL` seconds (or ``poll_interval`` if shorter) instead.
        """
        halted: set[str] = set()
        poller: asyncio.Task[None] | None = None
        try:
            async for event in jobs.events():
                if event.kind in ("notify", "notify-next"):
                    dispatcher.notified(event.kind, event.body)
                elif event.kind in ("subscribed", "malformed"):
                    dispatcher.wake(event.kind)
                if event.kind == "subscription-halted":
                    halted.add(event.body["stream"])
                elif event.kind == "subscribed":
                    halted.discard(event.body["stream"])
                if halted and poller is None:
                    interval = min(REFUSED_POLL, self.config.poll_interval)
                    log.warning("notifications refused streams=%s: polling every %.0fs "
                                "instead", ",".join(sorted(halted)), interval)
                    poller = asyncio.create_task(self._poll(dispatcher, interval))
                elif not halted and poller is not None:
                    log.info("notifications granted: back to the %.0fs safety poll",
                             self.config.poll_interval)
                    poller.cancel()
                    poller = None
        finally:
            if poller is not None:
                poller.cancel()

    @staticmethod
    async def _poll(dispatcher: Dispatcher, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            dispatcher.wake("refused-streams-poll")

    async def _ready_when_synced(self, dispatcher: Dispatcher, monitor: Monitor,
                                 commands: CommandsClient | None = None) -> None:
        """READY=1 once connected and the pending jobs are answered (and, with Commands on,
        once its topics are subscribed: a script that waits for READY may send a command).

        A device that boots offline must not hold up ``multi-user.target`` (which orders itself
        after the units it wants) or be restarted by ``TimeoutStartSec=``: after
        :data:`READY_TIMEOUT` the agent declares itself ready anyway, saying it is offline, and
        keeps connecting.
        """
        began = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(dispatcher.synced.wait(), READY_TIMEOUT)
            if commands is not None:
                left = READY_TIMEOUT - (asyncio.get_running_loop().time() - began)
                with contextlib.suppress(TimeoutError):  # refused: logged by the client
                    await asyncio.wait_for(commands.subscribed.wait(), max(left, 0.0))
        except TimeoutError:
            log.warning("not connected after %.0fs; reporting ready and still trying",
                        READY_TIMEOUT)
            self.notifier.ready("offline: still connecting (see log)")
            self._ready = True
            await dispatcher.synced.wait()
        log.info("ready thing=%s", self.config.thing_name)
        self.notifier.ready(self._describe(dispatcher))
        self._ready = True
        monitor.set_phase("running")

    async def _reloader(self, dispatcher: Dispatcher, monitor: Monitor) -> None:
        """Each SIGHUP: re-read the config; apply it whole, or refuse it whole and keep ours."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self._ready:
                self.notifier.reloading(f"reloading {self.config.source}")
            from agent.reload import reread

            outcome = reread(self.config)
            if outcome.config is not None:
                self.config = outcome.config
                dispatcher.reconfigure(outcome.config)
                if self._executor is not None:
                    self._executor.reconfigure(outcome.config)
                monitor.reconfigure(outcome.config)
                logging.getLogger("agent").setLevel(outcome.config.log_level)
            monitor.reloaded(outcome.ok, outcome.message)
            self._reloaded(self._describe(dispatcher) if outcome.ok
                           else f"reload refused (see log); {self._describe(dispatcher)}")

    def _reloaded(self, status: str) -> None:
        """The reload is over: READY=1 ends systemd's "reloading" (not before start-up's)."""
        if self._ready:
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    async def _watchdog(self) -> None:
        """Ping systemd from the loop: if the loop wedges, the pings stop."""
        interval = self.notifier.interval
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    def _describe(self, dispatcher: Dispatcher) -> str:
        if dispatcher.refusing:
            return f"not taking jobs: {dispatcher.refusing}"
        running = [f"{k[0]}#{k[1]}" for k in dispatcher.running]
        text = f"running {', '.join(running)}" if running else "idle, waiting for jobs"
        commands = len(self._executor.running) if self._executor is not None else 0
        return f"{text}; {commands} command(s) running" if commands else text

    def _status(self, dispatcher: Dispatcher, monitor: Monitor) -> None:
        self.notifier.status(self._describe(dispatcher))
        monitor.changed()


def _pidfd_child_watcher(loop: asyncio.AbstractEventLoop) -> bool:
    """Learn of handler exits through a pidfd on the loop, where the kernel has them (5.3+).

    Why: Python 3.11's default child watcher starts a thread per child to block in waitpid();
    creating it costs the handler's spawn 1-2 ms (measured on the bench machine: 2.7 -> 1.1 ms
    per spawn under load, issue 13's command -> handler figure), and every exit then crosses
    threads. Python 3.12 picks pidfds by itself; elsewhere this keeps the default.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an old kernel, or a seccomp filter refusing the call
        return False
    watcher = asyncio.PidfdChildWatcher()
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    watcher.attach_loop(loop)
    return True


async def run_agent(config: Config) -> int:
    _pidfd_child_watcher(asyncio.get_running_loop())
    agent = Agent(config)
    with contextlib.suppress(asyncio.CancelledError):
        return await agent.serve()
    return 0
