"""Many independent reads shared out among the CPUs, by fork.

Reading a store of hundreds of containers is pure Python between short
system calls: one CPU does it all while the others idle, and threads would
not help (the interpreter runs one thread at a time). `each` forks a child
per spare CPU: each child does its own slice of the work and sends the
results back marshalled through a pipe, while this process does the first
slice itself; then it takes the children's results in order. The order and
the results are exactly those of doing it all here, and any child that
fails in any way (killed, crashed, short or unreadable output) only means
its slice is done here after all: slower, never different.

A fork and the results' way back cost about a millisecond: the first few
items are done here first, and only when the rest would give each process
`worth` seconds of work is it shared out (docs/benchmark.md measures where
that pays). A child never returns into the caller: whatever happens in it
ends with `os._exit`, so no second copy of the boot goes on.
"""

from __future__ import annotations

import marshal
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    T = TypeVar("T")
    R = TypeVar("R")

PROBE = 16  # items done here first, to learn what one costs
WORTH = 0.006  # seconds of work a process must have for a fork to pay (docs/benchmark.md)
_CHUNK = 1 << 20


def cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return 1


def each(
    work: Callable[[T], R],
    items: Sequence[T],
    encode: Callable[[R], object],
    decode: Callable[[object], R],
    processes: int | None = None,
    worth: float | None = None,
) -> list[R]:
    """[work(item) for item in items], shared out in order among up to `processes`
    processes (default: one per CPU) when what is left after the first few items
    would give each at least `worth` seconds of work.

    `encode` turns a result into what marshal can carry (tuples, dicts, strings,
    numbers, None, frozensets), `decode` turns that back into the same result."""
    while _EXITING:
        _reap(_EXITING.pop())  # long gone by now
    most = cpus() if processes is None else processes
    probe = max(PROBE, len(items) // 16)
    if most < 2 or len(items) <= probe:
        return [work(item) for item in items]
    results, spans = [], []
    start = time.perf_counter()
    for item in items[:probe]:
        results.append(work(item))
        now = time.perf_counter()
        spans.append(now - start)
        start = now
    if probe > 1:  # the slowest left out: the first of a kind may import what all the others then share
        spans.remove(max(spans))
    left = sum(spans) / len(spans) * (len(items) - probe)
    worth = WORTH if worth is None else worth
    n = min(most, len(items) - probe, int(left / worth) if worth > 0 else most)
    if n < 2:
        results.extend(work(item) for item in items[probe:])
        return results
    bounds = [probe + (len(items) - probe) * k // n for k in range(n + 1)]
    children: list[tuple[int, int, int, int]] = []  # (pid, read end, first item, end)
    try:
        for k in range(1, n):
            children.append(_fork(work, items, bounds[k], bounds[k + 1], encode, children))
        results.extend(work(item) for item in items[probe : bounds[1]])
        while children:
            pid, fd, first, end = children.pop(0)
            got = _collect(pid, fd, end - first, decode)
            results.extend(got if got is not None else (work(item) for item in items[first:end]))
        return results
    finally:
        for pid, fd, _, _ in children:  # only when this process failed: end the children it left
            _end(pid, fd)


def _fork(work: Callable[[T], R], items: Sequence[T], first: int, end: int, encode: Callable[[R], object],
          earlier: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A child doing items[first:end]; (its pid, the read end of its pipe, first, end)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            for _, fd, _, _ in earlier:
                os.close(fd)
            view = memoryview(marshal.dumps([encode(work(item)) for item in items[first:end]]))
            while view:
                view = view[os.write(write_end, view):]
            os.close(write_end)  # the end of the results now, not after this process's memory is torn down
            status = 0
        finally:
            os._exit(status)  # noqa: B012 - never back into the caller, whatever was raised
    os.close(write_end)
    return pid, read_end, first, end


def _collect(pid: int, fd: int, count: int, decode: Callable[[object], R]) -> list[R] | None:
    """The child's `count` results, or None when it did not deliver them all: a marshal
    stream cut short does not load, so complete results need no exit status."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        values = marshal.loads(b"".join(chunks))
        if type(values) is not list or len(values) != count:
            return None
        return [decode(value) for value in values]
    except (OSError, ValueError, EOFError, TypeError, IndexError, KeyError):
        return None
    finally:
        os.close(fd)
        _reap(pid, wait=False)  # its exit takes a while (its memory); nothing here depends on it


def _end(pid: int, fd: int) -> None:
    os.close(fd)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    _reap(pid)


_EXITING: list[int] = []  # children whose results are in, still tearing their memory down


def _reap(pid: int, wait: bool = True) -> None:
    """Collect the child's exit; without `wait`, one still exiting is collected at the next `each`."""
    try:
        if os.waitpid(pid, 0 if wait else os.WNOHANG) == (0, 0):
            _EXITING.append(pid)
    except ChildProcessError:
        pass
