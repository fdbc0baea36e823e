"""Selection policy: which extensions go in, why not, and in which order."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.builders import extension, modules
from mobynit.core import policy
from mobynit.core import labels as label
from mobynit.core.model import NORMAL, OVERRIDE, KernelModules

PROPS = settings(max_examples=200, deadline=None)
RELEASE = "6.1.0-13-cloud-amd64"
SYMVERS = b"0x12345678\tprintk\tvmlinux\tEXPORT_SYMBOL\n"
ABI = hashlib.sha256(SYMVERS).hexdigest()


# -- is_extension ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({label.CLASS: "overlay"}, True),
        ({label.CLASS: "overlay", "other": "x"}, True),
        ({label.LEGACY: "1"}, True),
        ({label.LEGACY: "true"}, True),
        ({label.LEGACY: "True"}, True),
        ({label.LEGACY: "0"}, False),
        ({label.LEGACY: "false"}, False),
        ({label.LEGACY: ""}, False),
        ({label.LEGACY: "yes-please"}, False),
        ({}, False),
        ({"io.balena.image.class": "service"}, False),
        ({"io.balena.image.class": "Overlay"}, False),
        ({"io.balena.image.class": "overlay2"}, False),
        ({"io.balena.image.class": ""}, False),
        ({"io.balena.image.class": "service", label.LEGACY: "1"}, True),
        ({"com.example.io.balena.image.class": "overlay"}, False),
    ],
)
def test_is_extension(labels: dict[str, str], expected: bool) -> None:
    assert label.is_extension(labels) is expected


# -- kernel_verdict: reference §1 step 3 -----------------------------------------------


def test_kernel_version_label_absent_passes() -> None:
    assert policy.kernel_verdict({}, None, RELEASE, None) is None


@pytest.mark.parametrize("release", ["6.1.0-13-cloud-amd64", "6.1.0", "6.1.0-rt5-x"])
def test_kernel_version_matches_release_cut_at_first_dash(release: str) -> None:
    assert policy.kernel_verdict({label.KERNEL_VERSION: "6.1.0"}, None, release, None) is None


@pytest.mark.parametrize("wanted", ["6.1.1", "6.1", "6.1.0-13", "6.1.0-13-cloud-amd64", "", " 6.1.0", "6.1.0 "])
def test_kernel_version_mismatch_is_dropped(wanted: str) -> None:
    reason = policy.kernel_verdict({label.KERNEL_VERSION: wanted}, None, RELEASE, None)
    assert reason is not None
    assert "6.1.0" in reason


def test_kernel_version_reason_is_safe_to_print() -> None:
    reason = policy.kernel_verdict({label.KERNEL_VERSION: "6.1\n\x1b[2Jevil" + "9" * 500}, None, RELEASE, None)
    assert reason is not None
    assert reason.isprintable()
    assert len(reason) < 200


def test_no_modules_passes_even_with_abi_label_and_token() -> None:
    labels = {label.KERNEL_ABI: "f" * 64}
    assert policy.kernel_verdict(labels, None, RELEASE, "0" * 64) is None


def test_modules_without_symvers_are_dropped() -> None:
    reason = policy.kernel_verdict({}, modules(RELEASE, None), RELEASE, None)
    assert reason is not None
    assert "Module.symvers" in reason
    assert RELEASE in reason


def test_modules_whose_abi_cannot_be_checked_stay_out() -> None:
    # No balena_kernel_abi= on the command line: the ABI is unverifiable, and the
    # extension is refused (fail closed) with what to put on the command line.
    reason = policy.kernel_verdict({}, modules(RELEASE, SYMVERS), RELEASE, None)
    assert reason is not None and f"no {policy.CMDLINE_ABI}=" in reason and ABI in reason
    assert policy.kernel_verdict({label.KERNEL_ABI: ABI}, modules(RELEASE, SYMVERS), RELEASE, None) is not None
    # The manager's question differs: unverifiable today is not proved stale.
    assert policy.kernel_verdict({}, modules(RELEASE, SYMVERS), RELEASE, None, unverified_ok=True) is None
    # Without modules for the running kernel there is nothing to check.
    assert policy.kernel_verdict({}, None, RELEASE, None) is None


def test_abi_label_agreeing_with_computed_passes() -> None:
    assert policy.kernel_verdict({label.KERNEL_ABI: ABI}, modules(RELEASE, SYMVERS), RELEASE, ABI) is None


def test_abi_label_disagreeing_with_computed_is_dropped() -> None:
    reason = policy.kernel_verdict({label.KERNEL_ABI: "0" * 64}, modules(RELEASE, SYMVERS), RELEASE, None)
    assert reason is not None
    assert label.KERNEL_ABI in reason and ABI in reason


def test_cmdline_abi_agreeing_with_computed_passes() -> None:
    assert policy.kernel_verdict({}, modules(RELEASE, SYMVERS), RELEASE, ABI) is None


def test_cmdline_abi_disagreeing_with_computed_is_dropped() -> None:
    reason = policy.kernel_verdict({}, modules(RELEASE, SYMVERS), RELEASE, "1" * 64)
    assert reason is not None
    assert policy.CMDLINE_ABI in reason and "1" * 64 in reason


def test_label_checked_before_cmdline() -> None:
    """Label and command line both agree with each other but not with the file: dropped."""
    wrong = "2" * 64
    reason = policy.kernel_verdict({label.KERNEL_ABI: wrong}, modules(RELEASE, SYMVERS), RELEASE, wrong)
    assert reason is not None and label.KERNEL_ABI in reason


def test_version_checked_even_with_matching_abi() -> None:
    labels = {label.KERNEL_VERSION: "5.15.0", label.KERNEL_ABI: ABI}
    assert policy.kernel_verdict(labels, modules(RELEASE, SYMVERS), RELEASE, ABI) is not None


# -- placement -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "priority"), [("0", 0), ("7", 7), ("-3", -3), ("+4", 4), ("0010", 10), ("999999999999999999", 10**18 - 1)])
def test_integer_override(raw: str, priority: int) -> None:
    assert policy.placement({label.OVERRIDE: raw}) == (OVERRIDE, priority, None)


@pytest.mark.parametrize("raw", ["high", "1_0", " 3", "3 ", "٣", "1.5", "", "-", "+", "0x10", "1e3", "１", "\n1"])
def test_non_integer_override_is_unranked_with_a_warning(raw: str) -> None:
    position, priority, warning = policy.placement({label.OVERRIDE: raw})
    assert position == OVERRIDE
    assert priority is None
    assert warning is not None and label.OVERRIDE in warning
    assert warning.isprintable()


def test_no_override_label_is_normal() -> None:
    assert policy.placement({}) == (NORMAL, None, None)
    assert policy.placement({"io.balena.image.overrides": "1"}) == (NORMAL, None, None)


# -- decide / select -------------------------------------------------------------------


def _names(decisions: list) -> list[str]:
    return [d.extension.name for d in decisions]


def test_sysext_images_go_between_overrides_and_normals_by_rank_and_ignore_labels() -> None:
    """An image (mobynit.core.images) is ranked by version, top first; it has no labels to place it."""
    def image(name: str, rank: int | None, **kw: object):
        ext = extension(name, **kw)
        return ext.replace(image="erofs", rank=rank)

    exts = [extension("normal"), image("v10", 0), image("v2", 2), image("v9", 1), image("broken", None, fault="bad"),
            image("labelled", 3, override=1), extension("o", override=1)]
    got = policy.select(exts, RELEASE, None)
    assert _names(got) == ["o", "v10", "v9", "v2", "labelled", "broken", "normal"]
    assert [d.position for d in got] == [OVERRIDE] + ["sysext"] * 5 + [NORMAL]
    assert [d.included for d in got] == [True] * 5 + [False, True]


def test_select_orders_overrides_by_priority_then_name_then_normals_by_name() -> None:
    exts = [
        extension("zeta"),
        extension("alpha"),
        extension("o-high", override="high"),
        extension("o5b", override=5),
        extension("o5a", override=5),
        extension("o-neg", override=-2),
        extension("o10", override=10),
        extension("o-x", override="x"),
        extension("o2", override="2"),
        extension("mid"),
    ]
    got = policy.select(exts, RELEASE, None)
    assert _names(got) == ["o-neg", "o2", "o5a", "o5b", "o10", "o-high", "o-x", "alpha", "mid", "zeta"]
    assert all(d.included and d.reason is None for d in got)
    assert [d.priority for d in got] == [-2, 2, 5, 5, 10, None, None, None, None, None]
    assert [d.position for d in got] == [OVERRIDE] * 7 + [NORMAL] * 3
    assert [d.warning is not None for d in got] == [False] * 5 + [True, True] + [False] * 3


def test_names_compare_numerically_as_text_not_as_numbers() -> None:
    """Ties between equal priorities go by name as a string: "o10" sorts before "o9"."""
    got = policy.select([extension("o9", override=1), extension("o10", override=1)], RELEASE, None)
    assert _names(got) == ["o10", "o9"]


def test_same_name_ties_broken_by_id() -> None:
    a = extension("same", cid="a" * 64)
    b = extension("same", cid="b" * 64)
    assert [d.extension.id for d in policy.select([b, a], RELEASE, None)] == ["a" * 64, "b" * 64]


@pytest.mark.parametrize("state", ["Dead", "RemovalInProgress"])
def test_dead_or_removing_containers_are_excluded(state: str) -> None:
    (d,) = policy.select([extension("x", state=state)], RELEASE, None)
    assert not d.included
    assert d.reason is not None and state in d.reason


def test_faulty_extension_is_excluded_with_its_fault() -> None:
    fault = "/data/docker/containers/abc/config.v2.json: not JSON"
    (d,) = policy.select([extension("broken", fault=fault)], RELEASE, None)
    assert not d.included
    assert d.reason == fault
    assert d.position == NORMAL


def test_kernel_mismatch_is_excluded_with_reason() -> None:
    ext = extension("k", labels={label.KERNEL_VERSION: "5.10.0"})
    (d,) = policy.select([ext], RELEASE, None)
    assert not d.included and "5.10.0" in (d.reason or "")


def test_abi_token_reaches_the_verdict() -> None:
    ext = extension("mods", modules=modules(RELEASE, SYMVERS))
    assert policy.select([ext], RELEASE, ABI)[0].included
    assert not policy.select([ext], RELEASE, "3" * 64)[0].included


def test_excluded_ones_keep_their_place_in_the_order() -> None:
    exts = [extension("b"), extension("a", state="Dead"), extension("o", override=1, fault="bad")]
    got = policy.select(exts, RELEASE, None)
    # An unreadable extension's labels are unknown: it sorts with the normal ones.
    assert [(d.extension.name, d.included) for d in got] == [("a", False), ("b", True), ("o", False)]


def test_select_empty() -> None:
    assert policy.select([], RELEASE, None) == []


# -- properties ------------------------------------------------------------------------

overrides = st.one_of(
    st.none(),
    st.integers(min_value=-50, max_value=50),
    st.sampled_from(["high", "1_0", " 3", "٣", "", "x"]),
)
conditions = st.sampled_from([None, None, None, "Dead", "RemovalInProgress", "fault", "kernel", "nosymvers", "abi"])
names = st.text("abcdefgh-_.0123456789", min_size=1, max_size=6)


@st.composite
def extension_sets(draw: st.DrawFn) -> list:
    specs = draw(st.lists(st.tuples(names, overrides, conditions), max_size=40))
    exts = []
    for i, (name, override, cond) in enumerate(specs):
        cid = hashlib.sha256(f"{i}".encode()).hexdigest()
        kw: dict = {"cid": cid, "override": override}
        if cond in ("Dead", "RemovalInProgress"):
            kw["state"] = cond
        elif cond == "fault":
            kw["fault"] = f"containers/{cid}/config.v2.json: malformed"
        elif cond == "kernel":
            kw["labels"] = {label.KERNEL_VERSION: "4.19.0"}
        elif cond == "nosymvers":
            kw["modules"] = KernelModules(release=RELEASE, symvers_sha256=None)
        elif cond == "abi":
            kw["modules"] = modules(RELEASE, b"other symvers")
        exts.append(extension(name, **kw))
    return exts


@PROPS
@given(extension_sets(), st.randoms(use_true_random=False))
def test_select_is_independent_of_input_order(exts: list, rnd: random.Random) -> None:
    shuffled = list(exts)
    rnd.shuffle(shuffled)
    assert policy.select(exts, RELEASE, ABI) == policy.select(shuffled, RELEASE, ABI)


@PROPS
@given(extension_sets())
def test_select_order_and_reasons(exts: list) -> None:
    got = policy.select(exts, RELEASE, ABI)
    assert sorted(d.extension.id for d in got) == sorted(e.id for e in exts)
    # Every decision: a reason exactly when excluded.
    for d in got:
        assert d.included == (d.reason is None)
        assert (d.priority is not None) <= (d.position == OVERRIDE)
    included = [d for d in got if d.included]
    positions = [d.position for d in included]
    # Included overrides always precede included normals.
    assert positions == sorted(positions, key=lambda p: p != OVERRIDE)
    # Ranked overrides ascending by (N, name), then unranked by name, then normals by name.
    ranked = [(d.priority, d.extension.name) for d in got if d.position == OVERRIDE and d.priority is not None]
    unranked = [d.extension.name for d in got if d.position == OVERRIDE and d.priority is None]
    normal = [d.extension.name for d in got if d.position == NORMAL]
    assert ranked == sorted(ranked)
    assert unranked == sorted(unranked)
    assert normal == sorted(normal)
    kinds = ["r" if d.position == OVERRIDE and d.priority is not None else "u" if d.position == OVERRIDE else "n" for d in got]
    assert kinds == sorted(kinds, key="run".index)


@PROPS
@given(extension_sets())
def test_each_exclusion_names_its_cause(exts: list) -> None:
    """Oracle: the first of fault, state, kernel version, modules rules that applies."""
    for d in policy.select(exts, RELEASE, ABI):
        ext = d.extension
        if ext.fault is not None:
            assert d.reason == ext.fault
            continue
        c = ext.container
        if c.state is not None:
            assert d.reason is not None and c.state in d.reason
        elif c.labels.get(label.KERNEL_VERSION, "6.1.0") != "6.1.0":
            assert d.reason is not None and "kernel" in d.reason
        elif ext.modules is not None and ext.modules.symvers_sha256 is None:
            assert d.reason is not None and "Module.symvers" in d.reason
        elif ext.modules is not None and ext.modules.symvers_sha256 != ABI:
            assert d.reason is not None and policy.CMDLINE_ABI in d.reason
        else:
            assert d.included and d.reason is None


@PROPS
@given(st.one_of(st.from_regex(r"\A[+-]?[0-9]{1,20}\Z"), st.text(max_size=8)))
def test_placement_takes_plain_decimal_integers_only(raw: str) -> None:
    import re

    position, priority, warning = policy.placement({label.OVERRIDE: raw})
    assert position == OVERRIDE
    if re.fullmatch(r"[+-]?[0-9]{1,18}", raw, flags=re.ASCII):
        assert (priority, warning) == (int(raw), None)
    else:
        assert priority is None and warning is not None and warning.isprintable()


# -- compatibility gates: the hostapp's os-release (systemd-sysext rules, os-version label)

OS = {"ID": "balena-os", "VERSION_ID": "6.0.1"}
SYSEXT_OK = {"ID": "balena-os", "VERSION_ID": "6.0.1"}
OS_LABEL = "io.balena.image.os-version"


def _host(strict: bool = False) -> policy.Host:
    return policy.Host(os_release=OS, architecture="x86-64", strict_os_version=strict)


def _one(ext, host=None, abi=None):
    (d,) = policy.select([ext], RELEASE, abi, host)
    return d


def test_without_a_host_only_the_balena_rules_apply() -> None:
    d = _one(extension("e", release={"ID": "debian"}, labels={OS_LABEL: "1.*"}))
    assert d.included and d.warning is None


def test_matching_release_file_is_included() -> None:
    d = _one(extension("e", release=SYSEXT_OK), _host())
    assert d.included and d.reason is None and d.warning is None


def test_release_file_for_another_os_is_excluded() -> None:
    d = _one(extension("e", release={"ID": "debian", "VERSION_ID": "12"}), _host())
    assert not d.included and "extension-release.e" in (d.reason or "")


def test_os_version_mismatch_warns_and_keeps_unless_strict() -> None:
    ext = extension("e", labels={OS_LABEL: "5.*"})
    kept = _one(ext, _host(strict=False))
    assert kept.included and kept.reason is None
    assert OS_LABEL in (kept.warning or "") and policy.CMDLINE_STRICT_OS_VERSION in (kept.warning or "")
    skipped = _one(ext, _host(strict=True))
    assert not skipped.included
    assert OS_LABEL in (skipped.reason or "") and policy.CMDLINE_STRICT_OS_VERSION in (skipped.reason or "")


def test_os_version_match_is_silent() -> None:
    d = _one(extension("e", labels={OS_LABEL: "5.*, 6.0.*"}), _host(strict=True))
    assert d.included and d.warning is None


def test_warnings_accumulate() -> None:
    d = _one(extension("e", override="high", labels={OS_LABEL: "5.*"}), _host())
    assert d.included and d.priority is None
    assert label.OVERRIDE in (d.warning or "") and OS_LABEL in (d.warning or "")


def test_kernel_verdict_comes_before_the_release_file() -> None:
    ext = extension("e", labels={label.KERNEL_VERSION: "5.10.0"}, release={"ID": "debian"})
    d = _one(ext, _host())
    assert not d.included and "5.10.0" in (d.reason or "") and "extension-release" not in (d.reason or "")


def test_release_mismatch_is_the_reason_even_with_an_os_version_mismatch() -> None:
    ext = extension("e", labels={OS_LABEL: "5.*"}, release={"ID": "debian"})
    d = _one(ext, _host())
    assert not d.included and "extension-release" in (d.reason or "")
    assert d.warning is None


def test_dead_container_is_not_asked_about_its_release() -> None:
    d = _one(extension("e", state="Dead", release={"ID": "debian"}), _host())
    assert not d.included and "Dead" in (d.reason or "")
