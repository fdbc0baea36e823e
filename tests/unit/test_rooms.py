"""The package's rooms keep their rules: the boot path is a small stdlib island.

mobynit/core (read, decide, plan, mount) and mobynit/initrd (the PID-1
sequence) are what the initramfs runs: every import they make, at the top
or inside a function (which is how the boot path defers cost), must be on
the allowlist below, and the costly or rare ones only inside functions.
core never reaches into the rooms built on it. Checked twice: by reading
the sources, and by importing the whole island in a clean `python3 -S` and
looking at what got loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mobynit

PACKAGE = Path(mobynit.__file__).parent
ISLAND = ("core", "initrd")
# The standard library modules the boot path may use, and why each.
ALLOWED = {
    "__future__": "annotations",
    "posix": "the system calls; not `os`, whose import (its Python layer, _collections_abc) costs ~1 ms of every boot",
    "stat": "file types", "sys": "streams", "time": "timings", "errno": "error numbers",
    "marshal": "results of a store read shared out among CPUs (mobynit.core.fanout); built in",
    "_signal": "signals blocked across fanout's fork; built in and loaded at start, where `signal` costs ~1 ms",
    "gc": "a short-lived run turns the cyclic collector off (mobynit.core.process)",
    "_json": "the C JSON scanner and encoder (mobynit.core.jsonio), without json's re",
    "fcntl": "the work directory's lock", "select": "waiting for uevents", "socket": "the uevent netlink socket", "struct": "superblocks and partition tables",
}
# Allowed only inside a function: costly to import, needed by few runs.
LATE = {
    "ctypes": "only a run that mounts loads libc",
    "_ctypes": "syscalls binds libc through ctypes' C module: ~0.3 ms where the ctypes package costs ~2 ms",
    "hashlib": "only extensions that ship kernel modules hash a Module.symvers",
    "json": "jsonio's rare error path, for json's own message",
    "traceback": "the internal-error path of boot",
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every import outside `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: relative import"
                found.append((child.module or "", top))
                found.extend((f"{child.module}.{a.name}", top) for a in child.names
                             if (PACKAGE.parent / (child.module or "").replace(".", "/") / f"{a.name}.py").exists())
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    visit(ast.parse(path.read_text()), True)
    return found


def _island_modules() -> list[Path]:
    return sorted(p for room in ISLAND for p in (PACKAGE / room).glob("*.py"))


def test_the_island_imports_only_its_allowlist() -> None:
    bad = []
    for path in _island_modules():
        room = path.parent.name
        for name, top in _imports(path):
            if name == "mobynit" or name.startswith("mobynit.core"):
                continue
            if name.startswith("mobynit.initrd") and room == "initrd":
                continue
            if name.startswith("mobynit."):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}: outside the boot island")
            elif name.partition(".")[0] in LATE:
                if top:
                    bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name} at the top: only inside a function")
            elif name.partition(".")[0] not in ALLOWED:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}: not on the boot path's allowlist")
    assert bad == []


def test_importing_the_island_loads_nothing_else() -> None:
    modules = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in _island_modules()]
    # First the allowlist itself (and whatever it pulls in), then the island: it may add only itself.
    script = (
        "import sys\n"
        f"for m in {sorted(ALLOWED)!r}: __import__(m)\n"
        "before = set(sys.modules)\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = set(subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True,
                             cwd=PACKAGE.parent).stdout.split())
    assert out == {"mobynit", *(f"mobynit.{r}" for r in ISLAND), *modules}


def test_every_module_of_the_package_is_in_a_room() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {"core", "initrd", "tools", "runtime"}
