"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from conftest import BIN

from tagsplit.cli import main

if TYPE_CHECKING:
    from pathlib import Path

SAMPLE = BIN / "sample_gcc_x64_O2.sys"


def _pe_offset(data: bytes) -> int:
    return int(struct.unpack_from("<I", data, 0x3C)[0])


def _variant(tmp: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(SAMPLE.read_bytes())
    edit(data)
    p = tmp / name
    p.write_bytes(bytes(data))
    return p


def _machine(code: int):  # type: ignore[no-untyped-def]
    return lambda d: struct.pack_into("<H", d, _pe_offset(d) + 4, code)


def _dotnet(d: bytearray) -> None:
    pe = _pe_offset(d)
    struct.pack_into("<II", d, pe + 24 + 112 + 14 * 8, 0x2000, 0x48)


def _user_mode(d: bytearray) -> None:
    pe = _pe_offset(d)
    struct.pack_into("<H", d, pe + 24 + 68, 3)  # IMAGE_SUBSYSTEM_WINDOWS_CUI
    i = bytes(d).find(b"ntoskrnl.exe")
    d[i : i + 12] = b"kernel32.dll"


def _section_outside(d: bytearray) -> None:
    pe = _pe_offset(d)
    opt = struct.unpack_from("<H", d, pe + 20)[0]
    struct.pack_into("<I", d, pe + 24 + opt + 12, 0x7FFF0000)  # first section's VirtualAddress


def _huge_image(d: bytearray) -> None:
    struct.pack_into("<I", d, _pe_offset(d) + 24 + 56, 0xFFFFF000)  # SizeOfImage


CASES = {
    "text file": lambda t: _write(t / "notes.sys", b"hello, this is not a driver\n"),
    "empty file": lambda t: _write(t / "empty.sys", b""),
    "truncated": lambda t: _write(t / "trunc.sys", SAMPLE.read_bytes()[:700]),
    "mz only": lambda t: _write(t / "mz.sys", b"MZ" + b"\0" * 62),
    "arm64": lambda t: _variant(t, "arm.sys", _machine(0xAA64)),
    "ia64": lambda t: _variant(t, "ia64.sys", _machine(0x200)),
    ".net": lambda t: _variant(t, "net.sys", _dotnet),
    "section outside image": lambda t: _variant(t, "sec.sys", _section_outside),
    "huge SizeOfImage": lambda t: _variant(t, "huge.sys", _huge_image),
    "missing": lambda t: t / "nope.sys",
    "empty folder": lambda t: (t / "void").mkdir() or (t / "void"),
    "dangling link": lambda t: _link(t),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _link(t: Path) -> Path:
    p = t / "link.sys"
    p.symlink_to(t / "gone.sys")
    return p


def _one_error_line(err: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("tagsplit")


@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_bad_input(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES[case](tmp_path)
    code = main(["scan", str(path)])
    out, err = capsys.readouterr()
    assert code != 0
    _one_error_line(err)
    assert out == ""


def test_user_mode_image_is_scanned_and_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _variant(tmp_path, "user.dll", _user_mode)
    assert main(["scan", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "NOT A DRIVER" in out
    _one_error_line(err)


def test_folder_scan_continues_past_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(SAMPLE, tmp_path / "good.sys")
    (tmp_path / "bad.sys").write_bytes(b"MZ broken")
    assert main(["scan", str(tmp_path), "--tag", "Smpl"]) == 1
    out, err = capsys.readouterr()
    assert "good.sys" in out
    assert "bad.sys" in err


@pytest.mark.parametrize("tag", ["ABCDE", "", "0x0", "0x123456789", "\u00e9t\u00e9"])
def test_malformed_tag(tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(SAMPLE), "--tag", tag]) == 2
    assert "tag" in capsys.readouterr().err


def test_scan_traceback_free_in_a_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "x.sys"
    bad.write_bytes(b"MZ" + b"\xff" * 200)
    r = subprocess.run([sys.executable, "-m", "tagsplit.cli", "scan", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


# --- plan / apply / revert ---------------------------------------------------------------------------------------


def _plan(tmp: Path) -> Path:
    p = tmp / "p.plan.json"
    assert main(["plan", str(SAMPLE), "--tag", "Smpl", "-o", str(p)]) == 0
    return p


def test_plan_for_a_tag_the_driver_does_not_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(SAMPLE), "--tag", "Nope", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "'Smpl'" in err  # says which tags it does use
    assert not (tmp_path / "x.json").exists()


def test_bad_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(SAMPLE), "--tag", "Smpl", "--prefix", "a b", "-o", str(tmp_path / "x.json")]) == 2
    _one_error_line(capsys.readouterr().err)


def test_apply_to_another_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path)
    capsys.readouterr()
    out = tmp_path / "o.sys"
    code = main(["apply", str(plan), "--to-file", str(out), "--driver", str(BIN / "sample_gcc_x64_O0.sys")])
    assert code != 0
    assert "not the build the plan was made for" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"schema": 99}',
        '{"schema": 1, "driver": {}}',
        "[]",
        '{"schema": 1, "tool": "tagsplit", "driver": {"sha256": "'
        + "0" * 64
        + '", "arch": "x64", "timestamp": 0, "size_of_image": 4096, "checksum": 0, '
        '"image_base": 0}, "sites": [{"rva": "0x10", "strategy": "imm", "patches": '
        '[{"rva": "0x10", "original": "00", "replacement": "0000"}]}]}',
    ],
)
def test_corrupt_plan(content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.plan.json"
    p.write_text(content)
    assert main(["apply", str(p), "--to-file", str(tmp_path / "o.sys")]) != 0
    _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.sys").exists()


def test_output_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path)
    capsys.readouterr()
    assert main(["apply", str(plan), "--to-file", str(tmp_path / "no" / "such" / "o.sys")]) != 0
    _one_error_line(capsys.readouterr().err)


def test_refuses_to_overwrite_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drv = tmp_path / "d.sys"
    shutil.copy(SAMPLE, drv)
    plan = tmp_path / "p.json"
    assert main(["plan", str(drv), "--tag", "Smpl", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["apply", str(plan), "--to-file", str(drv)]) != 0
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert drv.read_bytes() == SAMPLE.read_bytes()


def test_corrupt_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j = tmp_path / "j.json"
    for content in ("{", json.dumps({"tool": "tagsplit-journal", "schema": 1, "entries": [{"rva": "zz"}]})):
        j.write_text(content)
        assert main(["revert", str(j)]) != 0
        _one_error_line(capsys.readouterr().err)


def test_patched_file_changed_after_apply_is_not_reverted_blindly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(tmp_path)
    out = tmp_path / "o.sys"
    assert main(["apply", str(plan), "--to-file", str(out)]) == 0
    doc = json.loads((tmp_path / "o.sys.journal.json").read_text())
    rva = next(int(e["rva"], 16) for e in doc["entries"] if int(e["rva"], 16) >= 0x1000)
    from tagsplit.image import load

    off = load(SAMPLE).rva_to_offset(rva)
    data = bytearray(out.read_bytes())
    data[off] ^= 0xFF
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["revert", str(tmp_path / "o.sys.journal.json")]) != 0
    assert "nothing written" in capsys.readouterr().err
    assert out.read_bytes() == bytes(data)
