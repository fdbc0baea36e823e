"""Work shared out by fork (mobynit.core.fanout): the results and their order are
those of one process, whatever a child does or the system refuses, and no child
outlives a call, runs the caller's signal handlers, or goes on past it.

Each result carries the pid of the process that made it, so the tests see
that the work really was shared out (or really was not), and by whom a
failed child's slice was done again.
"""

from __future__ import annotations

import marshal
import os
import posix
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mobynit.core import fanout, store

PARENT = os.getpid()


def square(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


def ident(value: object) -> object:
    return value


def spread(work: Callable[[int], tuple[int, int]], count: int, processes: int, **kw: object) -> list[tuple[int, int]]:
    return fanout.each(work, list(range(count)), ident, ident, processes, **kw)  # type: ignore[arg-type]


def children() -> list[str]:
    """This process's children, as the kernel lists them."""
    return [c for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    yield
    assert children() == []  # every child collected by the call that made it


@pytest.mark.parametrize("count", [1, 2, 17, 333])
@pytest.mark.parametrize("processes", [2, 3, 5])
def test_the_results_are_those_of_one_process_in_order(count: int, processes: int) -> None:
    results = spread(square, count, processes)
    assert [r[0] for r in results] == [i * i for i in range(count)]
    pids = {r[1] for r in results}
    assert PARENT in pids and len(pids) == min(processes, count)  # shared out: every process made some


def test_one_process_forks_nothing() -> None:
    assert {r[1] for r in spread(square, 300, 1)} == {PARENT}
    assert spread(square, 0, 4) == []


# --- whether it pays: mobynit.core.store.shares, a pure function of the probe's timings ---------

MS = 0.001


def test_as_many_processes_as_give_each_its_worth_of_work() -> None:
    from mobynit.core.store import shares

    spans = [0.1 * MS] * 16  # 0.1 ms an item
    assert shares(spans, 100, 4, 6 * MS) == 1  # 10 ms of work: not 6 ms each for two
    assert shares(spans, 120, 4, 6 * MS) == 2
    assert shares(spans, 180, 4, 6 * MS) == 3
    assert shares(spans, 10_000, 4, 6 * MS) == 4  # at most one per CPU
    assert shares(spans, 10_000, 1, 6 * MS) == 1
    assert shares([1.0] * 4, 3, 8, 6 * MS) == 3  # at most one per item
    assert shares([1.0] * 4, 1, 8, 6 * MS) == 1
    assert shares(spans, 120, 4, 0.0) == 4  # any amount of work is worth it: one per CPU
    assert shares([], 120, 4, 6 * MS) == 1


def test_the_slowest_probed_item_is_left_out_of_the_estimate() -> None:
    from mobynit.core.store import shares

    # The first extension imports the layer lookups: 1 ms once, then 0.05 ms each.
    spans = [1 * MS] + [0.05 * MS] * 15
    assert shares(spans, 200, 2, 6 * MS) == 1  # 10 ms left: counted, the import would make it 2.2 ms an item
    assert shares(sorted(spans), 200, 2, 6 * MS) == 1  # wherever it falls
    assert shares([0.05 * MS] * 15 + [0.06 * MS], 400, 2, 6 * MS) == 2  # only one item is ever left out
    assert shares([0.3 * MS], 100, 2, 6 * MS) == 2  # a single probe is all there is


def _in_child(action: Callable[[], None], at: int) -> Callable[[int], tuple[int, int]]:
    def work(i: int) -> tuple[int, int]:
        if os.getpid() != PARENT and i == at:
            action()
        return square(i)
    return work


def _kill() -> None:
    os.kill(os.getpid(), 9)


def _raise() -> None:
    raise RuntimeError("a bug in the child")


def _exit() -> None:
    raise SystemExit(0)


@pytest.mark.parametrize("action", [_kill, _raise, _exit], ids=["killed", "raises", "system-exit"])
def test_a_failed_child_means_its_slice_is_done_here(action: Callable[[], None]) -> None:
    results = spread(_in_child(action, 150), 200, 2)
    assert [r[0] for r in results] == [i * i for i in range(200)]
    assert {r[1] for r in results} == {PARENT}  # the child's slice redone here, all of it


def test_a_child_whose_results_do_not_load_is_redone_here(monkeypatch: pytest.MonkeyPatch) -> None:
    cut = types.SimpleNamespace(dumps=lambda v: marshal.dumps(v)[:-1], loads=marshal.loads)
    monkeypatch.setattr(fanout, "marshal", cut)
    results = spread(square, 200, 3)
    assert [r[0] for r in results] == [i * i for i in range(200)] and {r[1] for r in results} == {PARENT}


def test_results_marshal_cannot_carry_or_decode_refuses_are_redone_here() -> None:
    results = fanout.each(square, list(range(200)), lambda r: object(), ident, 2)
    assert {r[1] for r in results} == {PARENT}

    def decode(value: object) -> object:
        raise KeyError("no such field")

    results = fanout.each(square, list(range(200)), ident, decode, 2)
    assert [r[0] for r in results] == [i * i for i in range(200)] and {r[1] for r in results} == {PARENT}


@pytest.mark.parametrize("refused", ["fork", "pipe2"])
@pytest.mark.parametrize("at", [1, 2])
def test_no_fork_to_be_had_means_the_rest_is_done_here(monkeypatch: pytest.MonkeyPatch, refused: str, at: int) -> None:
    real = getattr(posix, refused)  # what fanout calls: the boot path uses posix, not os
    calls = []

    def refuse(*args: object) -> object:
        calls.append(1)
        if len(calls) >= at:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(*args)

    monkeypatch.setattr(posix, refused, refuse)
    results = spread(square, 300, 4)
    assert [r[0] for r in results] == [i * i for i in range(300)]
    assert len({r[1] for r in results}) == at  # the children forked before the refusal did their slices


def test_a_signal_in_a_child_never_runs_the_callers_handler(tmp_path: Path) -> None:
    import signal

    marks = tmp_path / "handled"

    def handler(signum: int, frame: object) -> None:
        with marks.open("a") as f:
            f.write(f"{os.getpid()}\n")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        results = spread(_in_child(lambda: os.kill(os.getpid(), signal.SIGTERM), 150), 200, 2)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not marks.exists()  # the child died of it, as an idle process would
    assert [r[0] for r in results] == [i * i for i in range(200)] and {r[1] for r in results} == {PARENT}


def test_a_failure_here_ends_the_children() -> None:
    def work(i: int) -> tuple[int, int]:
        if os.getpid() == PARENT and i == 20:
            raise RuntimeError("the parent's own slice failed")
        return square(i)

    with pytest.raises(RuntimeError, match="own slice"):
        spread(work, 200, 3)
    assert children() == []  # killed and collected at once


@pytest.mark.parametrize("raised", ["SystemExit(0)", "RuntimeError('a bug')"])
def test_a_child_never_goes_on_past_the_call(raised: str) -> None:
    # Whatever a child raises, it ends there: only this process goes on past the call.
    script = (
        "import os\n"
        "from mobynit.core import fanout\n"
        "parent = os.getpid()\n"
        "def work(i):\n"
        "    if os.getpid() != parent and i > 100:\n"
        f"        raise {raised}\n"
        "    return i\n"
        "try:\n"
        "    r = fanout.each(work, list(range(300)), lambda v: v, lambda v: v, 3)\n"
        "except BaseException as e:\n"
        "    r = repr(e)\n"
        "print('went on', os.getpid() == parent, r == list(range(300)), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(fanout.__file__).parents[2], check=True).stdout
    assert out == "went on True True\n"


# --- the store read, shared out ------------------------------------------------------------------

RELEASE = "6.1.0-test"


def _hex(n: int, kind: str) -> str:
    return (kind + f"{n:x}").rjust(64, "0")


def _link(n: int) -> str:
    return f"L{n:025d}"


def _container(root: Path, n: int, labels: dict[str, str], files: dict[str, bytes], own: bool = False) -> str:
    """A container of one image layer holding `files` (a container's own diff too, with `own`)."""
    import json

    cid, mount_id, layer = _hex(n, "c"), _hex(n, "a"), _hex(n, "b")
    (root / "containers" / cid).mkdir(parents=True)
    (root / "containers" / cid / "config.v2.json").write_text(json.dumps(
        {"ID": cid, "Name": f"/ctr-{n}", "Config": {"Labels": labels}, "State": {"Dead": n % 7 == 3}}))
    (root / "image/overlay2/layerdb/mounts" / cid).mkdir(parents=True)
    (root / "image/overlay2/layerdb/mounts" / cid / "mount-id").write_text(mount_id)
    (root / "overlay2" / mount_id / "diff").mkdir(parents=True)
    if own:
        (root / "overlay2" / mount_id / "diff" / "own-file").write_text("own")
    (root / "overlay2" / mount_id / "lower").write_text(f"l/{_link(n)}")
    diff = root / "overlay2" / layer / "diff"
    diff.mkdir(parents=True)
    for rel, data in files.items():
        (diff / rel).parent.mkdir(parents=True, exist_ok=True)
        (diff / rel).write_bytes(data)
    (root / "overlay2/l").mkdir(exist_ok=True)
    (root / "overlay2/l" / _link(n)).symlink_to(f"../{layer}/diff")
    return cid


def _varied_store(root: Path) -> None:
    """Extensions of every shape the reader returns, faults among them, and applications."""
    from mobynit.core import facts

    ext = {"io.balena.image.class": "overlay"}
    for n in range(60):
        kind = n % 6
        if kind == 0:
            _container(root, n, {"app": "yes"}, {"srv/app": b"x"})
        elif kind == 1:
            _container(root, n, ext, {f"lib/modules/{RELEASE}/Module.symvers": f"0x{n}\tsym\n".encode()})
        elif kind == 2:
            _container(root, n, {**ext, "io.balena.features.kernel-abi": "x"},
                       {f"usr/lib/extension-release.d/extension-release.ctr-{n}": b"ID=_any\n"}, own=True)
        elif kind == 3:
            cid = _container(root, n, ext, {"usr/share/a": b"a"})
            (root / "image/overlay2/layerdb/mounts" / cid / "mount-id").unlink()  # a fault
        elif kind == 4:
            cid = _container(root, n, ext, {"usr/share/b": b"b"})
            layer = _hex(n, "b")
            facts.index([(layer, str(root / "overlay2" / layer))])
        else:
            cid = _container(root, n, ext, {f"lib/modules/{RELEASE}/x.ko": b"ko"})
    (root / "containers" / "not-an-id").mkdir()
    (root / "containers" / "not-an-id" / "config.v2.json").write_text('{"Config": {"Labels": {"io.balena.image.class": "overlay"}}}')
    (root / "containers" / ("f" * 64)).write_text("a file where a directory belongs")


def _filled(cls: type, depth: int = 0) -> object:
    """An instance of a record class with every field set, none to its default: a field
    the codec does not carry comes back different. Records nest as the model nests them."""
    from mobynit.core import model
    from mobynit.core.facts import LayerFacts

    values: dict[str, object] = {}
    for n, field in enumerate(cls.__slots__):
        tag = f"{cls.__name__}.{field}.{depth}"
        if cls is model.Extension and field == "container":
            value: object = _filled(model.Container)
        elif cls is model.Extension and field == "modules":
            value = _filled(model.KernelModules)
        elif cls is model.Extension and field in ("release",):
            value = {"ID": tag}
        elif cls is model.Container and field == "layers":
            value = (_filled(model.Layer, 0), _filled(model.Layer, 1))
        elif cls is model.Container and field == "labels":
            value = {"io.balena.image.class": "overlay", "k": tag}
        elif cls is model.Layer and field == "facts":
            value = _filled(LayerFacts, depth)
        elif cls is LayerFacts and field == "paths":
            value = frozenset({tag, "usr"})
        elif cls is LayerFacts and field == "dirs":
            value = ((".", 1 + depth), (tag, 2))
        elif cls is LayerFacts:
            value = (tag,)
        elif field == "rank":
            value = 3
        else:
            value = tag  # any field not named above: a string, which the codec must carry like the rest
        values[field] = value
        assert value != cls._defaults.get(field, object()), f"{cls.__name__}.{field} left to its default ({n})"
    return cls(**values)


def test_every_field_of_an_extension_crosses_from_a_child() -> None:
    from mobynit.core import model, store

    ext = _filled(model.Extension)
    assert store._from_plain(marshal.loads(marshal.dumps(store._plain(ext)))) == ext
    faulty = model.Extension(id="x", name="y", container=None, modules=None, fault="z")
    assert store._from_plain(marshal.loads(marshal.dumps(store._plain(faulty)))) == faulty
    assert store._from_plain(store._plain(None)) is None


def _shared_out(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[bool]]:
    """Forks counted, and for each child whether its results were taken (not redone here)."""
    forks: list[int] = []
    taken: list[bool] = []
    real_fork, real_collect = fanout._fork, fanout._collect

    def collect(*args: object) -> object:
        got = real_collect(*args)  # type: ignore[arg-type]
        taken.append(got is not None)
        return got

    monkeypatch.setattr(fanout, "_fork", lambda *a: forks.append(1) or real_fork(*a))
    monkeypatch.setattr(fanout, "_collect", collect)
    monkeypatch.setattr(store, "WORTH", 0.0)
    return forks, taken


def test_the_store_read_shared_out_is_the_one_process_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobynit.core import labels
    from mobynit.core.store import Store

    root = tmp_path / "data" / "docker"
    _varied_store(root)
    forks, taken = _shared_out(monkeypatch)
    alone = Store(str(root)).scan(labels.is_extension, RELEASE, processes=1)
    assert forks == []
    shared = Store(str(root)).scan(labels.is_extension, RELEASE, processes=3)
    assert len(forks) == 2 and taken == [True, True]  # both children's results used, none redone here
    assert shared == alone
    # Every kind of field came through a child: the comparison above could see each one lost.
    found = [e for e in alone if e.container is not None]
    assert len(alone) == 52 and len(found) == 40  # 50 extensions, 2 planted entries; 10 faults, 2 planted
    assert sum(e.fault is not None for e in alone) == 12
    assert {e.modules.symvers_sha256 is not None for e in found if e.modules} == {True, False}
    assert sum(e.release is not None for e in found) == 10 and all(e.release_name for e in found if e.release)
    assert sum(e.container.state == "Dead" for e in found) >= 4
    assert sum(len(e.container.layers) == 2 for e in found) == 10  # the own diff on top
    assert sum(e.container.layers[0].facts is not None and e.container.layers[0].facts.dirs is not None
               for e in found) == 10


@pytest.mark.parametrize("count, worth, loaded", [(5, 0.0, False), (200, None, False), (40, 0.0, True)])
def test_only_a_read_that_forks_loads_the_fanout(tmp_path: Path, count: int, worth: float | None,
                                                 loaded: bool) -> None:
    root = tmp_path / "docker"
    for n in range(count):
        _container(root, n, {"io.balena.image.class": "overlay"} if n % 10 == 0 else {}, {"usr/share/x": b"x"})
    script = (
        "import sys\n"
        "from mobynit.core import labels, store\n"
        + (f"store.WORTH = {worth}\n" if worth is not None else "")
        + f"found = store.Store({str(root)!r}).scan(labels.is_extension, 'r', processes=2)\n"
        "print(len(found), 'mobynit.core.fanout' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(fanout.__file__).parents[2], check=True).stdout
    assert out == f"{(count + 9) // 10} {loaded}\n"  # 200 small containers: far from 12 ms of reading
