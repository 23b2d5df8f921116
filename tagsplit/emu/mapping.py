"""Lay a driver out in memory the way the kernel loader does: relocate, bind imports, optionally rewrite
import calls into the resident import-call-optimisation form, optionally discard INIT.

This produces the same bytes `.writemem` would give for a loaded driver, so the scanner's `--mapped` path, the
emulated kernel and the live-patching checks can all be exercised on real driver files.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..image import Image, Import

_ICO_CALL = re.compile(rb"\x48\xff\x15(.{4})\x0f\x1f\x44\x00\x00", re.S)


def map_image(
    image: Image,
    base: int,
    resolve: Callable[[Import], int],
    *,
    import_call_optimization: bool = False,
    discard_init: bool = False,
) -> bytes:
    """The image as resident memory at `base`; `resolve` gives each import's address."""
    mem = bytearray(image.mem)
    delta = base - image.base
    mask = (1 << (8 * image.ptr_size)) - 1
    for rva, size in zip(image.relocations, image.relocation_sizes):
        if size == 8:
            (v,) = struct.unpack_from("<Q", mem, rva)
            struct.pack_into("<Q", mem, rva, (v + delta) & mask)
        elif size == 4:
            (v,) = struct.unpack_from("<I", mem, rva)
            struct.pack_into("<I", mem, rva, (v + delta) & 0xFFFFFFFF)
    fmt = "<Q" if image.ptr_size == 8 else "<I"
    targets: dict[int, int] = {}
    for slot, imp in image.imports.items():
        targets[slot] = resolve(imp) & mask
        struct.pack_into(fmt, mem, slot, targets[slot])
    if import_call_optimization and image.arch == "x64":
        for sec in image.code_sections():
            for m in _ICO_CALL.finditer(image.mem, sec.rva, sec.end):
                rva = m.start()
                slot = rva + 7 + struct.unpack("<i", m.group(1))[0]
                if slot not in targets:
                    continue
                rel = targets[slot] - (base + rva + 12)
                if not -(1 << 31) <= rel < (1 << 31):
                    continue
                # mov r10, [rip+disp] keeps the same 7-byte length and displacement; then call rel32.
                mem[rva : rva + 12] = b"\x4c\x8b\x15" + m.group(1) + b"\xe8" + struct.pack("<i", rel)
    if discard_init:
        for sec in image.sections:
            if sec.name.upper().startswith("INIT"):
                mem[sec.rva : sec.end] = bytes(sec.size)
    if delta:
        # The loader records the new base in the resident header.
        pe_off = struct.unpack_from("<I", mem, 0x3C)[0]
        if image.ptr_size == 8:
            struct.pack_into("<Q", mem, pe_off + 24 + 24, base)
        else:
            struct.pack_into("<I", mem, pe_off + 24 + 28, base & 0xFFFFFFFF)
    return bytes(mem)
