"""The boot path's uevent test against pyroute2's uevent parser, on kernel-shaped messages.

The initramfs cannot afford pyroute2 (see docs/boot.md), so it tells a
block-device announcement by a byte test of its own; pyroute2's
MarshalUevent, a full parser written by others, is the oracle it must agree
with on every message the kernel could send (`action@devpath`, then
NUL-terminated KEY=value fields, each key once).
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from pyroute2.netlink.uevent import MarshalUevent

from mobynit.initrd.blockdev import is_block_event

_word = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="=@"), min_size=1, max_size=12)
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)
_subsystem = st.sampled_from(["block", "blocks", "bloc", "net", "usb", "Block", "block ", " block", ""]) | _value


@st.composite
def uevents(draw: st.DrawFn) -> bytes:
    action = draw(st.sampled_from(["add", "remove", "change", "bind", "move"]))
    devpath = "/devices/" + "/".join(draw(st.lists(_word, min_size=1, max_size=4)))
    fields = draw(st.dictionaries(_word.filter(lambda k: k != "SUBSYSTEM"), _value, max_size=6))
    if draw(st.booleans()):
        fields["SUBSYSTEM"] = draw(_subsystem)
    keys = draw(st.permutations(sorted(fields)))
    body = b"".join(f"{k}={fields[k]}".encode() + b"\0" for k in keys)
    return f"{action}@{devpath}".encode() + b"\0" + body


def _oracle(msg: bytes) -> bool:
    (parsed,) = MarshalUevent().parse(msg)
    return parsed.get("SUBSYSTEM") == "block"


@given(uevents())
@example(b"add@/devices/virtual/block/loop0\0ACTION=add\0SUBSYSTEM=block\0SEQNUM=1\0")
@example(b"add@/devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda1\0SUBSYSTEM=block\0")
@example(b"add@/devices/x\0SUBSYSTEM=blocks\0DEVTYPE=SUBSYSTEM=block\0")
def test_block_events_are_told_as_pyroute2_parses_them(msg: bytes) -> None:
    assert is_block_event(msg) == _oracle(msg)
