#!/usr/bin/env python3
"""Run the workload exports of sample.c / wrappers.c under unicorn and check the leak truth.

    python3 tools/emulate_workloads.py [N]        (default N = 7 iterations)

Each pool import is pointed at a stub (`ret` / `ret n`) whose execution is hooked: allocations come from a bump
heap and are recorded with their tag, size and return address. After SampleWorkBalanced / WrapWorkBalanced(N)
nothing may be left; after SampleWorkLeaky / WrapWorkLeaky(N) exactly the truth's leaks (N // 3 blocks) must be.
The function a leak is reported in is the export that contains the import call's return address, which for a
tail-called import (jmp [IAT]) is the wrapper's caller.  Needs unicorn (pip install 'unicorn>=2,<3').
"""
from __future__ import annotations

import collections
import json
import struct
import sys
from pathlib import Path

import pefile
import unicorn
from unicorn import x86_const as R

HERE = Path(__file__).resolve().parent.parent
ARG_BYTES = {"ExAllocatePool": 8, "ExAllocatePoolWithTag": 12, "ExAllocatePoolWithQuotaTag": 12,
             "ExAllocatePoolWithTagPriority": 16, "ExAllocatePool2": 16, "ExAllocatePool3": 24, "ExFreePool": 4,
             "ExFreePoolWithTag": 8, "ExFreePool2": 16, "ExInitializeNPagedLookasideList": 28,
             "ExInitializePagedLookasideList": 28, "ExInitializeLookasideListEx": 32,
             "ExDeleteNPagedLookasideList": 4, "ExDeletePagedLookasideList": 4, "ExDeleteLookasideListEx": 4}
STUBS, HEAP, STACK, SENTINEL = 0x70000000, 0x20000000, 0x30000000, 0x7F000000


def display(tag):
    return (tag & 0x7FFFFFFF).to_bytes(4, "little").decode("latin-1")


def run(path: Path, export: str, n: int):
    pe = pefile.PE(str(path))
    is64 = pe.FILE_HEADER.Machine == 0x8664
    base = pe.OPTIONAL_HEADER.ImageBase
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64 if is64 else unicorn.UC_MODE_32)
    image = bytearray(pe.get_memory_mapped_image())
    size = (len(image) + 0xFFF) & ~0xFFF
    ptr = 8 if is64 else 4
    stubs = {}
    for i, (d, imp) in enumerate((d, imp) for d in pe.DIRECTORY_ENTRY_IMPORT for imp in d.imports):
        name = imp.name.decode().split("@")[0]
        addr = STUBS + 16 * i
        stubs[addr] = name
        rva = imp.address - base
        image[rva:rva + ptr] = addr.to_bytes(ptr, "little")
    uc.mem_map(base, size)
    uc.mem_write(base, bytes(image) + bytes(size - len(image)))
    uc.mem_map(STUBS, 0x10000)
    for addr, name in stubs.items():
        uc.mem_write(addr, b"\xc3" if is64 else b"\xc2" + struct.pack("<H", ARG_BYTES[name]))
    uc.mem_map(HEAP, 0x1000000)
    uc.mem_map(STACK, 0x100000)
    uc.mem_map(SENTINEL, 0x1000)
    exports = sorted((e.address + base, e.name.decode()) for e in pe.DIRECTORY_ENTRY_EXPORT.symbols)
    heap = [HEAP]
    live = {}

    def owner(va):
        best = None
        for a, nm in exports:
            if a <= va:
                best = nm
        return best

    def rd(addr):
        return int.from_bytes(uc.mem_read(addr, ptr), "little")

    def hook(uc_, address, _size, _data):
        name = stubs.get(address)
        if name is None:
            return
        sp = uc.reg_read(R.UC_X86_REG_RSP if is64 else R.UC_X86_REG_ESP)
        ret = rd(sp)
        if is64:
            args = [uc.reg_read(r) for r in (R.UC_X86_REG_RCX, R.UC_X86_REG_RDX, R.UC_X86_REG_R8, R.UC_X86_REG_R9)]
        else:
            args = [rd(sp + 4 * (k + 1)) for k in range(8)]
        result = 0
        if name.startswith("ExAllocatePool"):
            if name in ("ExAllocatePool2", "ExAllocatePool3") and not is64:
                nbytes, tag = args[2], args[3]
            else:
                nbytes, tag = args[1], (args[2] if "Tag" in name or name[-1] in "23" else None)
            result = heap[0]
            heap[0] += (nbytes + 15) & ~15
            live[result] = (name, tag, nbytes, owner(ret))
        elif name.startswith("ExFreePool"):
            blk = args[0]
            if blk not in live:
                raise RuntimeError(f"{name} of unknown block {blk:#x}")
            if name != "ExFreePool" and (args[1] & 0xFFFFFFFF) != live[blk][1]:
                raise RuntimeError(f"{name} with tag {args[1]:#x}, allocated with {live[blk][1]:#x}")
            del live[blk]
        uc.reg_write(R.UC_X86_REG_RAX if is64 else R.UC_X86_REG_EAX, result)

    uc.hook_add(unicorn.UC_HOOK_CODE, hook, begin=STUBS, end=STUBS + 0xFFFF)
    entry = dict((nm, a) for a, nm in exports)[export]
    sp = STACK + 0x80000
    if is64:
        sp -= 0x28
        uc.mem_write(sp, SENTINEL.to_bytes(8, "little"))
        uc.reg_write(R.UC_X86_REG_RCX, n)
        uc.reg_write(R.UC_X86_REG_RSP, sp)
    else:
        sp -= 8
        uc.mem_write(sp, SENTINEL.to_bytes(4, "little") + n.to_bytes(4, "little"))
        uc.reg_write(R.UC_X86_REG_ESP, sp)
    uc.emu_start(entry, SENTINEL, count=2_000_000)
    result = uc.reg_read(R.UC_X86_REG_RAX if is64 else R.UC_X86_REG_EAX) & 0xFFFFFFFF
    return result, collections.Counter((nm, display(tag), sz, fn) for nm, tag, sz, fn in live.values())


def main(argv):
    n = int(argv[0]) if argv else 7
    bad = 0
    for path in sorted((HERE / "bin").glob("*.sys")):
        truth = json.loads(path.with_suffix(".truth.json").read_text())
        for w in truth.get("workloads", []):
            ret, leaks = run(path, w["export"], n)
            want = collections.Counter()
            for lk in w["leaks"]:
                want[(lk["api"], lk["tag"], lk["size"])] += n // 3
            got = collections.Counter()
            where = set()
            for (api, tag, sz, fn), c in leaks.items():
                got[(api, tag, sz)] += c
                where.add(fn)
            ok = ret == n and got == want
            for lk in w["leaks"]:  # the import's return address is in the site's function or, after a tail call, its caller
                if not where <= {lk["function"], lk.get("caller")}:
                    ok = False
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {path.name:32} {w['export']}({n}) = {ret}; leaks: "
                  + (", ".join(f"{c} x {api} '{tag}' {sz:#x} (ret in {fn})" for (api, tag, sz, fn), c in leaks.items())
                     or "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
