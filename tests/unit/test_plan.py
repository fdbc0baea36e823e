"""The mount planner: option lengths, drops, order and determinism, as properties.

The plan's operations are checked by running them in a small model of the
kernel (`Simulation`): directories, symlink directories and overlay mounts as
data. It resolves every lower dir the way mount(2) and fsconfig() would (from
the operation's cwd), applies the limits overlayfs and the syscalls impose,
and yields the layer directories the root really stacks, top first. The
properties compare that with what the selection asked for, whatever layout
or mechanism the planner chose.
"""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import builders
from tests.builders import extension, hostapp
from mobynit.core import plan as planner
from mobynit.core import policy
from mobynit.core.model import OVERRIDE, Container, Decision
from mobynit.core.plan import Detach, MakeDir, Mount, Plan, RemoveDir

PROPS = settings(max_examples=200, deadline=None)
RELEASE = "6.1.0-13-cloud-amd64"
TARGET = "/sysroot"
WORKDIR = "/run/mobynit/work"
OWN_FIT = "does not fit in one mount"
ROOT_FIT = "dropped to fit the root mount"
LAYOUTS = [(planner.NESTED, planner.MOUNT), (planner.NESTED, planner.FSCONFIG), (planner.FLAT, planner.MOUNT), (planner.FLAT, planner.FSCONFIG)]
FSCONFIG_VALUE_MAX = 255  # fsconfig() copies at most 256 bytes of a value, NUL included


def build(host, decisions, *, workdir=WORKDIR, page_size=4096, target=TARGET, layout=planner.NESTED, mechanism=planner.MOUNT) -> Plan:
    return planner.build(
        host, decisions, target=target, workdir=workdir, page_size=page_size, kernel_release=RELEASE, layout=layout, mechanism=mechanism
    )


def select(exts) -> list[Decision]:
    return policy.select(exts, RELEASE, None)


def mounts(p: Plan) -> list:
    return [op for op in p.operations if isinstance(op, (Mount, planner.FsMount))]


def root_mount(p: Plan):
    (root,) = [m for m in mounts(p) if m.target == p.target]
    return root


def lowers(m: Mount) -> list[str]:
    assert m.options.startswith("lowerdir=")
    return m.options[len("lowerdir=") :].split(":")


def kept(p: Plan) -> list[Decision]:
    return [d for d in p.decisions if d.included]


def containers_in(host: Container, decisions) -> list[Container]:
    return [host, *(d.extension.container for d in decisions if d.extension.container is not None)]


class Simulation:
    """Run a plan's operations against a model of the kernel and the file system.

    Raises AssertionError for anything the kernel would refuse or the plan
    would leave behind.
    """

    def __init__(self, p: Plan, known: list[Container]) -> None:
        self.page_size = p.page_size
        self.target = p.target
        self.layer_of: dict[str, str] = {}  # a name a mount may use (absolute) -> the layer dir it reaches
        self.layer_dirs: set[str] = set()
        for c in known:
            for layer in c.layers:
                self.layer_of[os.path.normpath(f"{c.overlay2}/{layer.link}")] = layer.path
                self.layer_of[layer.path] = layer.path
                self.layer_dirs.add(layer.path)
        self.dirs: set[str] = set()  # directories the plan made
        self.links: dict[str, str] = {}  # symlink path -> layer dir
        self.mounted: dict[str, tuple[str, ...]] = {}  # mount point -> the layer dirs it shows, top first
        self.nested_in_root = False
        self.root: tuple[str, ...] = ()
        self.intermediate: dict[str, tuple[str, ...]] = {}
        for op in p.operations:
            getattr(self, type(op).__name__)(op)
        assert set(self.mounted) == {p.target}, f"mounts left: {sorted(self.mounted)}"
        assert not self.dirs & set(self.intermediate), "mount point directories left behind"
        assert not self.links, "layer links left behind"
        self.root = self.mounted[p.target]

    def _resolve(self, cwd: str | None, name: str) -> tuple[tuple[str, ...], bool]:
        """(layer dirs, is an overlay) that `name`, looked up from `cwd`, stands for."""
        if not name.startswith("/"):
            assert cwd is not None, f"relative lower dir {name!r} without a cwd"
        path = os.path.normpath(name if name.startswith("/") else f"{cwd}/{name}")
        if path in self.mounted:
            return self.mounted[path], True
        if path in self.links:
            return (self.links[path],), False
        if path in self.layer_of:
            return (self.layer_of[path],), False
        assert path in self.dirs, f"lower dir {path} does not exist"
        return (), False  # an empty directory of ours

    def _overlay(self, target: str, cwd_names: list[tuple[str | None, str]]) -> None:
        assert target not in self.mounted, f"{target} mounted twice"
        assert target in self.dirs or target == self.target, f"mount point {target} was never made"
        assert 2 <= len(cwd_names) <= planner.MAX_LOWER, f"{len(cwd_names)} lower dirs"
        shown: list[str] = []
        reached: list[str] = []
        for cwd, name in cwd_names:
            dirs, is_overlay = self._resolve(cwd, name)
            reached.append(os.path.normpath(name if name.startswith("/") or cwd is None else f"{cwd}/{name}"))
            if target == self.target and is_overlay:
                self.nested_in_root = True
            shown.extend(dirs)
        real = [self.links.get(r, self.layer_of.get(r, r)) for r in reached]
        assert len(set(real)) == len(real), f"one overlay lists a directory twice (ELOOP): {real}"
        self.mounted[target] = tuple(shown)
        if target != self.target:
            self.intermediate[target] = tuple(shown)

    def MakeDir(self, op: MakeDir) -> None:
        self.dirs.add(op.path)

    def Mount(self, op: Mount) -> None:
        assert "ro" in op.flags and op.fstype == "overlay"
        assert len(op.options) <= self.page_size - 1, f"{len(op.options)} bytes of options in a {self.page_size}-byte page"
        self._overlay(op.target, [(op.cwd, n) for n in lowers(op)])

    def FsMount(self, op) -> None:
        assert "ro" in op.as_json()["flags"]  # fsmount(MOUNT_ATTR_RDONLY)
        for _, value in op.layers:
            assert len(value) <= FSCONFIG_VALUE_MAX
        self._overlay(op.target, list(op.layers))

    def LinkLayers(self, op) -> None:
        self.dirs.add(op.directory)
        for name, dest in op.links:
            path = f"{op.directory}/{name}"
            assert path not in self.links
            assert dest in self.layer_dirs, f"link to {dest}, not a layer"
            self.links[path] = dest

    def RemoveLinks(self, op) -> None:
        for name in op.names:
            del self.links[f"{op.directory}/{name}"]
        assert not any(k.startswith(op.directory + "/") for k in self.links)
        self.dirs.discard(op.directory)

    def Detach(self, op: Detach) -> None:
        assert op.target in self.mounted and op.target != self.target
        del self.mounted[op.target]

    def RemoveDir(self, op: RemoveDir) -> None:
        assert op.path in self.dirs and op.path not in self.mounted
        self.dirs.remove(op.path)


def simulate(p: Plan, host: Container, decisions) -> Simulation:
    return Simulation(p, containers_in(host, decisions))


def expected_root(p: Plan) -> tuple[str, ...]:
    """Overrides (in decision order), the hostapp, normal extensions; each image top first.

    A flat root lists a layer shared by two images once, at its upper place: the
    lower copy is shadowed by the identical upper one (and one overlay refuses a
    directory twice). Nested mounts each image on its own, so each keeps its copy.
    """
    overrides = [d.extension.container for d in kept(p) if d.position == OVERRIDE]
    normals = [d.extension.container for d in kept(p) if d.position != OVERRIDE]
    paths = [layer.path for c in (*overrides, p.hostapp, *normals) for layer in c.layers]
    if p.layout == planner.FLAT:
        paths = list(dict.fromkeys(paths))
    return tuple(paths)


# -- examples --------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "mechanism"), LAYOUTS)
def test_hostapp_only_mounts_straight_at_the_target(layout: str, mechanism: str) -> None:
    host = hostapp(nlayers=3)
    p = build(host, [], layout=layout, mechanism=mechanism)
    (m,) = p.operations
    assert isinstance(m, Mount)
    assert m.target == TARGET and m.owner == planner.HOSTAPP and "ro" in m.flags
    assert m.cwd == host.overlay2
    assert lowers(m) == [layer.link for layer in host.layers]
    assert p.decisions == ()
    assert simulate(p, host, []).root == expected_root(p)


def test_one_layer_hostapp_gets_the_empty_dir() -> None:
    host = hostapp(nlayers=1)
    p = build(host, [])
    mkdir, m = p.operations
    assert isinstance(mkdir, MakeDir) and isinstance(m, Mount)
    assert lowers(m) == [host.layers[0].link, mkdir.path]
    assert mkdir.path.startswith(WORKDIR + "/")
    assert simulate(p, host, []).root == (host.layers[0].path,)


def test_hostapp_own_diff_is_named_relative_to_its_store() -> None:
    host = hostapp(nlayers=2, own_diff=True)
    (m,) = mounts(build(host, []))
    assert lowers(m)[0] == f"{host.layers[0].id}/diff"
    assert m.cwd == host.overlay2


@pytest.mark.parametrize(("layout", "mechanism"), LAYOUTS)
def test_root_order_overrides_hostapp_normals(layout: str, mechanism: str) -> None:
    exts = [extension("b-normal"), extension("a-normal", nlayers=3), extension("o2", override=2), extension("o1", override=1, nlayers=2)]
    host = hostapp()
    decisions = select(exts)
    p = build(host, decisions, layout=layout, mechanism=mechanism)
    sim = simulate(p, host, decisions)
    by = {e.name: [layer.path for layer in e.container.layers] for e in exts}
    assert list(sim.root) == by["o1"] + by["o2"] + [layer.path for layer in host.layers] + by["a-normal"] + by["b-normal"]
    assert p.layout == layout and p.stacking_depth == (2 if layout == planner.NESTED else 1)
    assert sim.nested_in_root == (layout == planner.NESTED)
    if layout == planner.NESTED:
        # Each image its own overlay: whiteouts act only inside the image that carries them.
        images = sorted(tuple(layer.path for layer in c.layers) for c in containers_in(host, decisions))
        assert sorted(sim.intermediate.values()) == images


def image(name: str, rank: int | None, fault: str | None = None):
    """A sysext image as mobynit.core.images returns it: one layer, no labels, a rank among the images."""
    ext = extension(name, overlay2="/run/mobynit/work/images", fault=fault)
    return ext.replace(image="squashfs", rank=rank, container=ext.container and ext.container.replace(labels={}))


@pytest.mark.parametrize(("layout", "mechanism"), LAYOUTS)
def test_sysext_images_sit_between_the_overrides_and_the_hostapp_by_rank(layout: str, mechanism: str) -> None:
    """systemd-sysext's rule: images over the base, the highest version (rank 0) on top; overrides stay above."""
    exts = [extension("normal"), image("img-b", 1), extension("o1", override=1), image("img-a", 0),
            image("img-bad", None, fault="garbage")]
    host = hostapp()
    decisions = select(exts)
    assert [d.position for d in decisions] == ["override", "sysext", "sysext", "sysext", "normal"]
    assert [d.extension.name for d in decisions] == ["o1", "img-a", "img-b", "img-bad", "normal"]
    p = build(host, decisions, layout=layout, mechanism=mechanism)
    sim = simulate(p, host, decisions)
    by = {e.name: [layer.path for layer in e.container.layers] for e in exts if e.container}
    assert list(sim.root) == by["o1"] + by["img-a"] + by["img-b"] + [layer.path for layer in host.layers] + by["normal"]


def test_nested_operation_sequence_for_one_extension() -> None:
    """The documented nested layout, spelled out once."""
    ext = extension("one", nlayers=2)
    host = hostapp(nlayers=2)
    p = build(host, select([ext]))
    seq = [(type(op).__name__, getattr(op, "target", getattr(op, "path", None)), op.owner) for op in p.operations]
    h, e = f"{WORKDIR}/{planner.HOSTAPP}", f"{WORKDIR}/0"
    assert seq == [
        ("MakeDir", h, planner.HOSTAPP),
        ("Mount", h, planner.HOSTAPP),
        ("MakeDir", e, ext.id),
        ("Mount", e, ext.id),
        ("Mount", TARGET, planner.ROOT),
        ("Detach", h, planner.ROOT),
        ("RemoveDir", h, planner.ROOT),
        ("Detach", e, planner.ROOT),
        ("RemoveDir", e, planner.ROOT),
    ]
    root = root_mount(p)
    assert "ro" in root.flags
    assert [os.path.join(root.cwd or "/", n) for n in lowers(root)] == [h, e]


def test_excluded_decisions_are_carried_through_untouched() -> None:
    exts = [extension("dead", state="Dead"), extension("ok")]
    decisions = select(exts)
    p = build(hostapp(), decisions)
    assert p.decisions[0] == decisions[0]
    assert [d.included for d in p.decisions] == [False, True]


def test_option_length_exactly_at_the_limit() -> None:
    """mount(2) copies one page of options, NUL included: page_size - 1 bytes fit, page_size don't."""
    host = hostapp(nlayers=2)
    length = len("lowerdir=" + ":".join(layer.link for layer in host.layers))
    (m,) = mounts(build(host, [], page_size=length + 1))
    assert len(m.options) == length
    with pytest.raises(ValueError, match="cannot be mounted"):
        build(host, [], page_size=length)


@pytest.mark.parametrize("layout", [planner.NESTED, planner.FLAT])
def test_root_option_length_exactly_at_the_limit(layout: str) -> None:
    decisions = select([extension(f"e{i:02}", nlayers=3) for i in range(60)])
    host = hostapp(nlayers=2)
    roomy = build(host, decisions, page_size=1 << 16, layout=layout)
    assert len(kept(roomy)) == 60
    length = len(root_mount(roomy).options)
    assert all(len(m.options) < length for m in mounts(roomy) if m.target != TARGET), "the root must be the longest"
    at_limit = build(host, decisions, page_size=length + 1, layout=layout)
    assert at_limit == roomy.replace(page_size=length + 1)
    over = build(host, decisions, page_size=length, layout=layout)
    assert [d.included for d in over.decisions] == [True] * 59 + [False]
    assert (over.decisions[-1].reason or "").startswith(ROOT_FIT)
    assert len(root_mount(over).options) <= length - 1


def test_one_extension_too_big_for_its_own_mount_is_dropped_alone() -> None:
    big = extension("big", nlayers=200)
    small = extension("small", nlayers=2)
    p = build(hostapp(), select([big, small]))
    reasons = {d.extension.name: d.reason for d in p.decisions}
    assert (reasons["big"] or "").startswith(OWN_FIT)
    assert reasons["small"] is None


def test_more_than_500_layers_in_one_extension_is_dropped() -> None:
    huge = extension("huge", nlayers=600)
    p = build(hostapp(), select([huge]), page_size=1 << 20)
    (d,) = p.decisions
    assert not d.included and "500" in (d.reason or "")


@pytest.mark.parametrize(("layout", "mechanism"), LAYOUTS)
def test_overlayfs_stack_limit(layout: str, mechanism: str) -> None:
    """At most 500 lower dirs in one overlay: 499 images beside the hostapp nested,
    500 layers in all flat; normal extensions go first."""
    exts = [extension(f"e{i:03}", nlayers=2) for i in range(300)] + [extension(f"o{i:03}", nlayers=2, override=i) for i in range(300)]
    host = hostapp(nlayers=3)
    decisions = select(exts)
    p = build(host, decisions, page_size=1 << 20, layout=layout, mechanism=mechanism)
    n = planner.MAX_LOWER - 1 if layout == planner.NESTED else (planner.MAX_LOWER - 3) // 2
    assert [d.extension.name for d in kept(p)] == [f"o{i:03}" for i in range(min(n, 300))] + [f"e{i:03}" for i in range(max(0, n - 300))]
    assert simulate(p, host, decisions).root == expected_root(p)


def test_long_absolute_paths_no_longer_cap_at_twenty() -> None:
    """The reference tool listed absolute mount points: with balenaOS's long paths (here
    a 190-byte work directory) a 4 KiB page held the hostapp and only 20 extensions
    (21 * 190 + 87 = 4077 bytes; a 21st needs 22 * 190 + 91 = 4271). The root here
    names mount points relative to the work directory, so all 30 fit."""
    workdir = ("/mnt/sysroot/active/balena/overlay2/" + builders.hex_id("merged") + "/merged/run/mobynit/" + "w" * 190)[:190]
    assert len(workdir) == 190

    def reference_len(k: int) -> int:
        return len("lowerdir=" + ":".join([f"{workdir}/{i}" for i in range(k)] + [f"{workdir}/hostapp"]))

    assert reference_len(20) <= 4095 < reference_len(21)
    exts = [extension(f"ext-{i:02}", nlayers=2) for i in range(30)]
    host = hostapp()
    decisions = select(exts)
    p = build(host, decisions, workdir=workdir, page_size=4096)
    assert len(kept(p)) == 30
    assert simulate(p, host, decisions).root == expected_root(p)


def test_normal_extensions_are_dropped_before_overrides() -> None:
    exts = [extension(f"n{i}", nlayers=20) for i in range(10)] + [extension(f"o{i}", override=i, nlayers=20) for i in range(10)]
    p = build(hostapp(), select(exts), page_size=512, layout=planner.FLAT)
    names = [d.extension.name for d in kept(p)]
    assert 0 < len(names) < 10
    assert names == [f"o{i}" for i in range(len(names))]


def test_no_mount_lists_a_layer_twice() -> None:
    """Images built FROM one base share its layer directory in the store, and one
    overlay refuses a directory listed twice (ELOOP, "conflicting lowerdir path");
    separate overlays may share it. Every plan must be mountable."""
    base = builders.layers("busybox-base", 1, builders.DATA_OVERLAY2)
    exts = []
    for name in ("ext-a", "ext-b"):
        e = extension(name, nlayers=2)
        exts.append(e.replace(container=e.container.replace(layers=e.container.layers + base)))
    host = hostapp()
    decisions = select(exts)
    for layout, mechanism in LAYOUTS:
        p = build(host, decisions, layout=layout, mechanism=mechanism)
        assert len(kept(p)) == 2, (layout, mechanism)
        assert simulate(p, host, decisions).root == expected_root(p)  # the simulation refuses a dir listed twice


def test_bad_workdir_is_refused() -> None:
    for bad in ("relative/dir", "/a:b", "/a,b", "/a\\b", "/a\nb", "/" + "w" * 250):
        with pytest.raises(ValueError, match="work directory"):
            build(hostapp(), [], workdir=bad)


def test_plan_json_is_serialisable_and_complete() -> None:
    exts = [extension("x", nlayers=1), extension("y", override="high"), extension("z", state="Dead")]
    host = hostapp(nlayers=1)
    p = build(host, select(exts))
    doc = json.loads(json.dumps(p.as_json()))
    assert doc["hostapp"] == {"id": host.id, "name": host.name, "layers": [layer.path for layer in host.layers]}
    assert [e["name"] for e in doc["extensions"]] == ["y", "x", "z"]
    assert [e["included"] for e in doc["extensions"]] == [True, True, False]
    assert "warning" in doc["extensions"][0] and "reason" in doc["extensions"][2]
    assert "reason" not in doc["extensions"][0]
    assert len(doc["mounts"]) == len(p.operations)
    for op in doc["mounts"]:
        assert set(op) >= {"source", "target", "fstype", "options"}


# -- properties ------------------------------------------------------------------------


def _path(prefix: str, length: int) -> str:
    """An absolute path of about `length` bytes (at least len(prefix) + 2), not ending in "/"."""
    body = (prefix + "/" + "abcdefghij/" * (length // 11 + 1))[: max(length, len(prefix) + 2)]
    return body[:-1] + "x" if body.endswith("/") else body


@st.composite
def scenarios(draw: st.DrawFn, max_ext: int = 600) -> dict:
    """A hostapp, its extensions, the limits and the layout, drawn compactly: the
    shape from hypothesis, the bulk from a seeded generator so hundreds of
    extensions stay cheap. In some draws images share a base, as in a real store."""
    n = draw(st.integers(0, max_ext))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    max_layers = draw(st.integers(1, 60))
    override_share = draw(st.floats(0, 1))
    page_size = draw(st.sampled_from([512, 1024, 4096, 4096, 16384, 65536]) | st.integers(512, 65536))
    workdir = _path("/run", draw(st.integers(6, 200)))
    store = _path("/mnt/data/docker/overlay2", draw(st.integers(26, 300)))
    name_len = draw(st.integers(1, 40))
    layout, mechanism = draw(st.sampled_from(LAYOUTS))
    if layout == planner.FLAT:
        # The flat drop loop costs drops x layers (see the report in the planner's
        # review); keep flat cases to 1200 layers in all so the suite stays fast.
        max_layers = min(max_layers, max(1, 1200 // max(n, 1)))
    # Images built FROM a common base share its layer directories in the store.
    bases = [builders.layers(f"base{j}", j + 1, store) for j in range(3)] if draw(st.booleans()) else []
    exts = []
    for i in range(n):
        name = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz-_.0123456789") for _ in range(rnd.randint(1, name_len)))
        override = None
        if rnd.random() < override_share:
            override = rnd.choice([rnd.randint(-20, 20), rnd.randint(-20, 20), "high"])
        odd = rnd.random()
        kw: dict = {}
        if odd < 0.03:
            kw["state"] = "Dead"
        elif odd < 0.06:
            kw["fault"] = f"{store}/../containers/{i}/config.v2.json: malformed"
        cid = builders.hex_id(f"c{i}")
        exts.append(
            extension(
                name, nlayers=rnd.randint(1, max_layers), override=override, overlay2=store, cid=cid, own_diff=rnd.random() < 0.2,
                base=rnd.choice(bases) if bases and rnd.random() < 0.6 else (), **kw,
            )
        )
    host = hostapp(nlayers=draw(st.integers(1, 60)), own_diff=draw(st.booleans()))
    return {"host": host, "decisions": select(exts), "workdir": workdir, "page_size": page_size, "layout": layout, "mechanism": mechanism}


def _own_options_len(layers, workdir: str) -> int:
    """The option length of a mount(2) of one image: its links, plus the empty
    dir under the work directory as a second lower for a one-layer image."""
    dirs = [layer.link for layer in layers]
    if len(dirs) == 1:
        dirs.append(f"{workdir}/{planner.EMPTY}")
    return len("lowerdir=" + ":".join(dirs))


def _fits_alone(layers, workdir: str, page_size: int) -> bool:
    return _own_options_len(layers, workdir) <= page_size - 1 and max(2, len(layers)) <= planner.MAX_LOWER


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[i % 36]
    while i >= 36:
        i //= 36
        out = digits[i % 36] + out
    return out


def root_fits(host: Container, chosen: list[Decision], sc: dict) -> bool:
    """Whether the root mount of the hostapp and `chosen`, counted here from
    first principles, stays within overlayfs's 500 lower layers and the page.

    Flat: every distinct layer directory is one lower dir (images built on a
    common base share theirs), named by a short base-36 link for mount(2),
    unbounded in length for fsconfig. Nested: one lower dir per image, the
    extensions' mount points named 0, 1, ... and the hostapp's `hostapp`.
    """
    if sc["layout"] == planner.FLAT:
        dirs = {layer.path for layer in host.layers}
        for d in chosen:
            dirs.update(layer.path for layer in d.extension.container.layers)
        entries = len(dirs)
        names = [_base36(i) for i in range(entries)]
        bounded = sc["mechanism"] == planner.MOUNT
    else:
        entries = len(chosen) + 1
        names = [_base36(i) for i in range(len(chosen))] + ["hostapp"]
        bounded = True
    if entries > 500:
        return False
    return not bounded or len("lowerdir=" + ":".join(names)) <= sc["page_size"] - 1


def _build(sc: dict, decisions=None) -> Plan:
    return build(
        sc["host"], sc["decisions"] if decisions is None else decisions,
        workdir=sc["workdir"], page_size=sc["page_size"], layout=sc["layout"], mechanism=sc["mechanism"],
    )


def _check(sc: dict) -> None:
    host, decisions, workdir, page_size, layout = sc["host"], sc["decisions"], sc["workdir"], sc["page_size"], sc["layout"]
    try:
        p = _build(sc)
    except ValueError as e:
        # Only when the hostapp alone cannot be mounted.
        assert "hostapp" in str(e)
        assert not _fits_alone(host.layers, workdir, page_size)
        return
    assert _fits_alone(host.layers, workdir, page_size)

    # The operations mount what was asked for, within every limit (see Simulation).
    sim = simulate(p, host, decisions)
    assert sim.root == expected_root(p)
    assert p.layout == (layout if kept(p) else planner.FLAT)
    assert p.stacking_depth == (2 if sim.nested_in_root else 1)

    # Decisions: same extensions, same order; a reason exactly when left out.
    assert [d.extension.id for d in p.decisions] == [d.extension.id for d in decisions]
    for before, after in zip(decisions, p.decisions):
        assert after.included == (after.reason is None)
        if not before.included:
            assert after == before
        assert (after.position, after.priority, after.warning) == (before.position, before.priority, before.warning)

    # Nested: exactly the images whose own mount cannot fit are dropped on their own.
    candidates: list[Decision] = []
    originals: list[Decision] = []
    for before, after in zip(decisions, p.decisions):
        if not before.included:
            continue
        alone = after.reason is not None and after.reason.startswith(OWN_FIT)
        fits = layout != planner.NESTED or _fits_alone(before.extension.container.layers, workdir, page_size)
        assert alone != fits
        if fits:
            candidates.append(after)
            originals.append(before)

    # Drop order: what is kept is a prefix of the mount order (normal extensions
    # go first, then overrides from the lowest priority); the rest dropped for the root.
    k = len(kept(p))
    assert [d.extension.id for d in kept(p)] == [d.extension.id for d in candidates[:k]]
    for d in candidates[k:]:
        assert not d.included and (d.reason or "").startswith(ROOT_FIT)
    if any(d.position == OVERRIDE for d in candidates[k:]):
        assert all(d.position == OVERRIDE for d in kept(p))

    # Maximal, by an oracle of its own (not the planner): the kept ones fit the
    # root, and one more would not have.
    assert root_fits(host, originals[:k], sc)
    if k < len(candidates):
        assert not root_fits(host, originals[: k + 1], sc)

    # Every operation can be shown and recorded (plan prints them, assemble records them).
    for op in p.operations:
        assert op.describe().strip()
        assert {"op", "source", "target", "fstype", "options", "owner"} <= set(op.as_json())

    # Determinism: the same input gives an equal plan, and equal JSON.
    again = _build(sc, list(decisions))
    assert again == p
    assert json.dumps(again.as_json(), sort_keys=True) == json.dumps(p.as_json(), sort_keys=True)


@pytest.mark.parametrize(("layout", "mechanism"), [(planner.FLAT, planner.FSCONFIG), (planner.FLAT, planner.MOUNT)])
def test_extensions_on_a_shared_base_count_its_layers_once(layout: str, mechanism: str) -> None:
    # 200 extensions built FROM one two-layer base, one layer of their own each: with the
    # two-layer hostapp that is 2 + 2 + 200 = 204 distinct layer directories, all within
    # overlayfs's 500, so every extension is kept (a planner counting the base per image
    # would see 802 and drop most of them).
    store = builders.DATA_OVERLAY2
    base = builders.layers("common-base", 2, store)
    exts = [extension(f"e{i:03}", nlayers=1, base=base, cid=builders.hex_id(f"s{i}")) for i in range(200)]
    host = hostapp(nlayers=2)
    p = build(host, select(exts), layout=layout, mechanism=mechanism, page_size=65536)
    assert len(kept(p)) == 200
    lowers = {layer.path for layer in host.layers} | {layer.path for e in exts for layer in e.container.layers}
    assert len(lowers) == 204
    sc = {"layout": layout, "mechanism": mechanism, "page_size": 65536}
    assert root_fits(host, select(exts), sc)


@PROPS
@given(scenarios(max_ext=40))
def test_plan_properties_few_extensions(sc: dict) -> None:
    _check(sc)


@settings(max_examples=40, deadline=None)
@given(scenarios(max_ext=600))
def test_plan_properties_many_extensions(sc: dict) -> None:
    _check(sc)


@PROPS
@given(scenarios(max_ext=40), st.randoms(use_true_random=False))
def test_plan_is_independent_of_the_order_extensions_were_found_in(sc: dict, rnd: random.Random) -> None:
    exts = [d.extension for d in sc["decisions"]]
    rnd.shuffle(exts)
    try:
        p = _build(sc)
    except ValueError:
        with pytest.raises(ValueError):
            _build(sc, select(exts))
        return
    assert _build(sc, select(exts)) == p
