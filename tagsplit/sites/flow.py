"""One function's instructions, its control-flow edges, and backward value queries over them.

Only functions that reference a pool routine are disassembled, in capstone's lite mode; that is what keeps a scan
of a 20 MB driver to a fraction of a second (see docs/performance.md).
"""

from __future__ import annotations

from typing import Optional

import capstone

from .semantics import (
    Context,
    Fork,
    Insn,
    Loc,
    Origin,
    RegLoc,
    branch_target,
    entry_origin,
    is_branch,
    parse_operands,
    Step,
    step_back,
)

# Instructions after which execution does not fall through to the next one.
_NO_FALLTHROUGH = frozenset({"jmp", "ret", "retn", "retf", "int3", "ud2", "hlt", "iretq", "iretd", "sysret"})
MAX_STEPS = 20000


class FunctionCode:
    def __init__(self, mem: bytes, entry: int, ranges: tuple[tuple[int, int], ...], cs: capstone.Cs) -> None:
        self.entry = entry
        self.ranges = ranges
        insns: list[Insn] = []
        for begin, end in ranges:
            pos = begin
            while pos < end:
                last = pos
                for addr, size, mn, ops in cs.disasm_lite(mem[pos:end], pos):
                    insns.append(Insn(addr, size, mn, ops, mem[addr : addr + size]))
                    last = addr + size
                # lite mode stops at an undecodable byte: resynchronise on the next one
                pos = last if last > pos else pos + 1
        insns.sort(key=lambda i: i.rva)
        self.insns = insns
        self.index = {ins.rva: k for k, ins in enumerate(insns)}
        self.branch_preds: dict[int, list[int]] = {}
        for k, ins in enumerate(insns):
            if ins.mnemonic[0] == "j" and is_branch(ins.mnemonic):
                t = branch_target(ins)
                if t is not None and t in self.index:
                    self.branch_preds.setdefault(self.index[t], []).append(k)
        self._steps: dict[tuple[int, Loc], Step] = {}

    def at(self, rva: int) -> Optional[int]:
        return self.index.get(rva)

    def predecessors(self, k: int) -> list[int]:
        out = list(self.branch_preds.get(k, ()))
        if k > 0:
            prev = self.insns[k - 1]
            if prev.rva + prev.size == self.insns[k].rva and prev.mnemonic not in _NO_FALLTHROUGH:
                out.append(k - 1)
        return out

    def origins(self, k: int, loc: Loc, ctx: Context) -> list[Origin]:
        """Every origin of the value `loc` holds just before instruction k, over all paths reaching it."""
        found: dict[Origin, None] = {}
        seen: set[tuple[int, Loc]] = set()
        work = [(k, loc)]
        steps = 0
        while work:
            k, loc = work.pop()
            if (k, loc) in seen:
                continue
            seen.add((k, loc))
            steps += 1
            if steps > MAX_STEPS:
                found[Origin("computed", detail="analysis budget exceeded")] = None
                break
            preds = self.predecessors(k)
            if self.insns[k].rva == self.entry:
                found[entry_origin(loc, ctx.arch)] = None
            elif not preds and _is_padding(self.insns[k]):
                continue  # alignment padding after a ret/jmp: unreachable, it adds no path
            elif not preds:
                kind = "register" if isinstance(loc, RegLoc) else "stack"
                found[Origin(kind, detail=f"no known predecessor of {self.insns[k].rva:#x}")] = None
            for p in preds:
                key = (p, loc)
                res = self._steps.get(key)
                if res is None:
                    res = step_back(self.insns[p], loc, ctx)
                    self._steps[key] = res
                for r in res.steps if isinstance(res, Fork) else (res,):
                    if isinstance(r, Origin):
                        found[r] = None
                    else:
                        work.append((p, r))
        return list(found)


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

