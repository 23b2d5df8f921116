"""One function's instructions, its control-flow edges, and backward value queries over them.

Only functions that reference a pool routine are decoded. With `fast=True` (the scanner) instruction boundaries
and branches come from iced-x86 (`decode.py`) and capstone's lite mode decodes the text of an instruction only
when something reads it: the backward walk reads about a dozen instructions per call site, and most of those it
passes over are answered from a cache keyed by the instruction's bytes. Without it (other callers) every
instruction is decoded with capstone up front, as before. Both give the same instructions (see
docs/performance.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, overload

import capstone

from . import decode
from .encodings import step_bytes
from .semantics import (
    Context,
    Fork,
    Insn,
    Loc,
    Origin,
    RegLoc,
    StackLoc,
    Step,
    branch_target,
    entry_origin,
    is_branch,
    parse_operands,
    passes,
    step_back,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

# Instructions after which execution does not fall through to the next one.
_NO_FALLTHROUGH = frozenset({"jmp", "ret", "retn", "retf", "int3", "ud2", "hlt", "iretq", "iretd", "sysret"})
MAX_STEPS = 20000
_OVER_BUDGET = Origin("computed", detail="analysis budget exceeded")
# Functions where more instructions than this need their iced length confirmed by capstone are decoded by capstone.
MAX_CHECKS = 24


class StepMemo:
    """What the scanner learns about instructions whose text does not depend on their address, by their bytes.

    Every instruction except a relative branch or call prints the same text wherever it is (capstone shows RIP-relative
    operands as `[rip + disp]`), so its text, and what `step_back` makes of a location there when that is a location
    (an origin names the instruction's RVA and is not kept), can be reused for every copy of the same bytes.
    """

    def __init__(self) -> None:
        self.text: dict[bytes, tuple[str, str]] = {}
        self.steps: dict[tuple[bytes, Loc], Loc] = {}
        # `semantics.passes`: most first meetings of a (bytes, location) pair need no `step_back`
        self.passing: dict[bytes, tuple[bool, frozenset[str]]] = {}


class DecodeMismatch(Exception):
    """capstone decoded an instruction differently from iced-x86: decode the function with capstone instead."""


class FunctionCode:
    """The instructions of one function (its `ranges`), their predecessors, and `origins` queries.

    `fast`: boundaries from iced-x86, text from capstone on first use (`DecodeMismatch` where the two disagree);
    `memo`: what is known by instruction bytes, shared between functions; `upto`: the last instruction that can be a
    call site, after which decoding may stop (see `decode.layout`).
    """

    def __init__(
        self,
        mem: bytes,
        entry: int,
        ranges: tuple[tuple[int, int], ...],
        cs: capstone.Cs,
        fast: bool = False,
        memo: StepMemo | None = None,
        upto: int | None = None,
    ) -> None:
        self.entry = entry
        self.ranges = ranges
        self._mem = mem
        self._cs = cs
        self._memo = memo
        self._steps: dict[tuple[int, Loc], Step] = {}
        self.branch_preds: dict[int, list[int]] = {}
        self._passthru: frozenset[int] = frozenset()  # jcc/jmp rel: every location passes through unchanged
        self._reldep: frozenset[int] = frozenset()  # relative branches and calls: their text names their target
        self._register_branches: list[int] = []  # call/jmp through a register or memory, or unclassified
        self._index: dict[int, int] | None = None
        lay = None
        if fast:
            bits = 64 if cs.mode & capstone.CS_MODE_64 else 32
            self._textdec = decode.text_decoder(bits)
            lay = decode.layout(mem, ranges, bits, MAX_CHECKS, upto)
            if lay is not None and lay.checks and not decode.confirm(self._textdec, mem, lay, ranges):
                lay = None
        self.fast = lay is not None
        if lay is not None:
            self._init_fast(lay)
        else:
            self._init_exact()

    # --- construction ---------------------------------------------------------------------------------------

    def _init_exact(self) -> None:
        mem, cs = self._mem, self._cs
        self._memo = None  # the memo knows nothing about this function's branches
        insns: list[Insn] = []
        for begin, end in self.ranges:
            pos = begin
            while pos < end:
                last = pos
                for addr, size, mn, ops in cs.disasm_lite(mem[pos:end], pos):
                    insns.append(Insn(addr, size, mn, ops, mem[addr : addr + size]))
                    last = addr + size
                # lite mode stops at an undecodable byte: resynchronise on the next one
                pos = last if last > pos else pos + 1
        insns.sort(key=lambda i: i.rva)
        self._list: list[Insn] | None = insns
        self._text: list[Insn | None] = list(insns)
        self.starts = [i.rva for i in insns]
        self.sizes = [i.size for i in insns]
        self._range_first = [0]
        index = {ins.rva: k for k, ins in enumerate(insns)}
        self._index = index
        for k, ins in enumerate(insns):
            if ins.mnemonic[0] == "j" and is_branch(ins.mnemonic):
                t = branch_target(ins)
                if t is not None and t in index:
                    self.branch_preds.setdefault(index[t], []).append(k)
        fall = bytearray(len(insns))
        for k in range(1, len(insns)):
            prev = insns[k - 1]
            if prev.rva + prev.size == insns[k].rva and prev.mnemonic not in _NO_FALLTHROUGH:
                fall[k] = 1
        self._fall = fall
        self._register_branches = [k for k, ins in enumerate(insns) if ins.mnemonic in ("call", "jmp")]

    def _init_fast(self, lay: decode.Layout) -> None:
        self._list = None
        self.starts = starts = lay.starts
        self.sizes = lay.sizes
        n = len(starts)
        self._range_first = lay.range_first
        self._text = [None] * n
        self._index = None
        self._reldep = frozenset(lay.reldep)
        branches = lay.branches
        nofall = lay.nofall
        self._register_branches = lay.indirect
        if lay.text:
            branches = list(branches)
            nofall = list(nofall)
            self._register_branches = list(lay.indirect)
            for k in lay.text:
                ins = self.insn(k)  # classified exactly as the capstone sweep does
                mn = ins.mnemonic
                if mn in _NO_FALLTHROUGH:
                    nofall.append(k)
                if mn[0] == "j" and is_branch(mn):
                    t = branch_target(ins)
                    if t is not None:
                        branches.append((k, t))
                if mn in ("call", "jmp"):
                    self._register_branches.append(k)
            branches.sort()
            self._register_branches.sort()
        preds = self.branch_preds
        bisect_left = bisect.bisect_left
        for k, t in branches:
            kt = bisect_left(starts, t)
            if kt < n and starts[kt] == t:
                got = preds.get(kt)
                if got is None:
                    preds[kt] = [k]
                else:
                    got.append(k)
        fall = bytearray(b"\x01") * n
        if n:
            fall[0] = 0
        for k in nofall:
            if k + 1 < n:
                fall[k + 1] = 0
        for (begin, _), (_, prev_end), first in zip(self.ranges[1:], self.ranges, lay.range_first[1:]):
            if first < n and prev_end != begin:
                fall[first] = 0
        self._fall = fall
        self._passthru = frozenset(lay.passthru)

    # --- instructions -----------------------------------------------------------------------------------------

    @property
    def insns(self) -> Sequence[Insn]:
        return self._list if self._list is not None else _LazyInsns(self)

    def insn(self, k: int) -> Insn:
        """Instruction k, decoded by capstone (on first use in fast mode)."""
        ins = self._text[k]
        if ins is None:
            s, n = self.starts[k], self.sizes[k]
            raw = self._mem[s : s + n]
            memo = self._memo
            known = memo.text.get(raw) if memo is not None and k not in self._reldep else None
            if known is None:
                got = self._textdec.one(raw, s)
                if got is None or got[1] != n:
                    raise DecodeMismatch(f"capstone does not decode the {n}-byte instruction iced-x86 found at {s:#x}")
                known = (got[2], got[3])
                if memo is not None and k not in self._reldep:
                    memo.text[raw] = known
            ins = self._text[k] = Insn(s, n, known[0], known[1], raw)
        return ins

    def raw(self, k: int) -> bytes:
        """The bytes of instruction k (without decoding its text)."""
        s = self.starts[k]
        return self._mem[s : s + self.sizes[k]]

    @property
    def index(self) -> dict[int, int]:
        """RVA -> instruction number."""
        if self._index is None:
            self._index = dict(zip(self.starts, range(len(self.starts))))
        return self._index

    def at(self, rva: int) -> int | None:
        if self._index is not None:
            return self._index.get(rva)
        k = bisect.bisect_left(self.starts, rva)
        return k if k < len(self.starts) and self.starts[k] == rva else None

    def register_branches(self) -> list[int]:
        """Indices of every `call`/`jmp` that is not a direct rel32/rel8 branch (candidates for `call reg`)."""
        return self._register_branches

    def predecessors(self, k: int) -> list[int]:
        out = list(self.branch_preds.get(k, ()))
        if self._fall[k]:
            out.append(k - 1)
        return out

    # --- backward queries -------------------------------------------------------------------------------------

    def _step(self, p: int, loc: Loc, ctx: Context) -> Step:
        if p in self._passthru:
            return loc  # jcc/jmp rel8/rel32 (`step_back` passes every location through them)
        s = self.starts[p]
        raw = self._mem[s : s + self.sizes[p]]
        if self._memo is None or p in self._reldep:
            return self._read(p, raw, loc, ctx)
        known = self._memo.steps.get((raw, loc))
        return known if known is not None else self._learn(p, raw, loc, ctx)

    def _learn(self, p: int, raw: bytes, loc: Loc, ctx: Context) -> Step:
        """The step through instruction p (not in the memo yet), kept by its bytes where it is a location."""
        memo = self._memo
        assert memo is not None
        known = memo.passing.get(raw)
        step: Step | None = None
        if known is None:
            step = step_bytes(raw, self.starts[p], loc, ctx)
            if step is None:
                known = memo.passing[raw] = passes(self.insn(p))
        if known is not None:
            t = type(loc)
            if (t is RegLoc and loc.reg in known[1]) or (t is StackLoc and known[0]):  # type: ignore[union-attr]
                step = loc
        if step is None:
            step = step_back(self.insn(p), loc, ctx)
        if type(step) is not Origin and type(step) is not Fork:
            memo.steps[(raw, loc)] = step  # type: ignore[assignment]
        return step

    def _read(self, p: int, raw: bytes, loc: Loc, ctx: Context) -> Step:
        """The step through instruction p: from its bytes where they say (`encodings`), else from its text."""
        step = step_bytes(raw, self.starts[p], loc, ctx)
        return step_back(self.insn(p), loc, ctx) if step is None else step

    def origins(self, k: int, loc: Loc, ctx: Context) -> list[Origin]:
        """Every origin of the value `loc` holds just before instruction k, over all paths reaching it.

        A depth-first walk over (instruction, location) pairs. Where an instruction's only predecessor is the one
        before it, the walk goes on there directly: that is the pair the work list would hand out next anyway.
        """
        found: dict[Origin, None] = {}
        seen: set[tuple[int, Loc]] = set()
        work = [(k, loc)]
        steps = 0
        starts, entry, bpreds, fall, cache = self.starts, self.entry, self.branch_preds, self._fall, self._steps
        # the first lookups of `_step`, inlined below for the common case
        passthru, reldep, sizes, mem = self._passthru, self._reldep, self.sizes, self._mem
        memo = self._memo.steps if self._memo is not None else None
        res: Step | None
        while work:
            item = work.pop()
            if item in seen:
                continue
            seen.add(item)
            steps += 1
            if steps > MAX_STEPS:
                found[_OVER_BUDGET] = None
                break
            k, loc = item
            # straight-line code: the only predecessor is the previous instruction
            while fall[k] and k not in bpreds and starts[k] != entry:
                p = k - 1
                # the memo answers for most instructions; what it does not keep (origins, forks, relative branches)
                # is kept per function
                if p in passthru:
                    res = loc
                elif memo is not None and p not in reldep:
                    s = starts[p]
                    raw = mem[s : s + sizes[p]]
                    res = memo.get((raw, loc))
                    if res is None:
                        res = cache.get((p, loc))
                        if res is None:
                            res = cache[(p, loc)] = self._learn(p, raw, loc, ctx)
                else:
                    res = cache.get((p, loc))
                    if res is None:
                        res = cache[(p, loc)] = self._step(p, loc, ctx)
                t = type(res)
                if t is Origin:
                    found[res] = None  # type: ignore[index]
                    break
                if t is Fork:
                    for r in res.steps:  # type: ignore[union-attr]
                        if isinstance(r, Origin):
                            found[r] = None
                        else:
                            work.append((k - 1, r))
                    break
                item = (p, res)  # type: ignore[assignment]
                if item in seen:
                    break
                seen.add(item)
                steps += 1
                if steps > MAX_STEPS:
                    found[_OVER_BUDGET] = None
                    return list(found)
                k, loc = item
            else:
                self._visit(k, loc, ctx, found, work)
        return list(found)

    def _visit(
        self, k: int, loc: Loc, ctx: Context, found: dict[Origin, None], work: list[tuple[int, Loc]]
    ) -> None:
        """One pair of the walk at a join, a block start or the entry: all its predecessors."""
        bp = self.branch_preds.get(k)
        preds: Sequence[int]
        if self._fall[k]:
            preds = [*bp, k - 1] if bp else (k - 1,)
        else:
            preds = bp or ()
        if self.starts[k] == self.entry:
            found[entry_origin(loc, ctx.arch)] = None
        elif not preds and _is_padding(self.insn(k)):
            return  # alignment padding after a ret/jmp: unreachable, it adds no path
        elif not preds:
            kind = "register" if isinstance(loc, RegLoc) else "stack"
            found[Origin(kind, detail=f"no known predecessor of {self.starts[k]:#x}")] = None
        cache = self._steps
        for p in preds:
            key = (p, loc)
            res = cache.get(key)
            if res is None:
                res = cache[key] = self._step(p, loc, ctx)
            if isinstance(res, Fork):
                for r in res.steps:
                    if isinstance(r, Origin):
                        found[r] = None
                    else:
                        work.append((p, r))
            elif isinstance(res, Origin):
                found[res] = None
            else:
                work.append((p, res))


class _LazyInsns(Sequence[Insn]):
    """`FunctionCode.insns` in fast mode: capstone decodes an instruction when it is first read."""

    def __init__(self, code: FunctionCode) -> None:
        self._code = code

    def __len__(self) -> int:
        return len(self._code.starts)

    @overload
    def __getitem__(self, i: int) -> Insn: ...

    @overload
    def __getitem__(self, i: slice) -> list[Insn]: ...

    def __getitem__(self, i: int | slice) -> Insn | list[Insn]:
        n = len(self._code.starts)
        if isinstance(i, slice):
            return [self._code.insn(k) for k in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._code.insn(i)

    def __iter__(self) -> Iterator[Insn]:
        for k in range(len(self._code.starts)):
            yield self._code.insn(k)


def _is_padding(insn: Insn) -> bool:
    """No-op idioms compilers put between functions and blocks (nop, int3, lea esi,[esi+eiz*1+0], mov edi,edi)."""
    if insn.mnemonic in ("nop", "int3"):
        return True
    ops = parse_operands(insn.op_str)
    if insn.mnemonic == "lea" and len(ops) == 2 and ops[1].mem is not None:
        m = ops[1].mem
        return m.base == ops[0].reg and m.disp == 0 and m.index in (None, "eiz", "riz")
    if insn.mnemonic in ("mov", "xchg") and len(ops) == 2:
        return ops[0].kind == "reg" and ops[0] == ops[1]
    return False
