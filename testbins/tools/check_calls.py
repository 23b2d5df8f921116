#!/usr/bin/env python3
"""Cross-check the hand-written ground truth against what the compiler emitted.

For every binary in testbins/bin this finds the instructions that transfer control to a pool API -- call/jmp [IAT],
mov reg,[IAT] + call/jmp reg, and call/jmp rel32 to an import thunk (jmp [IAT]) -- attributes each to the export
whose body contains it (exports sorted by address within their section), and compares the number of sites per
(function, api) with bin/<name>.truth.json. It does NOT look at tags: tags in the truth come from the C source only.

    python3 tools/check_calls.py [--strict] [--encodings] [bin/x.sys ...]

Prints mismatches (exit 1 with --strict when there are any); --encodings prints every site and its encoding.
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import capstone
import pefile
from capstone import x86_const as X

POOL_APIS = {
    "ExAllocatePoolWithTag", "ExAllocatePoolWithQuotaTag", "ExAllocatePoolWithTagPriority", "ExAllocatePool2",
    "ExAllocatePool3", "ExAllocatePool", "ExAllocatePoolWithQuota", "ExFreePoolWithTag", "ExFreePool2",
    "ExFreePool", "ExInitializeNPagedLookasideList", "ExInitializePagedLookasideList", "ExInitializeLookasideListEx",
}
HERE = Path(__file__).resolve().parent.parent


def undecorate(name: str) -> str:
    if name.startswith("_"):
        name = name[1:]
    return name.split("@", 1)[0]


def mem_target(insn, op, is64):
    """The absolute address a memory operand refers to, when it is rip-relative (x64) or absolute (x86)."""
    m = op.mem
    if is64:
        if m.base == X.X86_REG_RIP and m.index == 0:
            return insn.address + insn.size + m.disp
        return None
    if m.base == 0 and m.index == 0:
        return m.disp & 0xFFFFFFFF
    return None


def scan(path: Path):
    pe = pefile.PE(str(path))
    is64 = pe.FILE_HEADER.Machine == 0x8664
    base = pe.OPTIONAL_HEADER.ImageBase
    iat = {}
    for d in getattr(pe, "DIRECTORY_ENTRY_IMPORT", []):
        for imp in d.imports:
            if imp.name:
                iat[imp.address] = undecorate(imp.name.decode())
    exports = sorted((e.address + base, e.name.decode()) for e in pe.DIRECTORY_ENTRY_EXPORT.symbols if e.name)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if is64 else capstone.CS_MODE_32)
    md.detail = True
    image = pe.get_memory_mapped_image()

    def section_of(va):
        for s in pe.sections:
            lo = base + s.VirtualAddress
            if lo <= va < lo + max(s.Misc_VirtualSize, s.SizeOfRawData):
                return s
        return None

    def thunk_target(va):
        """Import name if the instruction at va is jmp [IAT]."""
        s = section_of(va)
        if s is None or not s.Characteristics & 0x20000000:
            return None
        code = image[va - base: va - base + 16]
        for insn in md.disasm(code, va, 1):
            if insn.id == X.X86_INS_JMP and insn.operands and insn.operands[0].type == X.X86_OP_MEM:
                return iat.get(mem_target(insn, insn.operands[0], is64))
        return None

    export_starts = {start for start, _ in exports}
    sites = []  # (function, api, address, encoding)
    for i, (start, name) in enumerate(exports):
        sec = section_of(start)
        if sec is None or not sec.Characteristics & 0x20000000:
            continue
        end = base + sec.VirtualAddress + sec.Misc_VirtualSize
        for nstart, _ in exports[i + 1:]:
            if nstart > start and section_of(nstart) is sec:
                end = min(end, nstart)
                break
        # recursive descent from the export: the function's reachable instructions (import thunks and padding
        # after the last function are not part of it)
        insns = {}
        work = [start]
        while work:
            va = work.pop()
            while start <= va < end and va not in insns:
                got = list(md.disasm(image[va - base: va - base + 16], va, 1))
                if not got:
                    break
                insn = got[0]
                insns[va] = insn
                va += insn.size
                grp = set(insn.groups)
                if X.X86_GRP_RET in grp or insn.id in (X.X86_INS_INT3, X.X86_INS_UD2, X.X86_INS_HLT):
                    break
                if X.X86_GRP_JUMP in grp and insn.operands:
                    op = insn.operands[0]
                    if op.type == X.X86_OP_IMM:
                        if op.imm not in export_starts:
                            work.append(op.imm)
                    if insn.id == X.X86_INS_JMP:
                        break
        regs = {}  # register name -> import loaded into it
        for va in sorted(insns):
            insn = insns[va]
            raw = insn.bytes.hex()
            kind = None
            api = None
            if insn.id in (X.X86_INS_CALL, X.X86_INS_JMP) and insn.operands:
                op = insn.operands[0]
                tail = insn.id == X.X86_INS_JMP
                if op.type == X.X86_OP_MEM:
                    api = iat.get(mem_target(insn, op, is64))
                    kind = raw[: raw.index("15" if not tail else "25") + 2].upper() + ("[IAT] tail" if tail else "[IAT]")
                elif op.type == X.X86_OP_REG:
                    api = regs.get(insn.reg_name(op.reg))
                    kind = ("jmp" if tail else "call") + " reg (after mov reg,[IAT])"
                elif op.type == X.X86_OP_IMM and op.imm not in export_starts:
                    api = thunk_target(op.imm)
                    kind = ("E9 jmp" if tail else "E8 call") + " thunk"
            if api in POOL_APIS:
                sites.append((name, api, insn.address, kind))
            # register cache tracking
            if insn.id == X.X86_INS_MOV and len(insn.operands) == 2 and insn.operands[0].type == X.X86_OP_REG \
                    and insn.operands[1].type == X.X86_OP_MEM:
                tgt = mem_target(insn, insn.operands[1], is64)
                if tgt in iat:
                    regs[insn.reg_name(insn.operands[0].reg)] = iat[tgt]
                    continue
            try:
                _, written = insn.regs_access()
            except capstone.CsError:
                written = []
            for r in written:
                regs.pop(insn.reg_name(r), None)
    return sites


def main(argv):
    strict = "--strict" in argv
    show = "--encodings" in argv
    paths = [Path(a) for a in argv if not a.startswith("--")] or sorted((HERE / "bin").glob("*.sys"))
    bad = 0
    for path in paths:
        sites = scan(path)
        truth = json.loads(path.with_suffix(".truth.json").read_text())
        want = collections.Counter()
        for e in truth["sites"]:
            want[(e["function"], e["api"])] += e.get("count", 1)
        got = collections.Counter((f, a) for f, a, _, _ in sites)
        diffs = [(k, want.get(k, 0), got.get(k, 0)) for k in sorted(set(want) | set(got)) if want.get(k, 0) != got.get(k, 0)]
        enc = collections.Counter(k for *_, k in sites)
        print(f"{path.name}: {sum(got.values())} sites found, {sum(want.values())} expected; "
              + ", ".join(f"{k} x{n}" for k, n in sorted(enc.items())))
        for (f, a), w, g in diffs:
            bad += 1
            print(f"   MISMATCH {f} {a}: truth {w}, found {g}")
        if show:
            for f, a, addr, k in sites:
                print(f"   {addr:#x} {f:22} {a:32} {k}")
    return 1 if (bad and strict) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
