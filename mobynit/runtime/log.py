"""runc's log: what containerd's shim reads back to explain a failure."""

from __future__ import annotations

import json
import os
import stat
import sys
import time

from mobynit.runtime import PROG


def rfc3339(t: float | None = None) -> str:
    """UTC time as Go's time.Time decodes it (the shim parses our log's "time")."""
    ns = time.time_ns() if t is None else int(t * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class Log:
    """runc's log: one JSON (or logfmt) line per message, appended.

    containerd's shim reads the last "error" entry of this file and puts it in
    the error the engine shows, so every failure must end up here.
    """

    LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}

    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.threshold = 0 if debug else 1

    def __call__(self, level: str, msg: str) -> None:
        if self.LEVELS[level] < self.threshold:
            return
        now = rfc3339()
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now})
        else:
            line = f"time={json.dumps(now)} level={level} msg={json.dumps(msg)}"
        if self.path is None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            return
        # Never through a final symlink, never blocking on a FIFO, only into a regular file.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            sys.stderr.write(f"{PROG}: cannot open log {self.path}: {e.strerror}; {line}\n")
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                sys.stderr.write(f"{PROG}: log {self.path} is not a regular file; {line}\n")
                return
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
