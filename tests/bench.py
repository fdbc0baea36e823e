"""Benchmark of the boot path: `mobynit assemble`, whole process, on stores the real engine wrote.

Prints a table of medians. Each run is a fresh interpreter launched the way
the initramfs's /init launches mobynit (its interpreter flags, environment
and `-c`, read from initramfs/init so the two cannot drift apart), running
`assemble` in this script's private mount namespace, with the work directory
on a tmpfs as /run is at boot; the root it mounts is detached after each run.

    sh scripts/bench.sh                    # or: .venv/bin/python -m tests.bench [--runs N]
    sh scripts/bench.sh --against main     # this tree (B) against a worktree of main (A)
    sh scripts/bench.sh --cold ...         # the page cache dropped before every run, as at boot

With --against REV, REV is checked out once as a git worktree under
.cache/bench/, and every row runs A and B alternately (ABAB..., the order
flipped every other pair, so drift on a shared machine hits both alike);
it prints both medians and B/A. Stores are built once and cached under
.cache/bench/ (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import attrs

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
QUICK = [(0, 0), (20, 200), (498, 0), (500, 0)]
RELEASE_NEW = "6.18.0-bench"  # fsconfig lowerdir+
RELEASE_OLD = "6.1.0-bench"  # mount(2)
# What runs inside the launch line: the CLI's `assemble` (boot's own entry needs
# block devices and PID 1), after whatever /init's code does before importing
# boot's entry (turning the collector off, say). A tree whose CLI has `run()`
# (main, then the streams flushed and no teardown, as boot's main ends) is
# launched through it; an older one through main.
# (Trees from before the package's rooms named the entry mobynit.boot and the CLI mobynit.cli.)
BOOT_ENTRIES = ("from mobynit.initrd.boot import main", "from mobynit.boot import main")
CLI_RUN = "from mobynit.tools.cli import run; run()"
CLI_MAIN = "from {cli} import main; raise SystemExit(main())"


@attrs.frozen
class Launch:
    """/init's python line in one tree: interpreter flags, environment, and the code before boot's entry."""

    flags: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    prelude: str  # e.g. "import gc; gc.disable(); "
    entry: str  # the import of boot's entry that follows it


def launch_line(init: Path) -> Launch:
    """The python3 line of initramfs/init, with its continuation lines: VAR=value ... python3 FLAGS -c CODE."""
    text = init.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if re.fullmatch(r"(/usr/bin/)?python3(\.\d+)?", word) and "-c" in words[i:]:
                env = tuple(tuple(w.split("=", 1)) for w in words[:i] if "=" in w and not w.startswith("MOBYNIT_"))
                c = words.index("-c", i)
                code = words[c + 1]
                entry = next((e for e in BOOT_ENTRIES if e in code), None)
                if entry is None:
                    raise SystemExit(f"bench: {init}: the -c code {code!r} does not import {BOOT_ENTRIES[0]}")
                return Launch(flags=tuple(words[i + 1 : c]), env=env, prelude=code[: code.index(entry)], entry=entry)  # type: ignore[arg-type]
    raise SystemExit(f"bench: no python3 ... -c line in {init}")


@attrs.frozen
class Tree:
    """One version of mobynit to run: its source directory, a label, and its own launch line."""

    label: str
    path: Path
    launch: Launch = attrs.field(default=attrs.Factory(lambda self: launch_line(self.path / "initramfs" / "init"),
                                                       takes_self=True))

    @property
    def entry(self) -> str:
        """The code of `mobynit assemble ...` on this tree's launch line."""
        tools = self.path / "mobynit" / "tools" / "cli.py"
        if not tools.exists():
            return self.launch.prelude + CLI_MAIN.format(cli="mobynit.cli")
        return self.launch.prelude + (CLI_RUN if "\ndef run() ->" in tools.read_text() else CLI_MAIN.format(cli="mobynit.tools.cli"))

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        e.update(dict(self.launch.env))
        e["PYTHONPATH"] = str(self.path)
        return e

    def run(self, *args: str, code: str | None = None) -> float:
        """Seconds, wall clock, of one process."""
        argv = [PYTHON, *self.launch.flags, "-c", self.entry if code is None else code, *args]
        t = time.perf_counter()
        subprocess.run(argv, check=True, env=self.env(), stdout=subprocess.DEVNULL)
        return time.perf_counter() - t

    def compile(self) -> None:
        """Bytecode ahead of time, as the initramfs ships it (its line runs with -B)."""
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(self.path / "mobynit")], check=True,
                       env=self.env(), stdout=subprocess.DEVNULL)


def worktree(rev: str) -> Tree:
    """A git worktree of `rev` under .cache/bench/, made once per commit."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    path = CACHE / f"rev-{sha[:12]}"
    if not (path / "mobynit").is_dir():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), sha], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Tree(label=f"{rev}@{sha[:9]}", path=path)


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


def variant(base: Path, extensions: int, apps: int, trees: list[Tree]) -> Path:
    """A device whose data store keeps only the first `extensions` and `apps` containers,
    indexed by every tree compared (each records what it reads; up-to-date records are kept)."""
    out = CACHE / f"v{STORE_VERSION}-{extensions}-{apps}"
    if not (out / "done").exists():
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
    for tree in trees:
        tree.run("index", "--sysroot", str(out / "sysroot"), "--data", str(out / "data"))
    (out / "done").write_text("")
    return out


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


@attrs.frozen
class Row:
    """One row's measurements for one tree: wall-clock samples and the boot record's phases (medians)."""

    walls: tuple[float, ...]
    phases: dict[str, float]
    layout: str
    included: int


def drop_caches() -> None:
    """Every clean page and cached inode and dentry dropped, as after power-on: a boot reads cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def assemble_rows(trees: list[Tree], dev: Path, release: str, runs: int, work: Path,
                  target: Path, cold: bool = False) -> list[Row]:
    """`runs` assembles per tree, alternating between the trees, the order flipped every other
    round; with `cold`, the page cache dropped before each (the interpreter's files too)."""
    record = work.parent / "record.json"
    args = ["assemble", "--sysroot", str(dev / "sysroot"), "--data", str(dev / "data"), "--target", str(target),
            "--workdir", str(work), "--record", str(record), "--cmdline", "", "--kernel-release", release,
            "--quiet"]
    walls: list[list[float]] = [[] for _ in trees]
    records: list[list[dict]] = [[] for _ in trees]
    for i in range(runs):
        order = list(range(len(trees))) if i % 2 == 0 else list(reversed(range(len(trees))))
        for t in order:
            if cold:
                drop_caches()
            walls[t].append(trees[t].run(*args))
            records[t].append(json.loads(record.read_text()))
            syscalls.umount(str(target), syscalls.MNT_DETACH)
    rows = []
    for t in range(len(trees)):
        recs = records[t]
        phases = {k: statistics.median(r["timings_ms"][k] for r in recs) for k in recs[0]["timings_ms"]}
        last = recs[-1]
        rows.append(Row(walls=tuple(walls[t]), phases=phases, layout=f"{last['layout']}/{last['mechanism']}",
                        included=sum(e["included"] for e in last["extensions"])))
    return rows


def startup(trees: list[Tree], runs: int) -> tuple[float, list[float]]:
    """(interpreter alone, [interpreter + the boot entry's imports per tree]), medians in ms, alternating."""
    bare: list[float] = []
    imports: list[list[float]] = [[] for _ in trees]
    for i in range(runs):
        bare.append(trees[0].run(code="pass"))
        order = range(len(trees)) if i % 2 == 0 else reversed(range(len(trees)))
        for t in order:
            imports[t].append(trees[t].run(code=trees[t].launch.prelude + trees[t].launch.entry))
    return median_ms(bare), [median_ms(s) for s in imports]


LIVE_COUNTS = (1, 20, 100)


def env() -> dict[str, str]:
    """This tree's environment, for the live rows."""
    return Tree(label="this tree", path=REPO).env()


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
    ap.add_argument("--runs", type=int, default=21, help="runs per row and tree (median reported)")
    ap.add_argument("--quick", action="store_true", help="only the hostapp alone, 20 extensions with 200 apps, 498 and 500")
    ap.add_argument("--rows", help="only these rows, as EXT:APPS,EXT:APPS (from the full matrix)")
    ap.add_argument("--against", metavar="REV", help="also run a worktree of REV (A) and print B/A per row")
    ap.add_argument("--kernel", choices=("both", "new", "old"), default="both",
                    help="which mount mechanism's release to plan for (default both)")
    ap.add_argument("--live-only", action="store_true", help="only the live layering rows (merge, refresh)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every run, as a boot reads (store, interpreter and all)")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (mounts)", file=sys.stderr)
        return 2
    this = Tree(label="this tree", path=REPO)
    trees = [worktree(opts.against), this] if opts.against else [this]
    for tree in trees:
        tree.compile()
    matrix = [] if opts.live_only else QUICK if opts.quick else MATRIX
    if opts.rows:
        matrix = [tuple(int(x) for x in r.split(":")) for r in opts.rows.split(",")]  # type: ignore[misc]
    devices = {(n, a): variant(base_store(), n, a, trees) for n, a in matrix}
    releases = [(RELEASE_NEW, ">=6.8"), (RELEASE_OLD, "6.1")]
    if opts.kernel != "both":
        releases = releases[:1] if opts.kernel == "new" else releases[1:]

    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    scratch = Path("/run/mobynit-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    syscalls.mount("tmpfs", str(scratch), "tmpfs", 0, "mode=0755")
    work, target = scratch / "work", scratch / "root"
    target.mkdir()

    print(f"launch lines (initramfs/init's flags and environment, -c code), medians of {opts.runs}"
          f"{', the page cache dropped before each run of the table' if opts.cold else ''}:")
    for tree in trees:
        line = " ".join([*(f"{k}={v}" for k, v in tree.launch.env), PYTHON, *tree.launch.flags, "-c", repr(tree.entry)])
        print(f"  {tree.label}: {line} assemble ...")
    bare, imported = startup(trees, opts.runs)
    for tree, ms in zip(trees, imported):
        print(f"  {tree.label}: interpreter start (-c pass) {bare:.1f} ms; with its line's code up to boot's entry "
              f"({tree.launch.prelude + tree.launch.entry}) {ms:.1f} ms (+{ms - bare:.1f} ms)")
    print()
    head = f"{'extensions':>10} {'apps':>5} {'kernel':>7} {'layout':>15} {'incl':>5} |"
    if opts.against:
        head += f" {'A ms':>7} {'B ms':>7} {'B/A':>5} |"
    else:
        head += f" {'wall ms':>8} |"
    head += f" {'read':>6} {'select':>6} {'plan':>6} {'mount':>6}"
    print(head + ("   (phases of B; A's read in brackets)" if opts.against else ""))
    print("-" * len(head))
    for (n, a), dev in devices.items():
        for release, label in releases:
            rows = assemble_rows(trees, dev, release, opts.runs, work, target, cold=opts.cold)
            b = rows[-1]
            ph = b.phases
            cells = f"{n:>10} {a:>5} {label:>7} {b.layout:>15} {b.included:>5} |"
            if opts.against:
                wa, wb = median_ms(list(rows[0].walls)), median_ms(list(b.walls))
                cells += f" {wa:>7.1f} {wb:>7.1f} {wb / wa:>5.2f} |"
            else:
                cells += f" {median_ms(list(b.walls)):>8.1f} |"
            cells += f" {ph['read']:>6.1f} {ph['select']:>6.1f} {ph['plan']:>6.1f} {ph['mount']:>6.1f}"
            if opts.against:
                cells += f"   [{rows[0].phases['read']:.1f}]"
                if (rows[0].layout, rows[0].included) != (b.layout, b.included):
                    cells += f" A: {rows[0].layout}, {rows[0].included} included"
            print(cells, flush=True)
    if not opts.against and not opts.rows:  # this tree's own rows, off the boot path
        live_table(opts.runs, scratch)
    syscalls.umount(str(scratch), syscalls.MNT_DETACH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
