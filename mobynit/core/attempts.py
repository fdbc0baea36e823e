"""Boots with extensions that were never confirmed, and when to stop trying them.

An extension that breaks the system must not keep it broken. Each boot that mounts extensions counts one attempt in a
small file on the data partition; the booted system confirms a healthy boot
(`mobynit confirm`, from a unit that runs once the system is up), which
resets the count. After `max_tries` unconfirmed boots in a row with the same
set of extensions, the next boots mount the hostapp alone, until the set of
extensions changes (an update, a removal) or someone runs
`mobynit confirm --retry-extensions`.

The file is tiny, written atomically and durably (mobynit.core.fileio); a
torn or garbled one counts as no history, never as an error: the worst it can
do is give the extensions their tries again.
"""

from __future__ import annotations

import posix

from mobynit.core import jsonio
from mobynit.core.errors import StoreError
from mobynit.core.fileio import make_dirs, open_beneath, read_file, write_atomic_at
from mobynit.core.model import Record
from mobynit.core.paths import split
from mobynit.core.store import is_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

VERSION = 1
DEFAULT_MAX_TRIES = 3
CMDLINE_MAX_TRIES = "mobynit.max_tries"
STATE_NAME = "mobynit/boot-attempts.json"  # on the data partition


class Attempts(Record):
    """The extension set last booted, how many boots with it were not
    confirmed, and whether boot has given up on it (hostapp only)."""

    __slots__ = ("extensions", "unconfirmed", "fallback")
    extensions: tuple[str, ...]
    unconfirmed: int
    fallback: bool


NONE = Attempts(extensions=(), unconfirmed=0, fallback=False)


class Location(Record):
    """Where the attempts file is: `rel` below `top`, the partition (or the
    directory the operator named), every level between them checked."""

    __slots__ = ("top", "rel")
    top: str
    rel: str

    @property
    def path(self) -> str:
        return f"{self.top.rstrip('/')}/{self.rel}"


def state_path(data: str) -> Location:
    """The attempts file of a data partition."""
    return Location(top=data.rstrip("/") or "/", rel=STATE_NAME)


def named(path: str, data: str | None = None) -> Location:
    """An attempts file the operator named (`--attempts FILE`): below the data
    partition when it is there (every level then checked), else in the
    directory named."""
    if data is not None:
        top = data.rstrip("/") or "/"
        if path.startswith(top.rstrip("/") + "/"):
            return Location(top=top, rel=path[len(top.rstrip("/")) + 1 :])
    directory, name = split(path)
    return Location(top=directory or ".", rel=name)


def read(where: Location) -> Attempts:
    """The recorded attempts; NONE when the file is missing, torn or garbled,
    or when a level on the way is not a real directory of the partition."""
    directory, name = split(where.rel)
    try:
        fd, _ = open_beneath(where.top, directory)
        try:
            doc = jsonio.loads(read_file(name, 1 << 20, dir_fd=fd, display=where.path))
        finally:
            posix.close(fd)
    except (StoreError, ValueError, RecursionError):
        return NONE
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return NONE
    ids, count, fallback = doc.get("extensions"), doc.get("unconfirmed"), doc.get("fallback")
    if not isinstance(ids, list) or not all(isinstance(i, str) and is_id(i) for i in ids):
        return NONE
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(fallback, bool):
        return NONE
    return Attempts(extensions=tuple(sorted(ids)), unconfirmed=count, fallback=fallback)


def write(where: Location, attempts: Attempts) -> list[str]:
    """Atomically and durably (mobynit.core.fileio): a power cut leaves the old file or the new one.

    Its directory on the partition is ours: a level that is missing is made,
    one planted in its way (a symlink, a file) is replaced, never followed;
    the paths replaced are returned, to be said. Raises StoreError naming the
    file when it cannot be written.
    """
    directory, name = split(where.rel)
    doc = {
        "version": VERSION,
        "extensions": list(attempts.extensions),
        "unconfirmed": attempts.unconfirmed,
        "fallback": attempts.fallback,
    }
    try:
        make_dirs(where.top, 0o700)  # the operator's own directory (`--attempts FILE`)
    except OSError as e:
        raise StoreError(f"{where.top}: cannot create: {e.strerror}") from None
    fd, replaced = open_beneath(where.top, directory, create=True)
    try:
        write_atomic_at(fd, name, (jsonio.dumps(doc) + "\n").encode(), 0o600, display=where.path)
    finally:
        posix.close(fd)
    return replaced


def max_tries(value: str | None, log: Callable[[str], None] | None = None) -> int:
    """`mobynit.max_tries=N` (1 <= N < 1000); anything else means the default,
    which `log` is told once, as boot tells of a bad `mobynit.wait`."""
    if value is None:
        return DEFAULT_MAX_TRIES
    if value.isascii() and value.isdigit() and 0 < int(value) < 1000:
        return int(value)
    if log is not None:
        log(f"{CMDLINE_MAX_TRIES}={value} is not a whole number from 1 to 999; using the default, {DEFAULT_MAX_TRIES}")
    return DEFAULT_MAX_TRIES


def at_boot(previous: Attempts, planned: Sequence[str], tries: int) -> tuple[Attempts, str | None]:
    """(what to record for this boot, why extensions must stay off or None).

    `planned` are the ids of the extensions the plan includes. A boot without
    extensions counts nothing; a new set of extensions gets its tries afresh.
    """
    current = tuple(sorted(planned))
    if not current:
        return previous, None
    if current != previous.extensions:
        return Attempts(extensions=current, unconfirmed=1, fallback=False), None
    if previous.fallback:
        return previous, (
            f"these extensions failed {previous.unconfirmed} unconfirmed boots in a row; still mounting the hostapp"
            " alone (until they change, or `mobynit confirm --retry-extensions`)"
        )
    if previous.unconfirmed >= tries:
        return previous.replace(fallback=True), (
            f"{previous.unconfirmed} boots in a row with these extensions were never confirmed"
            f" ({CMDLINE_MAX_TRIES}={tries}): mounting the hostapp alone"
        )
    return previous.replace(unconfirmed=previous.unconfirmed + 1), None


def confirmed(previous: Attempts, retry: bool) -> tuple[Attempts, str]:
    """(what `mobynit confirm` records, what to tell the user)."""
    if previous.fallback and not retry:
        return previous, (
            "this boot was healthy without its extensions, which stay off;"
            " `mobynit confirm --retry-extensions` gives them their tries again"
        )
    if previous.fallback:
        return previous.replace(unconfirmed=0, fallback=False), "extensions will be mounted again at the next boot"
    return previous.replace(unconfirmed=0), "boot confirmed"
