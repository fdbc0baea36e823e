"""Running mobynit on the arena, and the properties every run must have.

Containment is decided by device and inode, not by path strings: every
`overlay2/<id>/diff` of the two stores, reached from the partitions' tops
through real directories only (lstat, no symlink), is a layer directory; a
lower dir is in a store when os.stat (which follows symlinks, as the kernel
does when it mounts) lands on one of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from mobynit.core import fanout, syscalls
from mobynit.core import store as core_store
from mobynit.core import labels as label
from mobynit.tools import cli
from tests.fuzz.arena import CANARY, DATA_LEVELS, Arena, real_dir
from tests.harness import mounts
from tests.harness.device import KERNEL_RELEASE

HEX = frozenset("0123456789abcdef")
LINK_CHARS = frozenset(string.ascii_uppercase + string.digits)
PLAN_TIMEOUT = 60  # seconds; a store that hangs the reader would hang a boot
# Hostapp files that no extension of the standard device deletes: no corruption may make them vanish.
HOSTAPP_FILES = ("etc/hostapp-file", "usr/share/hostapp/only-in-hostapp")

Variant = tuple[str, tuple[str, ...]]

# How to run mobynit: (kernel release, extra options). The standard device's modules were
# built for KERNEL_RELEASE; the running kernel's release also lets a planner use the new
# mount API (lowerdir+, Linux >= 6.8) when it knows how. Auto layout (flat when the facts
# allow) and nested, for each.
VARIANTS: list[Variant] = [(KERNEL_RELEASE, ()), (os.uname().release, ()),
                           (KERNEL_RELEASE, ("--layout", "nested")), (os.uname().release, ("--layout", "nested"))]
DEFAULT = VARIANTS[0]


# --- running mobynit -----------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"mobynit took more than {seconds} s on this store: a boot would hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _common(a: Arena, variant: Variant) -> list[str]:
    release, extra = variant
    return ["--sysroot", str(a.dev.sysroot), "--data", str(a.dev.data), "--cmdline", "",
            "--kernel-release", release, "--workdir", str(a.work), *extra]


def run_plan(a: Arena, variant: Variant, *extra: str) -> tuple[int, str, str]:
    """`mobynit plan` in this process: (status, stdout, stderr); stdout must be strict UTF-8."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.StringIO()
    with _deadline(PLAN_TIMEOUT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["plan", *_common(a, variant), *extra])
    out.flush()
    return status, out.buffer.getvalue().decode("utf-8"), err.getvalue()  # type: ignore[attr-defined]


def run_assemble(a: Arena, variant: Variant) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    record = a.work.parent / "record.json"
    record.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mobynit", "assemble", *_common(a, variant), "--target", str(a.target),
         "--record", str(record)],
        capture_output=True, text=True, errors="backslashreplace", timeout=PLAN_TIMEOUT,
    )
    doc = json.loads(record.read_text()) if record.exists() else None
    return proc, doc


def check_fanout(a: Arena, release: str) -> int:
    """The store read shared out among three processes (forced: any store, one item
    probed, any amount of work) is the one-process read, extension for extension and
    fault for fault, each child's results used rather than redone here; returns how many
    children it forked, which a listable `containers` of 4 entries or more makes 2."""
    forks: list[int] = []
    taken: list[bool] = []
    real_fork, real_collect = fanout._fork, fanout._collect

    def fork(*args):  # type: ignore[no-untyped-def]
        forks.append(1)
        return real_fork(*args)

    def collect(*args):  # type: ignore[no-untyped-def]
        got = real_collect(*args)
        taken.append(got is not None)
        return got

    saved = core_store.PROBE, core_store.WORTH, fanout._fork, fanout._collect
    core_store.PROBE, core_store.WORTH, fanout._fork, fanout._collect = 1, 0.0, fork, collect
    try:
        with _deadline(PLAN_TIMEOUT):
            alone = _scan(a, release, 1)
            shared = _scan(a, release, 3)
    finally:
        core_store.PROBE, core_store.WORTH, fanout._fork, fanout._collect = saved
    assert shared == alone, f"the store read shared out among processes differs from the one-process read:\n{shared}\n{alone}"
    assert all(taken), "a child's results were not used: its slice was read again here"
    containers = a.store / "containers"
    if real_dir(str(a.store)) and real_dir(str(containers)) and len(os.listdir(containers)) >= 4:
        assert len(forks) == 2, f"the read was not shared out ({len(forks)} children)"
    return len(forks)


def _scan(a: Arena, release: str, processes: int) -> list[object] | str:
    """The extensions the store read finds, or the one error it raises."""
    try:
        return core_store.Store(str(a.store)).scan(label.is_extension, release, processes=processes)  # type: ignore[return-value]
    except Exception as e:  # a StoreError for the whole store: the same one either way
        return f"{type(e).__name__}: {e}"


def detach(a: Arena) -> None:
    for m in mounts.mounts_under(str(a.target), str(a.work)):
        with contextlib.suppress(OSError):
            syscalls.umount(m.mount_point, syscalls.MNT_DETACH)


# --- where the layers are ------------------------------------------------------------------


def _is_link_entry(entry: str) -> bool:
    head, _, link = entry.partition("/")
    return head == "l" and len(link) == 26 and LINK_CHARS.issuperset(link)


def _is_diff_entry(entry: str) -> bool:
    lid, _, diff = entry.partition("/")
    return diff == "diff" and len(lid) == 64 and HEX.issuperset(lid)


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


Inode = tuple[int, int]


def layer_inodes(a: Arena) -> dict[Inode, tuple[str, str]]:
    """(st_dev, st_ino) of every layer directory of both stores -> (store, layer dir name).

    Only what the partitions hold counts: each store's overlay2, every overlay2/<name> and its
    diff are reached from the partition's top through real directories (lstat), so a store
    root, an overlay2 or a layer directory that is a symlink contributes nothing.
    """
    out: dict[Inode, tuple[str, str]] = {}
    for store, top, chain in (("data", a.dev.data, (a.store.name, "overlay2")),
                              ("hostapp", a.dev.sysroot, (a.hstore.name, "overlay2"))):
        path = str(top)
        for part in chain:
            path = f"{path}/{part}"
            if not real_dir(path):
                break
        else:
            for name in os.listdir(path):
                diff = f"{path}/{name}/diff"
                if real_dir(f"{path}/{name}") and real_dir(diff):
                    st = os.lstat(diff)
                    out[(st.st_dev, st.st_ino)] = (store, name)
    return out


def _inode(path: str) -> Inode | None:
    """Where the kernel lands for `path` (symlinks followed), or None if nowhere."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def broken_chain(a: Arena) -> str | None:
    """The first directory between the data partition and the extensions' layers that is not a
    real directory (a symlink, a file, a special file, missing), or None: with one, no extension
    can be read from inside the partition, so none may be included."""
    for level, rel in DATA_LEVELS.items():
        if not real_dir(f"{a.store}/{rel}".rstrip("/")):
            return level
    return None


# --- the properties ------------------------------------------------------------------------------


def check_mounts(a: Arena, doc: dict) -> None:
    """Every lower dir of every mount is a layer of the store its owner came from, or in the work dir.

    Relative dirs named from a store's overlay2 directory must have the store's own forms
    (`l/<26>` or `<64 hex>/diff`); wherever a lower dir resolves to (os.stat, as the kernel
    resolves it) must be a layer directory of the right store, by device and inode. Links the
    plan itself makes (`symlinks` operations) are followed on paper.
    """
    work = str(a.work)
    stores = {str(a.hstore / "overlay2"), str(a.store / "overlay2")}
    inodes = layer_inodes(a)
    ext_ids = {e["id"] for e in doc["extensions"]}
    host_layers = set()
    for p in doc["hostapp"]["layers"]:
        key = _inode(p)
        assert key in inodes and inodes[key][0] == "hostapp", f"the hostapp's layer {p} is not in the hostapp store"
        host_layers.add(key)
    links: dict[str, str] = {}
    for op in doc["mounts"]:
        if op["op"] == "symlinks":
            assert _under(op["target"], work), op
            for name, target in op["links"]:
                assert "/" not in name and name not in (".", ".."), op
                links[f"{op['target']}/{name}"] = target
    for op, cwd, entry in _lower_dirs(doc):
        owner = op["owner"]
        assert owner in ("root", "hostapp") or owner in ext_ids, op
        assert ".." not in entry.split("/") and entry, (entry, op)
        if cwd is not None:
            assert cwd in stores or cwd == work or _under(cwd, work), op
            if cwd in stores and not entry.startswith("/"):
                assert _is_link_entry(entry) or _is_diff_entry(entry), (entry, op)
                if owner != "root":  # the flat root's layers come from both stores
                    assert (cwd == str(a.hstore / "overlay2")) == (owner == "hostapp"), op
        assert entry.startswith("/") or cwd is not None, (entry, op)
        path = entry if entry.startswith("/") else os.path.join(cwd or "/", entry)
        path = links.get(path, path)
        if _under(path, work):
            continue  # a mount point of the nested layout, made in the work directory
        key = _inode(path)
        assert key in inodes, f"{entry} (from {cwd}) lands outside both stores' layers ({os.path.realpath(path)}): {op}"
        store, name = inodes[key]
        assert _is_diff_entry(f"{name.removesuffix('-init')}/diff"), (path, name, op)
        if store == "hostapp":
            assert owner == "hostapp" or key in host_layers, f"{path} is a hostapp-store layer, not the hostapp's: {op}"
        else:
            assert owner != "hostapp", f"the hostapp's mount uses {path} from the data store: {op}"


def _lower_dirs(doc: dict) -> Iterator[tuple[dict, str | None, str]]:
    """(operation, cwd, lower dir) for every lower dir of every mount the plan makes."""
    for op in doc["mounts"]:
        if op["op"] == "mount":
            options = [o for o in (op["options"] or "").split(",") if o.startswith("lowerdir=")]
            assert len(options) == 1, op
            for entry in options[0].removeprefix("lowerdir=").split(":"):
                yield op, op["cwd"], entry
        elif op["op"] == "fsmount":
            for cwd, entry in op["layers"]:
                yield op, cwd, entry


def check_decisions(a: Arena, doc: dict) -> None:
    assert doc["hostapp"]["id"] == a.dev.hostapp_id
    assert doc["hostapp"]["layers"], doc["hostapp"]
    for key in ("disabled_reason", "layout_reason"):
        assert doc.get(key) is None or doc[key].isprintable(), f"{key} is not one printable line: {doc[key]!r}"
    for e in doc["extensions"]:
        if e["included"]:
            assert "reason" not in e, e
        else:
            reason = e.get("reason")
            assert isinstance(reason, str) and reason, e
            assert reason.isprintable(), f"reason is not one printable line: {reason!r}"
    level = broken_chain(a)
    if level is not None:
        included = [e["name"] for e in doc["extensions"] if e["included"]]
        assert not included, f"the store's {level!r} is not a real directory, yet {included} were included"


def check_text(text: str, doc: dict) -> None:
    """The text plan: printable lines, one per item before the mounts, nothing that forges another."""
    lines = text.splitlines()
    assert text.endswith("\n") and len(text.split("\n")) == len(lines) + 1, text
    for line in lines:
        assert line.isprintable(), repr(line)
    head = next(i for i, line in enumerate(lines) if line.startswith("mounts"))
    included = any(e["included"] for e in doc["extensions"])
    # hostapp, its layers, the extensions' count (or why none were read), each decision and
    # warning, and the layout when there are extensions in the root
    expected = 1 + len(doc["hostapp"]["layers"]) + 1 + sum(1 + ("warning" in e) for e in doc["extensions"]) + included
    assert head == expected, text
    assert sum(line.startswith("layout ") for line in lines[:head]) == included, text


def check_assembled(a: Arena, proc: subprocess.CompletedProcess[str], record: dict | None, plan_doc: dict) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():
        assert line.startswith("mobynit: ") and line.isprintable(), f"forged or raw stderr line: {line!r}"
    assert record is not None
    check_decisions(a, record)
    check_mounts(a, record)
    planned = {e["id"] for e in plan_doc["extensions"] if e["included"]}
    assert {e["id"] for e in record["extensions"] if e["included"]} <= planned
    if not a.forged:  # a forged facts document is trusted by design: it may let a whiteout through
        for rel in HOSTAPP_FILES:  # an override may replace one (by a directory, even), never delete it
            assert os.path.lexists(a.target / rel), f"the assembled root lacks the hostapp's /{rel}"
    assert not (a.target / CANARY).exists(), "a layer from outside the store was mounted"
    new = [m for m in mounts.mountinfo() if _under(m.mount_point, str(a.work.parent))]
    assert [m.mount_point for m in new] == [str(a.target)], new
    assert new[0].fstype == "overlay"
    inodes = layer_inodes(a)
    for key, value in _super_options(str(a.target)):
        entries = value.split(":") if key == "lowerdir" else [value] if key == "lowerdir+" else []
        for entry in entries:
            assert entry and ".." not in entry.split("/"), (key, value)
            if entry.startswith("/"):
                assert _under(entry, str(a.work)) or _inode(entry) in inodes, entry
            else:
                assert _is_link_entry(entry) or _is_diff_entry(entry) or "/" not in entry, entry


def _super_options(mount_point: str) -> list[tuple[str, str]]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if mounts._unescape(left.split()[4]) == mount_point:
                opts = mounts._unescape(right.split()[2])
                return [(k, v) for k, _, v in (o.partition("=") for o in opts.split(","))]
    raise AssertionError(f"{mount_point} is not mounted")


def one_error(stderr: str) -> None:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("mobynit: error: ")]
    assert len(errors) == 1 and lines == errors, stderr
    assert "hostapp" in errors[0] and errors[0].isprintable(), errors[0]


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What a root shows: every entry's type, mode, owner, size, link target and content hash."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            extra: object = None
            if stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                extra = st_.st_rdev
            size = 0 if stat.S_ISDIR(st_.st_mode) else st_.st_size
            out[os.path.relpath(path, root)] = (st_.st_mode, st_.st_uid, st_.st_gid, size, extra)
    return out
