"""Fuzzing mailbox names: modified UTF-7 (RFC 3501 5.1.3) round-trips every Unicode name and
decodes only canonical input; a name either becomes a Maildir++ folder that stays inside the
user's directory and maps back to the same name, or is refused with InvalidMailboxNameError."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailroom.errors import InvalidMailboxNameError
from mailroom.imap.wire import MailboxNameError, decode_mailbox, encode_mailbox
from mailroom.mailstore import canonical_name, folder_name, mailbox_name
from tests.security import fuzzing  # noqa: F401  (the settings profile)

pieces = st.sampled_from(
    [
        "/",
        ".",
        "..",
        "&",
        "&-",
        "-",
        " ",
        "INBOX",
        "inbox",
        "é",
        "日本",
        "\U0001f600",
        "\x00",
        "\n",
        "~",
        "%",
        "*",
    ]
)
names = st.lists(pieces | st.text(max_size=6), max_size=10).map("".join)


@given(st.text())
def test_modified_utf7_round_trips(name: str) -> None:
    encoded = encode_mailbox(name)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert decode_mailbox(encoded) == name


@given(st.text(alphabet=st.sampled_from("&-+,/AZaz09é\x00 .")) | st.text(max_size=20))
def test_decoding_accepts_only_canonical_forms(encoded: str) -> None:
    try:
        name = decode_mailbox(encoded)
    except MailboxNameError:
        return
    assert encode_mailbox(name) == encoded


@given(names)
def test_names_become_folders_inside_the_user_directory(name: str) -> None:
    try:
        canonical = canonical_name(name)
    except InvalidMailboxNameError:
        return
    folder = folder_name(canonical)
    assert "/" not in folder and "\x00" not in folder
    assert folder not in (".", "..") and not folder.startswith(".")
    assert len(folder) < 255
    assert mailbox_name(folder) == canonical
    assert canonical_name(canonical) == canonical


@given(st.text(alphabet=st.sampled_from("&-+,.AZaz09 _")) | st.text(max_size=20))
def test_folders_read_from_disk_map_to_one_name_or_none(folder: str) -> None:
    name = mailbox_name(folder)
    if name is not None:
        assert folder_name(name) == folder
