"""A throw-away systemd, booted for a test in new namespaces over an overlay of the machine's root.

design (measured on Debian 12 with systemd 252 not PID 1, hybrid cgroups; see
/work/shared/notes/systemd-testing.md): a shell moves itself into cgroups of its own, one per
hierarchy it belongs to, so that the box's systemd only ever sees (and creates cgroups under) those;
it then execs ``unshare`` for new pid, mount, uts, ipc and cgroup namespaces, in which boot.sh
builds the root (an overlay of / with a tmpfs upper layer: the machine's files are never written),
pivots into it and execs systemd. The box shares the host's network namespace. It is controlled
with ``nsenter`` + ``systemctl`` and seen from outside through ``/proc/PID/root``. ``shutdown()``
powers it off, waits for its PID 1 to go, removes the cgroups and reports anything left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOT = HERE / "boot.sh"
SYSTEMD = Path("/lib/systemd/systemd")
BOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
_ENTER = ("-m", "-p", "-u", "-i", "-C")  # mount, pid, uts, ipc, cgroup: everything but the network


class BoxError(RuntimeError):
    """The box could not be booted or controlled."""


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root within its file system, mount point, fs type, super options) of every mount here."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        out.append((fields[3], fields[4], rfields[0], rfields[2] if len(rfields) > 2 else ""))
    return out


def cgroup_dirs() -> list[Path]:
    """The directory of this process's cgroup in every hierarchy it belongs to."""
    mounts = _mountinfo()
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        for root, point, fstype, options in mounts:
            if hierarchy == "0":
                match = fstype == "cgroup2"
            else:
                wanted = set(controllers.split(","))
                match = fstype == "cgroup" and wanted <= set(options.split(","))
            if match and (path + "/").startswith(root.rstrip("/") + "/"):
                dirs.append(Path(point) / path[len(root.rstrip("/")) :].lstrip("/"))
                break
        else:
            raise BoxError(f"no mount of the cgroup hierarchy {line!r}")
    return dirs


def unavailable_reason() -> str | None:
    """Why a box cannot be booted on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "needs root: mounts an overlay of / and boots systemd in new namespaces"
    for tool in ("unshare", "nsenter", "pivot_root", "systemctl", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / systemd)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system (modprobe overlay)"
    types = {(fstype, options) for _root, point, fstype, options in _mountinfo() if point.startswith("/sys/fs/cgroup")}
    has_v1_systemd = any(fstype == "cgroup" and "name=systemd" in options.split(",") for fstype, options in types)
    has_v2 = any(fstype == "cgroup2" for fstype, _ in types)
    if not (has_v1_systemd and has_v2):
        return (
            "boot.sh builds the hybrid cgroup layout (cgroup v1 name=systemd + cgroup2 at "
            "/sys/fs/cgroup/unified), which this machine does not have"
        )
    try:
        cgroup_dirs()
    except BoxError as exc:
        return str(exc)
    return None


def visible_in_box(path: Path) -> bool:
    """Whether the box sees ``path``: on the root file system, and not where it mounts its own."""
    real = path.resolve()
    if real.parts[1:2] and real.parts[1] in ("tmp", "run", "dev", "proc", "sys"):
        return False
    try:
        return os.stat(real).st_dev == os.stat("/").st_dev
    except OSError:
        return False


class Box:
    """One booted systemd; ``run`` executes a command inside it, ``path`` reaches its files."""

    def __init__(self, name: str, src: Path, workdir: Path) -> None:
        self.name = name
        self.src = src
        self.scratch = workdir / "scratch"  # mount point of the box's tmpfs, in its namespace only
        self.console = workdir / "box-console.log"
        self.cgroups: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the box's PID 1, as this (host) pid namespace numbers it

    def __repr__(self) -> str:
        return f"<Box {self.name} pid={self.pid}>"

    # -- life ------------------------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> None:
        """Start systemd and wait until the system is running; raise BoxError if it does not."""
        self.scratch.mkdir(parents=True)
        for parent in cgroup_dirs():
            cg = parent / self.name
            cg.mkdir()
            self.cgroups.append(cg)
            for name in ("cpuset.cpus", "cpuset.mems"):  # a new v1 cpuset is empty: inherit the parent's
                if (cg / name).exists():
                    (cg / name).write_text((parent / name).read_text())
        script = (
            'for procs do echo $$ > "$procs" || exit 1; done; '
            "exec unshare --pid --fork --mount --uts --ipc --cgroup --propagation private "
            f"/bin/sh {BOOT} {self.scratch} {self.src} {self.name}"
        )
        procs = [str(cg / "cgroup.procs") for cg in self.cgroups]
        with self.console.open("wb") as console:
            self.proc = subprocess.Popen(
                ["sh", "-c", script, "sh", *procs],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=BOX_ENV,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BoxError(f"the box exited with {self.proc.returncode}: {self.console_text()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids and _comm(int(pids[0])) == "systemd":
                self.pid = int(pids[0])
                break
            if time.monotonic() > deadline:
                raise BoxError(f"systemd did not start in {timeout} s: {self.console_text()}")
            time.sleep(0.01)
        private = Path(f"/proc/{self.pid}/root/run/systemd/private")  # systemctl talks to systemd there
        while not private.exists():
            if time.monotonic() > deadline or not _alive(self.pid):
                raise BoxError(f"systemd did not come up in {timeout} s: {self.console_text()}")
            time.sleep(0.01)
        left = max(1.0, deadline - time.monotonic())
        result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
        if result.stdout.strip() != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise BoxError(f"the box is {result.stdout.strip()!r} ({result.stderr.strip()}), failed units: {failed}")

    def shutdown(self, timeout: float = 30.0) -> dict[str, list[str]]:
        """Power off, wait for PID 1 to go, remove the cgroups; return what was left behind (by kind)."""
        if self.pid and _alive(self.pid):
            self.run("systemctl", "--no-block", "poweroff", check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)  # the init of a pid namespace takes all of it along
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        left = self.leftovers()
        for pid in left["processes"]:
            try:
                os.kill(int(pid.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for cg in self.cgroups:
            if cg.exists():
                for dirpath, _dirs, _files in os.walk(cg, topdown=False):  # children first
                    try:
                        os.rmdir(dirpath)
                    except OSError as exc:
                        left["cgroups"].append(f"{dirpath}: {exc.strerror}")
        if self.scratch.exists():
            try:
                self.scratch.rmdir()
            except OSError as exc:
                left["mounts"].append(f"{self.scratch}: {exc.strerror}")
        self.pid = 0
        return {kind: items for kind, items in left.items() if items}

    def leftovers(self) -> dict[str, list[str]]:
        """Processes still in the box's cgroups, host mounts of the box, and its cgroups (before removal)."""
        processes = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cgroups = (entry / "cgroup").read_text()
            except OSError:
                continue
            if f"/{self.name}" in cgroups:
                processes.append(f"{entry.name} {_comm(int(entry.name))}")
        mounts = [point for _root, point, _t, _o in _mountinfo() if str(self.scratch) in point or self.name in point]
        return {"processes": processes, "mounts": mounts, "cgroups": []}

    def remaining_cgroups(self) -> list[str]:
        return [str(cg) for cg in self.cgroups if cg.exists()]

    # -- control ---------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the box (its namespaces and root), as root."""
        if not self.pid:
            raise BoxError("the box is not running")
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), *_ENTER, "--", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=BOX_ENV,
            check=False,
        )
        if check and result.returncode != 0:
            raise BoxError(f"{' '.join(cmd)} exited with {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def path(self, path: str) -> Path:
        """A path inside the box, from outside (symbolic links resolved inside the box)."""
        resolved = self.run("readlink", "-m", path).stdout.strip()
        return Path(f"/proc/{self.pid}/root") / resolved.lstrip("/")

    def host_pid(self, box_pid: int) -> int:
        """The host's number for a process the box numbers ``box_pid``."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                cgroups = (entry / "cgroup").read_text()
            except OSError:
                continue
            if f"/{self.name}/" not in cgroups:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) >= 2 and int(nspid[-1]) == box_pid:
                return int(entry.name)
        raise BoxError(f"no process numbered {box_pid} in the box")

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
