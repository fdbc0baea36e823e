"""Never bricked, booted for real: one device booted several times in a row
under QEMU, its data partition (and the attempts file on it) kept between
boots (docs/fallback.md).

Each sequence boots its own disk image, written through (not a snapshot),
strictly one boot after another; independent sequences boot side by side,
two at a time (one per core). Console logs: build/boot-logs/<sequence>-<n>.log.

  bad-init       an override replaces the hostapp's init by one that exits at
                 once: 3 failed boots (panic), then the hostapp alone, twice
  bad-init-max2  the same with mobynit.max_tries=2 and no panic= (the kernel's
                 default would hang; /init makes the panic reboot): 2 failed
                 boots, then alone
  garbled        a garbled attempts file: boots with its extensions, counted afresh
  debian         a Debian hostapp that runs `mobynit confirm` (the example unit)
                 with mobynit.max_tries=1: every boot keeps its extension
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobynit.core import attempts
from qemu import disk, runner
from tests.boot import kit as boot_kit
from tests.boot.kit import boot_record, files

pytestmark = pytest.mark.boot

# A panic reboots at once (not after /init's 10 s), and QEMU (-no-reboot) ends there.
PANIC = "panic=-1"
GARBLED = b'{"version": 1, "extensions": ["' + b"\xff" * 8 + b'", '  # a write cut short, and not UTF-8


@dataclass(frozen=True)
class Sequence:
    cmdlines: tuple[str, ...]  # one boot each, appended to the base command line
    timeout: float = 120.0  # per boot


SEQUENCES: dict[str, Sequence] = {
    "bad-init": Sequence((PANIC,) * 5),
    "bad-init-max2": Sequence(("mobynit.max_tries=2",) * 3),
    "garbled": Sequence(("",) * 2),
    "debian": Sequence(("mobynit.max_tries=1",) * 3, timeout=300.0),
}


def _image(kit: boot_kit.Kit, name: str, work: Path) -> Path:
    """A disk image of the sequence's own, to be written by its boots."""
    dest = work / f"sequence-{name}.img"
    if name.startswith("bad-init"):
        source = kit.disks.get("bad-init").path
    elif name == "debian":
        source = kit.disks.get("debian").path
    elif name == "garbled":
        data = work / "data-garbled"
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run(["cp", "-a", str(kit.disks.device("full").data), str(data)], check=True)
        state = data / attempts.STATE_NAME
        state.parent.mkdir(mode=0o700)
        state.write_bytes(GARBLED)
        return disk.device_disk(dest, kit.disks.device("full").sysroot, data).path
    else:
        raise KeyError(name)
    subprocess.run(["cp", "--sparse=always", str(source), str(dest)], check=True)
    return dest


def _boot_sequence(kit: boot_kit.Kit, name: str, image: Path) -> list[runner.Result]:
    """Boot one image once per command line, each boot after the last has ended."""
    seq = SEQUENCES[name]
    results = []
    for n, extra in enumerate(seq.cmdlines, start=1):
        machine = runner.Machine(
            kernel=kit.kernel.vmlinuz, initrd=kit.initrd, cmdline=f"{boot_kit.BASE_CMDLINE} {extra}".strip(),
            disks=(image,), timeout=seq.timeout, persistent=True,
        )
        res = runner.boot(machine, boot_kit.LOGS / f"{name}-{n}.log", f"{name}-{n}")
        results.append(res)
        if res.timed_out:
            break  # what follows would not say anything more
    return results


@pytest.fixture(scope="module")
def sequences(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """name -> the results of its boots, in order; the sequences the
    module's selected tests use are booted together on first use."""
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (device nodes in the initramfs, dockerd)")
    work = tmp_path_factory.mktemp("boot-fallback")
    kit = boot_kit.make_kit(work, lambda line: sys.stderr.write(f"\n{line}\n"))
    wanted = [n for item in request.session.items for n in getattr(getattr(item, "function", None), "sequences", ())]
    names = list(dict.fromkeys(wanted)) or list(SEQUENCES)
    start = time.monotonic()
    images = {name: _image(kit, name, work) for name in names}  # engines and mkfs: not in threads
    built = time.monotonic() - start
    # The longest first, so the other core takes all the short ones.
    names.sort(key=lambda n: -sum(1 for _ in SEQUENCES[n].cmdlines) * SEQUENCES[n].timeout)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sequence") as pool:
        futures = {name: pool.submit(_boot_sequence, kit, name, images[name]) for name in names}
        done = {name: f.result() for name, f in futures.items()}
    for name, results in done.items():
        for res in results:
            kit.results[res.name] = res
    kit.write_summary()
    boots = sum(len(r) for r in done.values())
    sys.stderr.write(f"\n[boot] fallback: disks in {built:.1f} s, {boots} boots of {len(done)} devices "
                     f"in {time.monotonic() - start - built:.1f} s\n")
    yield done
    shutil.rmtree(work, ignore_errors=True)


def uses(*names: str):
    def mark(fn):
        fn.sequences = names
        return fn
    return mark


def said(res: runner.Result) -> list[str]:
    return res.console.mobynit()


def reached_probe(res: runner.Result) -> None:
    """The hostapp's own (probe) init ran as PID 1, reported and powered off."""
    assert res.returncode == 0 and res.console.mark("done") is not None, res.describe()
    assert res.console.mark("pid") == "1", res.describe()
    assert res.console.mark("bad-init") is None, res.describe()


def failed_in_bad_init(res: runner.Result) -> dict:
    """The override's init ran and died; the kernel panicked. Its boot record."""
    assert res.returncode == 0, res.describe()  # the panic rebooted, and QEMU (-no-reboot) ended
    assert res.console.mark("bad-init") == "1", res.describe()
    assert res.console.mark("init-start") is None  # the hostapp's own init never ran
    assert res.console.first("Kernel panic - not syncing: Attempted to kill init") is not None, res.describe()
    assert "root mounted read-only at /newroot: hostapp and 2 extensions" in said(res), res.describe()
    record = boot_record(res)
    assert record is not None, res.describe()
    return record


def hostapp_alone(res: runner.Result, tries: int, reason: str) -> None:
    reached_probe(res)
    seen = files(res)
    assert seen["/etc/hostapp-file"] == "hostapp"
    assert "/usr/share/tools/hello" not in seen and "/usr/share/bad-init/note" not in seen
    record = boot_record(res)
    counted = record["attempts"]
    assert counted["fallback"] is True and counted["unconfirmed"] == tries and counted["max_tries"] == tries
    assert reason in counted["reason"], counted
    assert len(counted["extensions"]) == 2
    # Every extension is in the record, skipped, with the reason.
    assert sorted(e["name"] for e in record["extensions"]) == ["bad-init", "tools"]
    for ext in record["extensions"]:
        assert not ext["included"] and ext["reason"] == counted["reason"], ext
    # The console says why, once, and what was mounted.
    assert said(res).count(counted["reason"]) == 1, "\n".join(said(res))
    assert "root mounted read-only at /newroot: hostapp and 0 extensions" in said(res)
    assert "Traceback" not in res.console.text()


@uses("bad-init")
def test_a_broken_override_fails_max_tries_boots_then_the_hostapp_boots_alone(sequences):
    boots = sequences["bad-init"]
    assert len(boots) == 5, boots[-1].describe()
    for n, res in enumerate(boots[:3], start=1):
        counted = failed_in_bad_init(res)["attempts"]
        assert counted["unconfirmed"] == n and counted["fallback"] is False and counted["max_tries"] == 3, counted
        assert counted["file"] == "/data/" + attempts.STATE_NAME
    hostapp_alone(boots[3], 3, "3 boots in a row with these extensions were never confirmed (mobynit.max_tries=3)")
    # And it stays that way: nobody confirmed with --retry-extensions, the set did not change.
    hostapp_alone(boots[4], 3, "still mounting the hostapp alone")


@uses("bad-init-max2")
def test_max_tries_on_the_command_line(sequences):
    boots = sequences["bad-init-max2"]
    assert len(boots) == 3, boots[-1].describe()
    for n, res in enumerate(boots[:2], start=1):
        counted = failed_in_bad_init(res)["attempts"]
        assert (counted["unconfirmed"], counted["max_tries"], counted["fallback"]) == (n, 2, False), counted
        # No panic= on the command line: the kernel would hang; /init armed a reboot before handing over.
        assert res.console.first("Rebooting in 10 seconds") is not None, res.describe()
    hostapp_alone(boots[2], 2, "2 boots in a row with these extensions were never confirmed (mobynit.max_tries=2)")


@uses("garbled")
def test_a_garbled_attempts_file_is_survived(sequences):
    boots = sequences["garbled"]
    assert len(boots) == 2, boots[-1].describe()
    for n, res in enumerate(boots, start=1):
        reached_probe(res)
        assert files(res)["/etc/hostapp-file"] == "patched by urgent"  # the extensions are there
        assert "/usr/share/tools/hello" in files(res)
        record = boot_record(res)
        counted = record["attempts"]
        # No history at first; then the file the first boot wrote in its place is read.
        assert (counted["unconfirmed"], counted["fallback"], counted["reason"]) == (n, False, None), counted
        assert sorted(counted["extensions"]) == sorted(e["id"] for e in record["extensions"] if e["included"])
        assert not any("warning" in line for line in said(res)), "\n".join(said(res))
        assert "Traceback" not in res.console.text()


@uses("debian")
def test_a_healthy_device_confirms_and_keeps_its_extensions(sequences):
    boots = sequences["debian"]
    assert len(boots) == 3, boots[-1].describe()
    for res in boots:
        assert res.returncode == 0 and res.console.mark("done") is not None, res.describe()
        assert files(res)["/usr/share/debian-ext/hello"] == "hello from a Debian extension"
        counted = boot_record(res)["attempts"]
        # max_tries=1: one unconfirmed boot before this one would have meant the hostapp alone.
        assert (counted["unconfirmed"], counted["max_tries"], counted["fallback"]) == (1, 1, False), counted
        # The booted system confirmed, through the example unit, on the data partition.
        assert res.console.mark("confirm") == "active success", res.describe()
        assert res.console.marks("confirm-said") == ["mobynit: boot confirmed"], res.describe()
        state = json.loads(res.console.mark("attempts"))
        assert state["unconfirmed"] == 0 and state["fallback"] is False
        assert state["extensions"] == counted["extensions"]
