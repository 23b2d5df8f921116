"""Self-check of benchmarks/synthdrv.py (not part of the test suite: needs capstone and pefile, takes ~3 minutes).

    python benchmarks/check_synthdrv.py [--mb 1] [--sites 500] [--no-big]

For both architectures it builds a small driver and checks:
  * pefile parses it without warnings; checksum, headers, sections, SizeOfImage, imports, IAT;
  * x64: .pdata sorted and non-overlapping, every function covered by one entry or two (chained) entries, each
    UNWIND_INFO matches the function's actual prologue bytes, chained entries link to the primary entry;
  * base relocations: x86 has a HIGHLOW for every absolute address in .text (found by disassembly) and no other
    in .text; x64's DIR64 entries are the .data function table;
  * every function disassembles with capstone from entry to end (no undecodable bytes, last instruction ret/jmp,
    every branch stays in the function, every call goes to a function entry or a thunk, CC padding);
  * every truth site: the instruction at ``rva`` is the call/jmp reaching the named API (through the IAT, a thunk,
    or a register loaded from the IAT), the instruction at ``tag_rva`` has the tag as immediate, and following the
    control flow from ``tag_rva`` to the site the tag reaches the API's tag argument (tagsplit/apis.py positions);
  * no unlisted sites: every call/jmp in the functions that reaches a pool API is in the truth;
  * determinism (same args -> same bytes), site count, share of functions with sites.
Then it times building 20 MB / 10,000 sites for each architecture and checks that image the same way, except that
only the functions holding sites are disassembled and relocations are not cross-checked.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import struct
import sys
import time
from pathlib import Path

import capstone
import pefile
from capstone import x86_const as X

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import synthdrv  # noqa: E402

try:
    from tagsplit.apis import BY_NAME as _APIS

    def tag_location(api: str, arch: str) -> object:
        return _APIS[api].tag_location(arch)

except Exception:  # pragma: no cover - tagsplit under construction
    _LOC = {
        "ExAllocatePoolWithTag": ("r8", 8),
        "ExAllocatePoolWithQuotaTag": ("r8", 8),
        "ExAllocatePool2": ("r8", 0xC),
        "ExAllocatePool": (None, None),
        "ExFreePoolWithTag": ("rdx", 4),
        "ExInitializeNPagedLookasideList": (0x28, 0x14),
    }

    def tag_location(api: str, arch: str) -> object:
        return _LOC[api][0 if arch == "x64" else 1]


class CheckError(AssertionError):
    pass


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckError(msg)


VOLATILE_X64 = {"rax", "rcx", "rdx", "r8", "r9", "r10", "r11"}
VOLATILE_X86 = {"eax", "ecx", "edx"}


def full_reg(cs: capstone.Cs, reg: int, x64: bool) -> str:
    name = cs.reg_name(reg)
    if not x64:
        return {"al": "eax", "cl": "ecx", "dl": "edx", "bl": "ebx", "ax": "eax", "cx": "ecx", "dx": "edx"}.get(
            name, name
        )
    m = {
        "eax": "rax",
        "ecx": "rcx",
        "edx": "rdx",
        "ebx": "rbx",
        "esi": "rsi",
        "edi": "rdi",
        "ebp": "rbp",
        "esp": "rsp",
        "al": "rax",
        "cl": "rcx",
        "dl": "rdx",
        "bl": "rbx",
        "ax": "rax",
        "cx": "rcx",
        "dx": "rdx",
    }
    if name in m:
        return m[name]
    if name.startswith("r") and name[-1] in "dwb" and name[1:-1].isdigit():
        return name[:-1]
    return name


class Image:
    def __init__(self, drv: synthdrv.SynthDriver):
        self.drv = drv
        self.x64 = drv.arch == "x64"
        self.pe = pefile.PE(data=drv.data)
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if self.x64 else capstone.CS_MODE_32)
        self.cs.detail = True
        text = self.pe.sections[0]
        expect(text.Name.rstrip(b"\0") == b".text", "first section is .text")
        self.text_rva = text.VirtualAddress
        self.text = text.get_data()[: text.Misc_VirtualSize]
        self.base = self.pe.OPTIONAL_HEADER.ImageBase
        self.iat: dict[int, str] = {}
        for desc in self.pe.DIRECTORY_ENTRY_IMPORT:
            for imp in desc.imports:
                self.iat[imp.address - self.base] = imp.name.decode()
        self.insns: dict[int, capstone.CsInsn] = {}  # rva -> insn
        self.func_of: dict[int, tuple[int, int]] = {}
        self.func_insns: dict[int, list] = {}
        self.thunk_target: dict[int, str] = {}

    def bytes_at(self, rva: int, n: int) -> bytes:
        o = rva - self.text_rva
        return self.text[o : o + n]

    def mem_target(self, insn: capstone.CsInsn, op: capstone.x86.X86Op) -> int | None:
        """rva addressed by a [rip+disp] / [abs32] memory operand, else None."""
        m = op.mem
        if self.x64 and m.base == X.X86_REG_RIP and m.index == 0:
            return insn.address + insn.size + m.disp - self.base
        if not self.x64 and m.base == 0 and m.index == 0:
            return (m.disp & 0xFFFFFFFF) - self.base
        return None


def check_headers(img: Image, label: str) -> None:
    pe = img.pe
    w = pe.get_warnings()
    expect(not w, f"{label}: pefile warnings: {w[:5]}")
    expect(pe.OPTIONAL_HEADER.Subsystem == 1, "subsystem NATIVE")
    expect(pe.FILE_HEADER.Machine == (0x8664 if img.x64 else 0x14C), "machine")
    expect(pe.OPTIONAL_HEADER.Magic == (0x20B if img.x64 else 0x10B), "magic")
    expect(pe.OPTIONAL_HEADER.SectionAlignment == 0x1000 and pe.OPTIONAL_HEADER.FileAlignment == 0x200, "alignment")
    expect(pe.OPTIONAL_HEADER.CheckSum == pe.generate_checksum(), "checksum (pefile)")
    expect(pe.verify_checksum(), "verify_checksum")
    cks_off = pe.OPTIONAL_HEADER.get_file_offset() + 64
    expect(synthdrv.pe_checksum(img.drv.data, cks_off) == pe.OPTIONAL_HEADER.CheckSum, "own checksum")
    names = [s.Name.rstrip(b"\0").decode() for s in pe.sections]
    want = [".text", ".rdata", ".data", ".pdata", ".reloc"] if img.x64 else [".text", ".rdata", ".data", ".reloc"]
    expect(names == want, f"sections {names}")
    chars = {s.Name.rstrip(b"\0").decode(): s.Characteristics for s in pe.sections}
    expect(chars[".text"] == 0x60000020, ".text RX code")
    expect(chars[".data"] & 0x80000000 and not chars[".data"] & 0x20000000, ".data RW")
    end = 0
    prev_end_raw = 0x400
    for s in pe.sections:
        expect(s.VirtualAddress % 0x1000 == 0 and s.VirtualAddress >= end, "section order/alignment")
        expect(s.PointerToRawData == prev_end_raw, "raw layout contiguous")
        expect(s.SizeOfRawData % 0x200 == 0 and s.SizeOfRawData >= min(s.Misc_VirtualSize, s.SizeOfRawData), "raw")
        prev_end_raw = s.PointerToRawData + s.SizeOfRawData
        end = s.VirtualAddress + (s.Misc_VirtualSize + 0xFFF) // 0x1000 * 0x1000
    expect(prev_end_raw == len(img.drv.data), "file size")
    expect(pe.OPTIONAL_HEADER.SizeOfImage == end, f"SizeOfImage {pe.OPTIONAL_HEADER.SizeOfImage:x} != {end:x}")
    expect(pe.OPTIONAL_HEADER.SizeOfHeaders == 0x400, "SizeOfHeaders")
    expect(pe.OPTIONAL_HEADER.AddressOfEntryPoint == img.drv.functions[0][0], "entry point = first function")
    expect(pe.FILE_HEADER.TimeDateStamp == synthdrv.TIMESTAMP, "fixed timestamp")
    # imports
    expect(len(pe.DIRECTORY_ENTRY_IMPORT) == 1, "one import descriptor")
    desc = pe.DIRECTORY_ENTRY_IMPORT[0]
    expect(desc.dll == b"ntoskrnl.exe", "dll name")
    got = {i.name.decode() for i in desc.imports}
    expect(set(synthdrv.POOL_IMPORTS) <= got, "pool imports present")
    nonpool = got - set(synthdrv.POOL_IMPORTS)
    expect(len(nonpool) >= 10, "~10+ non-pool imports")
    for need in ("KeQuerySystemTimePrecise", "RtlInitUnicodeString", "IoCreateDevice"):
        expect(need in got, need)
    if img.x64:
        expect("KeAcquireSpinLockRaiseToDpc" in got, "KeAcquireSpinLockRaiseToDpc")
    iat_dir = pe.OPTIONAL_HEADER.DATA_DIRECTORY[12]
    ptr = 8 if img.x64 else 4
    expect(iat_dir.Size == (len(got) + 1) * ptr, "IAT directory size")
    expect(min(img.iat) == iat_dir.VirtualAddress, "IAT at its directory")


def disassemble_functions(img: Image, only: set[int] | None = None) -> dict[str, int]:
    """Linear-sweep every function (or those whose entry is in ``only``); fill img.insns; check structure."""
    cs = img.cs
    funcs = img.drv.functions
    starts = {f[0] for f in funcs}
    if only is not None:
        funcs = tuple(f for f in funcs if f[0] in only)
    thunks = dict((rva, name) for name, rva in img.drv.thunks)
    stats: dict[str, int] = collections.Counter()
    # thunks
    slot_by_rva = {rva: name for rva, name in img.iat.items()}
    for rva, name in thunks.items():
        ins = next(cs.disasm(img.bytes_at(rva, 6), img.base + rva))
        expect(ins.mnemonic == "jmp" and ins.operands[0].type == X.X86_OP_MEM, "thunk is jmp [mem]")
        tgt = img.mem_target(ins, ins.operands[0])
        expect(slot_by_rva.get(tgt) == name, f"thunk {name} -> {slot_by_rva.get(tgt)}")
        img.thunk_target[rva] = name
        img.insns[rva] = ins
    prev_end = None
    for fstart, fend in funcs:
        expect(fstart % 16 == 0, "function start aligned")
        if prev_end is not None and only is None:
            expect(all(b == 0xCC for b in img.bytes_at(prev_end, fstart - prev_end)), "CC padding")
            expect(fstart - prev_end < 16, "padding < 16")
        prev_end = fstart
        code = img.bytes_at(fstart, fend - fstart)
        pos = fstart
        last = None
        lst = img.func_insns[fstart] = []
        for ins in cs.disasm(code, img.base + fstart):
            lst.append(ins)
            rva = ins.address - img.base
            expect(rva == pos, f"gap in sweep at {pos:x}")
            pos += ins.size
            img.insns[rva] = ins
            img.func_of[rva] = (fstart, fend)
            last = ins
            grp = ins.groups
            if X.X86_GRP_JUMP in grp or X.X86_GRP_CALL in grp:
                op = ins.operands[0]
                if op.type == X.X86_OP_IMM:
                    tgt = op.imm - img.base
                    if X.X86_GRP_CALL in grp:
                        expect(tgt in starts or tgt in thunks, f"call target {tgt:x} at {rva:x}")
                        stats["calls_internal" if tgt in starts else "calls_thunk"] += 1
                    else:
                        expect(fstart <= tgt < fend, f"branch out of function at {rva:x}")
                        if tgt <= rva:
                            stats["back_edges"] += 1
                        stats["branches"] += 1
                elif op.type == X.X86_OP_MEM:
                    t = img.mem_target(ins, op)
                    if t is not None:
                        expect(t in img.iat, f"indirect call/jmp through non-IAT at {rva:x}")
                        stats["calls_import"] += 1
            stats["insns"] += 1
        expect(pos == fend, f"sweep of {fstart:x} ended at {pos:x}, not {fend:x}")
        assert last is not None
        expect(last.mnemonic in ("ret", "jmp"), f"function {fstart:x} ends with {last.mnemonic}")
        prev_end = fend
    return stats


def check_pdata(img: Image) -> dict[str, int]:
    pe = img.pe
    entries = pe.DIRECTORY_ENTRY_EXCEPTION
    rt = [(e.struct.BeginAddress, e.struct.EndAddress, e.struct.UnwindData, e) for e in entries]
    expect(all(rt[i][1] <= rt[i + 1][0] for i in range(len(rt) - 1)), ".pdata sorted, non-overlapping")
    expect(all(b < e for b, e, _u, _x in rt), ".pdata non-empty ranges")
    by_begin = {r[0]: r for r in rt}
    chained = 0
    i = 0
    for fstart, fend in img.drv.functions:
        expect(i < len(rt) and rt[i][0] == fstart, f"function {fstart:x} has a .pdata entry")
        b, e, u, ent = rt[i]
        i += 1
        # primary unwind info must describe the prologue bytes
        data = pe.get_data(u, 4)
        ver_flags, size_prolog, count, frame = data
        expect(ver_flags & 7 == 1 and ver_flags >> 3 == 0 and frame == 0, "primary unwind header")
        codes = struct.unpack(f"<{count}H", pe.get_data(u + 4, 2 * count))
        check_prologue(img, fstart, size_prolog, codes)
        if e != fend:
            # chained second range
            expect(i < len(rt) and rt[i][0] == e and rt[i][1] == fend, f"second range of {fstart:x}")
            _b2, _e2, u2, ent2 = rt[i]
            i += 1
            hdr = pe.get_data(u2, 4)
            expect(hdr[0] == 1 | (4 << 3) and hdr[2] == 0, "chained unwind header")
            cb, ce, cu = struct.unpack("<III", pe.get_data(u2 + 4, 12))
            expect((cb, ce, cu) == (b, e, u), "chained entry points to the primary RUNTIME_FUNCTION")
            expect(ent2.unwindinfo.get_chained_function_entry() is ent, "pefile links the chain")
            expect((cb in by_begin), "chain target exists")
            chained += 1
    expect(i == len(rt), "no extra .pdata entries")
    expect(chained > 0, "some chained unwind entries")
    return {"pdata_entries": len(rt), "chained": chained}


_REGNUM = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
_REGNUM.update({f"r{i}": i for i in range(8, 16)})


def check_prologue(img: Image, fstart: int, size_prolog: int, codes: tuple[int, ...]) -> None:
    ops: list[tuple[int, int, int]] = []  # (offset after insn, op, info)
    off = 0
    alloc = None
    for ins in img.cs.disasm(img.bytes_at(fstart, size_prolog), 0):
        off += ins.size
        if ins.mnemonic == "push":
            ops.append((off, 0, _REGNUM[img.cs.reg_name(ins.operands[0].reg)]))
        elif ins.mnemonic == "sub" and ins.operands[0].reg == X.X86_REG_RSP:
            alloc = ins.operands[1].imm
            ops.append((off, 2 if alloc <= 128 else 1, alloc))
        else:
            raise CheckError(f"unexpected prologue instruction {ins.mnemonic} at {fstart:x}")
    expect(off == size_prolog and alloc is not None, "prologue size")
    want: list[int] = []
    for o, op, info in reversed(ops):
        if op == 0:
            want.append(o | (info << 12))
        elif op == 2:
            want.append(o | ((2 | ((info // 8 - 1) << 4)) << 8))
        else:
            want += [o | (1 << 8), info // 8]
    expect(tuple(want) == codes[: len(want)], f"unwind codes of {fstart:x}: {want} vs {codes}")
    expect((8 + 8 * sum(1 for o in ops if o[1] == 0) + alloc) % 16 == 0, f"stack aligned at calls in {fstart:x}")


def check_relocs(img: Image) -> dict[str, int]:
    pe = img.pe
    relocs: dict[int, int] = {}
    for blk in pe.DIRECTORY_ENTRY_BASERELOC:
        for ent in blk.entries:
            if ent.type == 0:
                continue
            expect(ent.rva not in relocs, "duplicate reloc")
            relocs[ent.rva] = ent.type
    text_lo, text_hi = img.text_rva, img.text_rva + len(img.text)
    data_sec = next(s for s in pe.sections if s.Name.startswith(b".data"))
    want_type = 10 if img.x64 else 3
    expect(all(t == want_type for t in relocs.values()), "reloc types")
    in_text = {r for r in relocs if text_lo <= r < text_hi}
    in_data = {r for r in relocs if data_sec.VirtualAddress <= r < data_sec.VirtualAddress + data_sec.Misc_VirtualSize}
    expect(len(in_text) + len(in_data) == len(relocs), "relocs only in .text/.data")
    starts = {f[0] for f in img.drv.functions}
    for r in in_data:
        v = pe.get_qword_at_rva(r) if img.x64 else pe.get_dword_at_rva(r)
        expect(v - img.base in starts, f"data pointer {r:x} points to a function")
    if img.x64:
        expect(not in_text, "x64: no relocations in .text")
        return {"relocs": len(relocs)}
    # x86: every absolute address operand in .text has a HIGHLOW reloc, and nothing else does
    lo, hi = img.base, img.base + pe.OPTIONAL_HEADER.SizeOfImage
    need: set[int] = set()
    for rva, ins in img.insns.items():
        for op in ins.operands:
            if (
                op.type == X.X86_OP_MEM
                and op.mem.base == 0
                and op.mem.index == 0
                and lo <= (op.mem.disp & 0xFFFFFFFF) < hi
            ):
                need.add(rva + ins.disp_offset)
            elif op.type == X.X86_OP_IMM and lo <= (op.imm & 0xFFFFFFFF) < hi and ins.imm_size == 4:
                if X.X86_GRP_CALL in ins.groups or X.X86_GRP_JUMP in ins.groups:
                    continue
                need.add(rva + ins.imm_offset)
    missing = need - in_text
    extra = in_text - need
    expect(not missing, f"x86: absolute addresses without relocation: {sorted(missing)[:5]}")
    expect(not extra, f"x86: relocations on non-addresses: {sorted(extra)[:5]}")
    return {"relocs": len(relocs), "relocs_text": len(in_text)}


def reg_loaded_from_iat(img: Image, site: int, reg: str) -> str | None:
    """API whose IAT slot was last loaded into ``reg`` before ``site`` in its function (linear order)."""
    fstart, _fend = img.func_of[site]
    found = None
    for ins in img.func_insns[fstart]:
        if ins.address - img.base >= site:
            break
        ops = ins.operands
        if (
            ins.mnemonic == "mov"
            and len(ops) == 2
            and ops[0].type == X.X86_OP_REG
            and full_reg(img.cs, ops[0].reg, img.x64) == reg
        ):
            src = ops[1]
            found = img.iat.get(img.mem_target(ins, src)) if src.type == X.X86_OP_MEM else None  # type: ignore
    return found


def follow_tag(img: Image, t: synthdrv.TruthSite) -> None:
    """Walk the control flow from tag_rva to the site and check the tag lands in the API's tag argument."""
    cs = img.cs
    x64 = img.x64
    ptr = 8 if x64 else 4
    volatile = VOLATILE_X64 if x64 else VOLATILE_X86
    sp = "rsp" if x64 else "esp"
    regs: set[str] = set()
    slots: set[int] = set()  # offsets from the current stack pointer holding the tag
    assert t.tag_rva is not None
    rva = t.tag_rva
    ins = img.insns[rva]
    tagv = int.from_bytes(t.tag.encode("latin-1"), "little")  # type: ignore[union-attr]
    immed = [op.imm & 0xFFFFFFFF for op in ins.operands if op.type == X.X86_OP_IMM]
    expect(immed and immed[-1] == tagv, f"tag immediate at {rva:x}: {[hex(v) for v in immed]}")
    dst = ins.operands[0]
    if ins.mnemonic == "push":
        slots.add(0)
    elif dst.type == X.X86_OP_REG:
        regs.add(full_reg(cs, dst.reg, x64))
    elif dst.type == X.X86_OP_MEM and dst.mem.base in (X.X86_REG_RSP, X.X86_REG_ESP):
        slots.add(dst.mem.disp)
    else:
        raise CheckError(f"tag instruction at {rva:x}")
    rva += ins.size
    steps = 0
    while rva != t.rva:
        steps += 1
        expect(steps < 200000, "path from tag to site too long")
        ins = img.insns.get(rva)
        expect(ins is not None, f"path left the decoded code at {rva:x}")
        assert ins is not None
        nxt = rva + ins.size
        m = ins.mnemonic
        ops = ins.operands
        if m == "push":
            src = ops[0]
            slots = {s + ptr for s in slots}
            if src.type == X.X86_OP_REG and full_reg(cs, src.reg, x64) in regs:
                slots.add(0)
        elif m == "pop":
            r = full_reg(cs, ops[0].reg, x64)
            if 0 in slots:
                regs.add(r)
            else:
                regs.discard(r)
            slots = {s - ptr for s in slots if s >= ptr}
        elif m in ("sub", "add") and ops[0].type == X.X86_OP_REG and full_reg(cs, ops[0].reg, x64) == sp:
            d = ops[1].imm if m == "sub" else -ops[1].imm
            slots = {s + d for s in slots if s + d >= 0}
        elif m == "mov" and ops[0].type == X.X86_OP_REG and ops[1].type == X.X86_OP_REG:
            d, s = full_reg(cs, ops[0].reg, x64), full_reg(cs, ops[1].reg, x64)
            if s in regs:
                regs.add(d)
            else:
                regs.discard(d)
        elif m == "mov" and ops[0].type == X.X86_OP_MEM and ops[0].mem.base in (X.X86_REG_RSP, X.X86_REG_ESP):
            d = ops[0].mem.disp
            if ops[1].type == X.X86_OP_REG and full_reg(cs, ops[1].reg, x64) in regs:
                slots.add(d)
            else:
                slots.discard(d)
        elif m == "call":
            regs -= volatile
            slots = set()  # callee may pop (x86 stdcall); we never keep the tag on the stack across a call
        elif m == "jmp":
            op = ops[0]
            expect(op.type == X.X86_OP_IMM, f"path hits an indirect jmp at {rva:x} before the site")
            nxt = op.imm - img.base
        elif m in ("ret",):
            raise CheckError(f"path from tag {t.tag_rva:x} reaches ret before site {t.rva:x}")
        else:
            _r, written = ins.regs_access()
            for w in written:
                name = full_reg(cs, w, x64)
                if name not in ("rflags", "flags", "eflags", "rip", "eip"):
                    regs.discard(name)
            for op in ops:
                write = op.type == X.X86_OP_MEM and op.access & capstone.CS_AC_WRITE
                if write and op.mem.base in (X.X86_REG_RSP, X.X86_REG_ESP):
                    slots.discard(op.mem.disp)
        rva = nxt
    loc = tag_location(t.api, img.drv.arch)
    if x64:
        if isinstance(loc, str):
            expect(loc in regs, f"site {t.rva:x}: tag not in {loc} (have {regs})")
        else:
            expect(loc in slots, f"site {t.rva:x}: tag not at [rsp+{loc:x}] (have {slots})")
    else:
        # at the call the return address is not yet pushed: argument n is at [esp+4*(n-1)]
        expect(loc in slots, f"site {t.rva:x}: tag not at [esp+{loc:x}] (have {slots})")


def check_truth(img: Image) -> dict[str, object]:
    cs = img.cs
    drv = img.drv
    starts = {f[0] for f in drv.functions}
    kinds: dict[str, int] = collections.Counter()
    apis: dict[str, int] = collections.Counter()
    per_func: dict[int, int] = collections.Counter()
    tags = set()
    untagged = 0
    param = 0
    for t in drv.truth:
        kinds[t.kind] += 1
        apis[t.api] += 1
        per_func[t.function_rva] += 1
        expect(t.function_rva in starts, f"function_rva {t.function_rva:x} is a function entry")
        ins = img.insns.get(t.rva)
        expect(ins is not None, f"site {t.rva:x} is an instruction start")
        assert ins is not None
        expect(img.func_of[t.rva][0] == t.function_rva, f"site {t.rva:x} in its function")
        expect(ins.mnemonic in ("call", "jmp"), f"site {t.rva:x} is {ins.mnemonic}")
        op = ins.operands[0]
        if op.type == X.X86_OP_MEM:
            target = img.iat.get(img.mem_target(ins, op))  # type: ignore[arg-type]
            enc = "mem"
        elif op.type == X.X86_OP_IMM:
            target = img.thunk_target.get(op.imm - img.base)
            enc = "thunk"
        else:
            target = reg_loaded_from_iat(img, t.rva, full_reg(cs, op.reg, img.x64))
            enc = "reg"
        expect(target == t.api, f"site {t.rva:x} reaches {target}, truth says {t.api}")
        # the encodings the truth kind promises
        raw = img.bytes_at(t.rva, 3)
        if t.kind in ("rexw_ff15_nop",):
            expect(raw[:3] == b"\x48\xff\x15", f"REX.W call at {t.rva:x}")
            expect(img.bytes_at(t.rva + 7, 5) == synthdrv.NOP5, f"nop after REX.W call at {t.rva:x}")
        if t.kind == "tail_rexw_ff25":
            expect(raw[:3] == b"\x48\xff\x25", f"REX.W jmp at {t.rva:x}")
            expect(t.rva + 7 == img.func_of[t.rva][1], "tail jmp ends its function")
        if t.kind == "tail_ff25":
            expect(raw[:2] == b"\xff\x25", f"jmp at {t.rva:x}")
            expect(t.rva + 6 == img.func_of[t.rva][1], "tail jmp ends its function")
        if t.kind == "thunk":
            expect(enc == "thunk" and raw[:1] == b"\xe8", "thunk call")
        if t.kind == "cached_reg":
            expect(enc == "reg", "register call")
        if t.kind == "push_lfence":
            expect(img.bytes_at(t.rva - 3, 3) == synthdrv.LFENCE, "lfence before call")
        if t.tag is None:
            expect(t.tag_rva is None, "untagged site without tag_rva")
            if tag_location(t.api, drv.arch) is None:
                untagged += 1
            else:
                param += 1
                expect(t.kind in ("param", "param_direct"), "tag None only for untagged APIs and parameters")
            continue
        expect(len(t.tag) == 4, "tag is 4 chars")
        tags.add(t.tag)
        expect(t.tag_rva in img.insns, f"tag_rva {t.tag_rva:x} is an instruction start")
        expect(img.func_of[t.tag_rva][0] == t.function_rva, "tag in the same function")
        follow_tag(img, t)
    # cached pairs: two different tags; staged pairs: one tag instruction for two sites
    by_tag_rva: dict[int, list[synthdrv.TruthSite]] = collections.defaultdict(list)
    for t in drv.truth:
        if t.tag_rva is not None:
            by_tag_rva[t.tag_rva].append(t)
    shared = sum(1 for v in by_tag_rva.values() if len(v) > 1)
    expect(all(v[0].kind == "staged_reg" for v in by_tag_rva.values() if len(v) > 1), "only staged tags shared")
    expect(max(per_func.values()) <= 4, "at most 4 sites per function")
    return {
        "kinds": dict(sorted(kinds.items())),
        "apis": dict(sorted(apis.items())),
        "distinct_tags": len(tags),
        "untagged": untagged,
        "param_tags": param,
        "staged_shared_tag_insns": shared,
        "functions_with_sites": len(per_func),
    }


def check_no_hidden_sites(img: Image) -> dict[str, int]:
    """Every call/jmp in the functions that reaches a pool API is a truth site (no unlisted sites)."""
    truth = {t.rva for t in img.drv.truth}
    pool = set(synthdrv.POOL_IMPORTS)
    found = 0
    pool_loads = 0
    for rva, ins in img.insns.items():
        if rva not in img.func_of:
            continue  # thunks
        m = ins.mnemonic
        if m == "mov" and len(ins.operands) == 2 and ins.operands[1].type == X.X86_OP_MEM:
            if img.iat.get(img.mem_target(ins, ins.operands[1])) in pool:  # type: ignore[arg-type]
                pool_loads += 1
            continue
        if m not in ("call", "jmp"):
            continue
        op = ins.operands[0]
        if op.type == X.X86_OP_MEM:
            tgt = img.iat.get(img.mem_target(ins, op))  # type: ignore[arg-type]
        elif op.type == X.X86_OP_IMM:
            tgt = img.thunk_target.get(op.imm - img.base)
        else:
            tgt = "register"
        if tgt == "register" or tgt in pool:
            expect(rva in truth, f"pool call at {rva:x} ({tgt}) missing from the truth")
            found += 1
    expect(found == len(truth), f"every truth site found by a scan ({found} vs {len(truth)})")
    return {"pool_pointer_loads": pool_loads}


def check_one(mb: float, sites: int, seed: int, arch: str) -> None:
    t0 = time.perf_counter()
    drv = synthdrv.build_driver(int(mb * (1 << 20)), sites, seed, arch)
    dt = time.perf_counter() - t0
    label = f"{arch} {mb:.1f} MB {sites} sites seed {seed}"
    print(f"== {label}: built in {dt:.2f} s, {len(drv.data)} bytes, {len(drv.functions)} functions")
    expect(len(drv.truth) == sites, "exact site count")
    again = synthdrv.build_driver(int(mb * (1 << 20)), sites, seed, arch)
    expect(again.data == drv.data and again.truth == drv.truth, "deterministic")
    other = synthdrv.build_driver(int(mb * (1 << 20)), sites, seed + 1, arch)
    expect(other.data != drv.data, "seed changes the bytes")
    img = Image(drv)
    check_headers(img, label)
    expect(len(img.text) >= int(mb * (1 << 20)), ".text at least code_size")
    stats = disassemble_functions(img)
    if img.x64:
        stats.update(check_pdata(img))
    stats.update(check_relocs(img))
    tstats = check_truth(img)
    stats.update(check_no_hidden_sites(img))
    sizes = sorted(e - s for s, e in drv.functions)
    nf = len(sizes)
    expect(tstats["functions_with_sites"] * 2 < nf, "pool sites in a minority of functions")  # type: ignore[operator]
    small = 100.0 * sum(1 for s in sizes if s <= 600) / nf
    print(
        f"   functions: {nf}, size median {statistics.median(sizes)}, 10% {sizes[nf // 10]}, "
        f"90% {sizes[nf * 9 // 10]}, max {sizes[-1]}, <=600 B: {small:.0f}%, "
        f"sites in {tstats['functions_with_sites']} functions"
    )
    print(f"   code: {dict(stats)}")
    for k, v in tstats.items():
        if k != "functions_with_sites":
            print(f"   {k}: {v}")
    print("   OK")


def time_big(arch: str, mb: float, sites: int) -> None:
    t0 = time.perf_counter()
    drv = synthdrv.build_driver(int(mb * (1 << 20)), sites, 1, arch)
    dt = time.perf_counter() - t0
    pe = pefile.PE(data=drv.data, fast_load=True)
    text = pe.sections[0]
    cks_off = pe.OPTIONAL_HEADER.get_file_offset() + 64
    expect(synthdrv.pe_checksum(drv.data, cks_off) == pe.OPTIONAL_HEADER.CheckSum, "checksum")
    expect(text.Misc_VirtualSize >= int(mb * (1 << 20)), ".text size")
    expect(len(drv.truth) == sites, "sites")
    print(
        f"== {arch} {mb:g} MB / {sites} sites: built in {dt:.2f} s ({len(drv.data)} bytes, "
        f".text {text.Misc_VirtualSize}, {len(drv.functions)} functions)"
    )
    t1 = time.perf_counter()
    img = Image(drv)  # full pefile parse
    check_headers(img, "big " + arch)
    if img.x64:
        check_pdata(img)
    disassemble_functions(img, only={t.function_rva for t in drv.truth})
    tstats = check_truth(img)
    expect(tstats["functions_with_sites"] * 2 < len(drv.functions), "minority")  # type: ignore[operator]
    what = ", .pdata" if img.x64 else ""
    print(
        f"   full pefile parse, headers, checksum{what} and every truth site checked in "
        f"{time.perf_counter() - t1:.1f} s ({tstats['functions_with_sites']} functions disassembled)"
    )
    print("   kinds: {}".format(tstats["kinds"]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--sites", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=1, help="check this many seeds per arch")
    ap.add_argument("--no-big", action="store_true", help="skip timing the 20 MB build")
    ap.add_argument("--arch", choices=("x64", "x86", "both"), default="both")
    args = ap.parse_args()
    arches = ("x64", "x86") if args.arch == "both" else (args.arch,)
    for arch in arches:
        for seed in range(1, args.seeds + 1):
            check_one(args.mb, args.sites, seed, arch)
    if not args.no_big:
        for arch in arches:
            time_big(arch, 20, 10_000)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
