"""Hostile PE files: every one gets a clear error (or a scan with warnings), in bounded time and memory.

Each case edits a real sample driver with `struct` (or appends a section full of hostile tables) and is run through
`image.parse` + `scan_image` under tracemalloc, then through the CLI (`tagsplit scan FILE`: one line on stderr, no
traceback) and all together in one folder scan (the good driver is still reported).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import BIN

from tagsplit import image as image_mod
from tagsplit.cli import _scan_job as _REAL_SCAN_JOB
from tagsplit.cli import main
from tagsplit.errors import ImageError, InputError, TagsplitError
from tagsplit.image import parse
from tagsplit.sites import scan_image

ROOT = Path(__file__).resolve().parent.parent
X64 = BIN / "sample_clang_x64.sys"  # .text .rdata .data .pdata INIT; imports, exports, .pdata
X86 = BIN / "sample_gcc_x86_O2.sys"  # .text INIT .bss .edata .idata .reloc
TIME_LIMIT = 10.0  # seconds per file, parse + scan (typically well under 1 s)
# Peak traced allocations per file: the image is materialised at SizeOfImage (built, then copied once), so the bound
# is a constant plus a few times the file, plus twice the uninitialised part the case declares.
MEMORY_LIMIT = 48 << 20


# --- editing PE headers ------------------------------------------------------------------------------------------


class Pe:
    """Offsets of the headers of a PE in a bytearray, and setters for the fields the cases change."""

    def __init__(self, data: bytes) -> None:
        self.d = bytearray(data)
        self.pe = struct.unpack_from("<I", self.d, 0x3C)[0]
        self.opt = self.pe + 24
        self.magic = struct.unpack_from("<H", self.d, self.opt)[0]
        self.dirs = self.opt + (112 if self.magic == 0x20B else 96)

    @property
    def nsec(self) -> int:
        return int(struct.unpack_from("<H", self.d, self.pe + 6)[0])

    @property
    def table(self) -> int:
        return self.opt + int(struct.unpack_from("<H", self.d, self.pe + 20)[0])

    def section(self, i: int) -> int:
        return self.table + 40 * i

    def put(self, off: int, fmt: str, *values: int) -> Pe:
        struct.pack_into(fmt, self.d, off, *values)
        return self

    def sec(self, i: int, field: str, value: int) -> Pe:
        at = {"vsize": 8, "rva": 12, "rawsize": 16, "raw": 20, "chars": 36}[field]
        return self.put(self.section(i) + at, "<I", value)

    def dir(self, n: int, rva: int, size: int) -> Pe:
        return self.put(self.dirs + 8 * n, "<II", rva, size)

    def size_of_image(self, v: int) -> Pe:
        return self.put(self.opt + 56, "<I", v)

    def get_size_of_image(self) -> int:
        return int(struct.unpack_from("<I", self.d, self.opt + 56)[0])

    def add_section(self, payload: bytes, name: bytes = b".evil", chars: int = 0x40000040) -> int:
        """Append a section holding `payload` at the end of the image; returns its RVA."""
        last = max(range(self.nsec), key=lambda i: struct.unpack_from("<I", self.d, self.section(i) + 12)[0])
        vs, rva = struct.unpack_from("<II", self.d, self.section(last) + 8)
        new_rva = (rva + max(vs, 1) + 0xFFF) & ~0xFFF
        raw = (len(self.d) + 0x1FF) & ~0x1FF
        size = (len(payload) + 0x1FF) & ~0x1FF
        at = self.section(self.nsec)
        assert at + 40 <= struct.unpack_from("<I", self.d, self.opt + 60)[0], "no room for another section header"
        self.d[at : at + 40] = struct.pack("<8sIIIIIIHHI", name, len(payload), new_rva, size, raw, 0, 0, 0, 0, chars)
        self.put(self.pe + 6, "<H", self.nsec + 1)
        self.d += b"\0" * (raw - len(self.d)) + payload + b"\0" * (size - len(payload))
        self.size_of_image((new_rva + len(payload) + 0xFFF) & ~0xFFF)
        return new_rva

    def bytes(self) -> bytes:
        return bytes(self.d)


def x64() -> Pe:
    return Pe(X64.read_bytes())


def x86() -> Pe:
    return Pe(X86.read_bytes())


# --- the cases ---------------------------------------------------------------------------------------------------


def _imports_looping() -> bytes:
    """20,000 import descriptors, all naming the same DLL and one thunk array of 0x3000 entries that never ends."""
    pe = x64()
    n_desc, n_thunks = 20_000, 0x3000
    desc_size = 20 * (n_desc + 1)
    payload = bytearray(desc_size + 8 * n_thunks + 64)
    base = pe.add_section(bytes(len(payload)))
    ilt = base + desc_size
    name = ilt + 8 * n_thunks
    for i in range(n_desc):
        struct.pack_into("<IIIII", payload, 20 * i, ilt, 0, 0, name, ilt)
    for i in range(n_thunks):
        struct.pack_into("<Q", payload, desc_size + 8 * i, name)  # hint/name entries that point at the DLL name
    payload[8 * n_thunks + desc_size : 8 * n_thunks + desc_size + 13] = b"ntoskrnl.exe\0"
    off = struct.unpack_from("<I", pe.d, pe.section(pe.nsec - 1) + 20)[0]
    pe.d[off : off + len(payload)] = payload
    pe.dir(1, base, desc_size)
    return pe.bytes()


def _imports_self_referencing() -> bytes:
    """The import descriptor's thunk array is the descriptor table itself: names and thunks point at each other."""
    pe = x64()
    rva, _size = struct.unpack_from("<II", pe.d, pe.dirs + 8)
    pe.put(_rva_to_off(pe, rva), "<IIIII", rva, 0, 0, rva, rva)
    return pe.bytes()


def _exports_huge() -> bytes:
    pe = x64()
    rva, _size = struct.unpack_from("<II", pe.d, pe.dirs)
    off = _rva_to_off(pe, rva)
    pe.put(off + 20, "<IIIII", 0xFFFFFFFF, 0xFFFFFFFF, 0x7FFFFFF0, 0x7FFFFFF0, 0x7FFFFFF0)
    return pe.bytes()


def _pdata(entries: list[tuple[int, int, int]], *, chain_loop: bool = False) -> bytes:
    pe = x64()
    payload = bytearray(b"".join(struct.pack("<III", *e) for e in entries))
    rva = pe.add_section(bytes(len(payload) + 16))
    if chain_loop:  # one unwind info, chained (flag 4) to a RUNTIME_FUNCTION whose unwind info is itself
        ui = rva + len(payload)
        payload += struct.pack("<BBBB", 1 | (4 << 3), 0, 0, 0) + struct.pack("<III", 0x1000, 0x1010, ui)
        for i in range(len(entries)):
            struct.pack_into("<I", payload, 12 * i + 8, ui)
    off = struct.unpack_from("<I", pe.d, pe.section(pe.nsec - 1) + 20)[0]
    pe.d[off : off + len(payload)] = payload
    pe.dir(3, rva, 12 * len(entries))
    return pe.bytes()


def _pdata_chained_to_unwind_outside() -> bytes:
    """A fragment chained (one link) to a primary entry whose unwind info lies outside the image."""
    pe = x64()
    entries = [(0x1000, 0x1010, 0xFFFFFF00), (0x1020, 0x1030, 0)]
    rva = pe.add_section(bytes(12 * len(entries) + 16))
    ui = rva + 12 * len(entries)
    entries[1] = (0x1020, 0x1030, ui)
    payload = b"".join(struct.pack("<III", *e) for e in entries)
    payload += struct.pack("<BBBB", 1 | (4 << 3), 0, 0, 0) + struct.pack("<III", *entries[0])
    off = struct.unpack_from("<I", pe.d, pe.section(pe.nsec - 1) + 20)[0]
    pe.d[off : off + len(payload)] = payload
    pe.dir(3, rva, 12 * len(entries))
    return pe.bytes()


def _relocs_hostile() -> bytes:
    pe = x86()
    payload = bytearray()
    for i in range(20_000):  # many tiny blocks, one pointing far outside the image
        payload += struct.pack("<IIHH", 0x7FFF0000 if i % 2 else 0x1000, 12, 0x3000 | (i & 0xFFF), 0xA000)
    payload += struct.pack("<II", 0x1000, 0xFFFFFFF0)  # a block claiming 4 GiB
    rva = pe.add_section(bytes(payload))
    pe.dir(5, rva, len(payload))
    return pe.bytes()


def _rva_to_off(pe: Pe, rva: int) -> int:
    for i in range(pe.nsec):
        vs, va, rs, raw = struct.unpack_from("<IIII", pe.d, pe.section(i) + 8)
        if va <= rva < va + max(vs, rs):
            return int(raw + rva - va)
    raise AssertionError(hex(rva))


def _big_virtual_text() -> bytes:
    """An executable section of 60 MiB virtual size and no file data: allowed (below the bound), scanned."""
    pe = x64()
    rva = (pe.get_size_of_image() + 0xFFF) & ~0xFFF
    at = pe.section(pe.nsec)
    pe.d[at : at + 40] = struct.pack("<8sIIIIIIHHI", b".big", 60 << 20, rva, 0, 0, 0, 0, 0, 0, 0x60000020)
    pe.put(pe.pe + 6, "<H", pe.nsec + 1)
    return pe.size_of_image(rva + (60 << 20)).bytes()


@dataclass(frozen=True)
class Case:
    make: Callable[[], bytes]
    error: str | None  # None: parses (with warnings) and scans; else an ImageError whose text holds this
    mapped: bool = False
    virtual: int = 0  # bytes of uninitialised image the case declares (allowed up to image.MAX_VIRTUAL_EXCESS)


CASES: dict[str, Case] = {
    "zero-length": Case(lambda: b"", "empty file"),
    "one byte": Case(lambda: b"M", "no MZ header"),
    "mz only": Case(lambda: b"MZ", "not a valid PE"),
    "headers only": Case(lambda: X64.read_bytes()[:0x200], ""),
    "truncated in .text": Case(lambda: X64.read_bytes()[:0x600], "extends past the end of the file"),
    "e_lfanew outside the file": Case(lambda: x64().put(0x3C, "<I", 0x7FFFFFF0).bytes(), "not a valid PE"),
    "e_lfanew zero": Case(lambda: x64().put(0x3C, "<I", 0).bytes(), "not a valid PE"),
    "section raw data outside the file": Case(lambda: x64().sec(0, "raw", 0x7FFFFF00).bytes(), ""),
    "section raw size huge": Case(lambda: x64().sec(0, "rawsize", 0xFFFFFE00).bytes(), "SizeOfImage"),
    "section outside SizeOfImage": Case(lambda: x64().sec(1, "rva", 0x10000000).bytes(), "outside SizeOfImage"),
    "overlapping sections": Case(lambda: x64().sec(1, "rva", 0x1000).bytes(), "overlap"),
    "huge virtual size": Case(lambda: x64().sec(0, "vsize", 0xFFFFF000).bytes(), "outside SizeOfImage"),
    "huge SizeOfImage, tiny file": Case(
        lambda: x64().size_of_image(0x36007000).sec(0, "vsize", 0x36000000).bytes(), "implausible SizeOfImage"
    ),
    "SizeOfImage 4 GiB": Case(lambda: x64().size_of_image(0xFFFFF000).bytes(), "implausible SizeOfImage"),
    "60 MiB of virtual code": Case(_big_virtual_text, None, virtual=60 << 20),
    "no sections": Case(lambda: x64().put(x64().pe + 6, "<H", 0).bytes(), "no executable section"),
    "65535 sections": Case(lambda: x64().put(x64().pe + 6, "<H", 0xFFFF).bytes(), None),
    "optional header size huge": Case(lambda: x64().put(x64().pe + 20, "<H", 0xFFFF).bytes(), ""),
    "imports outside the image": Case(lambda: x64().dir(1, 0x7FFFFFF0, 0x1000).bytes(), None),
    "imports 20000 descriptors, endless thunks": Case(_imports_looping, None),
    "imports self-referencing": Case(_imports_self_referencing, None),
    "exports counts 0xffffffff": Case(_exports_huge, None),
    ".pdata outside the image": Case(lambda: x64().dir(3, 0x7FFFFFF0, 0x7FFFFFF0).bytes(), None),
    ".pdata entries out of range": Case(lambda: _pdata([(0xFFFFFFF0, 0xFFFFFFFF, 0), (0x1000, 0x900000, 5)]), None),
    ".pdata 100000 overlapping entries": Case(lambda: _pdata([(0x1000, 0x1300 - i % 7, 0) for i in range(100_000)]),
                                              None),
    ".pdata chained unwind loop": Case(lambda: _pdata([(0x1000 + 16 * i, 0x1010 + 16 * i, 0) for i in range(40)],
                                                      chain_loop=True), None),
    ".pdata chained to unwind info outside the image": Case(_pdata_chained_to_unwind_outside, None),
    ".reloc hostile blocks": Case(_relocs_hostile, None),
    "arm64": Case(lambda: x64().put(x64().pe + 4, "<H", 0xAA64).bytes(), "unsupported architecture ARM64"),
    "x86 magic on x64": Case(lambda: x64().put(x64().opt, "<H", 0x10B).bytes(), ""),
    "mapped: dump shorter than its headers": Case(lambda: X64.read_bytes()[:0x100], "truncated headers", mapped=True),
    "mapped: SizeOfImage beyond the dump": Case(lambda: x64().size_of_image(0x3000000).bytes(), None, mapped=True,
                                                 virtual=0x3000000),
}


@dataclass
class Outcome:
    error: BaseException | None
    seconds: float
    peak: int


def _run(case: Case, data: bytes) -> Outcome:
    tracemalloc.start()
    t = time.perf_counter()
    err: BaseException | None = None
    try:
        image = parse(data, "hostile.sys", mapped_base=0xFFFFF80012340000 if case.mapped else None)
        scan_image(image)
    except TagsplitError as e:
        err = e
    finally:
        seconds = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return Outcome(err, seconds, peak)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_pe_gives_a_clear_error_in_bounded_time_and_memory(name: str) -> None:
    case = CASES[name]
    data = case.make()
    out = _run(case, data)  # anything but a TagsplitError fails the test with its traceback
    if case.error is None:
        assert out.error is None, out.error
    else:
        assert isinstance(out.error, ImageError), f"parsed, expected an error with {case.error!r}"
        assert case.error in str(out.error)
        assert "hostile.sys" in str(out.error)
    assert out.seconds < TIME_LIMIT, f"{out.seconds:.1f} s"
    assert out.peak < MEMORY_LIMIT + 8 * len(data) + 2 * case.virtual, f"{out.peak >> 20} MiB"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for i, name in enumerate(sorted(CASES)):
        if not CASES[name].mapped:
            (folder / f"{i:02d}.sys").write_bytes(CASES[name].make())
    shutil.copy(BIN / "sample_gcc_x64_O2.sys", folder / "good.sys")
    return folder


@pytest.mark.parametrize("name", sorted(n for n in CASES if not CASES[n].mapped and CASES[n].error is not None))
def test_cli_scan_of_a_hostile_file_is_one_line(name: str, hostile_folder: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = hostile_folder / f"{sorted(CASES).index(name):02d}.sys"
    assert main(["scan", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("tagsplit: error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(("jobs", "args"), [("1", ["--tag", "Smpl"]), ("2", [])], ids=["one-core-tag", "two-cores"])
def test_folder_of_hostile_files_still_reports_the_good_one(hostile_folder: Path, jobs: str, args: list[str],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TAGSPLIT_JOBS", jobs)
    bad = [n for n in CASES if not CASES[n].mapped and CASES[n].error is not None]
    assert main(["scan", str(hostile_folder), *args]) == 1
    out, err = capsys.readouterr()
    assert "good.sys" in out
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == len(bad), err  # one line per bad file, in file order
    assert lines == sorted(lines)


# --- files that are not files ------------------------------------------------------------------------------------


def test_enormous_file_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "huge.sys"
    with open(big, "wb") as f:
        f.write(X64.read_bytes())
        f.truncate(4 << 30)  # sparse: 4 GiB that cost no disk and must never be read
    t = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        image_mod.load(big)
    assert time.perf_counter() - t < 1.0
    assert main(["scan", str(big)]) == 2
    assert "too large" in capsys.readouterr().err


def test_file_larger_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "MAX_FILE_SIZE", 1024)
    with pytest.raises(ImageError, match="too large"):
        image_mod.load(X64)
    with pytest.raises(ImageError, match="too large"):
        parse(X64.read_bytes())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.sys"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        image_mod.load(fifo)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_is_refused() -> None:
    with pytest.raises(InputError, match="not a regular file"):
        image_mod.load("/dev/zero")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        image_mod.load(tmp_path)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "secret.sys"
    p.write_bytes(X64.read_bytes())
    p.chmod(0)
    with pytest.raises(InputError, match="cannot read"):
        image_mod.load(p)


def test_driver_truncated_between_plan_and_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drv = tmp_path / "d.sys"
    shutil.copy(BIN / "sample_gcc_x64_O2.sys", drv)
    plan = tmp_path / "p.plan.json"
    assert main(["plan", str(drv), "--tag", "Smpl", "-o", str(plan)]) == 0
    drv.write_bytes(drv.read_bytes()[:0x300])
    capsys.readouterr()
    assert main(["apply", str(plan), "--to-file", str(tmp_path / "o.sys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "d.sys" in err
    assert not (tmp_path / "o.sys").exists()


def test_code_file_ranges_is_conservative() -> None:
    """The folder-scan prefilter's view of where code lies in the file covers every executable section's bytes."""
    for path in sorted(BIN.glob("*.sys")):
        data = path.read_bytes()
        ranges = image_mod.code_file_ranges(data)
        assert ranges is not None, f"{path.name}: a valid driver must get ranges, not the None that means 'use parse'"
        image = parse(data, str(path))
        for sec in image.code_sections():
            if sec.raw_size:
                assert any(a <= sec.raw_offset and sec.raw_offset + sec.raw_size <= b for a, b in ranges)
    for name in CASES:
        image_mod.code_file_ranges(CASES[name].make())  # never raises


# --- folder scans ------------------------------------------------------------------------------------------------


def _folder_docs(folder: Path, tag: str | None, jobs: str, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object], str]:
    monkeypatch.setenv("TAGSPLIT_JOBS", jobs)
    code = main(["scan", str(folder), "--json", *(["--tag", tag] if tag else [])])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest.fixture(scope="module")
def mixed_folder(hostile_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample drivers, the corpus (if present) and the hostile files, in subfolders."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copytree(BIN, folder / "bin", ignore=shutil.ignore_patterns("*.json"))
    shutil.copytree(hostile_folder, folder / "hostile")
    corpus = ROOT.parent / "shared" / "corpus" / "github"
    if corpus.is_dir():
        for p in sorted(corpus.glob("*/*.sys")):
            shutil.copy(p, folder / f"corpus_{p.name}")
    return folder


FOLDER_TAGS = ("Smpl", "PShr", "Prot", "WDiv", "Nope")


@pytest.fixture(scope="module")
def full_scans(mixed_folder: Path) -> list[tuple[Path, object]]:
    """Every file of the mixed folder scanned on its own, cross-checked for all FOLDER_TAGS at once."""
    from tagsplit import tags as tagmod
    from tagsplit.cli import _driver_files

    every = {tagmod.parse(t) for t in FOLDER_TAGS}
    out: list[tuple[Path, object]] = []
    for f in _driver_files(mixed_folder):
        try:
            out.append((f, scan_image(image_mod.load(f), every)))
        except TagsplitError as e:
            out.append((f, e))
    return out


@pytest.mark.parametrize("tag", FOLDER_TAGS)
def test_folder_scan_with_prefilter_equals_a_full_scan_of_every_file(
    tag: str,
    mixed_folder: Path,
    full_scans: list[tuple[Path, object]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The byte prefilter only skips files that cannot use the tag: same drivers, same sites, same errors, in the
    same order, on one core and on several."""
    import dataclasses

    from tagsplit import tags as tagmod
    from tagsplit.cli import _uses
    from tagsplit.sites import DriverScan
    from tagsplit.sites.render import document

    v = tagmod.parse(tag)
    expected, errors = [], []
    for f, s in full_scans:
        if not isinstance(s, DriverScan):
            errors.append({"path": str(f), "error": str(s)})
            continue
        s = dataclasses.replace(s, unexplained_tag_bytes={v: s.unexplained_tag_bytes.get(v, ())})
        if any(_uses(x.tag_value, {v}) for x in s.sites) or s.unexplained_tag_bytes[v]:
            expected.append(s)
    want = json.loads(json.dumps(document(expected, errors)))
    for jobs in ("1", "2") if tag == FOLDER_TAGS[0] else ("2",):
        code, doc, _ = _folder_docs(mixed_folder, tag, jobs, monkeypatch, capsys)
        assert code == 1  # the hostile files
        assert doc == want


def _dies_on_two_files(job: tuple[str, tuple[int, ...] | None, bool]) -> object:
    """A scan job that kills its worker process on 03.sys and good.sys (a native crash, an OOM kill)."""
    if job[0].endswith(("03.sys", "good.sys")):
        os._exit(9)
    return _REAL_SCAN_JOB(job)


def test_a_worker_process_dying_does_not_stop_the_folder_scan(
    hostile_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tagsplit.cli as cli

    monkeypatch.setattr(cli, "_scan_job", _dies_on_two_files)
    monkeypatch.setenv("TAGSPLIT_JOBS", "2")
    assert main(["scan", str(hostile_folder), "--json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    died = sorted(Path(e["path"]).name for e in doc["errors"] if "process died" in e["error"])
    assert died == ["03.sys", "good.sys"]
    bad = {f"{i:02d}.sys" for i, n in enumerate(sorted(CASES)) if not CASES[n].mapped and CASES[n].error is not None}
    assert {Path(e["path"]).name for e in doc["errors"]} == bad | {"03.sys", "good.sys"}
    assert doc["drivers"]  # the others were scanned
    assert "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals")
def test_progress_only_on_a_terminal() -> None:
    import subprocess

    cmd = [sys.executable, "-m", "tagsplit.cli", "scan", str(BIN), "--tag", "Smpl"]
    master, slave = os.openpty()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    tty_err = b"".join(chunks).decode(errors="replace")
    n = len(list(BIN.glob("*.sys")))
    assert f"scanned {n}/{n} files" in tty_err
    assert "sample_gcc_x64_O2.sys" in r.stdout
    assert "scanned" not in r.stdout  # progress never goes to stdout
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "scanned" not in piped.stderr
    assert piped.stdout == r.stdout
