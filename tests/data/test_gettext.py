"""`builtin:gettext-<lang>`: English -> <lang> pairs from gettext catalogues, on .mo files the test writes."""

import struct
from array import array

import pytest

from lmkiln.cli import main
from lmkiln.data.gettext_pairs import format_only, gettext_splits
from lmkiln.data.split import is_heldout
from lmkiln.errors import UserError

HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


def write_mo(path, messages: dict[str, str]) -> None:
    """A GNU .mo file (msgfmt's layout): the header, then the sorted original and translated tables."""
    keys = sorted(messages)
    ids = strs = b""
    spans = []
    for key in keys:
        k, v = key.encode(), messages[key].encode()
        spans.append((len(ids), len(k), len(strs), len(v)))
        ids, strs = ids + k + b"\0", strs + v + b"\0"
    n = len(keys)
    key_start = 7 * 4 + 16 * n
    value_start = key_start + len(ids)
    key_table, value_table = [], []
    for k_off, k_len, v_off, v_len in spans:
        key_table += [k_len, key_start + k_off]
        value_table += [v_len, value_start + v_off]
    header = struct.pack("Iiiiiii", 0x950412DE, 0, n, 7 * 4, 7 * 4 + 8 * n, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array("i", key_table).tobytes() + array("i", value_table).tobytes() + ids + strs)


@pytest.fixture
def locale_root(tmp_path):
    root = tmp_path / "locale"
    write_mo(
        root / "de" / "LC_MESSAGES" / "fileutil.mo",
        {
            "": HEADER,
            "File not found": "Datei nicht gefunden",
            "%s: %d": "%s: %d",  # only format strings
            "%s (%s)": "%s (%s)",
            "OK": "OK",  # identical
            "menu\x04Open": "Öffnen",  # a context
            "One file\x00%d files": "Eine Datei\x00%d Dateien",  # a plural
            "Untranslated": "",
        },
    )
    write_mo(
        root / "de" / "LC_MESSAGES" / "netutil.mo",
        {"": HEADER, "File not found": "Datei fehlt", "Connection lost": "Verbindung verloren"},
    )
    return root


def test_pairs_drop_identical_and_format_only_messages(locale_root):
    splits = gettext_splits("builtin:gettext-de", 0.0, 0.0, (locale_root,))
    pairs = {(r["input"], r["output"]) for r in splits["train"]}
    # "File not found" is kept once: from the first catalogue (in name order) that has it
    assert pairs == {
        ("File not found", "Datei nicht gefunden"),
        ("Open", "Öffnen"),
        ("One file", "Eine Datei"),
        ("Connection lost", "Verbindung verloren"),
    }
    assert splits["val"] == splits["test"] == []
    row = splits["train"][0]
    assert row["instruction"] == "Translate this program message from English to German." and row["group"] == "fileutil"
    assert format_only("%1$s: %(name)s {0} ${HOME} 100%%") and not format_only("%s files")


def test_a_catalogue_stays_on_one_side(locale_root):
    splits = gettext_splits("builtin:gettext-de", 0.5, 0.0, (locale_root,))
    for side, rows in splits.items():
        for row in rows:
            assert (side == "test") == is_heldout(row["group"], 0.5)
    held = {r["group"] for r in splits["test"]}
    trained = {r["group"] for r in splits["train"]}
    assert not held & trained


def test_a_language_without_catalogues_is_a_clear_error(locale_root, tmp_path, capsys):
    with pytest.raises(UserError, match=r"no gettext catalogue \(\*\.mo\) for 'xx'"):
        gettext_splits("builtin:gettext-xx", 0.1, 0.1, (locale_root,))
    with pytest.raises(UserError, match="locale code"):
        gettext_splits("builtin:gettext-../etc", 0.1, 0.1, (locale_root,))
    # checked before any model loads: the eval names the task, not a missing model
    assert main(["eval", "--models", str(tmp_path / "none"), "--tasks", "gen:builtin:gettext-xx@test"]) == 2
    assert "'builtin:gettext-xx': no gettext catalogue" in capsys.readouterr().err
