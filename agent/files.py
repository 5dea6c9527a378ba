"""Files that readers may open at any moment: written whole, then renamed into place.

A reader (``iot-jobs-agent status``, node exporter's textfile collector) sees the old content
or the new, never half of either: ``rename(2)`` within one directory is atomic. There is no
fsync: these files describe the present and are rewritten at every start, so after a power
loss an old or empty file is harmless (readers treat an empty or unreadable file as "no
information"), while an fsync per change would stall the agent's loop for 5-10 ms on an SD card.
The journal, which *is* the durable record, fsyncs (``synchronous=FULL``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data``, created with exactly ``mode`` (umask does not apply).

    The temporary file is a hidden sibling not ending like ``path`` (node exporter reads only
    ``*.prom``), and is never followed if it is a symlink planted by someone else.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    os.close(fd)
    os.replace(temp, path)
