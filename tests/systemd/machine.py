"""A booted Debian with a real systemd, for tests: :class:`Machine`.

The booted-systemd tier (``tests/systemd/``) runs the agent the way a device does: as the
shipped unit, under a real PID 1, with journald, the watchdog, ``systemctl stop`` and reboots.
This module is the harness; ``conftest.py`` next to it turns it into fixtures, and
``../shared/reference/systemd-container.md`` has the facts it is built on.

How one machine lives:

* ``.ci/systemd-rootfs`` debootstraps (once, cached under /var/cache/iot-jobs-agent-ci) a
  minimal bookworm with systemd, dbus, python3-venv, mosquitto and openssl.
* Each :class:`Machine` boots an overlayfs copy of it (the cache is the read-only lower layer,
  the machine's writes go to its own upper layer), so machines never see each other's changes
  and the copy costs nothing. Writes survive :meth:`Machine.reboot` (the same overlay is booted
  again) and vanish at :meth:`Machine.close`.
* The host's PID 1 is not systemd here, so the machine gets cgroups of its own in every
  hierarchy before it boots (its systemd then owns a subtree, never the host's root cgroup).
* ``systemd-nspawn --boot --register=no --keep-unit`` boots it on the host's network, so a
  sandbox on the host's loopback serves it; ``nsenter`` into its PID 1's namespaces runs
  commands inside (there is no machined, hence no ``machinectl``).
* ``systemctl reboot`` inside makes nspawn exit 133; :meth:`Machine.await_reboot` boots it
  again, as ``systemd-nspawn@.service`` does with ``RestartForceExitStatus=133``.

Use::

    with Machine.boot(rootfs, workdir) as m:
        m.run(["systemctl", "is-system-running"])           # CompletedProcess, text
        m.write_file("/etc/foo.conf", "x = 1\\n", mode=0o600)
        m.install_unit("foo.service", text)                  # + daemon-reload
        m.journal("-u", "foo", "-p", "warning")              # journalctl output
        m.reboot()                                           # and back, new boot id

Needs root and the right to create namespaces: :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["OWNER", "REBOOT_EXIT", "Machine", "MachineError", "sweep_stale", "unavailable"]

#: systemd-nspawn's exit status when the container asked for a reboot.
REBOOT_EXIT = 133
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: In a directory of machines: the pid of the test process that owns them (see sweep_stale).
OWNER = "owner.pid"
#: The environment of every command run inside: nothing from the test process leaks in.
INSIDE_ENV = ("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb")


class MachineError(RuntimeError):
    """The machine did not boot, stop or answer as expected (the message says what it did)."""


def unavailable() -> str | None:
    """Why this host cannot boot a machine (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "the booted-systemd tier needs root (systemd-nspawn, overlayfs, cgroups)"
    if shutil.which("unshare") is None:
        return "the booted-systemd tier needs unshare(1) (util-linux) to probe namespaces"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no reason given"])[-1]
        return ("this machine cannot create namespaces (`unshare --mount --pid --fork true` "
                f"failed: {reason}); the booted-systemd tier needs a VM or privileged container")
    return None


def _cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, name=systemd, the unified one)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mountpoint = Path(fields[4])
            if fstype in ("cgroup", "cgroup2") and CGROUP_ROOT in mountpoint.parents:
                found.append(mountpoint)
    if not found and (CGROUP_ROOT / "cgroup.procs").exists():
        found.append(CGROUP_ROOT)  # a pure cgroup v2 host
    return found


class Machine:
    """One booted container. Build with :meth:`boot` (a context manager that tears it down)."""

    def __init__(self, rootfs: Path, workdir: Path, name: str | None = None) -> None:
        self.name = name or f"iotci-{uuid.uuid4().hex[:8]}"
        self.rootfs = Path(rootfs)
        self.dir = Path(workdir) / self.name
        self.root = self.dir / "root"  # the overlay: what the machine sees as /
        self.console_log = self.dir / "console.log"
        self.boots = 0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self._cgroups: list[Path] = []
        self._mounted = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.contextmanager
    def boot(cls, rootfs: Path, workdir: Path, *, timeout: float = 60.0) -> Iterator[Machine]:
        """Copy ``rootfs`` (overlay), boot it, yield the running machine, tear it all down."""
        machine = cls(rootfs, workdir)
        try:
            machine._prepare()
            machine.start(timeout=timeout)
            yield machine
        finally:
            machine.close()

    def _prepare(self) -> None:
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.root):
            d.mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={upper},workdir={work}",
                        str(self.root)], check=True, capture_output=True)
        self._mounted = True
        for hierarchy in _cgroup_hierarchies():
            group = hierarchy / self.name
            group.mkdir(exist_ok=True)
            self._cgroups.append(group)
            for knob in ("cpuset.cpus", "cpuset.mems"):  # empty in a new v1 cpuset group
                if (hierarchy / knob).exists():
                    (group / knob).write_text((hierarchy / knob).read_text())

    def start(self, *, timeout: float = 60.0) -> None:
        """Boot (again): nspawn runs in the machine's own cgroups; wait until systemd is up."""
        assert self._nspawn is None, "already running"
        procs = " ".join(f"{g}/cgroup.procs" for g in self._cgroups)
        # The shell moves itself into the machine's cgroups, then becomes nspawn.
        script = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
        command = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                   "-M", self.name, "-D", str(self.root), "--console=read-only", "--boot"]
        with open(self.console_log, "ab") as console:
            self._nspawn = subprocess.Popen(["sh", "-c", script, "sh", *command],
                                            stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT)
        self.boots += 1
        self._pid1 = self._find_pid1(timeout)
        state = self.wait_until_running(timeout)
        if state not in ("running", "degraded"):
            raise MachineError(f"{self.name}: systemd is {state!r} after {timeout:g}s"
                               f"{self.console_tail()}")

    def _find_pid1(self, timeout: float) -> int:
        """The container's systemd: the child of the nspawn process."""
        assert self._nspawn is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise MachineError(f"{self.name}: systemd-nspawn exited "
                                   f"{self._nspawn.returncode} while booting"
                                   f"{self.console_tail()}")
            for child in self._children(self._nspawn.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            time.sleep(0.05)
        raise MachineError(f"{self.name}: no systemd under nspawn after {timeout:g}s")

    def console_tail(self, lines: int = 30) -> str:
        """The end of nspawn's console (the machine's boot messages), for error messages: the
        machine's files are gone once the test has failed and torn it down."""
        try:
            text = self.console_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\nconsole:\n" + "\n".join(text)

    @staticmethod
    def _children(pid: int) -> list[int]:
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    children += [int(c) for c in (task / "children").read_text().split()]
        return children

    def wait_until_running(self, timeout: float = 60.0) -> str:
        """``systemctl is-system-running --wait``: 'running', 'degraded' (a unit failed)..."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            result = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip() or "unknown"
            if state in ("running", "degraded", "maintenance", "stopping"):
                return state
            time.sleep(0.1)  # the bus may not be up yet at the very start
        return state

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for nspawn to exit (the machine powered off or rebooted); its exit status."""
        assert self._nspawn is not None, "not running"
        try:
            code = self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MachineError(f"{self.name}: still running after {timeout:g}s") from None
        self._nspawn = None
        self._pid1 = None
        return code

    def await_reboot(self, timeout: float = 60.0) -> str:
        """The machine is rebooting on its own (a job asked): wait for nspawn's 133, boot it
        again; the new boot id."""
        code = self.wait_exit(timeout)
        if code != REBOOT_EXIT:
            raise MachineError(f"{self.name}: nspawn exited {code}, not {REBOOT_EXIT} "
                               f"(a reboot){self.console_tail()}")
        self.start(timeout=timeout)
        return self.boot_id()

    def reboot(self, timeout: float = 60.0) -> str:
        """``systemctl reboot`` and back; the new boot id."""
        self.run(["systemctl", "reboot"], check=False)
        return self.await_reboot(timeout)

    def poweroff(self, timeout: float = 60.0) -> int:
        """``systemctl poweroff`` and wait; nspawn's exit status (0 for a clean one)."""
        if self._nspawn is None:
            return 0
        self.run(["systemctl", "poweroff"], check=False)
        try:
            return self.wait_exit(timeout)
        except MachineError:  # shutdown hung: what a power cut would do
            assert self._nspawn is not None
            self._nspawn.kill()
            return self.wait_exit(10)

    def close(self) -> None:
        """Power off (or kill), remove the cgroups, unmount and delete the copy."""
        with contextlib.suppress(Exception):
            self.poweroff()
        if self._nspawn is not None:
            self._nspawn.kill()
            self._nspawn.wait(10)
            self._nspawn = None
        for group in self._cgroups:
            self._remove_cgroup(group)
        self._cgroups = []
        if self._mounted:
            subprocess.run(["umount", "--lazy", str(self.root)], check=False,
                           capture_output=True)
            self._mounted = False
        if self.dir.exists():
            # The upper layer holds root-owned files and the work dir a 000 directory.
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir)], check=False)

    @staticmethod
    def _remove_cgroup(group: Path, timeout: float = 10.0) -> None:
        """rmdir the subtree bottom-up (cgroupfs directories hold only control files)."""
        deadline = time.monotonic() + timeout
        while group.exists():
            subdirs = sorted((p for p in group.rglob("*") if p.is_dir()),
                             key=lambda p: len(p.parts), reverse=True)
            for d in [*subdirs, group]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not group.exists() or time.monotonic() > deadline:
                return
            time.sleep(0.1)  # processes still exiting

    @classmethod
    def remains(cls, directory: Path) -> Machine:
        """The machine that lived in ``directory`` (left by a killed test run), to close."""
        machine = cls(Path("/nonexistent"), directory.parent, directory.name)
        machine._cgroups = [h / machine.name for h in _cgroup_hierarchies()
                            if (h / machine.name).is_dir()]
        machine._mounted = os.path.ismount(machine.root)
        return machine

    def kill_all(self) -> None:
        """SIGKILL every process in the machine's cgroups (nspawn and everything it booted)."""
        for group in self._cgroups:
            for procs in group.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    for pid in procs.read_text().split():
                        os.kill(int(pid), 9)

    # ------------------------------------------------------------------ inside

    @property
    def pid1(self) -> int:
        """The host's pid of the machine's systemd."""
        if self._pid1 is None:
            raise MachineError(f"{self.name} is not running")
        return self._pid1

    def run(self, command: Sequence[str] | str, *, check: bool = True,
            input: str | bytes | None = None, timeout: float = 60.0,
            text: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` inside (a string goes to ``sh -c``) as root, with a clean
        environment; stdout and stderr captured. ``check``: raise on a non-zero exit, with
        both outputs in the message."""
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        full = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                "--", *INSIDE_ENV, *argv]
        if text and isinstance(input, bytes):
            input = input.decode()
        result = subprocess.run(full, input=input, capture_output=True, text=text,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise MachineError(f"{self.name}: {argv!r} exited {result.returncode}\n"
                               f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def write_file(self, path: str, content: str | bytes, *, mode: int = 0o644) -> None:
        """Create or replace ``path`` inside (parents made 0755), owned by root."""
        data = content.encode() if isinstance(content, str) else content
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                  "sh", path, f"{mode:o}"], input=data, text=False)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def copy_in(self, source: Path, destination: str) -> None:
        """Copy a host file or directory to ``destination`` inside (a tar stream, so it also
        works for the machine's tmpfs such as /tmp and /run; symlinks are followed)."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", dereference=True) as tar:
            tar.add(source, arcname=".", filter=_as_root)
        self.run(["sh", "-c", 'mkdir -p "$1" && tar -x -C "$1"', "sh", destination],
                 input=buffer.getvalue(), text=False)

    def install_unit(self, name: str, text: str, *, dropin: str | None = None) -> None:
        """Write ``/etc/systemd/system/<name>`` (or, with ``dropin``, the drop-in
        ``<name>.d/<dropin>.conf``) and ``systemctl daemon-reload``."""
        path = (f"/etc/systemd/system/{name}.d/{dropin}.conf" if dropin is not None
                else f"/etc/systemd/system/{name}")
        self.write_file(path, text)
        self.run(["systemctl", "daemon-reload"])

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """``journalctl --no-pager ARGS`` (e.g. ``"-u", "iot-jobs-agent", "-p", "warning"``)."""
        return self.run(["journalctl", "--no-pager", *args]).stdout

    def boot_id(self) -> str:
        """The machine's own boot id (nspawn's, not the host kernel's; see the reference)."""
        return self.read_file("/proc/sys/kernel/random/boot_id").strip()


def sweep_stale(cache: Path) -> None:
    """Tear down machines that a killed test run left in ``cache``/machines-* (their nspawn
    still running, overlay mounted, cgroups made): those whose owner pid is gone."""
    for directory in cache.glob("machines-*"):
        owner = directory / OWNER
        if not owner.exists():
            continue  # just made by a run that has not written its pid yet (or not ours)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(owner.read_text()), 0)
            continue  # its test run is alive
        for remains in directory.glob("iotci-*"):
            machine = Machine.remains(remains)
            machine.kill_all()
            machine.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=False)


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
