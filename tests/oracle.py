"""An independent, slow reference: a linear capstone sweep (detail mode) over every executable section.

It knows nothing about functions or data flow; it lists each instruction that calls, jumps to or loads a pool
routine's IAT slot. The scanner must account for every one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import capstone
from capstone import x86

from tagsplit import apis

if TYPE_CHECKING:
    from tagsplit.image import Image


def iat_references(image: Image) -> list[tuple[int, str, str]]:
    """(rva, mnemonic, api) for every call/jmp/mov that references a pool routine's IAT slot."""
    slots = {}
    for slot, imp in image.imports.items():
        api = apis.lookup(imp.name)
        if api is not None and imp.dll.lower() == api.dll:
            slots[slot] = api.name
    mode = capstone.CS_MODE_64 if image.arch == "x64" else capstone.CS_MODE_32
    cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
    cs.detail = True
    out = []
    for sec in image.code_sections():
        pos = sec.rva
        while pos < sec.end:
            progressed = False
            for insn in cs.disasm(image.mem[pos : sec.end], pos):
                progressed = True
                pos = insn.address + insn.size
                if insn.mnemonic not in ("call", "jmp", "mov"):
                    continue
                for op in insn.operands:
                    if op.type != x86.X86_OP_MEM:
                        continue
                    if op.mem.base == x86.X86_REG_RIP:
                        slot = insn.address + insn.size + op.mem.disp
                    elif op.mem.base == 0 and op.mem.index == 0:
                        slot = (op.mem.disp - image.base) & 0xFFFFFFFF
                    else:
                        continue
                    if slot in slots:
                        out.append((insn.address, insn.mnemonic, slots[slot]))
            if not progressed:
                pos += 1
    return out
