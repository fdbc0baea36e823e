"""The proxy: the process containerd tracks for an extension, which never runs anything."""

from __future__ import annotations

import fcntl
import os
import signal
import socket

from mobynit.runtime import RuntimeFailure

# The proxy exits 0 on these: SIGUSR1 from start, SIGTERM/SIGINT from a stop.
PROXY_SIGNALS = frozenset((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of `pid`, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def spawn_proxy(console_socket: str | None) -> tuple[int, int]:
    """Fork the process containerd tracks; returns (pid, start time).

    The proxy holds none of the caller's descriptors: its stdio is
    /dev/null (or the terminal it is handed), so a caller reading our output
    to its end is not kept waiting for the proxy. It does nothing but wait for
    a signal: SIGUSR1 (start done),
    SIGTERM or SIGINT make it exit 0; any other signal has its default
    effect, as on any idle process. Those three are blocked before the fork,
    so one sent the moment the pid file exists is queued, never lost.
    When we exit, the proxy is re-parented to the shim (a subreaper), which
    reaps it and reports its exit status to the engine.
    """
    master = slave = -1
    if console_socket is not None:
        master, slave = os.openpty()
        tty_name = os.ttyname(slave)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PROXY_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _proxy(slave)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if console_socket is not None:
        os.close(slave)
        try:
            _send_console(console_socket, master, tty_name)
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            raise RuntimeFailure(f"cannot hand the terminal to console socket {console_socket}: {e.strerror}") from None
        finally:
            os.close(master)
    st = proc_stat(pid)  # our child until we exit: its /proc entry stays, even as a zombie
    if st is None:
        raise RuntimeFailure(f"proxy process {pid} has no /proc entry right after fork")
    return pid, st[1]


def _proxy(tty: int) -> None:
    try:
        os.setsid()
        if tty >= 0:
            import termios

            fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
            stdio = tty
        else:
            stdio = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(stdio, fd)
        os.closerange(3, 65536)
        os.chdir("/")
        with open("/proc/self/comm", "w") as comm:  # so ps shows what it is
            comm.write("extension-proxy")
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signal.valid_signals()) - PROXY_SIGNALS)
        signal.sigwait(PROXY_SIGNALS)
        os._exit(0)
    finally:
        os._exit(127)


def _send_console(path: str, master: int, name: str) -> None:
    """Pass the terminal's master side to the shim as runc does: its name, and the fd by SCM_RIGHTS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        socket.send_fds(sock, [name.encode()], [master])
