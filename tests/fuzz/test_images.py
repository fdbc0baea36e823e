"""Hostile image directories: the data partition's `extensions/` as an attacker fills it.

Each example fills a fresh `extensions/` with entries drawn from a pool made
once by Debian's mksquashfs and mkfs.erofs (good images, and images that are
wrong in one way each) and from things that are not images at all (garbage,
truncated files, FIFOs, device nodes, symlinks in and out, directories whose
`usr` points away), under hostile names. mobynit.core.images reads it with
real loop mounts in the test's own namespace. Properties, against oracles
the code does not share:

- nothing raises; every refusal is one line naming the entry, printable;
- exactly the good entries are kept (the pool knows which are good), and
  every file the kept ones show is the file the pool wrote, byte for byte;
- nothing is left mounted, no loop device stays attached, nothing outside
  the work directory was written (the image directory lists what was put in).

`test_every_kind_was_reached` proves the fuzzer reached each rule it was
written for: each kind of entry was refused (or kept) for its own reason at
least once.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobynit.core import images, policy
from mobynit.core.compat import host_architecture
from mobynit.core.errors import shown
from tests.harness import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mksquashfs") or not shutil.which("mkfs.erofs"),
                                reason="needs root, squashfs-tools and erofs-utils")

EXAMPLES = int(os.environ.get("MOBYNIT_FUZZ_IMAGE_EXAMPLES", "60"))
RELEASE_DIR = "usr/lib/extension-release.d"
HOST = {"ID": "debian", "VERSION_ID": "12"}
KERNEL = "6.1.0-fuzz"

# kind -> the words its refusal must hold (None: kept)
KINDS = {
    "sq-good": None, "ero-good": None, "dir-good": None,
    "sq-other-os": "built for OS", "sq-other-name": "an image for another name", "sq-no-release": "has no usr/lib",
    "sq-outside": "outside /usr, /opt", "sq-whiteout": "deletes or hides", "dir-usr-link": "usr is a symlink",
    "dir-outside": "outside /usr, /opt", "dir-empty": "has nothing under", "garbage": "neither a squashfs nor an erofs",
    "empty": "empty file", "truncated": "truncated squashfs", "gpt": "GPT disk image", "fifo": "not a regular file",
    "chardev": "not a regular file", "link-in": "is a symlink", "link-out": "is a symlink",
    "dangling": "is a symlink", "sq-bad-tables": "cannot mount it as squashfs", "ero-truncated": "truncated erofs",
}
SEEN: Counter[str] = Counter()


def _tree(top: Path, files: dict[str, str], name: str | None) -> Path:
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    if name is not None:
        (top / RELEASE_DIR).mkdir(parents=True, exist_ok=True)
        (top / RELEASE_DIR / f"extension-release.{name}").write_text("ID=debian\nVERSION_ID=12\n")
    return top


def _squash(src: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress", "-all-root"], check=True,
                   capture_output=True)
    return out


def _erofs(src: Path, out: Path) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", "--all-root", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw images whose release name is the pool name they are placed under (`<kind>.raw`)."""
    p = tmp_path_factory.mktemp("pool")
    src = p / "src"
    files = lambda kind: {f"usr/share/{kind}/data": f"{kind}\n", f"opt/{kind}/x": "opt\n"}  # noqa: E731
    _squash(_tree(src / "a", files("sq-good"), "sq-good"), p / "sq-good.raw")
    _erofs(_tree(src / "b", files("ero-good"), "ero-good"), p / "ero-good.raw")
    other = _tree(src / "c", files("sq-other-os"), None)
    (other / RELEASE_DIR).mkdir(parents=True)
    (other / RELEASE_DIR / "extension-release.sq-other-os").write_text("ID=fedora\nVERSION_ID=40\n")
    _squash(other, p / "sq-other-os.raw")
    _squash(_tree(src / "d", files("sq-other-name"), "somebody-else"), p / "sq-other-name.raw")
    _squash(_tree(src / "e", files("sq-no-release"), None), p / "sq-no-release.raw")
    _squash(_tree(src / "f", {**files("sq-outside"), "etc/shadow": "x\n"}, "sq-outside"), p / "sq-outside.raw")
    white = _tree(src / "g", files("sq-whiteout"), "sq-whiteout")
    os.mknod(white / "usr/share/gone", 0o600 | 0o020000, os.makedev(0, 0))
    _squash(white, p / "sq-whiteout.raw")
    good = (p / "sq-good.raw").read_bytes()
    used = int.from_bytes(good[40:48], "little")
    (p / "truncated.raw").write_bytes(good[: used - 8])
    (p / "sq-bad-tables.raw").write_bytes(good[:96] + b"\xff" * (len(good) - 96))
    ero = (p / "ero-good.raw").read_bytes()
    (p / "ero-truncated.raw").write_bytes(ero[:1100])
    gpt = bytearray(8192)
    gpt[512:520] = b"EFI PART"
    (p / "gpt.raw").write_bytes(bytes(gpt))
    (p / "outside-target").write_text("not for the root\n")
    return p


_names = st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                 max_size=12).filter(lambda n: n not in (".", "..") and not n.startswith("."))
_entries = st.lists(st.tuples(st.sampled_from(sorted(KINDS)), _names), min_size=1, max_size=8,
                    unique_by=lambda e: e[0])


def _entry_name(kind: str, hostile: str) -> str:
    """Raw images from the pool keep their pool name (their release file names it), directory
    images a name a mount option can carry; everything else takes the hostile name."""
    if kind.startswith(("sq-", "ero-")):
        return f"{kind}.raw"
    if kind.startswith("dir-"):
        return "".join(c if c in images.NAME_CHARS else "_" for c in hostile)
    return hostile if kind == "link-out" else f"{hostile}.raw"


def _place(pool: Path, d: Path, kind: str, entry: str) -> None:
    """Put one entry of `kind` named `entry` into `d`."""
    raw = entry
    name = entry[:-4]
    if kind.startswith(("sq-", "ero-", "truncated", "gpt")):
        shutil.copyfile(pool / f"{kind}.raw", d / raw)
        return
    if kind in ("garbage", "empty"):
        (d / raw).write_bytes(os.urandom(4096) if kind == "garbage" else b"")
        return
    if kind == "fifo":
        os.mkfifo(d / raw)
        return
    if kind == "chardev":
        os.mknod(d / raw, 0o600 | 0o020000, os.makedev(1, 3))
        return
    if kind == "link-in":
        shutil.copyfile(pool / "sq-good.raw", d / ".hidden")
        os.symlink(".hidden", d / raw)
        return
    if kind == "link-out":
        os.symlink(str(pool / "outside-target"), d / entry)
        return
    if kind == "dangling":
        os.symlink("/nowhere/at/all", d / raw)
        return
    safe = entry
    top = d / safe
    if kind == "dir-good":
        _tree(top, {f"usr/share/{safe}/data": f"{safe}\n"}, safe)
    elif kind == "dir-usr-link":
        top.mkdir()
        (top / "usr").symlink_to("/usr")
    elif kind == "dir-outside":
        _tree(top, {f"usr/share/{safe}/data": "x\n", "etc/passwd": "root::0:0::/:/bin/sh\n"}, safe)
    elif kind == "dir-empty":
        _tree(top, {"srv/x": "x\n"}, None)
        shutil.rmtree(top / "srv")


def _is_entry(ext, path: Path) -> bool:
    """Whether `ext` stands for the entry at `path` (`x` and `x.raw` share a name)."""
    if ext.container is not None:
        return ext.container.config == str(path)
    said = f"{path.parent}/{shown(path.name)}"  # a refusal names the entry as it can be printed
    return ext.fault.startswith((f"{said}:", f"{said} "))


def _loops(directory: Path) -> list[str]:
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            if Path(f).read_text().startswith(str(directory)):
                out.append(f)
        except OSError:
            pass
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(entries=_entries)
def test_hostile_image_directory(pool: Path, tmp_path: Path, entries: list[tuple[str, str]]) -> None:
    base = Path(os.environ.get("MOBYNIT_FUZZ_DIR", tmp_path)) / f"ex{len(SEEN)}-{os.getpid()}-{time.monotonic_ns()}"
    d = base / "extensions"
    d.mkdir(parents=True)
    placed: dict[str, str] = {}  # entry name -> kind
    for kind, hostile in entries:
        name = _entry_name(kind, hostile)
        if name in placed or name in (".hidden", ".raw"):  # two names alike: the first is kept
            continue
        _place(pool, d, kind, name)
        placed[name] = kind
    before = sorted(os.listdir(d))
    work = base / "work"
    m = images.Mounts(str(work / "images"))
    try:
        found = images.find(str(d), os.stat(d).st_dev, m, KERNEL)
        decisions = policy.select(found, KERNEL, None, policy.Host(os_release=HOST, architecture=host_architecture(),
                                                                   strict_os_version=False))
        for dec in decisions:
            ext = dec.extension
            if ext.container is None:
                assert ext.fault and "\n" not in ext.fault and ext.fault.isprintable(), ext.fault
                assert dec.reason == ext.fault
        assert len(decisions) == len(placed), ([x.extension.name for x in decisions], placed)
        for name, kind in placed.items():
            words = KINDS[kind]
            entry_name = name[:-4] if name.endswith(".raw") else name
            (dec,) = [x for x in decisions if x.extension.name == entry_name and _is_entry(x.extension, d / name)]
            if words is None:
                assert dec.included, (kind, dec.reason)
                top = dec.extension.container.layers[0].path
                assert Path(top, f"usr/share/{entry_name}/data").read_text() == f"{entry_name}\n"
            else:
                assert not dec.included, (kind, name)
                assert words in dec.reason, (kind, dec.reason)
            SEEN[kind] += 1
    finally:
        m.close()
    assert sorted(os.listdir(d)) == before, "the image directory was changed"
    assert not [e for e in mounts.mountinfo() if e.mount_point.startswith(str(base))]
    deadline = time.monotonic() + 5
    while _loops(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _loops(d), "a loop device stayed attached"
    shutil.rmtree(base)


def test_every_kind_was_reached() -> None:
    """The fuzzer met every kind of entry and saw it handled for its own reason."""
    if not SEEN:
        pytest.skip("the fuzzer did not run (run the whole file)")
    missing = sorted(k for k in KINDS if not SEEN[k])
    assert not missing, f"never reached: {missing} (raise MOBYNIT_FUZZ_IMAGE_EXAMPLES)"
