"""Stand-ins for the sandbox: a package manager, systemctl and a reboot that change nothing on
the host.

The managed templates install packages, start services and reboot the device. In the sandbox
(and the tests) they must run as they come, with the shipped handlers, yet leave the machine as
it was: the sandbox puts these first on the handlers' PATH and makes ``bin/reboot`` the agent's
``reboot_command``. Each records its calls in ``log`` and keeps a little state in its directory,
so a package that was never made available fails as apt-get would, and so does a unit systemd
does not know:

- ``apt-get install|remove [options] NAMES...``: only names listed in ``available-packages``
  install (else exit 100 "Unable to locate package"); installed ones go to
  ``installed-packages``;
- ``systemctl start|stop|restart UNIT...``: only units listed in ``units`` (a name without a
  suffix means ``.service``), else exit 5 "Unit ... not found"; running ones are in ``running``;
- ``reboot``: a new ``boot_id`` (the agent's ``boot_id_path``), a ``rebooting`` marker, and
  SIGTERM to the agent that ran it, as systemd stops services when the machine goes down; whoever
  supervises the agent starts it again, as the next boot would.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["StandIns", "install_stand_ins"]

_APT_GET = r"""#!/bin/sh
# Sandbox stand-in for apt-get (iot-jobs-agent): changes nothing on this machine.
here=$(dirname "$(dirname "$0")")
echo "apt-get $*" >> "$here/log"
action=$1; shift
status=0
while [ $# -gt 0 ]; do
    name=$1; shift
    case $name in -o) shift; continue ;; -*) continue ;; esac
    case $action in
        install)
            if grep -qx -- "$name" "$here/available-packages" 2>/dev/null; then
                grep -qx -- "$name" "$here/installed-packages" 2>/dev/null \
                    || echo "$name" >> "$here/installed-packages"
                echo "Setting up $name (stand-in) ..."
            else
                echo "E: Unable to locate package $name" >&2; status=100
            fi ;;
        remove)
            if grep -qx -- "$name" "$here/installed-packages" 2>/dev/null; then
                grep -vx -- "$name" "$here/installed-packages" > "$here/.p" || true
                mv "$here/.p" "$here/installed-packages"
                echo "Removing $name (stand-in) ..."
            else
                echo "Package '$name' is not installed, so not removed"
            fi ;;
        *) echo "E: the stand-in knows install and remove only" >&2; exit 100 ;;
    esac
done
exit $status
"""

_SYSTEMCTL = r"""#!/bin/sh
# Sandbox stand-in for systemctl (iot-jobs-agent): changes nothing on this machine.
here=$(dirname "$(dirname "$0")")
echo "systemctl $*" >> "$here/log"
action=$1; shift
status=0
for name in "$@"; do
    case $name in *.*) unit=$name ;; *) unit=$name.service ;; esac
    if ! grep -qx -- "$unit" "$here/units" 2>/dev/null; then
        echo "Failed to $action $unit: Unit $unit not found." >&2; status=5; continue
    fi
    grep -vx -- "$unit" "$here/running" > "$here/.r" 2>/dev/null || true
    mv "$here/.r" "$here/running"
    case $action in
        start|restart) echo "$unit" >> "$here/running" ;;
        stop) ;;
        *) echo "the stand-in knows start, stop and restart only" >&2; exit 1 ;;
    esac
done
exit $status
"""


_REBOOT = r"""#!/bin/sh
# Sandbox stand-in for the agent's reboot_command (iot-jobs-agent): reboots nothing.
here=$(dirname "$(dirname "$0")")
echo "reboot" >> "$here/log"
od -An -N16 -tx1 /dev/urandom | tr -d ' 
' > "$here/boot_id"
touch "$here/rebooting"
kill -TERM "$PPID"
"""


class StandIns:
    """A stand-in directory: put :attr:`bin` first on PATH."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bin = directory / "bin"

    @property
    def boot_id(self) -> Path:
        """What the agent's ``boot_id_path`` should be; ``bin/reboot`` changes it."""
        return self.dir / "boot_id"

    @property
    def reboot(self) -> Path:
        """What the agent's ``reboot_command`` should be."""
        return self.bin / "reboot"

    def read(self, name: str) -> list[str]:
        """A state file (``log``, ``installed-packages``, ``running``...) as lines."""
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    def add(self, name: str, *lines: str) -> None:
        with (self.dir / name).open("a") as file:
            file.writelines(f"{line}\n" for line in lines)


def install_stand_ins(directory: Path, *, packages: tuple[str, ...] = (),
                      units: tuple[str, ...] = ()) -> StandIns:
    """Write the stand-ins into ``directory`` (mode 0755, as the agent's checks want them),
    with ``packages`` available and ``units`` known."""
    stand_ins = StandIns(directory)
    stand_ins.bin.mkdir(parents=True, exist_ok=True)
    for path in (directory, stand_ins.bin):
        path.chmod(0o755)
    for name, text in (("apt-get", _APT_GET), ("systemctl", _SYSTEMCTL), ("reboot", _REBOOT)):
        program = stand_ins.bin / name
        program.write_text(text)
        program.chmod(0o755)
    stand_ins.add("available-packages", *packages)
    stand_ins.add("units", *(u if "." in u else f"{u}.service" for u in units))
    if not stand_ins.boot_id.exists():
        stand_ins.boot_id.write_text("sandbox-boot-1\n")
    return stand_ins
