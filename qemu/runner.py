"""Run one QEMU machine under TCG and read its serial console.

Every line the guest prints is timestamped (seconds since QEMU started, on
the host) and kept, in memory and in a log file. QEMU runs in its own
process group and is always reaped: at its exit, at the hard timeout, or
when the caller leaves the `with` block for any reason.

Two machines in parallel use both cores of the CI machine; a third would
oversubscribe them, hence `boot_all`'s default of two workers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
MARK = re.compile(r"MARK (\S+)(?: (.*))?$")
MOBYNIT = re.compile(r"mobynit: (.*)$")
KERNEL_TIME = re.compile(r"^\[\s*\d+\.\d+\] ")


@dataclass(frozen=True)
class Machine:
    """What to boot. Disks are attached read-only to the image files
    (`snapshot=on`): guests may write, the files never change, and several
    machines can share one disk image. A `persistent` machine writes through
    to its image files instead (a device booted several times in a row, its
    state kept between boots); QEMU's image lock then refuses a second
    machine on the same file."""

    kernel: Path
    initrd: Path
    cmdline: str
    disks: tuple[Path, ...] = ()
    memory_mib: int = 512
    timeout: float = 180.0
    hotplug: tuple[Path, ...] = ()  # disks added later with Run.hotplug()
    persistent: bool = False

    def command(self, qmp: Path | None = None) -> list[str]:
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", str(self.memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline,
        ]
        snapshot = "off" if self.persistent else "on"
        for n, disk in enumerate(self.disks):
            cmd += ["-drive", f"file={disk},format=raw,if=virtio,snapshot={snapshot},id=disk{n}"]
        for n, disk in enumerate(self.hotplug):
            cmd += ["-drive", f"file={disk},format=raw,if=none,snapshot={snapshot},id=late{n}"]
        if qmp is not None:
            cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        return cmd


@dataclass
class Console:
    """The serial console so far: (seconds since start, line) pairs."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def marks(self, name: str) -> list[str]:
        """Values of the guest's `MARK name value` lines, in order."""
        out = []
        for _, line in self.lines:
            m = MARK.search(line)
            if m and m.group(1) == name:
                out.append(m.group(2) or "")
        return out

    def mark(self, name: str) -> str | None:
        """The last `MARK name` value, None when the guest never printed it."""
        values = self.marks(name)
        return values[-1] if values else None

    def mobynit(self) -> list[str]:
        """mobynit's console lines without the prefix (and without the
        kernel's timestamp when they came through /dev/kmsg)."""
        out = []
        for _, line in self.lines:
            m = MOBYNIT.search(KERNEL_TIME.sub("", line))
            if m:
                out.append(m.group(1))
        return out

    def first(self, pattern: str) -> float | None:
        """When the first line matching `pattern` arrived."""
        rx = re.compile(pattern)
        for t, line in self.lines:
            if rx.search(line):
                return t
        return None


@dataclass
class Result:
    name: str
    machine: Machine
    console: Console
    returncode: int | None  # None: killed at the timeout
    seconds: float
    log: Path | None

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def describe(self) -> str:
        """For assertion messages: how it ended and the console's tail."""
        end = "timed out" if self.timed_out else f"exited {self.returncode}"
        tail = "\n".join(line for _, line in self.console.lines[-60:])
        return f"machine {self.name} {end} after {self.seconds:.1f} s (log: {self.log})\n{tail}"


class Run:
    """A running machine. Use as a context manager: QEMU never outlives it."""

    def __init__(self, machine: Machine, log: Path | None = None, name: str = "machine",
                 on_line: Callable[[float, str], None] | None = None) -> None:
        self.machine = machine
        self.on_line = on_line
        self.name = name
        self.log_path = log
        self.console = Console()
        self._cond = threading.Condition()
        self._qmp = None
        if machine.hotplug:
            base = log.parent if log is not None else Path("/tmp")
            self._qmp = base / f".{name}.{os.getpid()}.qmp"
        self._log = open(log, "w", encoding="utf-8", errors="replace") if log is not None else None
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            machine.command(self._qmp),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one
        )
        self._reader = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self._add(lines)
        self._add([buf] if buf else [])
        with self._cond:
            self._cond.notify_all()

    def _add(self, raw: Iterable[bytes]) -> None:
        now = time.monotonic() - self.start
        with self._cond:
            for line in raw:
                text = line.decode("utf-8", "replace").rstrip("\r")
                self.console.lines.append((now, text))
                if self.on_line is not None:
                    self.on_line(now, text)
                if self._log is not None:
                    self._log.write(f"{now:8.3f} {text}\n")
            if self._log is not None:
                self._log.flush()
            self._cond.notify_all()

    def expect(self, pattern: str, timeout: float) -> bool:
        """Wait for a console line matching `pattern` (searched from the start)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for _, line in self.console.lines[seen:]:
                    if rx.search(line):
                        return True
                seen = len(self.console.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return False
                self._cond.wait(min(left, 0.5))

    def send(self, text: str) -> None:
        """Type on the serial console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def hotplug(self, n: int = 0) -> None:
        """Plug the n-th late disk in as a virtio PCI device (QMP device_add)."""
        import json
        import socket

        assert self._qmp is not None, "this machine has no hotplug disks"
        deadline = time.monotonic() + 10
        while not self._qmp.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self._qmp))
            f = s.makefile("rw")
            f.readline()  # greeting
            for cmd in (
                {"execute": "qmp_capabilities"},
                {"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": f"late{n}", "id": f"late{n}"}},
            ):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply:
                        break
                    if "error" in reply:
                        raise RuntimeError(f"QMP {cmd['execute']}: {reply['error'].get('desc')}")

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit; None (and QEMU killed) at the timeout."""
        left = self.machine.timeout - (time.monotonic() - self.start) if timeout is None else timeout
        try:
            return self.proc.wait(timeout=max(left, 0))
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def result(self, returncode: int | None) -> Result:
        self._reader.join(timeout=5)
        return Result(self.name, self.machine, self.console, returncode, time.monotonic() - self.start, self.log_path)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.kill()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._qmp is not None:
            self._qmp.unlink(missing_ok=True)


Step = tuple[str, str]  # (console pattern to wait for, text to type then)
Driver = Callable[[Run], None]


def boot(machine: Machine, log: Path | None = None, name: str = "machine",
         steps: Sequence[Step] = (), driver: Driver | None = None) -> Result:
    """Boot `machine` to the end: through `steps` (each waits for its
    pattern, then types its text) or `driver`, then until QEMU exits or the
    hard timeout kills it."""
    with Run(machine, log, name) as run:
        for pattern, text in steps:
            left = machine.timeout - (time.monotonic() - run.start)
            if not run.expect(pattern, left):
                break
            run.send(text)
        if driver is not None:
            driver(run)
        return run.result(run.wait())


def boot_all(jobs: Sequence[tuple[str, Machine, dict]], log_dir: Path, workers: int = 2) -> dict[str, Result]:
    """Boot several machines, `workers` at a time. Each job is (name,
    machine, keyword arguments for `boot`); logs go to log_dir/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qemu") as pool:
        futures = {
            name: pool.submit(boot, machine, log_dir / f"{name}.log", name, **kwargs)
            for name, machine, kwargs in jobs
        }
        return {name: f.result() for name, f in futures.items()}
