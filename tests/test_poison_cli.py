"""`pagewarden poison show|merge|diff|convert`."""

from __future__ import annotations

from pathlib import Path

import pytest

import pagewarden as pw
from pagewarden.cli import main


def test_show_convert_merge_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "list.txt"
    text.write_text("# hand-written\n0x1000\n8192  # decimal\n\n0x200000\n")
    assert main(["poison", "show", str(text)]) == 0
    out = capsys.readouterr().out
    assert "pages       3" in out and "(text)" in out and "ranges      2" in out
    assert "|#" in out  # the map marks the start of guest memory

    as_json = tmp_path / "list.json"
    assert main(["poison", "convert", str(text), str(as_json)]) == 0
    assert sorted(pw.PoisonSet.load(as_json)) == [0x1000, 0x2000, 0x200000]
    back = tmp_path / "back.txt"
    assert main(["poison", "convert", str(as_json), str(back), "--to", "text"]) == 0
    assert [ln for ln in back.read_text().splitlines() if not ln.startswith("#")] == [
        "0x1000",
        "0x2000",
        "0x200000",
    ]

    other = tmp_path / "other.json"
    pw.PoisonSet([0x200000, 0x300000]).save(other)
    merged = tmp_path / "merged.json"
    assert main(["poison", "merge", str(merged), str(as_json), str(other)]) == 0
    assert sorted(pw.PoisonSet.load(merged)) == [0x1000, 0x2000, 0x200000, 0x300000]

    capsys.readouterr()
    assert main(["poison", "diff", str(as_json), str(text)]) == 0
    assert "same poison" in capsys.readouterr().out
    assert main(["poison", "diff", str(as_json), str(other)]) == 1
    out = capsys.readouterr().out
    assert "only in" in out and "0x000000300000" in out and "0x000000001000" in out


def test_show_a_journal(uffd: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "j"
    mem = pw.GuestMemory.anonymous(64 << 10)
    with pw.Handler(mem, pw.ZeroSource(), poison=pw.PoisonSet([0x3000]), poison_journal=journal):
        pass
    assert main(["poison", "show", str(journal), "--size", "64K"]) == 0
    out = capsys.readouterr().out
    assert "(journal)" in out and "pages       1" in out


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("0x1000\nnot-an-address\n", "line 2"),
        ("0x1001\n", "aligned"),
        ('{"format": "pagewarden.poison", "version": 1', "truncated"),
        (
            (
                '{"format": "pagewarden.poison", "version": 7, "page_size": 4096, "pages": 0, '
                '"ranges": []}'
            ),
            "version",
        ),
    ],
)
def test_bad_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    assert main(["poison", "show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and needle in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["poison", "show", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
