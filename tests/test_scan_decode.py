"""The fast scanner paths give exactly what the plain capstone paths give.

* `FunctionCode(fast=True)` (iced-x86 boundaries, capstone text on demand) against `FunctionCode()` (a capstone
  lite-mode sweep of every instruction): boundaries, predecessors, control-flow classes and the text of every
  instruction, for every function of every sample and corpus driver, and for random code;
* the canonical control-flow encodings `decode.py` reads from their bytes, against capstone's text;
* the chunked byte searches in `refs.py`/`stubs.py`, against the straightforward expressions they replace.
"""

from __future__ import annotations

import random
import re
import struct
from typing import TYPE_CHECKING

import capstone
import pytest
from conftest import BIN, corpus_drivers
from iced_x86 import Code, EncodingKind, FlowControl, Instruction, Mnemonic, OpCodeInfo, OpCodeTableKind

from tagsplit.image import Image, load
from tagsplit.sites import decode, refs, stubs
from tagsplit.sites.flow import _NO_FALLTHROUGH, DecodeMismatch, FunctionCode
from tagsplit.sites.semantics import (
    Context,
    FrameLoc,
    Insn,
    RegLoc,
    StackLoc,
    branch_target,
    is_branch,
    parse_operands,
    step_back,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DRIVERS = [p for p in corpus_drivers() if "arm64" not in p.name] + sorted(BIN.glob("*.sys"))


def _cs(arch: str) -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)


def _functions(image: Image) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    if image.functions:
        return [(f.rva, f.ranges) for f in image.functions]
    starts = refs.FunctionStarts(image)
    out = []
    for s in starts.starts:
        b = starts.bounds(s)
        if b is not None:
            out.append((b[0], (b,)))
    return out


def _same(fast: FunctionCode, exact: FunctionCode) -> None:
    """Everything the scanner reads from a FunctionCode is the same."""
    assert fast.starts == exact.starts
    assert fast.sizes == exact.sizes
    n = len(exact.starts)
    assert [fast.predecessors(k) for k in range(n)] == [exact.predecessors(k) for k in range(n)]
    assert fast.branch_preds == exact.branch_preds
    assert list(fast.insns) == list(exact.insns)  # capstone text, checked against iced's lengths on the way
    # every `call reg`/`jmp reg` is among the fast candidates (which may hold other indirect calls too)
    through_reg = {
        k for k in exact.register_branches() if (ops := parse_operands(exact.insns[k].op_str)) and ops[0].kind == "reg"
    }
    assert through_reg <= set(fast.register_branches())


@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: p.name)
def test_fast_function_decoding_matches_capstone(path: Path) -> None:
    image = load(path)
    cs = _cs(image.arch)
    fast_count = 0
    for entry, ranges in _functions(image):
        exact = FunctionCode(image.mem, entry, ranges, cs)
        try:
            fast = FunctionCode(image.mem, entry, ranges, cs, fast=True)
            if not fast.fast:
                continue  # iced could not tell (an undecodable byte, overlapping ranges): capstone's sweep is used
            _same(fast, exact)
        except DecodeMismatch:
            continue  # the scanner falls back to the capstone sweep for this function: nothing to compare
        fast_count += 1
    assert fast_count > 0


def test_fast_decoding_of_random_code_matches_capstone() -> None:
    """Random instruction-like bytes, biased towards prefixes, escapes and control flow."""
    rnd = random.Random(7)
    pieces = [
        b"\x66", b"\x67", b"\xf2", b"\xf3", b"\x2e", b"\x3e", b"\xf0", b"\x48", b"\x41", b"\x0f", b"\x0f\x1f",
        b"\x0f\x0d", b"\x0f\xae", b"\x0f\x01", b"\xe8", b"\xe9", b"\xeb", b"\x74", b"\x0f\x84", b"\xff", b"\xc3",
        b"\xc2\x08\x00", b"\xcc", b"\xe3", b"\xe2", b"\xdf", b"\xc4", b"\xc5", b"\x62", b"\x8f", b"\x90",
    ]
    compared = 0
    for arch in ("x64", "x86"):
        cs = _cs(arch)
        for _ in range(2500):
            body = b"".join(rnd.choice(pieces) + bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 6)))
                            for _ in range(12))
            mem = b"\x00" * 0x100 + body + b"\xcc" * 32
            ranges = ((0x100, 0x100 + len(body)),)
            exact = FunctionCode(mem, 0x100, ranges, cs)
            try:
                fast = FunctionCode(mem, 0x100, ranges, cs, fast=True)
                if not fast.fast:
                    continue
                _same(fast, exact)
            except DecodeMismatch:
                continue  # the scanner decodes this function with capstone instead
            compared += 1
    assert compared > 150


def test_fast_decoding_of_shuffled_real_instructions_matches_capstone() -> None:
    """Instructions taken from the sample drivers, strung together in random order (with odd prefixes added)."""
    rnd = random.Random(11)
    for arch in ("x64", "x86"):
        cs = _cs(arch)
        pool: list[bytes] = []
        for path in [p for p in DRIVERS if arch in p.name or (arch == "x64" and "amd64" in p.name)][:6]:
            image = load(path)
            for _entry, ranges in _functions(image)[:80]:
                for b, e in ranges:
                    pool += [image.mem[a : a + n] for a, n, _, _ in cs.disasm_lite(image.mem[b:e], b)]
        assert pool
        for _ in range(400):
            body = b"".join(
                rnd.choice((b"", b"", b"", b"\x66", b"\xf3", b"\x2e", b"\x67", b"\xf2\x66")) + rnd.choice(pool)
                for _ in range(40)
            )
            mem = b"\x00" * 0x100 + body + b"\xcc" * 32
            ranges = ((0x100, 0x100 + len(body)),)
            exact = FunctionCode(mem, 0x100, ranges, cs)
            try:
                fast = FunctionCode(mem, 0x100, ranges, cs, fast=True)
                if fast.fast:
                    _same(fast, exact)
            except DecodeMismatch:
                pass


@pytest.mark.parametrize("path", DRIVERS[:6], ids=lambda p: p.name)
def test_partial_decoding_stops_only_where_nothing_branches_back(path: Path) -> None:
    """`layout(upto=...)` leaves out the rest of a function only when no branch there lands in the decoded part."""
    image = load(path)
    bits = 64 if image.arch == "x64" else 32
    for _, ranges in _functions(image):
        full = decode.layout(image.mem, ranges, bits)
        if full is None or not full.starts:
            continue
        for upto in (full.starts[len(full.starts) // 3], full.starts[len(full.starts) // 2]):
            part = decode.layout(image.mem, ranges, bits, None, upto)
            assert part is not None, f"{path.name}: iced decoded the whole function but not its first part"
            n = len(part.starts)
            assert part.starts == full.starts[:n]
            assert part.sizes == full.sizes[:n]
            if part.complete[0]:
                assert part == full  # (a jump back was found: decoded on to the end)
                continue
            end = part.starts[-1] + part.sizes[-1]
            for k, t in full.branches:
                assert k < n or not any(b <= t < min(e, end) for b, e in ranges), "a branch back was left out"


@pytest.mark.parametrize("opcode", ["eb", "74", "e3", "e9", "0f85", "66e9"])
def test_partial_decoding_sees_any_jump_back(opcode: str) -> None:
    """A jump from beyond the stopping point back before it makes `layout` decode the whole function."""
    site = b"\xff\x15" + struct.pack("<i", 0x1000)
    head = b"\x90" * 16 + site + b"\x90" * 64
    op = bytes.fromhex(opcode)
    at = 0x1000 + len(head)
    width = 2 if opcode == "66e9" else 1 if len(op) == 1 and opcode != "e9" else 4
    end = at + len(op) + width
    back = op + (0x1005 - end).to_bytes(width, "little", signed=True)
    body = head + back + b"\xc3"
    mem = b"\xcc" * 0x1000 + body + b"\xcc" * 64
    ranges = ((0x1000, 0x1000 + len(body)),)
    for bits in (64, 32):
        lay = decode.layout(mem, ranges, bits, None, 0x1010)
        assert lay is None or lay.complete[0], opcode  # None: capstone's sweep decodes it all
        quiet = b"\xcc" * 0x1000 + head + b"\x90" * len(back) + b"\xc3" + b"\xcc" * 64
        part = decode.layout(quiet, ranges, bits, None, 0x1010)
        assert part is not None, "plain NOPs and a ret must decode with iced"
        assert not part.complete[0]
        assert part.starts[-1] == 0x1016  # the site and the instruction after it


def test_canonical_control_flow_encodings_read_like_capstone() -> None:
    """The encodings classified from their bytes: capstone's mnemonic and target agree with what decode.py says."""
    cases: list[bytes] = []
    for op in range(0x70, 0x80):
        cases += [bytes([op, d]) for d in (0, 1, 0x7F, 0x80, 0xFE, 0xFF, 0x05)]
        cases += [b"\x0f" + bytes([op + 0x10]) + struct.pack("<i", d) for d in (0, 5, -6, -0x1000, 0x7FFFFFF0)]
    cases += [b"\xeb" + bytes([d]) for d in (0, 5, 0x80, 0xFE)]
    cases += [op + struct.pack("<i", d) for op in (b"\xe8", b"\xe9") for d in (0, 5, -5, -0x2000, 0x123456)]
    cases += [b"\xc3", b"\xcc", b"\xf4", b"\xc2\x08\x00", b"\xc2\x00\x00"]
    for rex in (b"", b"\x48", b"\x41", b"\x40", b"\x4c"):
        for modrm in range(256):
            if (modrm >> 3) & 7 in (2, 4):
                cases.append(rex + b"\xff" + bytes([modrm]) + b"\x11\x22\x33\x44\x55\x66")
    for arch, bits in (("x64", 64), ("x86", 32)):
        cs = _cs(arch)
        for raw in cases:
            if bits == 32 and raw[:1] in (b"\x48", b"\x41", b"\x40", b"\x4c"):
                continue
            got = next(cs.disasm_lite(raw, 0x4000, 1), None)
            if got is None:
                continue
            mem = b"\x00" * 0x4000 + raw[: got[1]]
            lay = decode.layout(mem, ((0x4000, 0x4000 + got[1]),), bits)
            assert lay is not None, raw.hex()
            assert lay.sizes == [got[1]], raw.hex()
            mn = got[2]
            if lay.text:
                continue  # classified from capstone's text anyway
            assert (0 in lay.nofall) == (mn in _NO_FALLTHROUGH), raw.hex()
            insn = Insn(0x4000, got[1], mn, got[3], raw[: got[1]])
            want = branch_target(insn) if mn[0] == "j" and is_branch(mn) else None
            assert dict(lay.branches).get(0) == want, raw.hex()
            through = mn in ("call", "jmp") and want is None and not got[3][:1].isdigit()
            assert (0 in lay.indirect) == through, raw.hex()
            if 0 in lay.passthru:
                ctx = Context(arch, 0x10000, lambda _s: None, lambda _i: None)
                for loc in (RegLoc("r8"), RegLoc("rsp"), StackLoc(0x28), StackLoc(0), FrameLoc("rbp", -8)):
                    assert step_back(insn, loc, ctx) == loc, (raw.hex(), loc)


def test_site_instructions_read_from_their_bytes_read_like_capstone() -> None:
    """scan._sites_in names `[REX] FF 15/25` and E8/E9 rel32 without decoding their text."""
    for arch, bits in (("x64", 64), ("x86", 32)):
        cs = _cs(arch)
        mask = (1 << bits) - 1
        for at in (0x1000, 0x7FFFFFF0 if bits == 64 else 0x1000):
            for disp in (0, 5, -5, -0x2000, 0x12345678, -0x7FFFFFFF):
                for op, mn in ((b"\xe8", "call"), (b"\xe9", "jmp")):
                    raw = op + struct.pack("<i", disp)
                    got = next(cs.disasm_lite(raw, at, 1))
                    assert got[1] == 5
                    assert got[2] == mn
                    assert branch_target(Insn(at, 5, got[2], got[3], raw)) == (at + 5 + disp) & mask
                for rex in (b"", b"\x48", b"\x40", b"\x4f") if bits == 64 else (b"",):
                    for modrm, mn in ((0x15, "call"), (0x25, "jmp")):
                        raw = rex + b"\xff" + bytes([modrm]) + struct.pack("<i", disp)
                        got = next(cs.disasm_lite(raw, at, 1))
                        assert got[1] == len(raw), raw.hex()
                        assert got[2] == mn, raw.hex()


@pytest.mark.parametrize("path", DRIVERS[:8], ids=lambda p: p.name)
def test_text_of_non_branches_does_not_depend_on_the_address(path: Path) -> None:
    """StepMemo reuses text and steps by bytes for everything but relative branches and calls."""
    image = load(path)
    cs = _cs(image.arch)
    for entry, ranges in _functions(image)[:300]:
        fast = FunctionCode(image.mem, entry, ranges, cs, fast=True)
        if not fast.fast:
            continue
        for k, (s, n) in enumerate(zip(fast.starts, fast.sizes)):
            if k in fast._reldep:
                continue
            raw = image.mem[s : s + n]
            here = next(cs.disasm_lite(raw, s, 1), None)
            there = next(cs.disasm_lite(raw, s + 0x123450, 1), None)
            assert here is not None, hex(s)
            assert there is not None, hex(s)
            assert here[2:] == there[2:], (hex(s), raw.hex())


def test_screen_covers_every_control_flow_and_risky_opcode() -> None:
    """decode._SCREEN holds the opcode byte of every iced code that is control flow or risky (from iced's tables)."""
    for name, code in vars(Code).items():
        if not isinstance(code, int) or name.startswith("_") or code == Code.INVALID or name.startswith(
            ("DECLARE", "ZERO_BYTES")
        ):
            continue
        ins = Instruction.create(code)
        info = OpCodeInfo(code)
        special = ins.flow_control != FlowControl.NEXT or ins.mnemonic == Mnemonic.HLT
        risky = code in decode.RISKY_CODES or info.encoding != EncodingKind.LEGACY
        if not (special or risky):
            continue
        if info.encoding == EncodingKind.LEGACY and info.table == OpCodeTableKind.NORMAL:
            first = info.op_code >> 8 if info.op_code > 0xFF else info.op_code
            assert first in decode._SCREEN, name
        else:
            assert info.encoding != EncodingKind.LEGACY or 0x0F in decode._SCREEN, name
    assert {0xC4, 0xC5, 0x62, 0x8F, 0x0F} <= decode._SCREEN


# --- byte searches ---------------------------------------------------------------------------------------------

_X64_OLD = re.compile(rb"\xff[\x15\x25]|[\x48\x4c]\x8b[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.S)


def _find_refs_old(image: Image, slots: set[int]) -> list[refs.Ref]:
    out = []
    mem = image.mem
    for sec in image.code_sections():
        for m in _X64_OLD.finditer(mem, sec.rva, sec.end):
            start, head, disp_at = m.start(), m.group(), m.end()
            if disp_at + 4 > len(mem):
                continue
            size = disp_at + 4 - start
            slot = start + size + struct.unpack_from("<i", mem, disp_at)[0]
            if slot not in slots:
                continue
            if head[-2:-1] == b"\x8b":
                out.append(refs.Ref(start, size, refs.LOAD, slot))
                continue
            kind = refs.CALL_MEM if head[-1] == 0x15 else refs.JMP_MEM
            out.append(refs.Ref(start, size, kind, slot))
            if start > 0 and 0x40 <= mem[start - 1] <= 0x4F:
                out.append(refs.Ref(start - 1, size + 1, kind, slot))
    out.sort(key=lambda r: r.rva)
    return out


def _branches_old(image: Image, targets: set[int]) -> list[tuple[int, int, bool]]:
    out = []
    mem = image.mem
    for sec in image.code_sections():
        for m in re.finditer(rb"[\xe8\xe9]", mem[: sec.end - 4]):
            p = m.start()
            if p < sec.rva:
                continue
            t = p + 5 + struct.unpack_from("<i", mem, p + 1)[0]
            if t in targets:
                out.append((p, t, mem[p] == 0xE8))
    return out


class _Fake:
    """Just what the searches read from an Image: the bytes and one executable section."""

    def __init__(self, mem: bytes, base: int = 0x1000) -> None:
        self.mem = mem
        self.arch = "x64"
        self.size_of_image = len(mem)
        self._sec = type("S", (), {"rva": base, "end": len(mem) - 3, "size": len(mem) - 3 - base})()

    def code_sections(self) -> list[object]:
        return [self._sec]

    def function_at(self, rva: int) -> None:
        return None


def test_chunked_searches_find_what_the_plain_expressions_find() -> None:
    rnd = random.Random(3)
    size = (3 << 20) + 12345  # several chunks
    buf = bytearray(rnd.getrandbits(8) for _ in range(size))
    slots = {size - 0x200 + 8 * i for i in range(4)} | {0x800}
    # plant references to the slots (and near misses) all over, some overlapping each other's displacement
    for _ in range(3000):
        p = rnd.randrange(0x1000, size - 0x400)
        slot = rnd.choice(sorted(slots)) + rnd.choice((0, 0, 0, 8, -8))
        form = rnd.choice((b"\xff\x15", b"\xff\x25", b"\x48\x8b\x05", b"\x4c\x8b\x15", b"\x48\xff\x15"))
        end = p + len(form) + 4
        buf[p:end] = form + struct.pack("<i", slot - end)
    targets = {rnd.randrange(0x1000, size - 0x400) for _ in range(50)} | {size - 0x300 + i for i in range(40)}
    for _ in range(2000):
        p = rnd.randrange(0x1000, size - 0x400)
        t = rnd.choice(sorted(targets)) + rnd.choice((0, 0, 1, -1))
        buf[p : p + 5] = rnd.choice((b"\xe8", b"\xe9")) + struct.pack("<i", t - p - 5)
    image = _Fake(bytes(buf))
    want = _find_refs_old(image, slots)  # type: ignore[arg-type]
    assert refs.find_refs(image, slots) == want  # type: ignore[arg-type]
    assert refs.direct_branches_to(image, targets) == _branches_old(image, targets)  # type: ignore[arg-type]
    # cut into spans anywhere (inside references too): together the spans find the same, each reference once
    cuts = sorted({0, size, *(rnd.randrange(0x1000, size) for _ in range(6)), *(r.rva + 1 for r in want[:40:7])})
    parts = [refs.find_refs(image, slots, span) for span in zip(cuts, cuts[1:])]  # type: ignore[arg-type]
    assert sorted((r for part in parts for r in part), key=lambda r: r.rva) == want
    branches = refs.direct_branches_to(image, targets)  # type: ignore[arg-type]
    pieces = [refs.direct_branches_to(image, targets, span) for span in zip(cuts, cuts[1:])]  # type: ignore[arg-type]
    assert [b for piece in pieces for b in piece] == branches
    # `jmp reg` starts, with a REX byte just before a cut
    jr = bytearray(b"\x90" * 64)
    jr[10:13] = b"\x41\xff\xe3"
    jr[30:32] = b"\xff\xe0"
    jr[60:62] = b"\xff\xe1"  # its second byte lies past the section's end
    fake = _Fake(bytes(jr), base=0)
    fake.arch = "x64"
    whole = stubs.find_tails(fake, {}, None).jmp_reg  # type: ignore[arg-type]
    assert whole == [10, 30]
    for cut in range(1, 40):
        halves = [stubs.find_tails(fake, {}, None, span).jmp_reg for span in ((0, cut), (cut, 64))]  # type: ignore[arg-type]
        assert halves[0] + halves[1] == whole, cut
        # found in find_refs' pass over the FF bytes instead
        by_refs = []
        for span in ((0, cut), (cut, 64)):
            found: list[int] = []
            refs.find_refs(fake, set(), span, found)  # type: ignore[arg-type]
            by_refs += stubs.find_tails(fake, {}, None, span, found).jmp_reg  # type: ignore[arg-type]
        assert by_refs == whole, cut


@pytest.mark.parametrize("path", [p for p in DRIVERS if p.suffix == ".sys"][:20], ids=lambda p: p.name)
def test_searches_on_drivers_match_the_plain_expressions(path: Path) -> None:
    image = load(path)
    slots = set(image.imports)
    if image.arch == "x64":
        assert refs.find_refs(image, slots) == _find_refs_old(image, slots)
    targets = {f.rva for f in image.functions} or set(refs.FunctionStarts(image).starts)
    assert refs.direct_branches_to(image, targets) == _branches_old(image, targets)
    # `jmp reg` tails: the literal search plus the REX byte before it, as the old optional-REX expression
    old = re.compile(rb"(?:[\x40-\x4f])?\xff[\xe0-\xe7]" if image.arch == "x64" else rb"\xff[\xe0-\xe7]", re.S)
    everywhere = []
    for sec in image.code_sections():
        want = [m.start() for m in old.finditer(image.mem, sec.rva, sec.end)]
        assert stubs.jmp_reg_starts(image.mem, sec.rva, sec.end, image.arch == "x64") == want
        everywhere += want
    if image.arch == "x64":  # found in the same pass as the IAT references
        found: list[int] = []
        assert refs.find_refs(image, slots, None, found) == _find_refs_old(image, slots)
        assert found == everywhere


# --- the parallel split ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["patterns_clang_x64.sys", "patterns_gcc_x86_O2.sys", "wrappers_gcc_x64_O2.sys"])
def test_parallel_analysis_gives_the_same_scan(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites computed in forked workers come back (pickled) equal to the ones computed in-process."""
    import multiprocessing
    import os
    import time

    from tagsplit.sites import scan as scan_mod

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    image = load(BIN / name)
    monkeypatch.setattr(scan_mod, "PARALLEL_MIN_FUNCTIONS", 10**9)
    alone = scan_mod.scan_image(image)
    monkeypatch.setattr(scan_mod, "PARALLEL_MIN_FUNCTIONS", 1)
    monkeypatch.setattr(scan_mod, "PARALLEL_CHUNK", 2)
    monkeypatch.setattr(scan_mod.os, "cpu_count", lambda: 3)
    # this process works slowly, so that the children (which take a while to start) get a share of the work
    parent = os.getpid()
    analyse, find_refs, rebuilt = scan_mod._Scanner.analyse, scan_mod.find_refs, scan_mod._rebuilt
    from_children: list[int] = []

    def slow_analyse(self: scan_mod._Scanner, work: list) -> scan_mod.Analysed:  # type: ignore[type-arg]
        if os.getpid() == parent:
            time.sleep(0.02)
        return analyse(self, work)

    searched_here: list[object] = []

    def slow_find_refs(*args: object) -> object:
        if os.getpid() == parent:
            searched_here.append(args[2:])
            time.sleep(0.02)
        return find_refs(*args)  # type: ignore[arg-type]

    def counted(rec: object) -> object:
        from_children.append(1)
        return rebuilt(rec)

    monkeypatch.setattr(scan_mod._Scanner, "analyse", slow_analyse)
    monkeypatch.setattr(scan_mod, "find_refs", slow_find_refs)
    monkeypatch.setattr(scan_mod, "_rebuilt", counted)
    shared = scan_mod.scan_image(image)
    assert shared == alone
    assert from_children, "no child analysed anything"
    monkeypatch.setattr(scan_mod, "PARALLEL_SEARCH_BYTES", 0)  # the byte searches split between processes as well
    searched_here.clear()
    assert scan_mod.scan_image(image) == alone
    assert len(searched_here) < 6, "the children searched no part of the code"  # (6 parts: two per process)


# --- tag bytes in code (the cross-check) -------------------------------------------------------------------------


_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 "


@pytest.mark.parametrize("alphabet", [_LETTERS, bytes(range(256))], ids=["letters", "bytes"])
@pytest.mark.parametrize("window_cost", [0, 250, 10**9])  # always the one pass, as chosen, always per tag
def test_tag_occurrences_agree_with_brute_force(
    alphabet: bytes, window_cost: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scan._occurrences finds every (overlapping) occurrence of every tag, whichever of its two methods it uses."""
    from tagsplit.sites import scan as scan_mod

    monkeypatch.setattr(scan_mod, "WINDOW_COST", window_cost)
    rnd = random.Random(11)
    tags = sorted({int.from_bytes(bytes(rnd.choice(alphabet) for _ in range(4)), "little") for _ in range(60)})
    buf = bytearray(rnd.getrandbits(8) for _ in range(100_000))
    for _ in range(1000):  # plant tags, some overlapping others
        p = rnd.randrange(0, len(buf) - 8)
        buf[p : p + 4] = struct.pack("<I", rnd.choice(tags))
    buf[1000:1012] = b"AAAAAAAAAAAA"
    tags.append(int.from_bytes(b"AAAA", "little"))
    mem = bytes(buf)
    spans = [(0, 40_000), (40_002, len(mem) - 5)]
    by_bytes = {struct.pack("<I", v): v for v in tags}
    want: dict[int, list[int]] = {v: [] for v in tags}
    for b, e in spans:
        for p in range(b, e - 3):
            v = by_bytes.get(mem[p : p + 4])
            if v is not None:
                want[v].append(p)
    assert sum(map(len, want.values())) >= 900
    assert scan_mod._occurrences(mem, spans, tags) == want
    assert scan_mod._occurrences(mem, spans, tags[:3]) == {v: want[v] for v in tags[:3]}  # (a few: per tag)


@pytest.mark.parametrize("stage", ["analysis", "search"])
def test_a_worker_that_dies_is_reported(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked worker that dies mid-scan (a crash in a native library, say) is an error, not missing sites."""
    import multiprocessing
    import os

    from tagsplit.sites import scan as scan_mod

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    image = load(BIN / "patterns_clang_x64.sys")
    parent = os.getpid()
    shares = scan_mod._Shares.__iter__

    # A child dies when it first asks for work (whether or not any is left: this process may have taken it all).
    def dying(self: scan_mod._Shares) -> Iterator[int]:
        if os.getpid() != parent:
            os._exit(3)
        return shares(self)

    monkeypatch.setattr(scan_mod._Shares, "__iter__", dying)
    monkeypatch.setattr(scan_mod.os, "cpu_count", lambda: 2)
    if stage == "analysis":
        monkeypatch.setattr(scan_mod, "PARALLEL_MIN_FUNCTIONS", 1)
    else:
        monkeypatch.setattr(scan_mod, "PARALLEL_SEARCH_BYTES", 0)
    with pytest.raises(RuntimeError, match="died"):
        scan_mod.scan_image(image)


@pytest.mark.parametrize("n", [0, 1, 7, 48, 95, 96, 97, 1000, 4751])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_analysis_chunks_cover_the_work_once_in_order(n: int, workers: int) -> None:
    from tagsplit.sites.scan import _chunks

    for size in (1, 5, 48):
        chunks = _chunks(list(range(n)), size, workers)
        assert [x for c in chunks for x in c] == list(range(n))
        assert all(0 < len(c) <= size for c in chunks)
        assert [len(c) for c in chunks] == sorted((len(c) for c in chunks), reverse=True)
