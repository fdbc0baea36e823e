"""Many independent reads shared out among the CPUs, by fork.

Reading a store of hundreds of containers is pure Python between short
system calls: one CPU does it all while the others idle, and threads would
not help (the interpreter runs one thread at a time). `each` forks a child
for each process asked beyond this one: each child does its own slice of
the work and sends the results back marshalled through a pipe, while this
process does the first slice itself; then it takes the children's results
in order. The order and
the results are exactly those of doing it all here, and whatever goes wrong
with a child (the fork refused, the child killed or crashed, its output
short or unreadable) only means its slice is done here after all: slower,
never different.

A fork and the results' way back cost about a millisecond; whether a read
is worth it is decided before this module is even loaded (the store reads
a few items first and times them: mobynit.core.store.shares). A child never
returns into the caller: signals are blocked across the fork and whatever
happens in the child ends with `posix._exit`, so no second copy of the caller
goes on (and, say, unmounts what it mounted). A child holds no descriptor
once its results are sent, and every child is collected before `each`
returns.
"""

from __future__ import annotations

import _signal
import marshal
import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    T = TypeVar("T")
    R = TypeVar("R")

_PIPE_READ = 1 << 16  # a pipe holds 64 KiB
_FD_END = 1 << 20  # above any descriptor a process of ours holds (fs.nr_open's default)


def each(
    work: Callable[[T], R],
    items: Sequence[T],
    encode: Callable[[R], object],
    decode: Callable[[object], R],
    processes: int,
) -> list[R]:
    """[work(item) for item in items], shared out in order among `processes` processes,
    this one doing the first slice (whether that pays is the caller's to judge: see
    mobynit.core.store.shares).

    `encode` turns a result into what marshal can carry (tuples, dicts, strings,
    numbers, None, frozensets), `decode` turns that back into the same result."""
    n = min(processes, len(items))
    if n < 2:
        return [work(item) for item in items]
    bounds = [len(items) * k // n for k in range(n + 1)]
    children: list[tuple[int, int, int, int]] = []  # (pid, read end, first item, end)
    results: list[R] = []
    try:
        for k in range(1, n):
            child = _fork(work, items, bounds[k], bounds[k + 1], encode)
            if child is None:  # no fork to be had (EAGAIN, ENOMEM, EMFILE): the rest is read here
                children.append((-1, -1, bounds[k], len(items)))
                break
            children.append((*child, bounds[k], bounds[k + 1]))
        results.extend(work(item) for item in items[: bounds[1]])
        while children:
            pid, fd, first, end = children.pop(0)
            got = None if pid < 0 else _collect(pid, fd, end - first, decode)
            results.extend(got if got is not None else (work(item) for item in items[first:end]))
        return results
    finally:
        for pid, fd, _, _ in children:  # only when this process failed: end the children it left
            if pid >= 0:
                _kill(pid, fd)


def _fork(work: Callable[[T], R], items: Sequence[T], first: int, end: int,
          encode: Callable[[R], object]) -> tuple[int, int] | None:
    """A child doing items[first:end]: (its pid, the read end of its pipe);
    None when the system has no fork to give."""
    try:
        read_end, write_end = posix.pipe2(posix.O_CLOEXEC)
    except OSError:
        return None
    # Blocked across the fork, so that no signal's handler runs in the child as the caller's code.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        pid = posix.fork()
        if pid == 0:
            _child(work, items[first:end], encode, write_end, mask)  # never returns
    except OSError:
        posix.close(read_end)
        posix.close(write_end)
        return None
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    posix.close(write_end)
    return pid, read_end


def _child(work: Callable[[T], R], items: Sequence[T], encode: Callable[[R], object], out: int,
           mask: object) -> None:
    """The child's whole life: its slice, marshalled into `out`, then `posix._exit`."""
    try:
        for sig in (_signal.SIGINT, _signal.SIGTERM):  # the caller's handlers would raise here: die instead
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        view = memoryview(marshal.dumps([encode(work(item)) for item in items]))
        posix.closerange(0, out)  # the store, the work directory's lock, ...: let go before the end of the results
        posix.closerange(out + 1, _FD_END)
        while view:
            view = view[posix.write(out, view):]
    finally:
        posix._exit(0)  # noqa: B012 - never back into the caller, whatever was raised; short output says the rest


def _collect(pid: int, fd: int, count: int, decode: Callable[[object], R]) -> list[R] | None:
    """The child's `count` results, or None when it did not deliver them all: a marshal
    stream cut short does not load, so complete results need no exit status."""
    chunks = []
    try:
        while True:
            chunk = posix.read(fd, _PIPE_READ)
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
        posix.close(fd)
        _reap(pid)


def _kill(pid: int, fd: int) -> None:
    posix.close(fd)
    try:
        posix.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        posix.waitpid(pid, 0)
    except ChildProcessError:
        pass
