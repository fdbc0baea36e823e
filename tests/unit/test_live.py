"""Live layering (`mobynit merge/unmerge/refresh/list`) on real mounts, with --root.

Each test builds a small root (a base /usr and /opt) and sysext images made by
Debian's own tools (mksquashfs, mkfs.erofs, or plain directories), runs the
command as a separate process in the test's private mount namespace, and
checks the outcome against oracles the code under test does not share: the
kernel's mount table (tests/harness/mounts.py parses /proc/self/mountinfo)
and a file-by-file comparison of the merged tree with the union the test
computes from the trees it wrote itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobynit.tools.live_state import beneath_supported
from tests.harness import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mksquashfs") or not shutil.which("mkfs.erofs"),
                                reason="needs root, squashfs-tools and erofs-utils")

RELEASE = "ID=debian\nVERSION_ID=12\n"


def mobynit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mobynit", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def tree(top: Path) -> dict[str, tuple[str, str]]:
    """Every entry under `top`: relative path -> (type, content or link target); never follows a symlink."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", p.read_text())
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def ext_tree(name: str, where: Path, files: dict[str, str] | None = None, release: str | None = RELEASE,
             release_name: str | None = None) -> Path:
    """A sysext directory tree: usr/bin/<name> plus `files`, and its release file."""
    top = where / f"src-{name}"
    for rel, text in {f"usr/bin/{name}": name, **(files or {})}.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    if release is not None:
        d = top / "usr/lib/extension-release.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"extension-release.{release_name or name}").write_text(release)
    return top


def image(src: Path, out: Path, kind: str) -> Path:
    if kind == "squashfs":
        subprocess.run(["mksquashfs", str(src), str(out), "-quiet", "-noappend", "-all-root"], check=True,
                       capture_output=True)
    elif kind == "erofs":
        subprocess.run(["mkfs.erofs", "--quiet", "--all-root", str(out), str(src)], check=True, capture_output=True)
    else:
        shutil.copytree(src, out, symlinks=True)
    return out


@pytest.fixture
def root(tmp_path: Path):
    r = tmp_path / "root"
    (r / "usr/bin").mkdir(parents=True)
    (r / "usr/lib").mkdir(parents=True)
    (r / "usr/share/base").mkdir(parents=True)
    (r / "opt").mkdir()
    (r / "usr/bin/base").write_text("base")
    (r / "usr/share/base/doc").write_text("doc")
    (r / "usr/lib/os-release").write_text(RELEASE)
    for d in ("etc/extensions", "var/lib/extensions", "run"):
        (r / d).mkdir(parents=True)
    yield r
    mobynit("unmerge", "--root", str(r), "--quiet", check=False)  # leave no mount behind, whatever failed


def ours(r: Path, h: str = "usr") -> list[mounts.MountEntry]:
    target = os.path.realpath(r / h)
    return [m for m in mounts.mountinfo() if m.mount_point == target]


def union(r: Path, *srcs: Path, h: str = "usr") -> dict[str, tuple[str, str]]:
    """What the merged hierarchy must hold: the base, then each source above it (last on top)."""
    want = tree(r / h)
    for s in srcs:
        if (s / h).is_dir():
            want.update(tree(s / h))
    return want


@pytest.mark.parametrize("kind", ["directory", "squashfs", "erofs"])
def test_merge_and_unmerge_each_kind(root: Path, tmp_path: Path, kind: str) -> None:
    src = ext_tree("tool", tmp_path, {"opt/tool/data": "x"})
    name = "tool" if kind == "directory" else "tool.raw"
    image(src, root / "var/lib/extensions" / name, kind)
    before_usr, before_opt = tree(root / "usr"), tree(root / "opt")
    want_usr, want_opt = union(root, src), union(root, src, h="opt")

    out = mobynit("merge", "--root", str(root))
    assert "merged into /usr, /opt" in out.stdout
    assert tree(root / "usr") == want_usr
    assert tree(root / "opt") == want_opt
    for h in ("usr", "opt"):
        stack = ours(root, h)
        assert [(m.fstype, m.source) for m in stack] == [("overlay", "mobynit-live.1")]
        assert "ro" in open("/proc/self/mountinfo").read().split(f" {os.path.realpath(root / h)} ")[1].split()[0].split(",")
    with pytest.raises(OSError):
        (root / "usr/bin/new").write_text("no")  # read-only

    mobynit("unmerge", "--root", str(root))
    assert tree(root / "usr") == before_usr
    assert tree(root / "opt") == before_opt
    assert mounts.mounts_under(str(root)) == []


def test_stacking_order_and_precedence(root: Path, tmp_path: Path) -> None:
    """As systemd-sysext: the last name in version order is on top; the first search directory holding a name wins."""
    a = ext_tree("a", tmp_path, {"usr/share/x": "from a"})
    b = ext_tree("b10", tmp_path, {"usr/share/x": "from b10"})
    c = ext_tree("b9", tmp_path, {"usr/share/x": "from b9"})
    image(a, root / "etc/extensions/a", "directory")
    image(b, root / "var/lib/extensions/b10.raw", "squashfs")
    image(c, root / "var/lib/extensions/b9.raw", "erofs")
    shadow = ext_tree("a", tmp_path / "other", {"usr/share/x": "shadowed"})
    image(shadow, root / "var/lib/extensions/a.raw", "squashfs")

    listed = mobynit("list", "--root", str(root)).stdout
    assert "shadowed by" in listed and ours(root) == []
    mobynit("merge", "--root", str(root))
    assert tree(root / "usr") == union(root, a, c, b)
    assert (root / "usr/share/x").read_text() == "from b10"  # 10 sorts after 9


def test_refresh_swaps_and_idempotent_merge(root: Path, tmp_path: Path) -> None:
    one = ext_tree("one", tmp_path)
    two = ext_tree("two", tmp_path)
    image(one, root / "var/lib/extensions/one.raw", "squashfs")
    mobynit("merge", "--root", str(root))
    again = mobynit("merge", "--root", str(root))
    assert "already merged" in again.stderr
    assert len(ours(root)) == 1

    image(two, root / "etc/extensions/two", "directory")
    (root / "var/lib/extensions/one.raw").unlink()
    refused = mobynit("merge", "--root", str(root), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "refresh" in refused.stderr

    out = mobynit("refresh", "--root", str(root), "--json")
    rec = json.loads(out.stdout)
    assert rec["state"] == "merged" and rec["generation"] == 2 and rec["mechanism"] in ("beneath", "replace")
    assert tree(root / "usr") == union(root, two)
    assert [m.source for m in ours(root)] == ["mobynit-live.2"]
    on_disk = json.loads((root / "run/mobynit/live.json").read_text())
    assert on_disk == rec


@pytest.mark.parametrize("beneath", [True, False])
def test_refresh_never_hides_the_base(root: Path, tmp_path: Path, beneath: bool) -> None:
    """A watcher reads the hierarchy during repeated refreshes: the base files are always
    there; with MOVE_MOUNT_BENEATH (Linux >= 6.5) so is every extension file kept across."""
    if beneath and not beneath_supported(os.uname().release):
        pytest.skip("MOVE_MOUNT_BENEATH needs Linux 6.5")
    keep = ext_tree("keep", tmp_path)
    image(keep, root / "var/lib/extensions/keep.raw", "squashfs")
    mobynit("merge", "--root", str(root))
    flip = ext_tree("flip", tmp_path)
    watcher = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"base, ext = {str(root / 'usr/bin/base')!r}, {str(root / 'usr/bin/keep')!r}\n"
        "end = time.monotonic() + 60; seen_base = seen_ext = 0\n"
        "while time.monotonic() < end and not os.path.exists(sys.argv[1]):\n"
        "    seen_base += not os.path.exists(base); seen_ext += not os.path.exists(ext)\n"
        "print(seen_base, seen_ext)\n"), str(tmp_path / "stop")], stdout=subprocess.PIPE, text=True)
    try:
        args = ["refresh", "--root", str(root), "--quiet"] + ([] if beneath else ["--no-beneath"])
        for i in range(6):
            if i % 2:
                shutil.rmtree(root / "etc/extensions/flip", ignore_errors=True)
            else:
                image(flip, root / "etc/extensions/flip", "directory")
            mobynit(*args)
    finally:
        (tmp_path / "stop").touch()
        out, _ = watcher.communicate(timeout=70)
    missing_base, missing_ext = map(int, out.split())
    assert missing_base == 0
    if beneath:
        assert missing_ext == 0
    assert len(ours(root)) == 1


def test_kill_9_mid_command_never_leaves_usr_half_merged(root: Path, tmp_path: Path) -> None:
    for n in range(4):
        image(ext_tree(f"e{n}", tmp_path), root / f"var/lib/extensions/e{n}.raw", "squashfs")
    base = tree(root / "usr")
    rng = random.Random(11)
    for attempt in range(12):
        cmd = "refresh" if attempt % 3 else "unmerge"
        p = subprocess.Popen([sys.executable, "-m", "mobynit", cmd, "--root", str(root), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        now = tree(root / "usr")
        assert all(now.get(k) == v for k, v in base.items()), "base files missing after kill -9"
        assert len(ours(root)) <= 2
        assert set(now) - set(base) in (set(), set(union(root, *[tmp_path / f"src-e{n}" for n in range(4)])) - set(base))
    mobynit("refresh", "--root", str(root))
    assert tree(root / "usr") == union(root, *[tmp_path / f"src-e{n}" for n in range(4)])
    assert len(ours(root)) == 1
    assert json.loads((root / "run/mobynit/live.json").read_text())["state"] == "merged"


def test_two_merges_at_once_are_serialised(root: Path, tmp_path: Path) -> None:
    image(ext_tree("solo", tmp_path), root / "var/lib/extensions/solo.raw", "erofs")
    procs = [subprocess.Popen([sys.executable, "-m", "mobynit", "merge", "--root", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert len(ours(root)) == 1


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize("case", ["garbage", "truncated", "gpt", "other-os", "other-arch", "symlink-usr",
                                  "other-name", "no-release", "symlink-entry", "modules-no-symvers"])
def test_bad_images_are_refused_with_one_line(root: Path, tmp_path: Path, case: str) -> None:
    ext = root / "var/lib/extensions"
    good = ext_tree("good", tmp_path)
    image(good, ext / "good.raw", "squashfs")
    if case == "garbage":
        (ext / "bad.raw").write_bytes(os.urandom(8192))
    elif case == "truncated":
        big = ext_tree("bad", tmp_path, {"usr/share/blob": os.urandom(300000).hex()})
        image(big, tmp_path / "full.raw", "squashfs")
        (ext / "bad.raw").write_bytes((tmp_path / "full.raw").read_bytes()[:40000])
    elif case == "gpt":
        data = bytearray(64 * 1024)
        data[512:520] = b"EFI PART"
        (ext / "bad.raw").write_bytes(bytes(data))
    elif case == "other-os":
        image(ext_tree("bad", tmp_path, release="ID=fedora\nVERSION_ID=40\n"), ext / "bad.raw", "erofs")
    elif case == "other-arch":
        image(ext_tree("bad", tmp_path, release=RELEASE + "ARCHITECTURE=arm64\n"), ext / "bad", "directory")
    elif case == "symlink-usr":
        (ext / "bad").mkdir()
        (ext / "bad/usr").symlink_to("/usr")
    elif case == "other-name":
        image(ext_tree("bad", tmp_path, release_name="someone-else"), ext / "bad", "directory")
    elif case == "no-release":
        image(ext_tree("bad", tmp_path, release=None), ext / "bad.raw", "squashfs")
    elif case == "symlink-entry":
        image(ext_tree("bad", tmp_path), tmp_path / "elsewhere", "directory")
        (ext / "bad").symlink_to(tmp_path / "elsewhere")
    elif case == "modules-no-symvers":  # the kernel gate, as at boot (mobynit.core.policy.kernel_verdict)
        image(ext_tree("bad", tmp_path, {f"usr/lib/modules/{os.uname().release}/x.ko": "ko"}), ext / "bad.raw", "erofs")
    done = mobynit("merge", "--root", str(root), "--json")
    rec = json.loads(done.stdout)
    by_name = {e["name"]: e for e in rec["extensions"]}
    assert by_name["good"]["merged"] is True
    bad = by_name["bad"]
    assert bad["merged"] is False and "\n" not in bad["reason"] and bad["reason"]
    if case == "modules-no-symvers":
        assert "without a Module.symvers" in bad["reason"], bad["reason"]
    assert tree(root / "usr") == union(root, good)  # the good one merged, nothing of the bad one
    _one_line(done)


def test_files_outside_the_hierarchies_are_not_merged_and_said(root: Path, tmp_path: Path) -> None:
    src = ext_tree("wide", tmp_path, {"etc/wide.conf": "x"})
    image(src, root / "etc/extensions/wide", "directory")
    done = mobynit("merge", "--root", str(root), "--json")
    entry = json.loads(done.stdout)["extensions"][0]
    assert entry["merged"] and "etc" in entry["warning"]
    assert not (root / "etc/wide.conf").exists()


def test_command_line_mistakes_are_one_line(root: Path, tmp_path: Path) -> None:
    (root / "notadir").write_text("")
    for args in (["--hierarchy", "/notadir"], ["--hierarchy", "relative"], ["--hierarchy", "/missing"]):
        done = mobynit("merge", "--root", str(root), *args, check=False)
        assert done.returncode in (1, 2) and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    nothing = mobynit("unmerge", "--root", str(root))
    assert "nothing merged" in nothing.stderr
    switched = mobynit("merge", "--root", str(root), "--cmdline", "quiet mobynit.no_overlays", "--json")
    image(ext_tree("tool", tmp_path), root / "etc/extensions/tool", "directory")
    switched = mobynit("merge", "--root", str(root), "--cmdline", "quiet mobynit.no_overlays", "--json")
    entry = json.loads(switched.stdout)["extensions"][0]
    assert not entry["merged"] and "mobynit.no_overlays" in entry["reason"]
    assert ours(root) == []


def test_status_shows_boot_time_and_live_extensions(root: Path, tmp_path: Path) -> None:
    from mobynit.core.record import BootRecord, Hostapp

    boot = BootRecord(hostapp=Hostapp(id="a" * 64, name="hostapp", layers=("/l",)), extensions=(), disabled_by=None,
                      disabled_reason="no data partition given: hostapp only", kernel_release=os.uname().release,
                      page_size=4096, target="/sysroot", layout="flat", layout_reason=None, mechanism="fsconfig",
                      stacking_depth=1)
    boot.write(str(root / "run/mobynit/boot.json"))
    image(ext_tree("tool", tmp_path), root / "etc/extensions/tool", "directory")
    image(ext_tree("gone", tmp_path, release="ID=fedora\n"), root / "etc/extensions/gone", "directory")
    mobynit("merge", "--root", str(root))
    args = ["status", "--record", str(root / "run/mobynit/boot.json"), "--live-record", str(root / "run/mobynit/live.json")]
    out = mobynit(*args).stdout
    assert "hostapp hostapp (aaaaaaaaaaaa): 1 layers" in out
    assert "live: merged, generation 1: /usr overlaid (attach)" in out
    assert "live sysext directory tool: merged into /usr" in out
    assert "live sysext directory gone: not merged: extension-release.gone: built for OS fedora" in out
    doc = json.loads(mobynit(*args, "--json").stdout)
    assert doc["live"]["state"] == "merged"
    mobynit("unmerge", "--root", str(root))
    assert "live: unmerged" in mobynit(*args).stdout


def test_status_says_when_the_last_command_was_interrupted(root: Path, tmp_path: Path) -> None:
    """The two states kill -9 can leave (docs/live.md): the record written `pending` and the
    overlays not yet replaced, or replaced but the record not yet `merged`. The record is
    edited as JSON here, as the interrupted command leaves it; the mount table is the kernel's."""
    from mobynit.core.record import BootRecord, Hostapp

    boot = BootRecord(hostapp=Hostapp(id="a" * 64, name="hostapp", layers=("/l",)), extensions=(), disabled_by=None,
                      disabled_reason="no data partition given: hostapp only", kernel_release=os.uname().release,
                      page_size=4096, target="/sysroot", layout="flat", layout_reason=None, mechanism="fsconfig",
                      stacking_depth=1)
    boot.write(str(root / "run/mobynit/boot.json"))
    image(ext_tree("tool", tmp_path), root / "etc/extensions/tool.raw", "squashfs")
    mobynit("merge", "--root", str(root))
    live = root / "run/mobynit/live.json"
    merged = json.loads(live.read_text())
    args = ["status", "--record", str(root / "run/mobynit/boot.json"), "--live-record", str(live)]
    assert not [line for line in mobynit(*args).stdout.splitlines() if "interrupted" in line]
    assert [m.source for m in ours(root)] == ["mobynit-live.1"]

    # Killed before its overlays were put in place: generation 2 pending, generation 1 mounted.
    live.write_text(json.dumps({**merged, "state": "pending", "generation": 2}))
    notes = [line for line in mobynit(*args).stdout.splitlines() if "interrupted" in line]
    assert notes == ["live: the last command was interrupted: run `mobynit refresh` (or `unmerge`) to get to a known state"]

    # Killed after: the mounted generation is the pending one, so the record holds.
    live.write_text(json.dumps({**merged, "state": "pending", "generation": 1}))
    notes = [line for line in mobynit(*args).stdout.splitlines() if "interrupted" in line]
    assert notes == ["live: the last command was interrupted after its overlays were in place: the record below holds"]
    doc = json.loads(mobynit(*args, "--json").stdout)
    assert doc["live"]["state"] == "pending"

    # What the note advises brings it to a known state.
    mobynit("refresh", "--root", str(root), "--quiet")
    out = mobynit(*args).stdout
    assert "interrupted" not in out and "live: merged, generation 2: /usr overlaid" in out
    assert [m.source for m in ours(root)] == ["mobynit-live.2"]


def test_classify_any_bytes_is_a_kind_or_one_line() -> None:
    """The superblock reader takes whatever a .raw holds: a kind, or one line naming the file."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mobynit.core.sysext import classify

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2048), st.integers(min_value=0, max_value=1 << 40), st.booleans(),
           st.sampled_from([b"", b"hsqs", b"\xe2\xe1\xf5\xe0"]))
    def check(head: bytes, size: int, gpt: bool, magic: bytes) -> None:
        if magic == b"hsqs":
            head = magic + head
        elif magic:
            head = head.ljust(1024, b"\0")[:1024] + magic + head
        kind, fault = classify("/x.raw", head, size, gpt)
        assert (kind is None) != (fault is None)
        assert fault is None or (fault.startswith("/x.raw: ") and "\n" not in fault)

    check()
