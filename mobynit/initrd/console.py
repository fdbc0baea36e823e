"""Where the boot speaks: one short `mobynit:` line per decision, on the
console and in the kernel log.

Each line is written once to /dev/kmsg. Whether the kernel then echoes it to
the console depends on the console log level (`quiet`, `loglevel=`), so the
line is also written to the console directly exactly when the kernel will
not echo it: either way it shows up once on the serial console, and always
in `dmesg` (and the journal) of the booted system.

/dev/kmsg rate-limits each writer to ten lines per five seconds unless
`kernel.printk_devkmsg` is `on`; the boot turns that on while it speaks and
puts the previous value back before handing over.
"""

from __future__ import annotations

import posix
import sys

from mobynit.core.errors import shown

PREFIX = "mobynit: "
LEVEL_INFO = 6
LEVEL_DEBUG = 7
_USER = 1 << 3  # syslog facility "user": these lines come from userspace
_DEVKMSG = "/proc/sys/kernel/printk_devkmsg"
_PRINTK = "/proc/sys/kernel/printk"


class Console:
    """The boot's voice. `debug` lines appear only with `mobynit.debug`."""

    def __init__(self, kmsg: str = "/dev/kmsg", stream=None, verbose: bool = False,
                 devkmsg_sysctl: str = _DEVKMSG, printk_sysctl: str = _PRINTK) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        self.lines: list[str] = []
        self._kmsg: int | None = None
        self._devkmsg_before: str | None = None
        try:
            self._kmsg = posix.open(kmsg, posix.O_WRONLY | posix.O_CLOEXEC)
        except OSError:
            pass
        self._echo_level = _console_loglevel(printk_sysctl)
        self._devkmsg: int | None = None
        if self._kmsg is not None:
            # Kept open: /proc has moved into the new root by the time it is restored.
            try:
                self._devkmsg = posix.open(devkmsg_sysctl, posix.O_RDWR | posix.O_CLOEXEC)
                self._devkmsg_before = _swap_sysctl(self._devkmsg, "on")
            except OSError:
                pass

    def info(self, line: str) -> None:
        self._emit(line, LEVEL_INFO)

    def debug(self, line: str) -> None:
        if self.verbose:
            self._emit(line, LEVEL_DEBUG)

    def _emit(self, line: str, level: int) -> None:
        # Everything printed is escaped where it is built; this is the last line of defence.
        text = PREFIX + shown(line.replace("\n", " "), 2000)
        self.lines.append(text)
        echoed = False
        if self._kmsg is not None:
            try:
                posix.write(self._kmsg, f"<{_USER | level}>{text}\n".encode("utf-8", "replace"))
                echoed = level < self._echo_level
            except OSError:
                pass
        if not echoed:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except OSError:
                pass

    def close(self) -> None:
        """Give the kernel its rate limit back and let go of /dev/kmsg."""
        if self._devkmsg is not None:
            if self._devkmsg_before is not None:
                _swap_sysctl(self._devkmsg, self._devkmsg_before)
            posix.close(self._devkmsg)
            self._devkmsg = None
        if self._kmsg is not None:
            posix.close(self._kmsg)
            self._kmsg = None


def _console_loglevel(path: str = _PRINTK) -> int:
    """The first field of kernel.printk: messages below it reach the console."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: assume no echo, so the line is written directly


def _swap_sysctl(fd: int, value: str) -> str | None:
    """Set an open sysctl, returning what it was (None when it cannot be
    changed: `printk.devkmsg=` on the command line locks it)."""
    try:
        before = posix.pread(fd, 64, 0).decode("ascii").strip()
        if before != value:
            posix.pwrite(fd, f"{value}\n".encode("ascii"), 0)  # the kernel takes the word only with its newline
        return before
    except (OSError, UnicodeDecodeError):
        return None
