"""Byte-level search for references to pool-routine IAT slots, and function bounds for the code around them.

Searching bytes first and disassembling only the functions that contain a hit is what makes scanning fast;
every hit is later confirmed by disassembling its function from the start (a hit inside another instruction's
bytes is dropped there).
"""

from __future__ import annotations

import bisect
import re
import struct
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..image import Image

CALL_MEM = "call"  # call [slot]
JMP_MEM = "jmp"  # jmp [slot]
LOAD = "load"  # mov reg, [slot]


class Ref(NamedTuple):
    """(A named tuple: a large driver has tens of thousands, made in the byte search's inner loop.)"""

    rva: int  # start of the referencing instruction
    size: int
    kind: str
    slot: int


# x64: FF 15/FF 25 rel32, and mov r64, [rip+rel32] (REX 8B, ModRM with mod=00 rm=101). A REX prefix before FF 15 is
# not matched by the expression: the byte before may as well be the last byte of the previous instruction (a tag
# immediate ending in 'H' is 0x48), so both readings are kept and decoding the function decides.
_X64_LOAD_MODRM = rb"[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]"

# The searches below run over the code in chunks. Within a chunk the rel32 that reaches a given target can only take
# a few values in its upper 16 bits, so a regular expression that starts with the opcode byte (a literal, which
# `re` finds at memchr speed) and requires those upper bytes rejects nearly every other call and load in C; the
# few that pass are checked exactly in Python.
CHUNK = 1 << 20
_MAX_HIGHS = 4096


def rel32_pattern(intervals: Iterable[tuple[int, int]]) -> bytes:
    """Regex source matching the 4 little-endian bytes of every rel32 in the closed `intervals` (and a few more)."""
    highs: set[int] = set()
    for lo, hi in intervals:
        a, b = lo >> 16, hi >> 16
        if b - a > _MAX_HIGHS or len(highs) > _MAX_HIGHS:
            return b"...."
        highs.update(range(a, b + 1))
    by_top: dict[int, list[int]] = {}
    for h in highs:
        by_top.setdefault((h >> 8) & 0xFF, []).append(h & 0xFF)
    alts = [_byte_class(lows) + b"\\x%02x" % top for top, lows in sorted(by_top.items())]
    return b"..(?:" + b"|".join(alts) + b")" if alts else b"(?!)"


def _byte_class(values: list[int]) -> bytes:
    vs = sorted(set(values))
    if len(vs) == 256:
        return b"."
    parts = []
    i = 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        parts.append(b"\\x%02x" % vs[i] if i == j else b"\\x%02x-\\x%02x" % (vs[i], vs[j]))
        i = j + 1
    return b"[" + b"".join(parts) + b"]"


def _clusters(targets: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted targets merged into [first, last] runs whose members are less than 64 KiB apart."""
    out: list[tuple[int, int]] = []
    for t in sorted(targets):
        if out and t - out[-1][1] < 0x10000:
            out[-1] = (out[-1][0], t)
        else:
            out.append((t, t))
    return out


def code_spans(image: Image, span: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """(section start, section end, begin, end) of the executable sections, each cut to `span` where one is given."""
    lo, hi = span if span is not None else (0, image.size_of_image)
    return [(s.rva, s.end, max(s.rva, lo), min(s.end, hi)) for s in image.code_sections() if s.rva < hi and lo < s.end]


def split_code(image: Image, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive RVA spans that hold about the same amount of executable code each."""
    secs = image.code_sections()
    total = sum(s.size for s in secs)
    cuts = [0]
    for i in range(1, parts):
        want, acc = total * i // parts, 0
        for s in secs:
            if acc + s.size > want:
                cuts.append(s.rva + (want - acc))
                break
            acc += s.size
    cuts.append(image.size_of_image)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def find_refs(
    image: Image, slots: set[int], span: tuple[int, int] | None = None, jmp_reg: list[int] | None = None
) -> list[Ref]:
    """Every instruction-shaped reference to one of the IAT `slots` in the executable sections; with `span`, those
    whose opcode byte lies in it (the searches of disjoint spans can run in parallel and together find the same).

    x64: with `jmp_reg`, also the start of every `jmp reg` (`[REX] FF E0+r`, as `stubs.jmp_reg_starts` finds them)
    is added to it: the same pass over the FF bytes finds both."""
    out: list[Ref] = []
    mem = image.mem
    if image.arch == "x64":
        unpack = struct.unpack_from
        groups = _clusters(slots)
        for sec_rva, sec_end, begin, end in code_spans(image, span):
            for c in range(begin, end, CHUNK):
                ce = min(c + CHUNK, end)
                # the opcode byte (FF, or 8B after its REX) at p in [c, ce); slot = p + 6 + rel32
                rel = rel32_pattern((a - (ce - 1) - 6, b - c - 6) for a, b in groups)
                stop = min(len(mem), ce + 6)
                ff = b"\\xff(?=[\\x15\\x25]" + rel + (b"|[\\xe0-\\xe7])" if jmp_reg is not None else b")")
                for m in _compiled(ff).finditer(mem, c, stop):
                    start = m.start()
                    if start >= ce:
                        break
                    if mem[start + 1] >= 0xE0:  # jmp reg
                        if start + 2 <= sec_end:
                            rex = start > sec_rva and 0x40 <= mem[start - 1] <= 0x4F
                            jmp_reg.append(start - 1 if rex else start)  # type: ignore[union-attr]
                        continue
                    slot = start + 6 + unpack("<i", mem, start + 2)[0]
                    if slot not in slots or start + 2 > sec_end:
                        continue
                    kind = CALL_MEM if mem[start + 1] == 0x15 else JMP_MEM
                    out.append(Ref(start, 6, kind, slot))
                    if start > 0 and 0x40 <= mem[start - 1] <= 0x4F:
                        out.append(Ref(start - 1, 7, kind, slot))
                for m in _compiled(b"\\x8b(?=" + _X64_LOAD_MODRM + rel + b")").finditer(mem, c, stop):
                    q = m.start()
                    if q >= ce:
                        break
                    if q - 1 < sec_rva or q + 2 > sec_end or mem[q - 1] not in (0x48, 0x4C):
                        continue
                    slot = q + 6 + unpack("<i", mem, q + 2)[0]
                    if slot in slots:
                        out.append(Ref(q - 1, 7, LOAD, slot))
    else:
        lo, hi = span if span is not None else (0, image.size_of_image)
        for slot in slots:
            needle = struct.pack("<I", (image.base + slot) & 0xFFFFFFFF)
            for sec in image.code_sections():
                pos = mem.find(needle, sec.rva, sec.end)
                while pos >= 0:
                    ref = _x86_ref(mem, pos, slot)
                    if ref is not None and lo <= ref.rva < hi:
                        out.append(ref)
                    pos = mem.find(needle, pos + 1, sec.end)
    out.sort(key=lambda r: r.rva)
    return out


def _compiled(source: bytes) -> re.Pattern[bytes]:
    return re.compile(source, re.S)


_E8_LITERAL = re.compile(rb"\xe8", re.S)


def _e8_positions(mem: bytes, begin: int, end: int) -> list[int]:
    return [m.start() for m in _E8_LITERAL.finditer(mem, begin, end)]


def _x86_ref(mem: bytes, pos: int, slot: int) -> Ref | None:
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


def direct_branches_to(
    image: Image, targets: set[int], span: tuple[int, int] | None = None
) -> list[tuple[int, int, bool]]:
    """(rva, target, is_call) of every E8/E9 rel32 in executable sections that lands on one of `targets`; with
    `span`, those whose opcode byte lies in it."""
    out: list[tuple[int, int, bool]] = []
    if not targets:
        return out
    mem = image.mem
    unpack = struct.unpack_from
    groups = _clusters(targets)
    for _, sec_end, begin, limit in code_spans(image, span):
        end = min(limit, sec_end - 4)  # the rel32 lies inside the section
        found: list[tuple[int, int, bool]] = []
        for c in range(begin, end, CHUNK):
            ce = min(c + CHUNK, end)
            # the opcode at p in [c, ce); target = p + 5 + rel32
            rel = rel32_pattern((a - (ce - 1) - 5, b - c - 5) for a, b in groups)
            stop = min(len(mem), ce + 5)
            for opcode, is_call in ((b"\\xe8", True), (b"\\xe9", False)):
                for m in _compiled(opcode + b"(?=" + rel + b")").finditer(mem, c, stop):
                    p = m.start()
                    if p >= ce:
                        break
                    t = p + 5 + unpack("<i", mem, p + 1)[0]
                    if t in targets:
                        found.append((p, t, is_call))
        found.sort()
        out.extend(found)
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
        code = [(s.rva, s.end) for s in image.code_sections()]

        def in_code(t: int) -> bool:
            return any(b <= t < e for b, e in code)

        mem = image.mem
        unpack = struct.unpack_from
        called: list[int] = []
        for sec in image.code_sections():
            starts.add(sec.rva)
            called.extend(p + 5 + unpack("<i", mem, p + 1)[0] for p in _e8_positions(mem, sec.rva, sec.end - 4))
        for t, n in Counter(called).items():
            if in_code(t) and (n >= 2 or self._after_padding(t)):
                starts.add(t)
        ptr, base, size_ok = image.ptr_size, image.base, len(mem)
        for r, size in zip(image.relocations, image.relocation_sizes):
            if size == ptr and r + size <= size_ok:
                t = int.from_bytes(mem[r : r + size], "little") - base
                if in_code(t) and self._after_padding(t):
                    starts.add(t)
        for f in image.functions:
            starts.add(f.rva)
            # whatever follows a .pdata range belongs to something else (a leaf function, a thunk, padding)
            starts.update(e for _, e in f.ranges)
        self.starts = sorted(s for s in starts if in_code(s))

    def _after_padding(self, t: int) -> bool:
        return after_padding(self.image.mem, t)

    def bounds(self, rva: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, rva) - 1
        if i < 0:
            return None
        start = self.starts[i]
        sec = self.image.section_at(start)
        end = self.starts[i + 1] if i + 1 < len(self.starts) else (sec.end if sec else start + 0x1000)
        if sec is not None:
            end = min(end, sec.end)
        return start, end
