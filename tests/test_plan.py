"""The mount planner: option lengths, drops, order and determinism, as properties."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import builders
from builders import extension, hostapp
from mobynit import plan as planner
from mobynit import policy
from mobynit.model import OVERRIDE, Decision
from mobynit.plan import Detach, MakeDir, Mount, Plan, RemoveDir

PROPS = settings(max_examples=200, deadline=None)
RELEASE = "6.1.0-13-cloud-amd64"
TARGET = "/sysroot"
WORKDIR = "/run/mobynit/work"
OWN_FIT = "does not fit in one mount"
ROOT_FIT = "dropped to fit the root mount"


def build(host, decisions, *, workdir: str = WORKDIR, page_size: int = 4096, target: str = TARGET) -> Plan:
    return planner.build(host, decisions, target=target, workdir=workdir, page_size=page_size, kernel_release=RELEASE)


def mounts(p: Plan) -> list[Mount]:
    return [op for op in p.operations if isinstance(op, Mount)]


def root_mount(p: Plan) -> Mount:
    (root,) = [m for m in mounts(p) if m.target == p.target]
    return root


def lowers(m: Mount) -> list[str]:
    assert m.options.startswith("lowerdir=")
    return m.options[len("lowerdir=") :].split(":")


def kept(p: Plan) -> list[Decision]:
    return [d for d in p.decisions if d.included]


def select(exts) -> list[Decision]:
    return policy.select(exts, RELEASE, None)


# -- examples --------------------------------------------------------------------------


def test_hostapp_only_mounts_straight_at_the_target() -> None:
    host = hostapp(nlayers=3)
    p = build(host, [])
    (m,) = mounts(p)
    assert m.target == TARGET and m.owner == planner.HOSTAPP
    assert "ro" in m.flags
    assert m.cwd == host.overlay2
    assert lowers(m) == [layer.link for layer in host.layers]
    assert p.decisions == ()
    assert not any(isinstance(op, (MakeDir, Detach, RemoveDir)) for op in p.operations)


def test_one_layer_hostapp_gets_the_empty_dir() -> None:
    host = hostapp(nlayers=1)
    p = build(host, [])
    mkdir, m = p.operations
    assert isinstance(mkdir, MakeDir) and isinstance(m, Mount)
    assert lowers(m) == [host.layers[0].link, mkdir.path]
    assert mkdir.path.startswith(WORKDIR + "/")


def test_hostapp_own_diff_is_named_relative_to_its_store() -> None:
    host = hostapp(nlayers=2, own_diff=True)
    (m,) = mounts(build(host, []))
    assert lowers(m)[0] == f"{host.layers[0].id}/diff"
    assert m.cwd == host.overlay2


def test_root_order_overrides_hostapp_normals() -> None:
    exts = [extension("b-normal"), extension("a-normal", nlayers=3), extension("o2", override=2), extension("o1", override=1, nlayers=2)]
    host = hostapp()
    p = build(host, select(exts))
    by_target = {m.target: m for m in mounts(p)}
    owners = [by_target[t].owner for t in lowers(root_mount(p))]
    ids = {e.name: e.id for e in exts}
    assert owners == [ids["o1"], ids["o2"], planner.HOSTAPP, ids["a-normal"], ids["b-normal"]]
    assert root_mount(p).owner == planner.ROOT
    assert "ro" in root_mount(p).flags
    assert root_mount(p).cwd is None
    for e in exts:
        (m,) = [m for m in mounts(p) if m.owner == e.id]
        assert m.cwd == e.container.overlay2
        expected = [layer.link for layer in e.container.layers]
        if len(expected) == 1:
            expected.append(f"{WORKDIR}/{planner.EMPTY}")
        assert lowers(m) == expected


def test_operation_sequence_for_one_extension() -> None:
    ext = extension("one", nlayers=2)
    host = hostapp(nlayers=2)
    p = build(host, select([ext]))
    kinds = [(type(op).__name__, getattr(op, "target", getattr(op, "path", None))) for op in p.operations]
    host_dir = f"{WORKDIR}/{planner.HOSTAPP}"
    ext_dir = f"{WORKDIR}/0"
    assert kinds == [
        ("MakeDir", host_dir),
        ("Mount", host_dir),
        ("MakeDir", ext_dir),
        ("Mount", ext_dir),
        ("Mount", TARGET),
        ("Detach", host_dir),
        ("RemoveDir", host_dir),
        ("Detach", ext_dir),
        ("RemoveDir", ext_dir),
    ]
    assert root_mount(p).options == f"lowerdir={host_dir}:{ext_dir}"


def test_excluded_decisions_are_carried_through_untouched() -> None:
    exts = [extension("dead", state="Dead"), extension("ok")]
    decisions = select(exts)
    p = build(hostapp(), decisions)
    assert p.decisions[0] == decisions[0]
    assert [d.included for d in p.decisions] == [False, True]
    assert len(mounts(p)) == 3


def test_option_length_exactly_at_the_limit() -> None:
    """mount(2) copies one page of options, NUL included: page_size - 1 bytes fit, page_size don't."""
    host = hostapp(nlayers=2)
    length = len("lowerdir=" + ":".join(layer.link for layer in host.layers))
    (m,) = mounts(build(host, [], page_size=length + 1))
    assert len(m.options) == length
    with pytest.raises(ValueError, match="cannot be mounted"):
        build(host, [], page_size=length)


def test_root_option_length_exactly_at_the_limit() -> None:
    decisions = select([extension(f"e{i:02}", nlayers=2) for i in range(12)])
    host = hostapp()
    roomy = build(host, decisions, page_size=65536)
    length = len(root_mount(roomy).options)
    at_limit = build(host, decisions, page_size=length + 1)
    assert at_limit == roomy.replace(page_size=length + 1)
    over = build(host, decisions, page_size=length)
    assert [d.included for d in over.decisions] == [True] * 11 + [False]
    assert over.decisions[-1].reason is not None and over.decisions[-1].reason.startswith(ROOT_FIT)
    assert len(root_mount(over).options) <= length - 1


def test_one_extension_too_big_for_its_own_mount_is_dropped_alone() -> None:
    big = extension("big", nlayers=200)
    small = extension("small", nlayers=2)
    p = build(hostapp(), select([big, small]))
    reasons = {d.extension.name: d.reason for d in p.decisions}
    assert reasons["big"] is not None and reasons["big"].startswith(OWN_FIT)
    assert reasons["small"] is None


def test_more_than_500_layers_in_one_extension_is_dropped() -> None:
    huge = extension("huge", nlayers=600)
    p = build(hostapp(), select([huge]), page_size=1 << 20)
    (d,) = p.decisions
    assert not d.included and d.reason is not None and "500" in d.reason


def test_root_keeps_at_most_499_extensions_beside_the_hostapp() -> None:
    exts = [extension(f"e{i:03}", nlayers=2, layer_seed="shared") for i in range(520)]
    p = build(hostapp(), select(exts), workdir="/w", page_size=1 << 20)
    assert len(kept(p)) == planner.MAX_LOWER - 1
    assert len(lowers(root_mount(p))) == planner.MAX_LOWER
    assert [d.extension.name for d in kept(p)] == [f"e{i:03}" for i in range(499)]


def test_balenaos_long_paths_cap_a_device_at_about_twenty_extensions() -> None:
    """With balenaOS's long absolute paths (here a 190-byte work directory) a 4 KiB page
    holds the hostapp and 20 extension mount points: 21 * 190 + 87 = 4077 bytes of
    options; a 21st would need 22 * 190 + 91 = 4271."""
    sysroot = "/mnt/sysroot/active/balena/overlay2/" + builders.hex_id("merged") + "/merged"
    workdir = (sysroot + "/run/mobynit/" + "w" * 190)[:190]
    assert len(workdir) == 190
    exts = [extension(f"ext-{i:02}", nlayers=2) for i in range(30)]
    p = build(hostapp(), select(exts), workdir=workdir, page_size=4096)
    assert [d.extension.name for d in kept(p)] == [f"ext-{i:02}" for i in range(20)]
    assert len(root_mount(p).options) == 21 * 190 + 87
    for d in p.decisions[20:]:
        assert d.reason is not None and d.reason.startswith(ROOT_FIT)


def test_normal_extensions_are_dropped_before_overrides() -> None:
    exts = [extension(f"n{i}") for i in range(10)] + [extension(f"o{i}", override=i) for i in range(10)]
    workdir = "/" + "w" * 150
    p = build(hostapp(), select(exts), workdir=workdir, page_size=1024)
    names = [d.extension.name for d in kept(p)]
    assert 0 < len(names) < 10
    assert names == [f"o{i}" for i in range(len(names))]


def test_bad_workdir_is_refused() -> None:
    for bad in ("relative/dir", "/a:b", "/a,b", "/a\\b", "/a\nb"):
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
    """An absolute path of exactly `length` bytes (at least len(prefix) + 1)."""
    body = (prefix + "/" + "abcdefghij/" * (length // 11 + 1))[: max(length, len(prefix) + 1)]
    return body[:-1] + "x" if body.endswith("/") else body


@st.composite
def scenarios(draw: st.DrawFn, max_ext: int = 600) -> dict:
    """A hostapp, its extensions and the limits, drawn compactly: the shape from
    hypothesis, the bulk from a seeded generator so hundreds of extensions stay cheap."""
    n = draw(st.integers(0, max_ext))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    max_layers = draw(st.integers(1, 60))
    override_share = draw(st.floats(0, 1))
    page_size = draw(st.sampled_from([512, 1024, 4096, 4096, 16384, 65536]) | st.integers(512, 65536))
    workdir = _path("/run", draw(st.integers(5, 300)))
    store = _path("/mnt/data/docker/overlay2", draw(st.integers(26, 300)))
    name_len = draw(st.integers(1, 40))
    exts = []
    for i in range(n):
        name = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz-_.0123456789") for _ in range(rnd.randint(1, name_len)))
        override = None
        if rnd.random() < override_share:
            override = rnd.choice([rnd.randint(-20, 20), rnd.randint(-20, 20), "high"])
        nlayers = rnd.randint(1, max_layers)
        own = rnd.random() < 0.2
        odd = rnd.random()
        kw: dict = {}
        if odd < 0.03:
            kw["state"] = "Dead"
        elif odd < 0.06:
            kw["fault"] = f"{store}/../containers/{i}/config.v2.json: malformed"
        exts.append(
            extension(
                name,
                nlayers=nlayers,
                override=override,
                overlay2=store,
                cid=builders.hex_id(f"c{i}"),
                own_diff=own,
                layer_seed=f"{nlayers}/{own}",
                **kw,
            )
        )
    host = hostapp(nlayers=draw(st.integers(1, 60)), own_diff=draw(st.booleans()))
    return {"host": host, "decisions": select(exts), "workdir": workdir, "page_size": page_size}


def _own_options_len(layers, workdir: str) -> int:
    """The option length of a mount of these layers: their links, plus the empty
    dir under the work directory as a second lower for a one-layer image."""
    dirs = [layer.link for layer in layers]
    if len(dirs) == 1:
        dirs.append(f"{workdir}/{planner.EMPTY}")
    return len("lowerdir=" + ":".join(dirs))


def _check(sc: dict) -> None:
    host, decisions, workdir, page_size = sc["host"], sc["decisions"], sc["workdir"], sc["page_size"]
    try:
        p = build(host, decisions, workdir=workdir, page_size=page_size)
    except ValueError as e:
        # Only when the hostapp alone cannot be mounted.
        assert "hostapp" in str(e)
        assert _own_options_len(host.layers, workdir) > page_size - 1
        return

    ops = list(p.operations)
    ms = mounts(p)

    # Every mount(2) fits one page and the overlay stack limit.
    for m in ms:
        assert len(m.options) <= page_size - 1
        assert len(lowers(m)) <= planner.MAX_LOWER
        assert "ro" in m.flags

    # The hostapp is always mounted, with its own layers top first.
    (host_mount,) = [m for m in ms if m.owner == planner.HOSTAPP]
    expected_host = [layer.link for layer in host.layers]
    assert lowers(host_mount)[: len(expected_host)] == expected_host
    assert host_mount.cwd == host.overlay2

    # Decisions: same extensions, same order; a reason exactly when left out.
    assert [d.extension.id for d in p.decisions] == [d.extension.id for d in decisions]
    for before, after in zip(decisions, p.decisions):
        assert after.included == (after.reason is None)
        if not before.included:
            assert after == before
        assert (after.position, after.priority, after.warning) == (before.position, before.priority, before.warning)

    # Own-size drops are exactly the extensions whose own mount cannot fit.
    candidates = []
    for before, after in zip(decisions, p.decisions):
        if not before.included:
            continue
        layers = before.extension.container.layers
        fits = _own_options_len(layers, workdir) <= page_size - 1 and len(layers) < planner.MAX_LOWER
        dropped_alone = after.reason is not None and after.reason.startswith(OWN_FIT)
        assert dropped_alone != fits
        if fits:
            candidates.append(after)

    # Drop order: what is kept is a prefix of the mount order (normals go first,
    # then overrides from the lowest priority), the rest dropped for the root.
    kept_ids = [d.extension.id for d in kept(p)]
    assert kept_ids == [d.extension.id for d in candidates[: len(kept_ids)]]
    for d in candidates[len(kept_ids) :]:
        assert not d.included and d.reason is not None and d.reason.startswith(ROOT_FIT)
    dropped_overrides = [d for d in candidates[len(kept_ids) :] if d.position == OVERRIDE]
    if dropped_overrides:
        assert all(d.position == OVERRIDE for d in kept(p))

    if not kept_ids:
        # Hostapp alone, straight at the target.
        assert host_mount.target == p.target
        assert ms == [host_mount]
        if candidates:
            # Even one extension would not have fitted beside the hostapp.
            assert _root_len(workdir, 1) > page_size - 1
    else:
        root = root_mount(p)
        assert root.owner == planner.ROOT and root.cwd is None
        # Maximality: one more candidate would not have fitted.
        assert len(root.options) == _root_len(workdir, len(kept_ids))
        if len(candidates) > len(kept_ids):
            assert _root_len(workdir, len(kept_ids) + 1) > page_size - 1 or len(kept_ids) + 2 > planner.MAX_LOWER
        # Root order: overrides (priority, then name), the hostapp, normals by name.
        by_target = {m.target: m for m in ms}
        owners = [by_target[t].owner for t in lowers(root)]
        overrides = [d for d in kept(p) if d.position == OVERRIDE]
        normals = [d for d in kept(p) if d.position != OVERRIDE]
        assert owners == [d.extension.id for d in overrides] + [planner.HOSTAPP] + [d.extension.id for d in normals]
        keys = [(d.priority is None, d.priority or 0, d.extension.name) for d in overrides]
        assert keys == sorted(keys)
        assert [d.extension.name for d in normals] == sorted(d.extension.name for d in normals)
        # Each kept extension: its own layers, in its own store.
        for d in kept(p):
            (m,) = [m for m in ms if m.owner == d.extension.id]
            layers = d.extension.container.layers
            assert m.cwd == d.extension.container.overlay2
            assert lowers(m)[: len(layers)] == [layer.link for layer in layers]
            assert len(lowers(m)) == max(2, len(layers))
        # Intermediate mounts: made dir before, detached and removed after the root.
        root_at = ops.index(root)
        for m in ms:
            if m is root:
                continue
            at = ops.index(m)
            assert m.target.startswith(workdir + "/")
            assert MakeDir(path=m.target, owner=m.owner) in ops[:at]
            later = ops[root_at + 1 :]
            detach = later.index(Detach(target=m.target, owner=planner.ROOT))
            remove = later.index(RemoveDir(path=m.target, owner=planner.ROOT))
            assert detach < remove
        assert len({m.target for m in ms}) == len(ms)

    # One-layer stacks get an empty dir made before any mount uses it.
    for m in ms:
        entries = lowers(m)
        if m.owner == planner.ROOT:
            continue
        layers = host.layers if m.owner == planner.HOSTAPP else next(d for d in kept(p) if d.extension.id == m.owner).extension.container.layers
        if len(layers) == 1:
            assert len(entries) == 2
            empty = entries[1]
            assert empty.startswith(workdir + "/")
            made = [i for i, op in enumerate(ops) if isinstance(op, MakeDir) and op.path == empty]
            assert made and made[0] < ops.index(m)
            assert not any(op.target == empty for op in ms)
        else:
            assert len(entries) == len(layers)

    # Determinism: the same input gives an equal plan, and equal JSON.
    again = build(host, list(decisions), workdir=workdir, page_size=page_size)
    assert again == p
    assert json.dumps(again.as_json(), sort_keys=True) == json.dumps(p.as_json(), sort_keys=True)


def _root_len(workdir: str, k: int) -> int:
    """Options of a root with k extension mount points `<workdir>/<i>` and `<workdir>/hostapp`."""
    return len("lowerdir=" + ":".join([f"{workdir}/{i}" for i in range(k)] + [f"{workdir}/{planner.HOSTAPP}"]))


@PROPS
@given(scenarios(max_ext=40))
def test_plan_properties_few_extensions(sc: dict) -> None:
    _check(sc)


@settings(max_examples=60, deadline=None)
@given(scenarios(max_ext=600))
def test_plan_properties_many_extensions(sc: dict) -> None:
    _check(sc)


@PROPS
@given(scenarios(max_ext=40), st.randoms(use_true_random=False))
def test_plan_is_independent_of_the_order_extensions_were_found_in(sc: dict, rnd: random.Random) -> None:
    exts = [d.extension for d in sc["decisions"]]
    rnd.shuffle(exts)
    kw = {"workdir": sc["workdir"], "page_size": sc["page_size"]}
    try:
        p = build(sc["host"], sc["decisions"], **kw)
    except ValueError:
        with pytest.raises(ValueError):
            build(sc["host"], select(exts), **kw)
        return
    assert build(sc["host"], select(exts), **kw) == p
