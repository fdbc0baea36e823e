"""Benchmark of the boot path: `mobynit assemble`, whole process, on stores the real engine wrote.

Prints a table of medians. Each run is a fresh `python3.11 -S` process (as in
the initramfs: Debian's interpreter, no site, bytecode precompiled) in this
script's private mount namespace, with the work directory on a tmpfs as
/run is at boot; the root it mounts is detached after each run.

    sh scripts/bench.sh            # or: .venv/bin/python -m tests.bench [--runs N]

Stores are built once and cached under .cache/bench/ (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mobynit.core import syscalls
from tests.harness import bulk

REPO = Path(__file__).resolve().parent.parent

PYTHON = "/usr/bin/python3.11"
CACHE = REPO / ".cache" / "bench"
STORE_VERSION = "1"  # bump when the stores' recipe changes
# 498 one-layer extensions and the two-layer hostapp are exactly overlayfs's 500
# lower layers (flat); 500 extensions are past that, and nest.
EXTENSIONS = (0, 1, 20, 100, 498, 500)
APPS = (0, 200, 1000)
MATRIX = [(n, 0) for n in EXTENSIONS] + [(0, 200), (0, 1000), (20, 200), (20, 1000), (498, 1000)]
RELEASE_NEW = "6.18.0-bench"  # fsconfig lowerdir+
RELEASE_OLD = "6.1.0-bench"  # mount(2)


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    e["PYTHONPATH"] = str(REPO)
    return e


def base_store() -> Path:
    """One device with 500 extensions and 1000 apps; variants are hardlinked subsets of it."""
    root = CACHE / f"base-{STORE_VERSION}"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    print("building the base store (500 extensions, 1000 apps; a few minutes, once)...", file=sys.stderr)
    dev = bulk.build_bulk_device(root, 500, apps=1000, overrides_every=50)
    (root / "ids.json").write_text(json.dumps({"extensions": dict(dev.extensions), "apps": list(dev.apps)}))
    (root / "done").write_text("")
    return root


def variant(base: Path, extensions: int, apps: int) -> Path:
    """A device whose data store keeps only the first `extensions` and `apps` containers."""
    out = CACHE / f"v{STORE_VERSION}-{extensions}-{apps}"
    if (out / "done").exists():
        # Layer facts from an older mobynit are re-recorded; up-to-date ones are kept.
        run_mobynit(["index", "--sysroot", str(out / "sysroot"), "--data", str(out / "data")])
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ids = json.loads((base / "ids.json").read_text())
    subprocess.run(["cp", "-al", str(base / "sysroot"), str(out / "sysroot")], check=True)
    subprocess.run(["cp", "-al", str(base / "data"), str(out / "data")], check=True)
    keep = {ids["extensions"][f"ext-{i:04d}"] for i in range(extensions)} | set(ids["apps"][:apps])
    containers = out / "data" / "docker" / "containers"
    for entry in containers.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry)
    run_mobynit(["index", "--sysroot", str(out / "sysroot"), "--data", str(out / "data")])
    (out / "done").write_text("")
    return out


def run_mobynit(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([PYTHON, "-S", "-m", "mobynit", *args], check=True, env=env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def assemble_runs(dev: Path, release: str, runs: int, work: Path, target: Path, layout: str = "auto") -> tuple[float, dict]:
    record = work.parent / "record.json"
    walls, records = [], []
    args = ["assemble", "--sysroot", str(dev / "sysroot"), "--data", str(dev / "data"), "--target", str(target),
            "--workdir", str(work), "--record", str(record), "--cmdline", "", "--kernel-release", release,
            "--quiet", "--layout", layout]
    for _ in range(runs):
        walls.append(run_mobynit(args))
        records.append(json.loads(record.read_text()))
        syscalls.umount(str(target), syscalls.MNT_DETACH)
    phases = {k: statistics.median(r["timings_ms"][k] for r in records) for k in records[0]["timings_ms"]}
    last = records[-1]
    phases["layout"] = f"{last['layout']}/{last['mechanism']}"
    phases["included"] = sum(e["included"] for e in last["extensions"])
    return median_ms(walls), phases


def startup(runs: int) -> tuple[float, float]:
    """(interpreter alone, interpreter + the boot path's imports), medians in ms."""
    bare, imports = [], []
    code = "import mobynit.tools.cli, mobynit.core.assemble, mobynit.core.store, mobynit.core.policy, mobynit.core.plan, mobynit.core.facts, mobynit.core.syscalls"
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([PYTHON, "-S", "-c", "pass"], check=True, env=env())
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([PYTHON, "-S", "-c", code], check=True, env=env())
        imports.append(time.perf_counter() - t)
    return median_ms(bare), median_ms(imports)


LIVE_COUNTS = (1, 20, 100)


def live_table(runs: int, scratch: Path) -> None:
    """`mobynit merge` and `refresh` of 1, 20 and 100 squashfs sysext images (docs/live.md), whole process.

    Run by the virtual environment's interpreter (the live commands are off the
    boot path and use attrs); each merge is undone by an untimed unmerge.
    """
    import tempfile

    print()
    head = f"{'live':>8} {'images':>6} {'replace':>8} | {'wall ms':>8}"
    print(head)
    print("-" * len(head))
    for n in LIVE_COUNTS:
        root = scratch / f"live-{n}"
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/base").write_text("base")
        (root / "usr/lib").mkdir()
        (root / "usr/lib/os-release").write_text("ID=bench\nVERSION_ID=1\n")
        images = root / "var/lib/extensions"
        images.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as src:
            for i in range(n):
                top = Path(src) / f"x{i:03d}"
                (top / "usr/lib/extension-release.d").mkdir(parents=True)
                (top / f"usr/lib/extension-release.d/extension-release.x{i:03d}").write_text("ID=bench\nVERSION_ID=1\n")
                (top / f"usr/share/x{i:03d}").mkdir(parents=True)
                (top / f"usr/share/x{i:03d}/file").write_text(str(i))
                subprocess.run(["mksquashfs", str(top), str(images / f"x{i:03d}.raw"), "-quiet", "-noappend"],
                               check=True, stdout=subprocess.DEVNULL)
        live = [sys.executable, "-m", "mobynit"]
        common = ["--root", str(root), "--quiet"]

        def timed(*args: str) -> float:
            t = time.perf_counter()
            subprocess.run([*live, *args, *common], check=True, env=env(), stdout=subprocess.DEVNULL)
            return time.perf_counter() - t

        merges = []
        for _ in range(runs):
            merges.append(timed("merge"))
            timed("unmerge")
        print(f"{'merge':>8} {n:>6} {'-':>8} | {median_ms(merges):>8.1f}")
        timed("merge")
        for label, extra in (("beneath", ()), ("replace", ("--no-beneath",))):
            refreshes = [timed("refresh", *extra) for _ in range(runs)]
            print(f"{'refresh':>8} {n:>6} {label:>8} | {median_ms(refreshes):>8.1f}")
        timed("unmerge")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21, help="runs per row (median reported)")
    ap.add_argument("--quick", action="store_true", help="only 20 extensions with 200 apps, and 500 extensions")
    ap.add_argument("--live-only", action="store_true", help="only the live layering rows (merge, refresh)")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (mounts)", file=sys.stderr)
        return 2
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "mobynit")], check=True, env=env(), stdout=subprocess.DEVNULL)
    matrix = [] if opts.live_only else [(20, 200), (498, 0), (500, 0)] if opts.quick else MATRIX
    devices = {(n, a): variant(base_store(), n, a) for n, a in matrix}

    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    scratch = Path("/run/mobynit-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    syscalls.mount("tmpfs", str(scratch), "tmpfs", 0, "mode=0755")
    work, target = scratch / "work", scratch / "root"
    target.mkdir()

    bare, imported = startup(opts.runs)
    print(f"interpreter start (python3.11 -S -c pass): {bare:.1f} ms; with the boot path's imports: {imported:.1f} ms "
          f"(imports {imported - bare:.1f} ms); median of {opts.runs}")
    print()
    head = f"{'extensions':>10} {'apps':>5} {'kernel':>7} {'layout':>15} {'incl':>5} | {'wall ms':>8} | {'read':>6} {'select':>6} {'plan':>6} {'mount':>6}"
    print(head)
    print("-" * len(head))
    for (n, a), dev in devices.items():
        for release, label in ((RELEASE_NEW, ">=6.8"), (RELEASE_OLD, "6.1")):
            wall, ph = assemble_runs(dev, release, opts.runs, work, target)
            print(f"{n:>10} {a:>5} {label:>7} {ph['layout']:>15} {ph['included']:>5} | {wall:>8.1f} | "
                  f"{ph['read']:>6.1f} {ph['select']:>6.1f} {ph['plan']:>6.1f} {ph['mount']:>6.1f}")
    live_table(opts.runs, scratch)
    syscalls.umount(str(scratch), syscalls.MNT_DETACH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
