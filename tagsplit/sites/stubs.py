"""Stubs: short straight-line code, called with `call`/`jmp rel32`, that ends by jumping to a pool routine.

This covers import thunks (`jmp [IAT]` alone, as mingw and old DDK builds emit), tagsplit's own stubs in a patched
driver (`mov r8d, NEW; jmp [IAT]`, or moved instructions and `jmp reg`), and leaf tail wrappers that are neither
exported nor described by `.pdata`. The callers of a stub are the call sites; their tag is followed backwards
through the stub and on into the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .refs import JMP_MEM, Ref, after_padding, code_spans, direct_branches_to
from .semantics import Insn, branch_target

if TYPE_CHECKING:
    import capstone

    from ..apis import PoolApi
    from ..image import Image

WINDOW = 48  # how far before its final jump a stub may start
MAX_INSNS = 12
_PIC = re.compile(rb"\xe8\x00\x00\x00\x00[\x58-\x5f]", re.S)
# `jmp reg` (FF E0+r), on x64 optionally behind a REX prefix. The search looks for the opcode byte (a literal, found
# at memchr speed) and takes a REX byte just before it into the match, as `(?:[\x40-\x4f])?\xff[\xe0-\xe7]` would.
_JMP_REG = re.compile(rb"\xff[\xe0-\xe7]", re.S)


def jmp_reg_starts(mem: bytes, begin: int, end: int, x64: bool, floor: int | None = None) -> list[int]:
    """Where `jmp reg` (with a REX prefix on x64 when there is one, from `floor` on) starts, its two bytes in
    [begin, end)."""
    out = []
    floor = begin if floor is None else floor
    for m in _JMP_REG.finditer(mem, begin, end):
        start = m.start()
        if x64 and start - 1 >= floor and 0x40 <= mem[start - 1] <= 0x4F:
            start -= 1
        out.append(start)
    return out


@dataclass(frozen=True)
class Stub:
    entry: int
    insns: tuple[Insn, ...]  # straight-line; the last one jumps on
    api: PoolApi | None  # None: `jmp reg`, resolved per caller
    via_thunk: int | None = None  # the stub ends in `jmp thunk`
    ends_in_call: bool = False  # `call [..]; ret N` (a stub that calls the routine itself) instead of a jump

    @property
    def is_plain_thunk(self) -> bool:
        return len(self.insns) == 1 and self.via_thunk is None


def _outside_functions(image: Image, rva: int) -> bool:
    f = image.function_at(rva)
    return f is None


class Tails(NamedTuple):
    """What the byte searches for stub endings found (other than `jmp [IAT]`, which `find_refs` finds)."""

    pic: dict[int, tuple[str, bool]]  # x86 position-independent stub's final jmp/call -> (routine, is a call)
    jmp_reg: list[int]  # every `jmp reg` (`stub_tails` keeps those outside every function)


def find_tails(
    image: Image,
    pool: dict[int, PoolApi],
    cs: capstone.Cs,
    span: tuple[int, int] | None = None,
    jmp_reg: list[int] | None = None,
) -> Tails:
    """The stub endings found by their bytes; with `span`, those whose first byte lies in it (see `find_refs`).
    `jmp_reg`: the `jmp reg` starts in it where they were found already (`find_refs`, on x64)."""
    mem = image.mem
    pic: dict[int, tuple[str, bool]] = {}
    found = jmp_reg if jmp_reg is not None else []
    x64 = image.arch == "x64"
    for sec_rva, sec_end, begin, end in code_spans(image, span):
        if not x64:
            # position-independent x86 stubs (tagsplit's own): call $+5; pop reg; ...; jmp/call [reg + disp32]
            for m in _PIC.finditer(mem, begin, min(sec_end, end + 5)):
                if m.start() >= end:
                    break
                got = _pic_tail(mem, m.start(), pool, cs)
                if got is not None:
                    tail, api, is_call = got
                    pic[tail] = (api.name, is_call)
        if jmp_reg is None:
            found += jmp_reg_starts(mem, begin, min(sec_end, end + 1), x64, floor=sec_rva)
    return Tails(pic, found)


def stub_tails(
    image: Image, refs: list[Ref], pool: dict[int, PoolApi], found: Tails
) -> dict[int, PoolApi | None]:
    """Where a stub may end: `jmp [IAT]` outside every function, and what `find_tails` found (`jmp reg` with None)."""
    tails: dict[int, PoolApi | None] = {}
    for r in refs:
        if r.kind == JMP_MEM and _outside_functions(image, r.rva) and r.rva not in image.exports:
            tails[r.rva] = pool[r.slot]
        # (a load inside a stub is picked up when the stub's `jmp reg` is)
    by_name = {api.name: api for api in pool.values()}
    tails.update((tail, by_name[name]) for tail, (name, _) in found.pic.items())
    for start in found.jmp_reg:
        if _outside_functions(image, start):
            tails.setdefault(start, None)
    return tails


def stub_window(tails: dict[int, PoolApi | None]) -> set[int]:
    """Every RVA a stub ending at one of `tails` may start at."""
    return {t - d for t in tails for d in range(WINDOW + 1) if t - d >= 0}


def find_stubs(
    image: Image,
    refs: list[Ref],
    pool: dict[int, PoolApi],
    cs: capstone.Cs,
    found: Tails | None = None,
    branches: list[tuple[int, int, bool]] | None = None,
) -> tuple[dict[int, Stub], dict[int, list[tuple[int, bool]]], set[int]]:
    """Stubs by entry RVA, their callers (RVA, is_call) by entry, and unused plain thunks (RVA). `found`: what
    `find_tails` found, and `branches`: the direct branches into the `stub_window` of the `stub_tails`, where
    they have been searched already."""
    mem = image.mem
    if found is None:
        found = find_tails(image, pool, cs)
    tails = stub_tails(image, refs, pool, found)
    if not tails:
        return {}, {}, set()
    calls_at = {tail for tail, (_, is_call) in found.pic.items() if is_call}
    if branches is None:
        branches = direct_branches_to(image, stub_window(tails))
    callers: dict[int, list[tuple[int, bool]]] = {}
    for src, target, is_call in branches:
        callers.setdefault(target, []).append((src, is_call))
    stubs: dict[int, Stub] = {}
    for entry in sorted(callers):
        if entry in image.exports or (image.function_at(entry) is not None):
            continue
        stub = _decode(image, entry, tails, cs, calls_at)
        if stub is not None:
            stubs[entry] = stub
    # chains: a stub ending in `jmp <plain thunk>` continues to that thunk's routine
    plain = {e: s for e, s in stubs.items() if s.is_plain_thunk}
    for entry in sorted(callers):
        if entry in stubs or entry in image.exports or image.function_at(entry) is not None:
            continue
        stub = _decode_to_thunk(image, entry, plain, cs)
        if stub is not None:
            stubs[entry] = stub
    ends = {s.insns[-1].rva for s in stubs.values()}
    unused = {t for t, api in tails.items() if api is not None and t not in ends and after_padding(mem, t)}
    return stubs, {e: callers[e] for e in stubs}, unused


def _decode(
    image: Image, entry: int, tails: dict[int, PoolApi | None], cs: capstone.Cs, calls_at: set[int]
) -> Stub | None:
    out: list[Insn] = []
    mem = image.mem
    for addr, size, mn, ops in cs.disasm_lite(mem[entry : entry + WINDOW + 24], entry):
        insn = Insn(addr, size, mn, ops, mem[addr : addr + size])
        out.append(insn)
        if addr in tails:
            if addr in calls_at:
                nxt = next(cs.disasm_lite(mem[addr + size : addr + size + 3], addr + size, 1), None)
                if nxt is None or nxt[2] != "ret":
                    return None
                return Stub(entry, tuple(out), tails[addr], ends_in_call=True)
            if mn != "jmp":
                return None
            return Stub(entry, tuple(out), tails[addr])
        pic = mn == "call" and insn.raw == b"\xe8\x00\x00\x00\x00"
        if (mn.startswith(("j", "call", "ret", "int", "loop")) and not pic) or len(out) >= MAX_INSNS:
            return None
    return None


def _decode_to_thunk(image: Image, entry: int, plain: dict[int, Stub], cs: capstone.Cs) -> Stub | None:
    out: list[Insn] = []
    mem = image.mem
    for addr, size, mn, ops in cs.disasm_lite(mem[entry : entry + WINDOW + 16], entry):
        insn = Insn(addr, size, mn, ops, mem[addr : addr + size])
        out.append(insn)
        if mn == "jmp":
            target = branch_target(insn)
            if target in plain:
                return Stub(entry, tuple(out), plain[target].api, via_thunk=target)
            return None
        if mn.startswith(("j", "call", "ret", "int", "loop")) or len(out) >= MAX_INSNS:
            return None
    return None


def _pic_tail(mem: bytes, at: int, pool: dict[int, PoolApi], cs: capstone.Cs) -> tuple[int, PoolApi, bool] | None:
    """For `call $+5; pop reg` at `at`: the later `jmp/call [reg + disp]` that reaches a pool routine's IAT slot."""
    from .semantics import REG, parse_operands

    pop_rva = at + 5
    reg = REG.get(["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"][mem[pop_rva] - 0x58], ("", 0))[0]
    for addr, _size, mn, ops in cs.disasm_lite(mem[pop_rva + 1 : pop_rva + 1 + WINDOW], pop_rva + 1):
        o = parse_operands(ops)
        if mn in ("jmp", "call") and o and o[0].mem is not None and o[0].mem.base == reg and o[0].mem.index is None:
            api = pool.get(pop_rva + o[0].mem.disp)
            return (addr, api, mn == "call") if api is not None else None
        if mn.startswith(("j", "call", "ret")) or (o and o[0].kind == "reg" and o[0].reg == reg):
            return None
    return None
