"""Byte-level search for references to pool-routine IAT slots, and function bounds for the code around them.

Searching bytes first and disassembling only the functions that contain a hit is what makes scanning fast;
every hit is later confirmed by disassembling its function from the start (a hit inside another instruction's
bytes is dropped there).
"""

from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass
from typing import Optional

from ..image import Image

CALL_MEM = "call"  # call [slot]
JMP_MEM = "jmp"  # jmp [slot]
LOAD = "load"  # mov reg, [slot]


@dataclass(frozen=True)
class Ref:
    rva: int  # start of the referencing instruction
    size: int
    kind: str
    slot: int


# x64: FF 15/FF 25 rel32, and mov r64, [rip+rel32] (REX 8B, ModRM with mod=00 rm=101). A REX prefix before FF 15 is
# not matched by the expression: the byte before may as well be the last byte of the previous instruction (a tag
# immediate ending in 'H' is 0x48), so both readings are kept and decoding the function decides.
_X64 = re.compile(rb"\xff[\x15\x25]|[\x48\x4c]\x8b[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.S)


def find_refs(image: Image, slots: set[int]) -> list[Ref]:
    """Every instruction-shaped reference to one of the IAT `slots` in the executable sections."""
    out: list[Ref] = []
    mem = image.mem
    if image.arch == "x64":
        unpack = struct.unpack_from
        for sec in image.code_sections():
            for m in _X64.finditer(mem, sec.rva, sec.end):
                start = m.start()
                head = m.group()
                disp_at = m.end()
                if disp_at + 4 > len(mem):
                    continue
                size = disp_at + 4 - start
                slot = start + size + unpack("<i", mem, disp_at)[0]
                if slot not in slots:
                    continue
                if head[-2:-1] == b"\x8b":
                    out.append(Ref(start, size, LOAD, slot))
                    continue
                kind = CALL_MEM if head[-1] == 0x15 else JMP_MEM
                out.append(Ref(start, size, kind, slot))
                if start > 0 and 0x40 <= mem[start - 1] <= 0x4F:
                    out.append(Ref(start - 1, size + 1, kind, slot))
    else:
        for slot in slots:
            needle = struct.pack("<I", (image.base + slot) & 0xFFFFFFFF)
            for sec in image.code_sections():
                pos = mem.find(needle, sec.rva, sec.end)
                while pos >= 0:
                    ref = _x86_ref(mem, pos, slot)
                    if ref is not None:
                        out.append(ref)
                    pos = mem.find(needle, pos + 1, sec.end)
    out.sort(key=lambda r: r.rva)
    return out


def _x86_ref(mem: bytes, pos: int, slot: int) -> Optional[Ref]:
    op, modrm = mem[pos - 2], mem[pos - 1]
    if op == 0xFF and modrm == 0x15:
        return Ref(pos - 2, 6, CALL_MEM, slot)
    if op == 0xFF and modrm == 0x25:
        return Ref(pos - 2, 6, JMP_MEM, slot)
    if op == 0x8B and modrm & 0xC7 == 0x05:
        return Ref(pos - 2, 6, LOAD, slot)
    if modrm == 0xA1:
        return Ref(pos - 1, 5, LOAD, slot)
    return None


_E8 = re.compile(rb"[\xe8\xe9]", re.S)


def direct_branches_to(image: Image, targets: set[int]) -> list[tuple[int, int, bool]]:
    """(rva, target, is_call) of every E8/E9 rel32 in executable sections that lands on one of `targets`."""
    out = []
    mem = image.mem
    unpack = struct.unpack_from
    for sec in image.code_sections():
        end = sec.end - 4
        for m in _E8.finditer(mem, sec.rva, end):
            p = m.start()
            t = p + 5 + unpack("<i", mem, p + 1)[0]
            if t in targets:
                out.append((p, t, mem[p] == 0xE8))
    return out


# Byte runs that end alignment padding between functions (gcc and MSVC multi-byte NOPs, int3, ret).
_PAD_ENDINGS = (
    b"\xcc", b"\x90", b"\xc3", b"\x8d\x76\x00", b"\x8d\x74\x26\x00", b"\x8d\xb4\x26\x00\x00\x00\x00",
    b"\x8d\xb6\x00\x00\x00\x00", b"\x66\x90", b"\x0f\x1f\x00", b"\x0f\x1f\x40\x00", b"\x0f\x1f\x44\x00\x00",
    b"\x0f\x1f\x80\x00\x00\x00\x00", b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
)


def after_padding(mem: bytes, t: int) -> bool:
    """Whether the bytes before `t` end alignment padding, a return, or an indirect jmp (the previous thunk)."""
    if any(mem[max(0, t - len(p)) : t] == p for p in _PAD_ENDINGS):
        return True
    return t >= 6 and mem[t - 6] == 0xFF and mem[t - 5] == 0x25


class FunctionStarts:
    """Function starts recovered without .pdata (x86, and x64 leaf functions that have no unwind entry)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        starts = {image.entry_rva, *image.exports}
        callers: dict[int, int] = {}
        code = [(s.rva, s.end) for s in image.code_sections()]
        in_code = lambda t: any(b <= t < e for b, e in code)  # noqa: E731
        mem = image.mem
        for sec in image.code_sections():
            starts.add(sec.rva)
            for m in _E8.finditer(mem, sec.rva, sec.end - 4):
                p = m.start()
                if mem[p] != 0xE8:
                    continue
                t = p + 5 + struct.unpack_from("<i", mem, p + 1)[0]
                if in_code(t):
                    callers[t] = callers.get(t, 0) + 1
        for t, n in callers.items():
            if n >= 2 or self._after_padding(t):
                starts.add(t)
        for r, size in zip(image.relocations, image.relocation_sizes):
            if size == image.ptr_size and r + size <= len(mem):
                t = int.from_bytes(mem[r : r + size], "little") - image.base
                if in_code(t) and self._after_padding(t):
                    starts.add(t)
        for f in image.functions:
            starts.add(f.rva)
            # whatever follows a .pdata range belongs to something else (a leaf function, a thunk, padding)
            starts.update(e for _, e in f.ranges)
        self.starts = sorted(s for s in starts if in_code(s))

    def _after_padding(self, t: int) -> bool:
        return after_padding(self.image.mem, t)

    def bounds(self, rva: int) -> Optional[tuple[int, int]]:
        i = bisect.bisect_right(self.starts, rva) - 1
        if i < 0:
            return None
        start = self.starts[i]
        sec = self.image.section_at(start)
        end = self.starts[i + 1] if i + 1 < len(self.starts) else (sec.end if sec else start + 0x1000)
        if sec is not None:
            end = min(end, sec.end)
        return start, end
