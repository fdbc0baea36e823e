"""Build mobynit's initramfs: a gzipped newc cpio archive.

    python -m initramfs.build --modules DIR --output initrd.gz

holds busybox-static (the shell, switch_root, insmod), Debian's python3.11
with the shared libraries it links and only the standard library modules
the boot path can import (read from the package's sources, then resolved
by a clean interpreter; as sourceless bytecode), those modules of the
`mobynit` package, the kernel modules the root needs in load order, and
/init. The same inputs give the same archive, byte for byte.

`--modules` is a kernel's /lib/modules/<release> directory (an extracted
Debian linux-image package will do); drivers the kernel has built in are
simply not needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = Path("/usr/bin/python3.11")
BUSYBOX = Path("/bin/busybox")
STDLIB = Path("/usr/lib/python3.11")

# What the root needs from modules: the virtio disk and overlayfs.
MODULES = ("virtio_pci", "virtio_blk", "overlay")
# Loaded only when the data partition has sysext images (mobynit/initrd/modules.py), by kind.
ON_DEMAND = (("loop", "loop"), ("squashfs", "squashfs"), ("erofs", "erofs"))

# The boot path starts at what /init runs; every module it can import, also
# lazily inside a function, is found by reading the sources (boot_closure).
BOOT_ENTRY = "mobynit.initrd.boot"
# Imported by the interpreter itself on demand (codecs by name).
INTERPRETER_EXTRAS = ("encodings.ascii", "encodings.latin_1")
# Never shipped: hashlib falls back to the built-in _sha256 without OpenSSL.
EXCLUDED = frozenset(("_hashlib", "_ssl"))


def boot_closure(source: Path = REPO, entry: str = BOOT_ENTRY) -> set[str]:
    """Every module the package's boot path may import, read from the
    sources: imports inside functions count (that is how the boot path
    defers cost), those under `if TYPE_CHECKING:` do not."""
    import ast

    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = source / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = source / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue  # not ours: the interpreter resolves it in trace_imports
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif node.module:
                todo.append(node.module)
                # `from pkg import mod` imports a module when mod is one
                todo += [f"{node.module}.{alias.name}" for alias in node.names
                         if (source / node.module.replace(".", "/") / f"{alias.name}.py").exists()]
    return seen


def _imports(tree):
    """Import nodes of a module, skipping `if TYPE_CHECKING:` blocks."""
    import ast

    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack += node.orelse
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack += ast.iter_child_nodes(node)


def trace_imports(source: Path = REPO, imports: tuple[str, ...] | None = None) -> dict[str, str]:
    """Module name -> file, for everything a clean interpreter loads to
    import `imports` (the interpreter's own start-up included); by default
    the boot closure."""
    if imports is None:
        imports = (*sorted(boot_closure(source) - {"__future__"}), *INTERPRETER_EXTRAS, "__future__")
    script = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({sorted(EXCLUDED)!r}))\n"
        f"for name in {list(imports)!r}: __import__(name)\n"
        "out = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items()) if m is not None}\n"
        "print(repr(out))\n"
    )
    env = {"PYTHONPATH": str(source), "PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(PYTHON), "-S", "-B", "-c", script], env=env, check=True, capture_output=True, text=True
    ).stdout
    import ast

    return {name: file for name, file in ast.literal_eval(out).items() if file}


def shared_libraries(binaries: list[Path]) -> set[Path]:
    """Every library the dynamic linker loads for `binaries` (via ldd)."""
    libs: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts:
                target = parts[parts.index("=>") + 1]
                if target.startswith("/"):
                    libs.add(Path(target))
            elif parts and parts[0].startswith("/"):
                libs.add(Path(parts[0]))
    return libs


def module_order(modules_dir: Path, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """Module files (relative to `modules_dir`) in an order insmod accepts:
    each after the modules it depends on. Built-in ones are left out."""
    release = modules_dir.name
    if not (modules_dir / "modules.dep").exists():
        subprocess.run(["depmod", "-b", str(modules_dir.parent.parent.parent), release], check=True)
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    builtin = set()
    if (modules_dir / "modules.builtin").exists():
        builtin = {_module_name(p) for p in (modules_dir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):  # modules.dep lists the deepest last
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise SystemExit(f"initramfs: module {name} is neither built into {release} nor in {modules_dir}")
        visit(by_name[name])
    return order


def _module_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _copy(src: Path, root: Path, dest: str | None = None) -> Path:
    target = root / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target, follow_symlinks=True)
    return target


def _compile(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(
        str(src), cfile=str(dest), dfile=str(src), doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )


def populate(root: Path, modules_dir: Path, source: Path = REPO) -> dict[str, object]:
    """Fill `root` with the initramfs's files; returns what went in."""
    for d in ("proc", "sys", "dev", "run", "newroot", "sysroot", "data", "tmp", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))

    _copy(BUSYBOX, root, "/bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    for applet in applets.split():
        link = root / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath("/bin/busybox", "/" + str(Path(applet).parent)))

    _copy(PYTHON, root, "/usr/bin/python3.11")
    (root / "usr/bin/python3").symlink_to("python3.11")

    modules = trace_imports(source)
    extensions: list[Path] = []
    for name, file in sorted(modules.items()):
        src = Path(file)
        if src.is_relative_to(source):
            rel = src.relative_to(source)
            dest = root / "usr/lib/python3.11" / rel
            _copy(src, root, str(dest.relative_to(root)))
            _compile(src, dest.parent / "__pycache__" / f"{dest.stem}.{sys.implementation.cache_tag}.pyc")
        elif src.suffix == ".so":
            extensions.append(_copy(src, root))
        elif src.suffix == ".py" and src.is_relative_to(STDLIB):
            _compile(src, root / str(src.with_suffix(".pyc")).lstrip("/"))
        else:
            raise SystemExit(f"initramfs: {name} comes from {src}, outside Debian's python3.11")
    # The interpreter finds its prefix by these landmarks.
    if not (root / "usr/lib/python3.11/os.pyc").exists():
        _compile(STDLIB / "os.py", root / "usr/lib/python3.11/os.pyc")
    (root / "usr/lib/python3.11/lib-dynload").mkdir(parents=True, exist_ok=True)

    for lib in sorted(shared_libraries([PYTHON, *extensions])):
        _copy(lib, root)

    mods = root / "lib/modules"
    mods.mkdir(parents=True, exist_ok=True)
    lines = [_module(modules_dir, rel, mods) for rel in module_order(modules_dir)]
    (mods / "load-order").write_text("".join(f"{line}\n" for line in lines))
    on_demand = []
    for kind, module in ON_DEMAND:
        for rel in module_order(modules_dir, (module,)):
            name = _module(modules_dir, rel, mods)
            if name not in lines and f"{kind} {name}" not in on_demand:
                on_demand.append(f"{kind} {name}")
    (mods / "on-demand").write_text("".join(f"{line}\n" for line in on_demand))

    init = root / "init"
    shutil.copy2(REPO / "initramfs/init", init)
    init.chmod(0o755)
    return {"python_modules": sorted(modules), "kernel_modules": lines, "on_demand_modules": on_demand}


def _module(modules_dir: Path, rel: str, mods: Path) -> str:
    """Copy one module (unpacked) into the initramfs's lib/modules; its file name."""
    src = modules_dir / rel
    dest = mods / (os.path.basename(rel).split(".ko")[0] + ".ko")
    if rel.endswith(".xz"):
        dest.write_bytes(lzma.decompress(src.read_bytes()))
    elif rel.endswith(".ko"):
        shutil.copy2(src, dest)
    else:
        raise SystemExit(f"initramfs: cannot unpack {src} (only .ko and .ko.xz)")
    return dest.name


def archive(root: Path, output: Path) -> None:
    """newc cpio, owned by root, sorted, with fixed times: reproducible."""
    for path in [*root.rglob("*"), root]:
        os.utime(path, (0, 0), follow_symlinks=False)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join([".", *names]) + "\n"
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        cwd=root, input=listing.encode(), check=True, capture_output=True,
    ).stdout
    tmp = output.with_suffix(output.suffix + ".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:  # no name in the header
        gz.write(cpio)
    os.replace(tmp, output)


def build(modules_dir: Path, output: Path, source: Path = REPO) -> dict[str, object]:
    """Build the initramfs at `output`; returns a summary (sizes, contents)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mobynit-initramfs.") as tmp:
        root = Path(tmp)
        summary = populate(root, modules_dir, source)
        summary["unpacked_bytes"] = sum(p.lstat().st_size for p in root.rglob("*") if p.is_file())
        archive(root, output)
    summary["gzip_bytes"] = output.stat().st_size
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m initramfs.build", description=__doc__.split("\n")[0])
    parser.add_argument("--modules", type=Path, required=True, help="the kernel's lib/modules/<release> directory")
    parser.add_argument("--output", type=Path, required=True, help="where to write the gzipped cpio")
    parser.add_argument("--source", type=Path, default=REPO, help="the directory holding the mobynit package")
    parser.add_argument("--verbose", action="store_true", help="print what went in")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("initramfs: run as root (the archive holds device nodes)", file=sys.stderr)
        return 1
    if not args.modules.is_dir():
        print(f"initramfs: {args.modules} is not a directory", file=sys.stderr)
        return 1
    summary = build(args.modules, args.output, args.source)
    if args.verbose:
        print(json.dumps(summary, indent=1))
    print(f"{args.output}: {summary['gzip_bytes'] / 1e6:.1f} MB gzipped, "
          f"{summary['unpacked_bytes'] / 1e6:.1f} MB unpacked, "
          f"{len(summary['python_modules'])} Python modules, {len(summary['kernel_modules'])} kernel modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
