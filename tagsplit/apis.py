"""The pool routines tagsplit knows, and where each one takes its tag at the moment of the call.

Positions follow the documented prototypes (windows-driver-docs-ddi) and the two calling conventions:
x64 passes arguments 1-4 in rcx, rdx, r8, r9 and the rest at [rsp+8*(n-1)] (above the 32-byte home area);
x86 NTAPI is stdcall, so at the call argument n sits at [esp+4*(n-1)] and the callee pops `arg_bytes`.
ExAllocatePool2/3 take a 64-bit POOL_FLAGS first, which on x86 occupies two stack dwords and moves the tag
one dword further than in ExAllocatePoolWithTag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# A tag location at the call instruction: a register name (x64) or a stack offset from the stack pointer.
Location = Union[str, int]

ALLOC = "alloc"
FREE = "free"
LOOKASIDE = "lookaside"


@dataclass(frozen=True)
class PoolApi:
    name: str
    role: str
    dll: str
    tag_x64: Location | None  # None: the routine takes no tag
    tag_x86: int | None
    arg_bytes_x86: int  # what the stdcall callee pops
    tagged_equivalent: str | None = None  # the tagged routine with the same other arguments
    nargs: int = 3

    @property
    def tagged(self) -> bool:
        return self.tag_x64 is not None

    def tag_location(self, arch: str) -> Location | None:
        return self.tag_x64 if arch == "x64" else self.tag_x86


_NT = "ntoskrnl.exe"

POOL_APIS: tuple[PoolApi, ...] = (
    PoolApi("ExAllocatePoolWithTag", ALLOC, _NT, "r8", 0x8, 12),
    PoolApi("ExAllocatePoolWithQuotaTag", ALLOC, _NT, "r8", 0x8, 12),
    PoolApi("ExAllocatePoolWithTagPriority", ALLOC, _NT, "r8", 0x8, 16, nargs=4),
    PoolApi("ExAllocatePool2", ALLOC, _NT, "r8", 0xC, 16),
    PoolApi("ExAllocatePool3", ALLOC, _NT, "r8", 0xC, 24, nargs=5),
    PoolApi("ExAllocatePool", ALLOC, _NT, None, None, 8, tagged_equivalent="ExAllocatePoolWithTag", nargs=2),
    PoolApi(
        "ExAllocatePoolWithQuota", ALLOC, _NT, None, None, 8, tagged_equivalent="ExAllocatePoolWithQuotaTag", nargs=2
    ),
    PoolApi("ExFreePoolWithTag", FREE, _NT, "rdx", 0x4, 8, nargs=2),
    PoolApi("ExFreePool2", FREE, _NT, "rdx", 0x4, 16, nargs=4),
    PoolApi("ExFreePool", FREE, _NT, None, None, 4, nargs=1),
    PoolApi("ExInitializeNPagedLookasideList", LOOKASIDE, _NT, 0x28, 0x14, 28, nargs=7),
    PoolApi("ExInitializePagedLookasideList", LOOKASIDE, _NT, 0x28, 0x14, 28, nargs=7),
    PoolApi("ExInitializeLookasideListEx", LOOKASIDE, _NT, 0x30, 0x18, 32, nargs=8),
    PoolApi("NdisAllocateMemoryWithTagPriority", ALLOC, "ndis.sys", "r8", 0x8, 16, nargs=4),
    PoolApi("FltAllocatePoolAlignedWithTag", ALLOC, "fltmgr.sys", "r9", 0xC, 16, nargs=4),
)

BY_NAME: dict[str, PoolApi] = {api.name: api for api in POOL_APIS}


def lookup(import_name: str) -> PoolApi | None:
    """The pool routine an import name refers to; x86 import names may carry stdcall decoration."""
    name = import_name
    if name.startswith("_"):
        name = name[1:]
    name = name.split("@", 1)[0]
    return BY_NAME.get(name)
