"""Mutation audit of the core rules: each listed one-line fault must fail a fast test.

    .venv/bin/python -m tests.mutants            # every mutant
    .venv/bin/python -m tests.mutants plan-      # those whose name starts so

For each mutant the source line is changed in place, the unit tests it names
run (in a fresh interpreter, `-x`, no cache), and the file is restored
whatever happens. A mutant the tests survive is printed as SURVIVED and the
exit status is 1. The list is the audit's: when a core rule changes, its
mutant is updated with it, and a new rule gets one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
UNIT = "tests/unit"


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str
    tests: str = UNIT  # what must fail


MUTANTS = [
    # policy: which extensions go in, and where
    Mutant("policy-legacy-label", "mobynit/core/labels.py", 'in ("1", "true")', 'in ("1", "true", "0")'),
    Mutant("policy-class-label", "mobynit/core/labels.py", 'labels.get(CLASS) == "overlay"', 'labels.get(CLASS) != "service"'),
    Mutant("policy-override-order", "mobynit/core/policy.py",
           "return (0, int(unranked), 0 if unranked else decision.priority, ext.name, ext.id)",
           "return (0, int(unranked), 0 if unranked else -decision.priority, ext.name, ext.id)"),
    Mutant("policy-normals-first", "mobynit/core/policy.py", "return (2, 0, 0, ext.name, ext.id)",
           "return (-1, 0, 0, ext.name, ext.id)"),
    Mutant("policy-sysext-version-order", "mobynit/core/policy.py",
           "return (1, int(ext.rank is None), ext.rank or 0, ext.name, ext.id)",
           "return (1, int(ext.rank is None), -(ext.rank or 0), ext.name, ext.id)"),
    Mutant("plan-sysext-below-hostapp", "mobynit/core/plan.py",
           "        *((d.extension.id, _image(d)) for d in kept if d.position == SYSEXT),\n        (HOSTAPP, hostapp),",
           "        (HOSTAPP, hostapp),\n        *((d.extension.id, _image(d)) for d in kept if d.position == SYSEXT),"),
    Mutant("images-deletions-kept", "mobynit/core/images.py", "    deletes = facts.whiteouts or facts.opaques or facts.xattrs",
           "    deletes = ()", "tests/fuzz/test_images.py"),
    Mutant("images-symlink-followed", "mobynit/core/images.py", "    if kind == _S_IFLNK:", "    if kind == -1:",
           "tests/fuzz/test_images.py"),
    Mutant("images-outside-kept", "mobynit/core/images.py", "    if outside:", "    if False:", "tests/fuzz/test_images.py"),
    Mutant("policy-dead-included", "mobynit/core/policy.py", "elif container.state is not None:",
           "elif container.state == 'Gone':"),
    # the kernel filter
    Mutant("kernel-version-prefix", "mobynit/core/policy.py", 'running = kernel_release.partition("-")[0]',
           "running = kernel_release"),
    Mutant("kernel-abi-token-ignored", "mobynit/core/policy.py", "    if abi_token != computed:", "    if abi_token == computed:"),
    Mutant("kernel-abi-unverified-kept", "mobynit/core/policy.py", "    if abi_token is None:\n        if unverified_ok:",
           "    if abi_token is None:\n        if True:"),
    Mutant("kernel-no-symvers-kept", "mobynit/core/policy.py", "if modules.symvers_sha256 is None:",
           "if modules.symvers_sha256 == 'never':"),
    # the command-line switches
    Mutant("switch-off-word", "mobynit/core/cmdline.py", 'FALSE_WORDS = frozenset(("0", "n", "no", "false", "off"))',
           'FALSE_WORDS = frozenset(("0", "n", "no", "false"))', "tests/unit/test_cmdline.py"),
    Mutant("switch-dash-underscore", "mobynit/core/cmdline.py", 'return name.replace("-", "_")', "return name",
           "tests/unit/test_cmdline.py"),
    Mutant("switch-emergency", "mobynit/core/cmdline.py", 'EMERGENCY_UNITS = frozenset(("emergency.target",))',
           'EMERGENCY_UNITS = frozenset(("rescue.target",))', "tests/unit/test_cmdline.py"),
    # the planner
    Mutant("plan-shared-layers-counted-twice", "mobynit/core/plan.py", "            if layer.path not in seen:\n                seen.add(layer.path)\n                n += 1",
           "            if True:\n                seen.add(layer.path)\n                n += 1"),
    Mutant("plan-max-lower", "mobynit/core/plan.py", "MAX_LOWER = 500", "MAX_LOWER = 499"),
    Mutant("plan-page-boundary", "mobynit/core/plan.py", "options_len > page_size - 1", "options_len > page_size"),
    Mutant("plan-order-normals-first", "mobynit/core/plan.py",
           "*((d.extension.id, _image(d)) for d in kept if d.position == OVERRIDE),\n"
           "        *((d.extension.id, _image(d)) for d in kept if d.position == SYSEXT),\n        (HOSTAPP, hostapp),",
           "(HOSTAPP, hostapp),\n        *((d.extension.id, _image(d)) for d in kept if d.position == OVERRIDE),\n"
           "        *((d.extension.id, _image(d)) for d in kept if d.position == SYSEXT),"),
    Mutant("plan-drop-from-front", "mobynit/core/plan.py", "        d = kept.pop()\n        entries -= own.pop()",
           "        d = kept.pop(0)\n        entries -= own.pop(0)"),
    # the flat check
    Mutant("facts-whiteout-ignored", "mobynit/core/facts.py", "for p in (*f.whiteouts, *f.opaques):",
           "for p in (*f.opaques,):"),
    Mutant("facts-stale-trusted", "mobynit/core/facts.py", "if dirs is not None and not unchanged(", "if dirs is None and not unchanged("),
    Mutant("facts-order-reversed", "mobynit/core/facts.py", "for s in reversed(stacks):", "for s in stacks:"),
    # the store's chain: real directories on the partition only
    Mutant("store-root-chain-unchecked", "mobynit/core/store.py", "                require_dir(path, device)",
           "                pass", "tests/unit/test_store_chain.py tests/unit/test_speed_paths.py"),
    Mutant("store-device-unchecked", "mobynit/core/fileio.py", "if device is not None and st.st_dev != device:",
           "if False:"),
    Mutant("store-shared-level-skipped", "mobynit/core/store.py", '            parent_rel, _, name = rel.rpartition("/")',
           '            parent_rel, name = "", rel'),
    Mutant("store-shared-level-unchecked", "mobynit/core/store.py", "            check_dir(posix.fstat(fd), shown, device)",
           "            pass"),
    Mutant("store-layer-dir-unchecked", "mobynit/core/store.py",
           "            _dir_at(overlay2, lid, device, self.overlay2)", "            pass",
           "tests/unit/test_speed_paths.py"),
    Mutant("store-file-device-unchecked", "mobynit/core/fileio.py",
           "        if device is not None and device != st.st_dev:",
           "        if False:", "tests/unit/test_speed_paths.py"),
    Mutant("facts-path-dotdot-allowed", "mobynit/core/facts.py", 'and "/../" not in wrapped', "",
           "tests/unit/test_speed_paths.py"),
    # the store read shared out among processes: what one process would have read, in its order
    Mutant("fanout-failed-slice-dropped", "mobynit/core/fanout.py",
           "results.extend(got if got is not None else (work(item) for item in items[first:end]))",
           "results.extend(got or ())", "tests/unit/test_fanout.py"),
    Mutant("fanout-slices-overlap", "mobynit/core/fanout.py",
           "_fork(work, items, bounds[k], bounds[k + 1], encode)",
           "_fork(work, items, bounds[k] - 1, bounds[k + 1], encode)", "tests/unit/test_fanout.py"),
    Mutant("fanout-fastest-left-out", "mobynit/core/store.py",
           "counted = sorted(spans)[:-1] if len(spans) > 1 else list(spans)",
           "counted = sorted(spans)[1:] if len(spans) > 1 else list(spans)", "tests/unit/test_fanout.py"),
    Mutant("fanout-cpus-ignored", "mobynit/core/store.py", "return max(1, min(cpus, left, wanted))",
           "return max(1, min(left, wanted))", "tests/unit/test_fanout.py"),
    Mutant("fanout-child-field-lost", "mobynit/core/store.py",
           "                     release_name=release_name, image=image, rank=rank)",
           "                     release_name=None, image=image, rank=rank)", "tests/unit/test_fanout.py"),
    # the boot path's own os.path: as the standard library computes it
    Mutant("paths-dotdot-kept", "mobynit/core/paths.py", "        elif parts:\n            parts.pop()",
           "        elif parts:\n            pass", "tests/unit/test_without_os.py"),
    Mutant("make-dirs-file-accepted", "mobynit/core/fileio.py",
           "        posix.mkdir(path, mode)\n    except FileExistsError:\n        if not is_dir(path):\n            raise",
           "        posix.mkdir(path, mode)\n    except FileExistsError:\n        if not is_dir(path):\n            pass",
           "tests/unit/test_without_os.py"),
    # the state on the data partition, and the work directory
    Mutant("attempts-dir-followed", "mobynit/core/fileio.py",
           "                inner = posix.open(part, O_DIR, dir_fd=fd)\n            except FileNotFoundError:",
           "                inner = posix.open(part, posix.O_RDONLY | posix.O_DIRECTORY, dir_fd=fd)\n            except FileNotFoundError:",
           "tests/unit/test_attempts_file.py"),
    Mutant("workdir-leftovers-kept", "mobynit/core/workdir.py", "            self.clear()", "            pass",
           "tests/engine/test_workdir.py"),
    Mutant("workdir-target-stacked", "mobynit/core/assemble.py", "    if is_mount_point(target):", "    if False:",
           "tests/engine/test_workdir.py"),
    # the purge marker
    Mutant("purge-marker-ignored", "mobynit/core/assemble.py", "    if problem is not None:\n        if problem == \"is missing\"",
           "    if problem is None and False:\n        if problem == \"is missing\""),
    Mutant("purge-marker-symlink", "mobynit/core/assemble.py", "    if stat.S_ISLNK(st.st_mode):\n        return", "    if False:\n        return"),
]


# The fast tests each family of rules has; a mutant may name others.
FOCUS = {"policy": "tests/unit/test_policy.py", "kernel": "tests/unit/test_policy.py", "switch": "tests/unit/test_cmdline.py",
         "plan": "tests/unit/test_plan.py", "purge": "tests/unit/test_purge_marker.py",
         "facts": "tests/unit/test_facts.py", "store": "tests/unit/test_store_chain.py"}


def run(m: Mutant) -> tuple[bool, float]:
    path = REPO / m.path
    source = path.read_text()
    if source.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: {m.path} holds its line {source.count(m.old)} times, not once: update it")
    start = time.monotonic()
    try:
        path.write_text(source.replace(m.old, m.new))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             *(m.tests if m.tests != UNIT else FOCUS.get(m.name.split("-")[0], UNIT)).split()],
            cwd=REPO, capture_output=True, text=True,
        )
    finally:
        path.write_text(source)
    if proc.returncode not in (0, 1):  # 1: tests failed; anything else: they did not run
        raise SystemExit(f"mutant {m.name}: pytest could not run ({proc.returncode}):\n{proc.stdout[-2000:]}")
    return proc.returncode == 1, time.monotonic() - start


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or any(m.name.startswith(a) for a in argv)]
    focus = sorted({*FOCUS.values()} | {t for m in chosen if m.tests != UNIT for t in m.tests.split()})
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *focus], cwd=REPO,
                              capture_output=True, text=True)
    if baseline.returncode != 0:  # a mutant is only killed by tests that pass without it
        raise SystemExit(f"the tests fail without any mutant:\n{baseline.stdout[-2000:]}")
    survived = []
    for m in chosen:
        killed, seconds = run(m)
        print(f"{'killed  ' if killed else 'SURVIVED'} {m.name:<36} {seconds:6.1f} s", flush=True)
        if not killed:
            survived.append(m.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
