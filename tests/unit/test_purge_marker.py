"""The data partition's purge marker: only a regular file lets extensions in.

The data store here is empty, so with a marker that counts the extensions
are read (none found, no reason); with one that does not, the store is not
read at all and the reason names the marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mobynit.core.assemble import find_extensions
from mobynit.core.cmdline import Cmdline
from mobynit.core.paths import store_paths


def _marker(data: Path, kind: str) -> None:
    marker = data / "remove_me_to_reset"
    if kind == "file":
        marker.write_text("")
    elif kind == "dangling":
        marker.symlink_to("nowhere")
    elif kind == "symlink":
        (data / "real").write_text("")
        marker.symlink_to("real")
    elif kind == "dir":
        marker.mkdir()
    elif kind == "fifo":
        os.mkfifo(marker)


@pytest.mark.parametrize(("kind", "reason"), [
    ("file", None),
    ("missing", "is missing"),
    ("dangling", "is a symlink, not the marker file"),
    ("symlink", "is a symlink, not the marker file"),
    ("dir", "is not a regular file"),
    ("fifo", "is not a regular file"),
])
def test_only_a_regular_marker_lets_extensions_in(tmp_path: Path, kind: str, reason: str | None) -> None:
    data = tmp_path / "data"
    (data / "docker").mkdir(parents=True)
    _marker(data, kind)
    found, token, why = find_extensions(store_paths(str(tmp_path / "sysroot"), str(data)), Cmdline(""), "6.1.0")
    assert found == [] and token is None
    if reason is None:
        assert why is None
    else:
        assert why == f"{data}/remove_me_to_reset {reason} (a data reset may be pending): extensions not overlaid"
