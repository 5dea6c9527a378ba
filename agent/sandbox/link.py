"""An emulated network link: a TCP proxy in front of the sandbox's broker.

A device on cellular or satellite sees 50-600 ms round trips and dropped connections; loopback
sees neither. Point a thing's ``mqtt.port`` at a :class:`Link` and every byte between it and the
broker waits ``delay`` seconds each way (order kept, no bandwidth limit), is counted (TLS
included: what a device's data plan pays for), and :meth:`Link.cut` drops every connection at
once, as a dead cell does, while the broker keeps the sessions. The bench measures latency behind
it (issue 12) and the tests reconnect through it.

The proxy runs its own asyncio loop on its own thread, so tests and the bench drive it with
plain method calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from concurrent.futures import Future

__all__ = ["Link"]

HOST = "127.0.0.1"


class Link:
    """``Link(broker_port, delay=0.025).start()``; connect to :attr:`port` instead of the broker.

    ``bytes_up`` (device -> broker), ``bytes_down`` and ``connections`` count everything that
    went through since the start (or :meth:`reset_counters`).
    """

    def __init__(self, target_port: int, *, delay: float = 0.0, host: str = HOST) -> None:
        self.target_port = target_port
        self.delay = delay
        self.host = host
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> Link:
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="link",
                                        daemon=True)
        self._thread.start()
        ready.result(10)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        self._thread.join(10)
        self._loop = None

    def cut(self) -> None:
        """Drop every connection through the link now (both sides see a reset)."""
        self._call(self._abort_all)

    def reset_counters(self) -> None:
        self.bytes_up = self.bytes_down = self.connections = 0

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ link thread

    def _call(self, fn: object) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the link is not running")
        done: Future[None] = Future()

        def run() -> None:
            try:
                fn()  # type: ignore[operator]
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        done.result(10)

    def _run(self, ready: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        loop.run_forever()
        loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        # Every connection's tasks end here, not later in a closed loop.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                      ) -> None:
        # Cancelled only by _shutdown. Python 3.11's start_server logs a cancelled connection
        # callback as "Exception in callback" with a traceback: end it quietly instead.
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(client_r, client_w)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                     ) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        for writer in (client_w, broker_w):
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                           socket.TCP_NODELAY, 1)
            self._writers.add(writer)
        up = asyncio.ensure_future(self._pump(client_r, broker_w, "up"))
        down = asyncio.ensure_future(self._pump(broker_r, client_w, "down"))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_w, broker_w):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        try:
            while data := await reader.read(65536):
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                queue.put_nowait((time.monotonic() + self.delay, data))
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()

    @staticmethod
    async def _send(queue: asyncio.Queue[tuple[float, bytes]],
                    writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
