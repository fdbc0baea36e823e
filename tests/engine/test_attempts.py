"""Never bricked: unconfirmed boots with extensions fall back to the hostapp alone.

Pure rules first, then the whole cycle with real assembles of the standard
device (the QEMU boots of the same cycle are in tests/boot/test_boot*.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobynit.core import attempts
from mobynit.core.attempts import NONE, Attempts, at_boot, confirmed
from tests.runs import assembled, mobynit

A, B = "a" * 64, "b" * 64


def test_a_new_set_gets_its_tries_afresh() -> None:
    now, why = at_boot(Attempts((A,), 7, True), [B], 3)
    assert now == Attempts((B,), 1, False) and why is None


def test_counting_then_giving_up_then_staying_down() -> None:
    state = NONE
    for n in (1, 2, 3):
        state, why = at_boot(state, [A], 3)
        assert state == Attempts((A,), n, False) and why is None
    state, why = at_boot(state, [A], 3)
    assert state.fallback and "3 boots in a row" in why
    again, why = at_boot(state, [A], 3)
    assert again == state and "still mounting the hostapp alone" in why


def test_no_extensions_counts_nothing() -> None:
    state = Attempts((A,), 2, False)
    assert at_boot(state, [], 3) == (state, None)


def test_confirm_resets_but_not_a_fallback_unless_asked() -> None:
    assert confirmed(Attempts((A,), 2, False), False)[0] == Attempts((A,), 0, False)
    down = Attempts((A,), 3, True)
    assert confirmed(down, False)[0] == down
    assert confirmed(down, True)[0] == Attempts((A,), 0, False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["boot-a", "boot-b", "boot-none", "confirm", "retry"]), max_size=30), st.integers(1, 5))
def test_never_more_than_max_tries_unconfirmed_boots_with_one_set(events: list[str], tries: int) -> None:
    state, streak = NONE, 0
    for event in events:
        if event.startswith("boot"):
            planned = {"boot-a": [A], "boot-b": [B], "boot-none": []}[event]
            before = state
            state, why = at_boot(state, planned, tries)
            if planned and tuple(planned) != before.extensions:
                streak = 0
            if planned and why is None:
                streak += 1  # a boot that mounted extensions and may not come back
            assert streak <= tries
        else:
            state, _ = confirmed(state, event == "retry")
            if not state.fallback:
                streak = 0


@pytest.mark.parametrize("content", [b"", b"{", b"\x00" * 40, b'{"version": 1, "extensions": ["../x"], "unconfirmed": 1, "fallback": false}',
                                     b'{"version": 1, "extensions": [], "unconfirmed": -3, "fallback": false}', b"[1, 2]"])
def test_garbled_state_is_no_history(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "boot-attempts.json"
    path.write_bytes(content)
    assert attempts.read(attempts.named(str(path))) == NONE


def test_state_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    where = attempts.state_path(str(tmp_path))
    assert attempts.write(where, Attempts((B, A), 2, False)) == []
    assert attempts.read(where) == Attempts((A, B), 2, False)
    assert sorted(os.listdir(tmp_path / "mobynit")) == ["boot-attempts.json"]


def test_max_tries_parameter() -> None:
    assert [attempts.max_tries(v) for v in (None, "1", "5", "0", "x", "-2", "99999")] == [3, 1, 5, 3, 3, 3, 3]


# --- the cycle with real mounts ------------------------------------------------------------


def boot(dev, tmp_path: Path, n: int, cmdline: str = "") -> dict:
    run = tmp_path / f"boot{n}"
    run.mkdir()
    with assembled(dev, run, cmdline, extra=("--attempts", str(dev.data / attempts.STATE_NAME))) as (root, record, _):
        record["root_has_extensions"] = (root / "usr/share/ext-normal").exists()
        return record


def confirm(dev, *extra: str) -> str:
    return mobynit("confirm", "--data", str(dev.data), *extra).stdout


@pytest.mark.engine
def test_unconfirmed_boots_fall_back_until_retried(device_copy, tmp_path: Path) -> None:
    dev = device_copy
    for n in (1, 2, 3):
        record = boot(dev, tmp_path, n)
        assert record["root_has_extensions"] and record["attempts"]["unconfirmed"] == n
    record = boot(dev, tmp_path, 4)
    assert not record["root_has_extensions"] and record["attempts"]["fallback"]
    assert all(not e["included"] for e in record["extensions"])
    assert "never confirmed" in record["attempts"]["reason"]
    assert "stay off" in confirm(dev)  # a healthy hostapp-only boot does not bring them back
    assert not boot(dev, tmp_path, 5)["root_has_extensions"]
    assert "mounted again" in confirm(dev, "--retry-extensions")
    record = boot(dev, tmp_path, 6)
    assert record["root_has_extensions"] and record["attempts"]["unconfirmed"] == 1


@pytest.mark.engine
def test_confirmed_boots_keep_their_extensions(device_copy, tmp_path: Path) -> None:
    for n in range(1, 6):
        record = boot(device_copy, tmp_path, n, "mobynit.max_tries=1")
        assert record["root_has_extensions"] and record["attempts"]["unconfirmed"] == 1
        assert confirm(device_copy) == "mobynit: boot confirmed\n"


@pytest.mark.engine
def test_a_changed_extension_set_is_tried_again(device_copy, tmp_path: Path) -> None:
    dev = device_copy
    boot(dev, tmp_path, 1, "mobynit.max_tries=1")
    assert not boot(dev, tmp_path, 2, "mobynit.max_tries=1")["root_has_extensions"]
    import shutil

    shutil.rmtree(dev.data / "docker/containers" / dev.extensions["ext-legacy"])  # an extension removed
    record = boot(dev, tmp_path, 3, "mobynit.max_tries=1")
    assert record["root_has_extensions"] and record["attempts"]["unconfirmed"] == 1


@pytest.mark.engine
def test_a_garbled_state_file_is_survived(device_copy, tmp_path: Path) -> None:
    state = device_copy.data / attempts.STATE_NAME
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b'{"version": 1, "extensions": [')
    record = boot(device_copy, tmp_path, 1)
    assert record["root_has_extensions"] and record["attempts"]["unconfirmed"] == 1
