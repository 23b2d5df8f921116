"""Deterministic generator of large synthetic Windows kernel drivers for the tagsplit benchmarks.

``build_driver(code_size, sites, seed, arch)`` returns a :class:`SynthDriver`: the bytes of a complete PE image
(PE32+ AMD64 or PE32 i386, Subsystem NATIVE, imports from ntoskrnl.exe) whose ``.text`` holds at least
``code_size`` bytes of plausible compiled code, and the ground truth of its ``sites`` pool-allocator call sites.

How the image is made (everything is hand-encoded; there is no assembler at run time and no dependency outside
the standard library, so it runs on Python 3.9 as well):

* a library of filler snippets (straight-line code, small if/else diamonds, short loops with back edges), of
  call templates (internal calls, calls to non-pool imports through ``FF 15`` / ``48 FF 15`` + NOP / thunks) and
  of data references is encoded once per build from ``random.Random(seed)``;
* functions are laid out one after the other (16-byte aligned, ``CC`` padding) by copying library bytes and
  recording displacement fix-ups; a minority of the functions carry 1-4 pool call sites, each encoded per site
  with one of the encodings seen in shipped drivers (see ``docs/toolchains.md``);
* once ``.text`` is complete, the other sections are laid out and every fix-up is patched with
  ``struct.pack_into``; x64 gets ``.pdata`` (one RUNTIME_FUNCTION per function, some functions split into two
  ranges with a chained UNWIND_INFO) and unwind data in ``.rdata``; x86 gets a HIGHLOW relocation for every
  absolute address.

Ground truth (``TruthSite``): ``rva`` is the instruction that transfers control to the allocator (the ``E8``
call for thunk calls, the ``call reg`` for register calls, the ``jmp`` for tail calls); ``tag`` is the tag in
memory byte order decoded as latin-1 (``None`` for untagged routines and for tags that come from the
function's own parameters); ``tag_rva`` is the instruction whose immediate holds the tag; ``function_rva`` is the
entry of the function holding the site (also for sites in the second range of a split function). The two sites
of a ``staged_reg`` pair share one ``tag_rva`` (the ``mov esi, tag`` early in the function).

``TruthSite.kind`` names the encoding. x64: ``ff15`` (``mov r8d, tag`` / ``mov edx, tag`` ... ``FF 15``),
``rexw_ff15_nop`` (``48 FF 15`` + ``0F 1F 44 00 00``), ``thunk`` (``E8`` to a ``FF 25`` thunk), ``rax_call``
(``mov rax, [IAT]; call rax``), ``cached_reg`` (``mov rbx, [IAT]`` once, two ``call rbx`` with different tags),
``staged_reg`` (``mov esi, tag`` once, ``mov r8d, esi`` before two calls), ``pred_block`` (tag set before a
diamond that joins at the call), ``tail_rexw_ff25`` / ``tail_ff25`` (tag, epilogue, ``jmp [IAT]`` ending the
function), ``lookaside`` (``mov dword [rsp+28h], tag``), ``free`` (ExFreePoolWithTag, ``mov edx, tag``),
``param`` / ``param_direct`` (tag copied from one of the function's own arguments: ``tag`` is None).
x86: ``push_ff15``, ``push_lfence``, ``pushpop_idiom`` (``6A 08 5B 53`` size), ``cached_reg`` (``mov esi, [IAT]``
/ ``call esi``), ``thunk``, ``gcc_mov`` (``mov dword [esp+8], tag``), ``staged_reg`` (``push edi``),
``pred_block``, ``param`` (``push dword [ebp+8]``), ``lookaside`` (6th argument), ``free``.
ExAllocatePool (untagged, ``tag`` None) appears under ``ff15``/``rexw_ff15_nop``/``thunk``/``push_*``.

CLI: ``python benchmarks/synthdrv.py OUT.sys [--mb 20] [--sites 10000] [--seed 1] [--arch x64|x86]`` writes the
image and ``OUT.sys.truth.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["SynthDriver", "TruthSite", "build_driver", "main", "pe_checksum"]

# ---------------------------------------------------------------------------------------------------------------
# public result types


@dataclass(frozen=True)
class TruthSite:
    rva: int  # the call/jmp that invokes the allocator
    api: str
    tag: str | None  # 4 chars, memory byte order, latin-1; None: untagged API or tag from a parameter
    tag_rva: int | None  # instruction holding the tag immediate
    function_rva: int  # entry of the function holding the site
    kind: str = ""  # encoding variant (for per-encoding benchmark breakdowns)

    def to_json(self) -> dict[str, object]:
        return {
            "rva": self.rva,
            "api": self.api,
            "tag": self.tag,
            "tag_rva": self.tag_rva,
            "function_rva": self.function_rva,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class SynthDriver:
    data: bytes
    truth: tuple[TruthSite, ...]
    arch: str = "x64"
    image_base: int = 0
    # (entry rva, end rva) of every generated function, end exclusive and before the CC padding; thunks excluded
    functions: tuple[tuple[int, int], ...] = ()
    # rva of the import thunk (``jmp [IAT]``) of each thunked import
    thunks: tuple[tuple[str, int], ...] = ()

    def truth_json(self) -> dict[str, object]:
        return {
            "format": "tagsplit-synthdrv-truth/1",
            "arch": self.arch,
            "image_base": self.image_base,
            "size": len(self.data),
            "functions": len(self.functions),
            "sites": [t.to_json() for t in self.truth],
        }


# ---------------------------------------------------------------------------------------------------------------
# constants

TEXT_RVA = 0x1000
SECTION_ALIGN = 0x1000
FILE_ALIGN = 0x200
SIZEOF_HEADERS = 0x400
TIMESTAMP = 0x5E8F1C2B  # fixed: same arguments, same bytes
IMAGE_BASE_X64 = 0x140000000
IMAGE_BASE_X86 = 0x10000

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15 = range(16)
EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)

# jcc condition codes
CC_B, CC_AE, CC_E, CC_NE, CC_BE, CC_A, CC_S, CC_NS, CC_L, CC_GE, CC_LE, CC_G = 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15
_COND = (CC_B, CC_AE, CC_E, CC_NE, CC_BE, CC_A, CC_S, CC_NS, CC_L, CC_GE, CC_LE, CC_G)

# fix-up regions
R_DATA, R_STR, R_IAT = 0, 1, 2

POOL_IMPORTS = (
    "ExAllocatePoolWithTag",
    "ExAllocatePool2",
    "ExAllocatePoolWithQuotaTag",
    "ExFreePoolWithTag",
    "ExInitializeNPagedLookasideList",
    "ExAllocatePool",
)
A_TAG, A_POOL2, A_QUOTA, A_FREE, A_LOOKASIDE, A_UNTAGGED = POOL_IMPORTS

# non-pool imports: name -> (argument count, x86 convention)
_NONPOOL_X64: dict[str, tuple[int, str]] = {
    "KeQuerySystemTimePrecise": (1, "std"),
    "RtlInitUnicodeString": (2, "std"),
    "IoCreateDevice": (7, "std"),
    "KeAcquireSpinLockRaiseToDpc": (1, "std"),
    "KeReleaseSpinLock": (2, "std"),
    "IoDeleteDevice": (1, "std"),
    "IofCompleteRequest": (2, "fast"),
    "IoCreateSymbolicLink": (2, "std"),
    "KeInitializeEvent": (3, "std"),
    "KeSetEvent": (3, "std"),
    "KeWaitForSingleObject": (5, "std"),
    "ObfDereferenceObject": (1, "fast"),
    "DbgPrint": (2, "cdecl"),
    "memset": (3, "cdecl"),
    "RtlCompareMemory": (3, "std"),
    "PsGetCurrentProcessId": (0, "std"),
}
_NONPOOL_X86: dict[str, tuple[int, str]] = {
    k: v for k, v in _NONPOOL_X64.items() if k not in ("KeAcquireSpinLockRaiseToDpc", "KeReleaseSpinLock")
}
_NONPOOL_X86["KeReleaseMutex"] = (2, "std")
_NONPOOL_X86["ExAcquireResourceExclusiveLite"] = (2, "std")
_THUNKED_NONPOOL = ("DbgPrint", "memset", "KeQuerySystemTimePrecise")


# ---------------------------------------------------------------------------------------------------------------
# a tiny x86/x64 encoder (used at library-build time and for the pool sites; never per filler instance)

Mem = tuple[Optional[int], int]  # (base register or None for [rip+disp32] / [abs32], displacement)
Operand = Union[int, Mem]


def _modrm(reg: int, rm: Operand) -> tuple[bytes, int]:
    """ModRM(+SIB+disp) bytes and the REX.B bit."""
    r = (reg & 7) << 3
    if isinstance(rm, tuple):
        base, disp = rm
        if base is None:
            return bytes([0x05 | r]) + struct.pack("<I", disp & 0xFFFFFFFF), 0
        b = base & 7
        sib = b"\x24" if b == 4 else b""
        if disp == 0 and b != 5:
            return bytes([r | b]) + sib, base >> 3
        if -128 <= disp <= 127:
            return bytes([0x40 | r | b]) + sib + struct.pack("<b", disp), base >> 3
        return bytes([0x80 | r | b]) + sib + struct.pack("<i", disp), base >> 3
    return bytes([0xC0 | r | (rm & 7)]), rm >> 3


def enc(op: bytes, reg: int, rm: Operand, w: bool = False, imm: bytes = b"", pre: bytes = b"") -> bytes:
    """Encode ``pre REX op ModRM ... imm``; REX only when needed (x86 callers never pass registers >= 8)."""
    modrm, bext = _modrm(reg, rm)
    rex = 0x40 | (8 if w else 0) | (4 if reg >= 8 else 0) | (1 if bext else 0)
    return pre + (bytes([rex]) if rex != 0x40 else b"") + op + modrm + imm


def i8(v: int) -> bytes:
    return struct.pack("<b", v)


def i32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def mov_r32_imm(r: int, v: int) -> bytes:
    return (b"\x41" if r >= 8 else b"") + bytes([0xB8 + (r & 7)]) + i32(v)


def mov_rr(dst: int, src: int, w: bool) -> bytes:
    return enc(b"\x8b", dst, src, w)


def push_r(r: int) -> bytes:
    return (b"\x41" if r >= 8 else b"") + bytes([0x50 + (r & 7)])


def pop_r(r: int) -> bytes:
    return (b"\x41" if r >= 8 else b"") + bytes([0x58 + (r & 7)])


def call_r(r: int) -> bytes:
    return (b"\x41" if r >= 8 else b"") + bytes([0xFF, 0xD0 + (r & 7)])


def push_imm(v: int) -> bytes:
    return b"\x6a" + i8(v) if -128 <= v <= 127 else b"\x68" + i32(v)


NOP5 = b"\x0f\x1f\x44\x00\x00"
LFENCE = b"\x0f\xae\xe8"


def pe_checksum(data: bytes | bytearray, checksum_offset: int) -> int:
    """The PE image checksum (what pefile's generate_checksum computes), fast: one C-level sum over 16-bit words."""
    buf = bytearray(data)
    if len(buf) % 2:
        buf.append(0)
    buf[checksum_offset : checksum_offset + 4] = b"\0\0\0\0"
    words = array("H")
    words.frombytes(bytes(buf))
    if sys.byteorder != "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(data)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# tags


def _tag_pool(n: int = 200) -> list[bytes]:
    """~200 printable 4-character tags (memory order), fixed for every seed so truths of different seeds compare."""
    rng = random.Random(0x7A65)
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lower = "abcdefghijklmnopqrstuvwxyz"
    digits = "0123456789"
    prefixes = ["Sy", "Nt", "Fl", "Vd", "Dr", "Io", "Mm", "Cc", "Ks", "Tg", "Np", "Wf", "Ob", "Hv", "Px", "Qm"]
    out: list[bytes] = []
    seen = set()
    while len(out) < n:
        r = rng.random()
        if r < 0.55:
            t = rng.choice(prefixes) + rng.choice(upper + lower) + rng.choice(lower + digits + upper)
        elif r < 0.75:
            t = rng.choice(upper) + rng.choice(lower) + rng.choice(lower) + " "
        elif r < 0.9:
            t = "".join(rng.choice(upper + digits) for _ in range(4))
        else:
            t = "".join(rng.choice(upper + lower + digits + "_-.") for _ in range(4))
        b = t.encode("latin-1")
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


TAGS: tuple[bytes, ...] = tuple(_tag_pool())


# ---------------------------------------------------------------------------------------------------------------
# library of encoded snippets


class _Lib:
    """Snippets encoded once per build. Filler writes only volatile registers and memory."""

    def __init__(self, rng: random.Random, x64: bool, imports: Sequence[str], nonpool: dict[str, tuple[int, str]]):
        self.rng = rng
        self.x64 = x64
        self.slot = {name: i for i, name in enumerate(imports)}
        self.ptr = 8 if x64 else 4
        self.thunk_names = list(POOL_IMPORTS) + [n for n in _THUNKED_NONPOOL if n in nonpool]
        self.thunk_index = {n: i for i, n in enumerate(self.thunk_names)}
        if x64:
            self.vol = [RAX, RCX, RDX, R8, R9, R10, R11]
            self.saved = [RBX, RBP, RSI, RDI, R12, R13, R14, R15]
            # frame classes: 0: N >= 0x28, 1: N >= 0x38, 2: N >= 0x68  (locals are [rsp+20h .. N-8])
            self.local_disps = [[0x20], [0x20, 0x28, 0x30], [0x20 + 8 * i for i in range(9)]]
        else:
            self.vol = [EAX, ECX, EDX]
            self.saved = [EBX, ESI, EDI]
            self.local_disps = [[-4 * i for i in range(1, 9)]] * 3  # x86 frames always have >= 0x20 of locals
        self.ptr_disps = [0, 4, 8, 0xC, 0x10, 0x18, 0x20, 0x28, 0x30, 0x40, 0x48, 0x60, 0x88, 0x100, 0x1A0]
        self.filler: list[list[bytes]] = []
        per_class: list[list[bytes]] = []
        for cls in range(3):
            mems = self._mems(cls, None)
            per_class.append([self._filler(mems) for _ in range(500 if cls == 0 else 300)])
        self.filler = [per_class[0], per_class[0] + per_class[1], per_class[0] + per_class[1] + per_class[2]]
        if not x64:
            self.filler = [self.filler[2]] * 3
        self.ptr_filler: dict[int, list[bytes]] = {}
        for r in self.saved:
            mems = self._mems(0, r)
            self.ptr_filler[r] = [self._filler(mems, ptr_only=True) for _ in range(120)]
        self.nonpool = nonpool
        self._build_calls()
        self._build_data_refs()

    # -- operands
    def _mems(self, cls: int, extra: int | None) -> list[tuple[int, list[int]]]:
        if self.x64:
            mems = [(RSP, self.local_disps[cls])] * 3 + [(r, self.ptr_disps) for r in (RAX, RCX, RDX, R8, R9, R10)]
        else:
            mems = [(EBP, self.local_disps[0])] * 3 + [(EBP, [8, 0xC, 0x10])]
            mems += [(r, self.ptr_disps) for r in (EAX, ECX, EDX)]
        if extra is not None:
            mems = mems + [(extra, self.ptr_disps)] * 4
        return mems

    # -- filler
    def _insn(self, mems: list[tuple[int, list[int]]], flags_only: bool = False) -> bytes:
        rng = self.rng
        x64 = self.x64
        vol = self.vol
        d = rng.choice(vol)
        s = rng.choice(vol)
        w = x64 and rng.random() < 0.45

        def mem() -> Mem:
            base, disps = rng.choice(mems)
            return (base, rng.choice(disps))

        if flags_only:
            r = rng.random()
            if r < 0.35:
                return enc(b"\x85", s, d, w)  # test
            if r < 0.6:
                return enc(b"\x83", 7, d, w, i8(rng.choice([0, 1, 2, 4, 8, 0x10, 0x20, -1])))  # cmp r, imm8
            if r < 0.75:
                return enc(b"\x3b", d, s, w)  # cmp r, r
            if r < 0.87:
                return enc(b"\xf6", 0, mem(), False, bytes([rng.choice([1, 2, 4, 8, 0x10, 0x80])]))  # test byte [m]
            return enc(b"\x83", 7, mem(), rng.random() < 0.3 and x64, i8(rng.choice([0, 1, 2, 3, -1])))
        r = rng.random()
        if r < 0.16:
            return enc(b"\x8b", d, mem(), w)
        if r < 0.28:
            return enc(b"\x89", s, mem(), w)
        if r < 0.35:
            return enc(b"\x8b", d, s, w)
        if r < 0.41:
            return enc(b"\x8d", d, mem(), x64)
        if r < 0.50:
            return enc(bytes([rng.choice([0x03, 0x0B, 0x23, 0x2B, 0x33, 0x3B])]), d, s, w)
        if r < 0.58:
            return enc(b"\x83", rng.choice([0, 1, 4, 5, 6, 7]), d, w, i8(rng.randint(-16, 64)))
        if r < 0.61:
            return enc(
                b"\x81",
                rng.choice([0, 1, 4, 5, 7]),
                d,
                w,
                i32(rng.choice([0x1000, 0xFFFF, 0x7FFFFFFF, 0x3FF, 0xFFFFF000])),
            )
        if r < 0.66:
            return mov_r32_imm(d, rng.choice([0, 1, 2, 0x10, 0x100, 0x104, 0xC0000001, 0xC000009A, 0x80000005]))
        if r < 0.69:
            return enc(b"\x33", d, d)
        if r < 0.73:
            return enc(rng.choice([b"\x0f\xb6", b"\x0f\xb7"]), d, mem(), False)
        if r < 0.76:
            return enc(b"\xc1", rng.choice([4, 5, 7]), d, w, bytes([rng.randint(1, 31)]))
        if r < 0.78:
            return enc(b"\x6b", d, s, w, i8(rng.choice([3, 5, 12, 24, 0x28, 0x38])))
        if r < 0.80:
            return enc(b"\xff", rng.choice([0, 1]), d, w)
        if r < 0.84:
            return enc(b"\xc7", 0, mem(), w, i32(rng.choice([0, 1, 0x10, 0x103, 0xFFFFFFFF])))
        if r < 0.86:
            return enc(b"\x83", rng.choice([0, 1, 4, 5]), mem(), w, i8(rng.randint(-4, 32)))
        if r < 0.89:
            return enc(bytes([0x0F, 0x40 + rng.choice(_COND)]), d, s, w)  # cmovcc
        if r < 0.91:
            return enc(bytes([0x0F, 0x90 + rng.choice(_COND)]), 0, rng.choice([0, 1, 2]))  # setcc al/cl/dl
        if r < 0.94 and x64:
            x = rng.randint(0, 3)
            if rng.random() < 0.3:
                return enc(b"\x0f\x57", x, x)  # xorps
            return enc(rng.choice([b"\x0f\x10", b"\x0f\x11"]), x, mem())  # movups
        if r < 0.96:
            return enc(b"\x0f\xc1", s, mem(), w, pre=b"\xf0")  # lock xadd
        if r < 0.98:
            return enc(b"\xff", rng.choice([0, 1]), mem(), False, pre=b"\xf0")  # lock inc/dec dword
        return enc(bytes([rng.choice([0x85, 0x3B])]), d, s, w)

    def _block(self, mems: list[tuple[int, list[int]]]) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return self._insn(mems)
        if r < 0.78:  # if (cond) { body }
            cond = self._insn(mems, flags_only=True)
            body = b"".join(self._insn(mems) for _ in range(rng.randint(1, 4)))
            return cond + bytes([0x70 + rng.choice(_COND), len(body)]) + body
        if r < 0.9:  # if (cond) { a } else { b }
            cond = self._insn(mems, flags_only=True)
            a = b"".join(self._insn(mems) for _ in range(rng.randint(1, 3)))
            b = b"".join(self._insn(mems) for _ in range(rng.randint(1, 3)))
            a += b"\xeb" + bytes([len(b)])
            return cond + bytes([0x70 + rng.choice(_COND), len(a)]) + a + b
        # do { body } while (cond): back edge
        body = b"".join(self._insn(mems) for _ in range(rng.randint(1, 4)))
        step = self._insn(mems, flags_only=True)
        loop = body + step
        return loop + bytes([0x70 + rng.choice(_COND)]) + i8(-(len(loop) + 2))

    def _filler(self, mems: list[tuple[int, list[int]]], ptr_only: bool = False) -> bytes:
        rng = self.rng
        n = rng.randint(2, 5) if not ptr_only else rng.randint(1, 3)
        return b"".join(self._block(mems) for _ in range(n))

    # -- calls
    def _x64_arg(self, reg: int, cls: int) -> bytes:
        rng = self.rng
        r = rng.random()
        w = reg in (RCX, RDX) or rng.random() < 0.5
        if r < 0.25:
            return enc(b"\x8d", reg, (RSP, rng.choice(self.local_disps[cls])), True)
        if r < 0.45:
            return mov_rr(reg, rng.choice([RAX, R10, R11]), w)
        if r < 0.6:
            return enc(b"\x33", reg, reg)
        if r < 0.75:
            return enc(b"\x8b", reg, (RSP, rng.choice(self.local_disps[cls])), w)
        return mov_r32_imm(reg, rng.choice([0, 1, 2, 4, 0x10, 0x22, 0x100, 0x1000]))

    def _x86_push_arg(self) -> tuple[bytes, int | None]:
        """One pushed argument; returns (bytes, offset of an abs32 string pointer or None)."""
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return push_imm(rng.choice([0, 1, 2, 4, 0x10, 0x100, 0x1000])), None
        if r < 0.45:
            return push_r(rng.choice([EAX, ECX, EDX])), None
        if r < 0.65:
            return enc(b"\xff", 6, (EBP, rng.choice([8, 0xC, 0x10])), False), None  # push dword [ebp+x]
        if r < 0.85:
            return enc(b"\x8d", EAX, (EBP, rng.choice(self.local_disps[0])), False) + push_r(EAX), None
        return b"\x68\0\0\0\0", 1

    def _build_calls(self) -> None:
        rng = self.rng
        x64 = self.x64
        # internal calls: x64 -> lists per frame class of (bytes, rel32 offset); x86 -> lists per argc
        self.icall: list[list[tuple[bytes, int]]] = []
        if x64:
            for cls in range(3):
                lst = []
                for _ in range(160):
                    regs = [RCX, RDX, R8, R9][: rng.choice([0, 1, 1, 2, 2, 3, 4])]
                    rng.shuffle(regs)
                    setup = b"".join(self._x64_arg(r, cls) for r in regs)
                    post = rng.choice(
                        [
                            b"",
                            b"",
                            enc(b"\x8b", rng.choice([RCX, RDX, R8]), RAX, True),
                            b"\x85\xc0",
                            enc(b"\x89", RAX, (RSP, rng.choice(self.local_disps[cls])), False),
                        ]
                    )
                    lst.append((setup + b"\xe8\0\0\0\0" + post, len(setup) + 1))
                self.icall.append(lst if cls == 0 else self.icall[0] + lst)
        else:
            for argc in range(4):
                lst = []
                for _ in range(80):
                    setup = b""
                    for _a in range(argc):
                        b, _abs = self._x86_push_arg()
                        if _abs is not None:
                            b = push_r(EAX)
                        setup += b
                    post = rng.choice(
                        [b"", b"", b"\x85\xc0", enc(b"\x89", EAX, (EBP, rng.choice(self.local_disps[0])))]
                    )
                    lst.append((setup + b"\xe8\0\0\0\0" + post, len(setup) + 1))
                self.icall.append(lst)
        # non-pool import calls: per frame class, list of (bytes, fixes) where fixes are
        #   x64: (offset, end_delta, region, value) rip fix-ups, ('T', offset, thunk) thunk call fix-ups
        #   x86: (offset, region, value) abs32 fix-ups, ('T', offset, thunk)
        self.xcall: list[list[tuple[bytes, tuple[tuple[Any, ...], ...]]]] = [[], [], []]
        for name, (argc, conv) in self.nonpool.items():
            for _v in range(10):
                form = rng.random()
                thunk = name in _THUNKED_NONPOOL and form < 0.3
                if x64:
                    need = 1 if argc > 5 else 0
                    for cls in range(3):
                        if cls < need:
                            continue
                        regs = [RCX, RDX, R8, R9][: min(argc, 4)]
                        rng.shuffle(regs)
                        setup = b""
                        fixes: list[tuple[Any, ...]] = []
                        for r in regs:
                            if r in (RCX, RDX) and rng.random() < 0.2:
                                fixes.append((len(setup) + 3, 4, R_STR, rng.randrange(self.nstr) * 64))
                                setup += enc(b"\x8d", r, (None, 0), True)  # lea reg, [rip+string]
                            else:
                                setup += self._x64_arg(r, max(cls, 0))
                        for k in range(4, argc):
                            setup += enc(
                                b"\xc7", 0, (RSP, 0x20 + 8 * (k - 4)), rng.random() < 0.5, i32(rng.choice([0, 1, 0x22]))
                            )
                        if thunk:
                            call = b"\xe8\0\0\0\0"
                            fixes.append(("T", len(setup) + 1, self.thunk_index[name]))
                        elif form < 0.75:
                            call = b"\xff\x15\0\0\0\0"
                            fixes.append((len(setup) + 2, 4, R_IAT, self.slot[name] * 8))
                        else:
                            call = b"\x48\xff\x15\0\0\0\0" + NOP5
                            fixes.append((len(setup) + 3, 4, R_IAT, self.slot[name] * 8))
                        self.xcall[cls].append((setup + call, tuple(fixes)))
                else:
                    setup = b""
                    fixes = []
                    npush = argc if conv != "fast" else 0
                    for _a in range(npush):
                        b, absoff = self._x86_push_arg()
                        if absoff is not None:
                            fixes.append((len(setup) + absoff, R_STR, rng.randrange(self.nstr) * 64))
                        setup += b
                    if conv == "fast":
                        setup += enc(b"\x8b", ECX, (EBP, rng.choice([8, 0xC])))
                        if argc > 1:
                            setup += rng.choice([b"\x32\xd2", b"\x8b\xd0", b"\x33\xd2"])  # xor dl,dl / mov edx,eax
                    if thunk:
                        call = b"\xe8\0\0\0\0"
                        fixes.append(("T", len(setup) + 1, self.thunk_index[name]))
                    elif form < 0.85:
                        call = b"\xff\x15\0\0\0\0"
                        fixes.append((len(setup) + 2, R_IAT, self.slot[name] * 4))
                    else:
                        call = LFENCE + b"\xff\x15\0\0\0\0"
                        fixes.append((len(setup) + 5, R_IAT, self.slot[name] * 4))
                    post = b"\x83\xc4" + bytes([4 * argc]) if conv == "cdecl" and argc else b""
                    self.xcall[0].append((setup + call + post, tuple(fixes)))
        if x64:
            self.xcall[1] = self.xcall[0] + self.xcall[1]
            self.xcall[2] = self.xcall[1] + self.xcall[2]
        else:
            self.xcall = [self.xcall[0]] * 3

    nstr = 48  # strings in .rdata, 64 bytes apart
    nglobals = 0x200  # dword slots in .data

    def _build_data_refs(self) -> None:
        rng = self.rng
        self.dref: list[tuple[bytes, tuple[tuple[Any, ...], ...]]] = []
        for _ in range(400):
            g = rng.randrange(self.nglobals) * 4
            s = rng.randrange(self.nstr) * 64
            r = rng.random()
            fx: tuple[int | None, int, int, int]
            if self.x64:
                if r < 0.25:
                    b, fx = enc(b"\x8d", rng.choice([RCX, RDX, R8]), (None, 0), True), (None, 4, R_STR, s)
                elif r < 0.45:
                    b, fx = (
                        enc(b"\x8b", rng.choice([RAX, RCX, RDX]), (None, 0), rng.random() < 0.4),
                        (None, 4, R_DATA, g),
                    )
                elif r < 0.6:
                    b, fx = enc(b"\x89", rng.choice([RAX, RCX, RDX]), (None, 0)), (None, 4, R_DATA, g)
                elif r < 0.75:
                    b, fx = enc(b"\x80", 7, (None, 0), False, b"\x00"), (None, 5, R_DATA, g)  # cmp byte [rip], 0
                elif r < 0.87:
                    b, fx = enc(b"\xff", 0, (None, 0), False, pre=b"\xf0"), (None, 4, R_DATA, g)  # lock inc
                else:
                    b, fx = enc(b"\x8d", rng.choice([RCX, RAX]), (None, 0), True), (None, 4, R_DATA, g)
                # offset of the disp32: it is followed by end_delta - 4 immediate bytes
                off = len(b) - fx[1]
                self.dref.append((b, ((off, fx[1], fx[2], fx[3]),)))
            else:
                if r < 0.25:
                    b, off, reg, val = b"\x68" + i32(0), 1, R_STR, s  # push offset string
                elif r < 0.45:
                    b, off, reg, val = b"\xa1" + i32(0), 1, R_DATA, g  # mov eax, [abs]
                elif r < 0.6:
                    b, off, reg, val = b"\xa3" + i32(0), 1, R_DATA, g  # mov [abs], eax
                elif r < 0.75:
                    b, off, reg, val = b"\x83\x3d" + i32(0) + b"\x00", 2, R_DATA, g  # cmp dword [abs], 0
                elif r < 0.87:
                    b, off, reg, val = b"\xf0\xff\x05" + i32(0), 3, R_DATA, g  # lock inc dword [abs]
                else:
                    b, off, reg, val = bytes([0xB8 + rng.choice([ECX, EDX])]) + i32(0), 1, R_DATA, g  # mov r, offset
                if b[0] == 0x68:
                    b = b + b"\x59"  # pop ecx: keep the stack balanced
                self.dref.append((b, ((off, reg, val),)))


# ---------------------------------------------------------------------------------------------------------------
# x64 prologue / epilogue / unwind


def _x64_prologue(pushes: tuple[int, ...], frame: int) -> tuple[bytes, bytes, bytes]:
    """(prologue bytes, epilogue bytes without ret, UNWIND_INFO bytes)."""
    pro = b""
    codes: list[tuple[int, int, int, int | None]] = []
    for r in pushes:
        pro += push_r(r)
        codes.append((len(pro), 0, r, None))  # UWOP_PUSH_NONVOL
    if frame <= 0x78:
        pro += b"\x48\x83\xec" + bytes([frame])
    else:
        pro += b"\x48\x81\xec" + i32(frame)
    if frame <= 128:
        codes.append((len(pro), 2, frame // 8 - 1, None))  # UWOP_ALLOC_SMALL
    else:
        codes.append((len(pro), 1, 0, frame // 8))  # UWOP_ALLOC_LARGE, size/8 in the next slot
    slots: list[int] = []
    for off, op, info, extra in reversed(codes):
        slots.append(off | ((op | (info << 4)) << 8))
        if extra is not None:
            slots.append(extra)
    count = len(slots)
    if count % 2:
        slots.append(0)
    unwind = struct.pack("<BBBB", 1, len(pro), count, 0) + struct.pack(f"<{len(slots)}H", *slots)
    epi = (b"\x48\x83\xc4" + bytes([frame])) if frame <= 0x78 else (b"\x48\x81\xc4" + i32(frame))
    for r in reversed(pushes):
        epi += pop_r(r)
    return pro, epi, unwind


def _x86_prologue(pushes: tuple[int, ...], frame: int, argc: int, leave: bool) -> tuple[bytes, bytes]:
    pro = b"\x55\x8b\xec" + ((b"\x83\xec" + bytes([frame])) if frame < 0x80 else (b"\x81\xec" + i32(frame)))
    for r in pushes:
        pro += push_r(r)
    epi = b"".join(pop_r(r) for r in reversed(pushes))
    epi += b"\xc9" if leave else b"\x8b\xe5\x5d"
    epi += (b"\xc2" + struct.pack("<H", 4 * argc)) if argc else b"\xc3"
    return pro, epi


def _x86_argc(i: int) -> int:
    if i == 0:
        return 2  # DriverEntry(DriverObject, RegistryPath)
    return ((i * 2654435761) >> 13) & 3


# ---------------------------------------------------------------------------------------------------------------
# the generator


class _Site:
    """One pool site being encoded: bytes plus fix-ups relative to its start."""

    __slots__ = ("api", "b", "call_off", "epi", "fix", "kind", "tag", "tag_off")

    def __init__(self, api: str, tag: bytes | None, kind: str):
        self.b = bytearray()
        self.fix: list[tuple[Any, ...]] = []
        self.call_off = -1
        self.tag_off: int | None = None  # start of the tag instruction, relative to the site
        self.api = api
        self.tag = tag
        self.kind = kind
        self.epi: list[int] = []  # rel32 offsets to patch with the epilogue


class _Builder:
    def __init__(self, code_size: int, sites: int, seed: int, arch: str):
        if arch not in ("x64", "x86"):
            raise ValueError("arch must be 'x64' or 'x86'")
        if code_size < 0 or sites < 0:
            raise ValueError("code_size and sites must be >= 0")
        self.x64 = arch == "x64"
        self.arch = arch
        self.code_size = code_size
        self.nsites = sites
        self.rng = random.Random(seed * 1000003 + (1 if self.x64 else 2))
        self.nonpool = _NONPOOL_X64 if self.x64 else _NONPOOL_X86
        self.imports = sorted(list(POOL_IMPORTS) + list(self.nonpool))
        self.lib = _Lib(self.rng, self.x64, self.imports, self.nonpool)
        self.slot = self.lib.slot
        self.text = bytearray()
        self.rip_fix: list[tuple[int, int, int, int]] = []  # (pos of disp32, end delta, region, value)
        self.abs_fix: list[tuple[int, int, int]] = []  # (pos of abs32, region, value)
        self.call_fix: list[tuple[int, int]] = []  # (pos of rel32, function index)
        self.thunk_fix: list[tuple[int, int]] = []  # (pos of rel32, thunk index)
        self.funcs: list[tuple[int, int, int, bytes]] = []  # (start, end, split or 0, unwind info)
        self.truth: list[tuple[int, str, bytes | None, int | None, int, str]] = []
        self.prologues: dict[tuple[tuple[int, ...], int], tuple[bytes, bytes, bytes]] = {}
        wsum = 0.0
        self.tag_cum: list[float] = []
        for i in range(len(TAGS)):
            wsum += 1.0 / (i + 1) ** 0.8
            self.tag_cum.append(wsum)

    # -- helpers
    def pick_tag(self) -> bytes:
        x = self.rng.random() * self.tag_cum[-1]
        lo, hi = 0, len(self.tag_cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tag_cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return TAGS[lo]

    def pick_alloc_api(self, untagged_ok: bool = True) -> str:
        r = self.rng.random()
        if r < 0.52:
            return A_TAG
        if r < 0.80:
            return A_POOL2
        if r < 0.93 or not untagged_ok:
            return A_QUOTA
        return A_UNTAGGED

    # -- driver
    def build(self) -> SynthDriver:
        rng = self.rng
        plan: list[int] = []
        left = self.nsites
        while left > 0:
            k = min(left, rng.choice((1, 1, 1, 2, 2, 2, 3, 3, 4)))
            plan.append(k)
            left -= k
        plan.reverse()  # popped from the end
        emitted_bytes_plain = 0
        emitted_plain = 0
        while True:
            cur = len(self.text)
            rem = self.code_size - cur
            if not plan and rem <= 0 and self.funcs:
                break
            if rem <= 0:
                pool_k = plan.pop() if plan else 0
            elif plan:
                avg = emitted_bytes_plain / emitted_plain if emitted_plain else 280.0
                expected_funcs = rem / avg
                p = len(plan) / max(expected_funcs, float(len(plan)))
                pool_k = plan.pop() if rng.random() < p else 0
            else:
                pool_k = 0
            before = len(self.text)
            if self.x64:
                self.function_x64(pool_k)
            else:
                self.function_x86(pool_k)
            if not pool_k:
                emitted_plain += 1
                emitted_bytes_plain += len(self.text) - before
        return self.finish()

    # =============================================================================================================
    # x64 functions

    def function_x64(self, pool_k: int) -> None:
        rng = self.rng
        rnd = rng.random
        lib = self.lib
        text = self.text
        idx = len(self.funcs)
        start = len(text)

        # ---- which pool sites, and the callee-saved registers they need
        kinds: list[str] = []
        left = pool_k
        while left:
            r = rnd()
            if r < 0.27:
                k = "ff15"
            elif r < 0.39:
                k = "rexw_ff15_nop"
            elif r < 0.46:
                k = "thunk"
            elif r < 0.50:
                k = "rax_call"
            elif r < 0.55:
                k = "lookaside"
            elif r < 0.61:
                k = "tail"
            elif r < 0.69:
                k = "cached_reg"
            elif r < 0.76:
                k = "staged_reg"
            elif r < 0.83:
                k = "pred_block"
            elif r < 0.90:
                k = "param"
            elif r < 0.94:
                k = "param_direct"
            else:
                k = "free"
            if k in ("cached_reg", "staged_reg") and left < 2:
                continue
            if k == "tail" and "tail" in kinds:
                continue
            if k == "param_direct" and "param_direct" in kinds:
                continue
            kinds.append(k)
            left -= 2 if k in ("cached_reg", "staged_reg") else 1
        # param_direct first, tail last
        if "param_direct" in kinds:
            kinds.remove("param_direct")
            kinds.insert(0, "param_direct")
        if "tail" in kinds:
            kinds.remove("tail")
            kinds.append("tail")
        tail = bool(kinds) and kinds[-1] == "tail"

        saved = list(lib.saved)
        rng.shuffle(saved)
        reserved: dict[int, int] = {}  # kinds index -> register
        for i, k in enumerate(kinds):
            if k in ("cached_reg", "staged_reg", "param"):
                reserved[i] = saved.pop()
        nptr = 0 if rnd() < 0.35 else (1 if rnd() < 0.7 else 2)
        ptr_regs = [saved.pop() for _ in range(min(nptr, len(saved)))]
        extra = rng.choice((0, 0, 0, 1, 1, 2)) if not pool_k else rng.choice((0, 0, 1))
        extra_regs = [saved.pop() for _ in range(min(extra, len(saved)))]
        pushset = set(reserved.values()) | set(ptr_regs) | set(extra_regs)
        pushes = tuple(r for r in (RBP, RBX, RSI, RDI, R12, R13, R14, R15) if r in pushset)

        # ---- frame
        r = rnd()
        if r < 0.45:
            locals_ = 8
        elif r < 0.7:
            locals_ = 0x18
        elif r < 0.85:
            locals_ = 0x48
        elif r < 0.95:
            locals_ = 0x68
        elif r < 0.99:
            locals_ = 0xD8
        else:
            locals_ = 0x1E8
        frame = 0x20 + locals_
        if "lookaside" in kinds and frame < 0x38:
            frame = 0x38
        if (8 + 8 * len(pushes) + frame) % 16:
            frame += 8
        cls = 2 if frame >= 0x68 else (1 if frame >= 0x38 else 0)
        key = (pushes, frame)
        pe = self.prologues.get(key)
        if pe is None:
            pe = self.prologues[key] = _x64_prologue(pushes, frame)
        pro, epi_body, unwind = pe

        # ---- size target
        r = rnd()
        if pool_k:
            target = 120 + pool_k * 70 + int(rng.lognormvariate(5.0, 0.6))
        elif r < 0.015:
            target = rng.randint(2500, 24000)
        else:
            target = int(rng.lognormvariate(5.25, 0.62))
            target = 40 if target < 40 else (650 if target > 650 else target)
        end_target = start + target

        text += pro
        # arguments saved in callee-saved registers (pointer parameters)
        argregs = [RCX, RDX, R8, R9]
        for i, pr in enumerate(ptr_regs):
            text += mov_rr(pr, argregs[i + 1 if "param_direct" in kinds else i], True)

        epi_fix: list[int] = []
        boundaries: list[int] = []
        fill = lib.filler[cls]
        pfill = lib.ptr_filler[ptr_regs[0]] if ptr_regs else None
        icall = lib.icall[cls]
        xcall = lib.xcall[cls]
        dref = lib.dref
        rip_fix = self.rip_fix
        thunk_fix = self.thunk_fix
        call_fix = self.call_fix

        # ---- sites, and their preludes (cached import pointers, staged tags, saved tag parameters)
        site_objs: list[_Site] = []
        for i, k in enumerate(kinds):
            reg = reserved.get(i)
            s1 = self.site_x64(k, reg, ptr_regs, pushes, epi_body, tail)
            site_objs.append(s1)
            if k in ("cached_reg", "staged_reg"):
                site_objs.append(self.site_x64(k, reg, ptr_regs, pushes, epi_body, tail, same=s1))
            if k == "cached_reg":
                assert reg is not None
                p = len(text)
                text += enc(b"\x8b", reg, (None, 0), True)  # mov reg, [rip+IAT]
                rip_fix.append((p + 3, 4, R_IAT, self.slot[s1.api] * 8))
            elif k == "staged_reg":
                assert reg is not None
                assert s1.tag is not None
                p = len(text)
                text += mov_r32_imm(reg, int.from_bytes(s1.tag, "little"))  # mov esi, tag
                s1.tag_off = p  # absolute .text position, shared by both sites
                site_objs[-1].tag_off = p
            elif k == "param":
                assert reg is not None
                text += mov_rr(reg, rng.choice(argregs), False)  # mov edi, ecx (a parameter)

        nsites = len(site_objs) - (1 if tail else 0)
        body_len = max(end_target - len(text), 16)
        thresholds = [len(text) + body_len * (j + 0.3 * rnd()) // max(nsites, 1) for j in range(nsites)]
        if kinds and kinds[0] == "param_direct":
            thresholds[0] = 0
        next_site = 0

        while True:
            pos = len(text)
            if next_site < nsites and pos >= thresholds[next_site]:
                boundaries.append(pos)
                self.place_site(site_objs[next_site], start, epi_fix)
                next_site += 1
                continue
            if pos >= end_target and next_site >= nsites:
                break
            boundaries.append(pos)
            r = rnd()
            if r < 0.58:
                text += fill[int(rnd() * len(fill))]
            elif r < 0.66:
                if pfill is not None:
                    text += pfill[int(rnd() * len(pfill))]
                else:
                    text += fill[int(rnd() * len(fill))]
            elif r < 0.77:
                if idx:
                    b, off = icall[int(rnd() * len(icall))]
                    p = len(text)
                    text += b
                    t = idx - 1 - int(rnd() * rnd() * 3000)
                    if rnd() < 0.3:
                        t = idx + 1 + int(rnd() * 2000)  # forward call, resolved modulo the function count
                    call_fix.append((p + off, t))
            elif r < 0.84:
                b, fixes = xcall[int(rnd() * len(xcall))]
                p = len(text)
                text += b
                for f in fixes:
                    if f[0] == "T":
                        thunk_fix.append((p + f[1], f[2]))
                    else:
                        rip_fix.append((p + f[0], f[1], f[2], f[3]))
            elif r < 0.9:
                b, fixes = dref[int(rnd() * len(dref))]
                p = len(text)
                text += b
                f = fixes[0]
                rip_fix.append((p + f[0], f[1], f[2], f[3]))
            elif r < 0.93:
                if not tail:
                    text += rng.choice((b"\x85\xc0\x0f\x88", b"\x48\x85\xc0\x0f\x84", b"\x85\xc0\x0f\x85"))
                    epi_fix.append(len(text))
                    text += b"\0\0\0\0"
            elif r < 0.97:
                # if (cond) { several snippets } with a rel32 forward branch
                text += rng.choice((b"\x85\xc0", b"\x48\x85\xc0", b"\x83\xf8\x01", b"\x3b\xc1"))
                text += bytes((0x0F, 0x80 + rng.choice(_COND)))
                p = len(text)
                text += b"\0\0\0\0"
                for _ in range(rng.randint(1, 3) if end_target - pos < 1500 else rng.randint(4, 40)):
                    text += fill[int(rnd() * len(fill))]
                struct.pack_into("<i", text, p, len(text) - (p + 4))
            else:
                # counted loop over several snippets, counter in [rsp+20h]
                text += b"\x83\x64\x24\x20\x00"  # and dword [rsp+20h], 0
                top = len(text)
                for _ in range(rng.randint(1, 3) if end_target - pos < 1500 else rng.randint(4, 40)):
                    text += fill[int(rnd() * len(fill))]
                text += b"\xff\x44\x24\x20\x83\x7c\x24\x20" + bytes([rng.choice((4, 8, 0x10, 0x20, 0x40))])
                rel = top - (len(text) + 2)
                if rel >= -128:
                    text += b"\x7c" + i8(rel)
                else:
                    text += b"\x0f\x8c" + struct.pack("<i", top - (len(text) + 6))

        # ---- epilogue
        if tail:
            boundaries.append(len(text))
            self.place_site(site_objs[-1], start, epi_fix)
            end = len(text)
        else:
            if rnd() < 0.5:
                text += rng.choice(
                    (b"\x33\xc0", b"\x8b\xc3" if RBX in pushes else b"\x33\xc0", b"\xb8\x01\x00\x00\xc0")
                )
            epi = len(text)
            for p in epi_fix:
                struct.pack_into("<i", text, p, epi - (p + 4))
            text += epi_body
            text += b"\xc3"
            end = len(text)
        pad = -end & 15
        if pad:
            text += b"\xcc" * pad

        # ---- split into two .pdata ranges (chained unwind) now and then
        split = 0
        if end - start >= 160 and rnd() < 0.06:
            mid = start + (end - start) // 2
            cand = [b for b in boundaries if b >= mid and b > start + len(pro) and b < end]
            if cand:
                split = cand[0]
        self.funcs.append((start, end, split, unwind))

    def place_site(self, s: _Site, fstart: int, epi_fix: list[int]) -> None:
        text = self.text
        p = len(text)
        text += s.b
        for f in s.fix:
            if f[0] == "T":
                self.thunk_fix.append((p + f[1], f[2]))
            elif f[0] == "A":
                self.abs_fix.append((p + f[1], f[2], f[3]))
            else:
                self.rip_fix.append((p + f[0], f[1], f[2], f[3]))
        for e in s.epi:
            epi_fix.append(p + e)
        tag_pos: int | None
        if s.tag_off is None:
            tag_pos = None
        elif s.kind == "staged_reg":
            tag_pos = s.tag_off  # the prelude instruction, already absolute
        else:
            tag_pos = p + s.tag_off
        tag = s.tag
        if tag_pos is None:
            tag = None
        self.truth.append((p + s.call_off, s.api, tag, tag_pos, fstart, s.kind))

    def site_x64(
        self,
        kind: str,
        reg: int | None,
        ptr_regs: list[int],
        pushes: tuple[int, ...],
        epi_body: bytes,
        tail_fn: bool,
        same: _Site | None = None,
    ) -> _Site:
        rng = self.rng
        rnd = rng.random
        if same is not None:
            api = same.api
        elif kind == "lookaside":
            api = A_LOOKASIDE
        elif kind == "free":
            api = A_FREE
        elif kind in ("ff15", "rexw_ff15_nop", "thunk", "rax_call", "tail", "cached_reg", "staged_reg", "param"):
            api = A_FREE if rnd() < 0.2 else self.pick_alloc_api(untagged_ok=kind in ("ff15", "rexw_ff15_nop", "thunk"))
            if kind == "param" and api == A_UNTAGGED:
                api = A_TAG
        else:  # pred_block, param_direct
            api = self.pick_alloc_api(untagged_ok=False)
        tag = self.pick_tag() if api != A_UNTAGGED else None
        if same is not None and kind == "staged_reg":
            tag = same.tag
        elif same is not None:
            while tag == same.tag:
                tag = self.pick_tag()
        s = _Site(api, tag, kind)
        timm = int.from_bytes(tag, "little") if tag else 0
        b = s.b

        # argument set-up parts: (bytes, is_tag_instruction)
        parts: list[tuple[bytes, bool]] = []
        if api == A_LOOKASIDE:
            parts.append((rng.choice((b"\x83\x64\x24\x30\x00", b"\x66\xc7\x44\x24\x30\x00\x00")), False))  # Depth
            parts.append((b"\xc7\x44\x24\x28" + i32(timm), True))  # Tag: 6th argument
            parts.append((b"\x48\xc7\x44\x24\x20" + i32(rng.choice((0x40, 0x58, 0x80, 0x100, 0x210))), False))
            parts.append((b"\x45\x33\xc9", False))  # Flags
            parts.append((b"\x45\x33\xc0", False))  # Free
            parts.append((b"\x33\xd2", False))  # Allocate
            rng.shuffle(parts)
            lea = enc(b"\x8d", RCX, (None, 0), True)  # lea rcx, [rip+lookaside]
            parts.append((lea, False))
        elif api == A_FREE:
            if ptr_regs and rnd() < 0.6:
                src = mov_rr(RCX, rng.choice(ptr_regs), True)
            else:
                src = rng.choice((mov_rr(RCX, RAX, True), enc(b"\x8b", RCX, (RSP, 0x20), True)))
            if kind in ("staged_reg", "param"):
                assert reg is not None
                tpart = mov_rr(RDX, reg, False)
            else:
                tpart = b"\xba" + i32(timm)
            parts = [(src, False), (tpart, True)]
            if rnd() < 0.4:
                parts.reverse()
        else:
            if api == A_POOL2:
                t = rng.choice((0x40, 0x40, 0x100, 0x42, 0x102))
            else:
                t = rng.choice((0, 1, 0x200, 0x200, 0x201))
            tp = b"\x33\xc9" if t == 0 else b"\xb9" + i32(t)
            if kind == "param_direct":
                parts = [(tp, False)]  # size comes in rdx (argument 2), tag from ecx / r9d
            else:
                r = rnd()
                if r < 0.7:
                    sp = b"\xba" + i32(
                        rng.choice(
                            (
                                0x10,
                                0x18,
                                0x20,
                                0x28,
                                0x30,
                                0x40,
                                0x48,
                                0x60,
                                0x80,
                                0x100,
                                0x200,
                                0x400,
                                0x1000,
                                0x2000,
                                8 * rng.randint(3, 300),
                            )
                        )
                    )
                elif r < 0.85:
                    sp = b"\x8b\xd0"  # mov edx, eax
                else:
                    sp = b"\x8d\x50" + bytes([rng.choice((0x10, 0x18, 0x20, 0x30))])  # lea edx, [rax+n]
                parts = [(tp, False), (sp, False)]
                if api != A_UNTAGGED:
                    if kind in ("staged_reg", "param"):
                        assert reg is not None
                        parts.append((mov_rr(R8, reg, False), True))
                    elif kind != "pred_block":
                        parts.append((b"\x41\xb8" + i32(timm), True))
                r = rnd()
                if r < 0.5 or kind == "pred_block":
                    pass  # tag last (MSVC's usual order)
                elif r < 0.75:
                    parts.insert(0, parts.pop())  # tag first
                else:
                    rng.shuffle(parts)

        def emit_parts() -> None:
            for pb, is_tag in parts:
                if is_tag:
                    s.tag_off = len(b)
                b.extend(pb)
            if api == A_LOOKASIDE:
                s.fix.append((len(b) - 4, 4, R_DATA, 0x1000 + 0x80 * rng.randrange(8)))

        if kind == "param_direct":
            src_reg = rng.choice((RCX, R9))
            b.extend(mov_rr(R8, src_reg, False))
            if api == A_UNTAGGED:
                raise AssertionError
            emit_parts()
            s.tag_off = None
        elif kind == "pred_block":
            s.tag_off = 0
            b.extend(b"\x41\xb8" + i32(timm))
            b.extend(rng.choice((b"\x85\xc0", b"\x48\x85\xc0", b"\x83\xf8\x02", b"\x85\xc9")))
            a = b"\xba" + i32(rng.choice((0x20, 0x40, 0x100)))
            c = b"\xba" + i32(rng.choice((0x80, 0x200, 0x1000)))
            a += b"\xeb" + bytes([len(c)])
            b.extend(bytes((0x70 + rng.choice(_COND), len(a))))
            b.extend(a)
            b.extend(c)
            for pb, _t in parts:
                if pb[:1] != b"\xba" and pb[:2] != b"\x8b\xd0" and pb[:2] != b"\x8d\x50":
                    b.extend(pb)  # the type; the size was set on both branches
        else:
            emit_parts()
        if kind == "param":
            s.tag_off = None

        # the call
        if kind == "tail":
            b.extend(epi_body)
            s.call_off = len(b)
            if rnd() < 0.7:
                b.extend(b"\x48\xff\x25\0\0\0\0")
                s.fix.append((len(b) - 4, 4, R_IAT, self.slot[api] * 8))
                s.kind = "tail_rexw_ff25"
            else:
                b.extend(b"\xff\x25\0\0\0\0")
                s.fix.append((len(b) - 4, 4, R_IAT, self.slot[api] * 8))
                s.kind = "tail_ff25"
            return s
        if kind == "cached_reg":
            assert reg is not None
            s.call_off = len(b)
            b.extend(call_r(reg))
        elif kind == "thunk":
            s.call_off = len(b)
            b.extend(b"\xe8\0\0\0\0")
            s.fix.append(("T", len(b) - 4, self.lib.thunk_index[api]))
        elif kind == "rax_call":
            b.extend(b"\x48\x8b\x05\0\0\0\0")
            s.fix.append((len(b) - 4, 4, R_IAT, self.slot[api] * 8))
            s.call_off = len(b)
            b.extend(b"\xff\xd0")
        elif kind == "rexw_ff15_nop" or (kind in ("lookaside", "param") and rnd() < 0.3):
            s.call_off = len(b)
            b.extend(b"\x48\xff\x15\0\0\0\0")
            s.fix.append((len(b) - 4, 4, R_IAT, self.slot[api] * 8))
            b.extend(NOP5)
        else:
            s.call_off = len(b)
            b.extend(b"\xff\x15\0\0\0\0")
            s.fix.append((len(b) - 4, 4, R_IAT, self.slot[api] * 8))
        # after the call
        if api != A_FREE and api != A_LOOKASIDE and not tail_fn:
            r = rnd()
            if r < 0.5:
                b.extend(b"\x48\x85\xc0\x0f\x84\0\0\0\0")  # test rax, rax / je epilogue
                s.epi.append(len(b) - 4)
            elif r < 0.8:
                b.extend(enc(b"\x89", RAX, (RSP, 0x20), True))
        return s

    # =============================================================================================================
    # x86 functions

    def function_x86(self, pool_k: int) -> None:
        rng = self.rng
        rnd = rng.random
        lib = self.lib
        text = self.text
        idx = len(self.funcs)
        start = len(text)
        argc = _x86_argc(idx)

        kinds: list[str] = []
        left = pool_k
        while left:
            r = rnd()
            if r < 0.30:
                k = "push_ff15"
            elif r < 0.38:
                k = "push_lfence"
            elif r < 0.46:
                k = "pushpop_idiom"
            elif r < 0.56:
                k = "cached_reg"
            elif r < 0.63:
                k = "thunk"
            elif r < 0.70:
                k = "gcc_mov"
            elif r < 0.77:
                k = "staged_reg"
            elif r < 0.83:
                k = "pred_block"
            elif r < 0.90:
                k = "param"
            elif r < 0.95:
                k = "lookaside"
            else:
                k = "free"
            if k in ("cached_reg", "staged_reg") and left < 2:
                continue
            kinds.append(k)
            left -= 2 if k in ("cached_reg", "staged_reg") else 1
        saved = list(lib.saved)
        rng.shuffle(saved)
        reserved: dict[int, int] = {}
        for i, k in enumerate(kinds):
            if k in ("cached_reg", "staged_reg"):
                if saved:
                    reserved[i] = saved.pop()
                else:
                    kinds[i] = "push_ff15_pair"  # out of registers: two plain sites
        ptr_regs = [saved.pop()] if saved and rnd() < 0.6 else []
        free_regs = list(saved)  # pushed, usable by the push/pop size idiom
        pushes: tuple[int, ...]
        if pool_k:
            pushes = (EBX, ESI, EDI)
        else:
            n = rng.choice((0, 1, 1, 2, 3, 3))
            pushset = set(ptr_regs) | set(saved[:n])
            pushes = tuple(r for r in (EBX, ESI, EDI) if r in pushset)
        frame = rng.choice((0x20, 0x20, 0x24, 0x28, 0x30, 0x40, 0x58, 0x80, 0x10C, 0x208))
        pro, epi_body = _x86_prologue(pushes, frame, argc, rnd() < 0.2)

        r = rnd()
        if pool_k:
            target = 110 + pool_k * 60 + int(rng.lognormvariate(4.9, 0.6))
        elif r < 0.015:
            target = rng.randint(2000, 20000)
        else:
            target = int(rng.lognormvariate(5.05, 0.62))
            target = 36 if target < 36 else (600 if target > 600 else target)
        end_target = start + target

        text += pro
        for i, pr in enumerate(ptr_regs):
            text += enc(b"\x8b", pr, (EBP, 8 + 4 * i))  # mov reg, [ebp+8]

        epi_fix: list[int] = []
        fill = lib.filler[0]
        pfill = lib.ptr_filler[ptr_regs[0]] if ptr_regs else None
        icall = lib.icall
        xcall = lib.xcall[0]
        dref = lib.dref
        abs_fix = self.abs_fix
        thunk_fix = self.thunk_fix
        call_fix = self.call_fix

        site_objs: list[_Site] = []
        expanded: list[str] = []
        for i, k in enumerate(kinds):
            if k == "push_ff15_pair":
                site_objs.append(self.site_x86("push_ff15", None, ptr_regs, free_regs))
                site_objs.append(self.site_x86("push_ff15", None, ptr_regs, free_regs))
                expanded += ["push_ff15", "push_ff15"]
            elif k in ("cached_reg", "staged_reg"):
                s1 = self.site_x86(k, reserved[i], ptr_regs, free_regs)
                s2 = self.site_x86(k, reserved[i], ptr_regs, free_regs, same_api=s1)
                site_objs += [s1, s2]
                expanded += [k, k]
                if k == "cached_reg":
                    p = len(text)
                    text += enc(b"\x8b", reserved[i], (None, 0))  # mov reg, [IAT]
                    abs_fix.append((p + 2, R_IAT, self.slot[s1.api] * 4))
                else:
                    assert s1.tag is not None
                    p = len(text)
                    text += mov_r32_imm(reserved[i], int.from_bytes(s1.tag, "little"))
                    s1.tag_off = p
                    s2.tag_off = p
            else:
                site_objs.append(self.site_x86(k, None, ptr_regs, free_regs))
                expanded.append(k)
        nsites = len(site_objs)
        body_len = max(end_target - len(text), 16)
        thresholds = [len(text) + body_len * (j + 0.3 * rnd()) // max(nsites, 1) for j in range(nsites)]
        next_site = 0

        while True:
            pos = len(text)
            if next_site < nsites and pos >= thresholds[next_site]:
                self.place_site(site_objs[next_site], start, epi_fix)
                next_site += 1
                continue
            if pos >= end_target and next_site >= nsites:
                break
            r = rnd()
            if r < 0.58:
                text += fill[int(rnd() * len(fill))]
            elif r < 0.66:
                if pfill is not None:
                    text += pfill[int(rnd() * len(pfill))]
                else:
                    text += fill[int(rnd() * len(fill))]
            elif r < 0.77:
                if idx:
                    t = idx - 1 - int(rnd() * rnd() * 3000)
                    if t < 0:
                        t = int(rnd() * idx)
                    lst = icall[_x86_argc(t)]
                    b, off = lst[int(rnd() * len(lst))]
                    p = len(text)
                    text += b
                    call_fix.append((p + off, t))
            elif r < 0.84:
                b, fixes = xcall[int(rnd() * len(xcall))]
                p = len(text)
                text += b
                for f in fixes:
                    if f[0] == "T":
                        thunk_fix.append((p + f[1], f[2]))
                    else:
                        abs_fix.append((p + f[0], f[1], f[2]))
            elif r < 0.9:
                b, fixes = dref[int(rnd() * len(dref))]
                p = len(text)
                text += b
                f = fixes[0]
                abs_fix.append((p + f[0], f[1], f[2]))
            elif r < 0.93:
                text += rng.choice((b"\x85\xc0\x0f\x88", b"\x85\xc0\x0f\x84", b"\x85\xc0\x0f\x85"))
                epi_fix.append(len(text))
                text += b"\0\0\0\0"
            elif r < 0.97:
                text += rng.choice((b"\x85\xc0", b"\x83\xf8\x01", b"\x3b\xc1", b"\x83\x7d\x08\x00"))
                text += bytes((0x0F, 0x80 + rng.choice(_COND)))
                p = len(text)
                text += b"\0\0\0\0"
                for _ in range(rng.randint(1, 3) if end_target - pos < 1500 else rng.randint(4, 40)):
                    text += fill[int(rnd() * len(fill))]
                struct.pack_into("<i", text, p, len(text) - (p + 4))
            else:
                text += b"\x83\x65\xfc\x00"  # and dword [ebp-4], 0
                top = len(text)
                for _ in range(rng.randint(1, 3) if end_target - pos < 1500 else rng.randint(4, 40)):
                    text += fill[int(rnd() * len(fill))]
                text += b"\xff\x45\xfc\x83\x7d\xfc" + bytes([rng.choice((4, 8, 0x10, 0x20, 0x40))])
                rel = top - (len(text) + 2)
                if rel >= -128:
                    text += b"\x7c" + i8(rel)
                else:
                    text += b"\x0f\x8c" + struct.pack("<i", top - (len(text) + 6))
        if rnd() < 0.5:
            text += rng.choice((b"\x33\xc0", b"\xb8\x01\x00\x00\xc0", b"\x8b\x45\xf8"))
        epi = len(text)
        for p in epi_fix:
            struct.pack_into("<i", text, p, epi - (p + 4))
        text += epi_body
        end = len(text)
        pad = -end & 15
        if pad:
            text += b"\xcc" * pad
        self.funcs.append((start, end, 0, b""))

    def site_x86(
        self, kind: str, reg: int | None, ptr_regs: list[int], free_regs: list[int], same_api: _Site | None = None
    ) -> _Site:
        rng = self.rng
        rnd = rng.random
        if same_api is not None:
            api = same_api.api
        elif kind == "lookaside":
            api = A_LOOKASIDE
        elif kind == "free":
            api = A_FREE
        elif kind in ("pred_block", "pushpop_idiom"):
            api = self.pick_alloc_api(untagged_ok=False)
        else:
            api = (
                A_FREE
                if rnd() < 0.18
                else self.pick_alloc_api(untagged_ok=kind in ("push_ff15", "thunk", "push_lfence"))
            )
            if kind in ("staged_reg", "param") and api == A_UNTAGGED:
                api = A_TAG
        if kind == "staged_reg" and same_api is not None:
            tag: bytes | None = same_api.tag
        else:
            tag = self.pick_tag() if api != A_UNTAGGED else None
            if kind == "cached_reg" and same_api is not None:
                while tag == same_api.tag:
                    tag = self.pick_tag()
        s = _Site(api, tag, kind)
        timm = int.from_bytes(tag, "little") if tag else 0
        b = s.b

        def size_push() -> bytes:
            if kind == "pushpop_idiom":
                v = rng.choice((8, 0x10, 0x18, 0x20, 0x28, 0x30, 0x40, 0x58, 0x78))
            else:
                v = rng.choice((0x10, 0x18, 0x20, 0x30, 0x40, 0x58, 0x100, 0x200, 0x1000, 8 * rng.randint(3, 300)))
            if kind == "pushpop_idiom":
                r = free_regs[0] if free_regs else ECX
                return push_imm(v) + pop_r(r) + push_r(r)  # 6A 08 5B 53
            if rnd() < 0.15:
                return push_r(EAX)
            return push_imm(v)

        # pushes in push order; each (bytes, is_tag)
        pushes: list[tuple[bytes, bool]] = []
        if kind == "staged_reg":
            assert reg is not None
            tagpush = push_r(reg)
        elif kind == "param":
            tagpush = rng.choice(
                (enc(b"\xff", 6, (EBP, 8)), enc(b"\xff", 6, (EBP, 0xC)), enc(b"\x8b", EAX, (EBP, 8)) + push_r(EAX))
            )
        else:
            tagpush = b"\x68" + i32(timm)
        if api == A_LOOKASIDE:
            pushes = [
                (b"\x6a\x00", False),
                (tagpush, True),
                (push_imm(rng.choice((0x40, 0x58, 0x100))), False),
                (b"\x6a\x00", False),
                (b"\x6a\x00", False),
                (b"\x6a\x00", False),
            ]
        elif api == A_FREE:
            src = (
                push_r(rng.choice(ptr_regs))
                if ptr_regs and rnd() < 0.6
                else rng.choice((push_r(EAX), enc(b"\xff", 6, (EBP, -8))))
            )
            pushes = [(tagpush, True), (src, False)]
        else:
            if api == A_POOL2:
                t = rng.choice((0x40, 0x40, 0x100, 0x42))
                typ = [(b"\x6a\x00", False), (push_imm(t), False)]
            else:
                t = rng.choice((0, 1, 0x200, 0x200))
                typ = [(push_imm(t), False)]
            if api == A_UNTAGGED:
                pushes = [(size_push(), False), *typ]
            else:
                pushes = [(tagpush, True), (size_push(), False), *typ]

        if kind == "gcc_mov":
            nargs = {A_TAG: 3, A_QUOTA: 3, A_POOL2: 4, A_FREE: 2, A_UNTAGGED: 2}[api]
            b.extend(b"\x83\xec" + bytes([4 * nargs]))  # sub esp, n  (the callee pops it)
            movs: list[tuple[bytes, bool]] = []
            # slot k (from esp) holds argument k+1
            vals: list[tuple[int, bytes, bool]] = []
            if api == A_FREE:
                vals = [(0, b"", False), (4, i32(timm), True)]
            elif api == A_POOL2:
                vals = [(0, i32(0x40), False), (4, i32(0), False), (8, i32(0x100), False), (0xC, i32(timm), True)]
            elif api == A_UNTAGGED:
                vals = [(0, i32(1), False), (4, i32(0x80), False)]
            else:
                vals = [(0, i32(rng.choice((0, 1, 0x200))), False), (4, i32(0x40), False), (8, i32(timm), True)]
            for off, imm, is_tag in vals:
                if not imm:
                    movs.append((enc(b"\x89", EAX, (ESP, off)), False))
                else:
                    movs.append((enc(b"\xc7", 0, (ESP, off), False, imm), is_tag))
            rng.shuffle(movs)
            for mb, is_tag in movs:
                if is_tag:
                    s.tag_off = len(b)
                b.extend(mb)
        elif kind == "pred_block":
            # push tag; cond; jcc L1; push A; jmp L2; L1: push B; L2: remaining pushes; call
            tb, _t = pushes[0]
            s.tag_off = len(b)
            b.extend(tb)
            b.extend(rng.choice((b"\x85\xc0", b"\x83\x7d\x08\x00", b"\x85\xc9")))
            a = b"\x68" + i32(rng.choice((0x20, 0x40, 0x100)))
            c = b"\x68" + i32(rng.choice((0x80, 0x200, 0x1000)))
            a += b"\xeb" + bytes([len(c)])
            b.extend(bytes((0x70 + rng.choice(_COND), len(a))))
            b.extend(a)
            b.extend(c)
            for pb, _t in pushes[2:]:
                b.extend(pb)
        else:
            for pb, is_tag in pushes:
                if is_tag:
                    s.tag_off = len(b)
                b.extend(pb)
        if api == A_LOOKASIDE:
            b.extend(b"\x68\0\0\0\0")  # push offset lookaside
            s.fix.append(("A", len(b) - 4, R_DATA, 0x1000 + 0x80 * rng.randrange(8)))
        # the call
        if kind == "cached_reg":
            assert reg is not None
            s.call_off = len(b)
            b.extend(call_r(reg))
        elif kind == "thunk":
            s.call_off = len(b)
            b.extend(b"\xe8\0\0\0\0")
            s.fix.append(("T", len(b) - 4, self.lib.thunk_index[api]))
        else:
            if kind == "push_lfence":
                b.extend(LFENCE)
            s.call_off = len(b)
            b.extend(b"\xff\x15\0\0\0\0")
            s.fix.append(("A", len(b) - 4, R_IAT, self.slot[api] * 4))
        if kind == "param":
            s.tag_off = None
        if api not in (A_FREE, A_LOOKASIDE):
            r = rnd()
            if r < 0.45:
                b.extend(b"\x85\xc0\x0f\x84\0\0\0\0")
                s.epi.append(len(b) - 4)
            elif r < 0.8:
                b.extend(b"\x89\x45\xf8")  # mov [ebp-8], eax
        return s

    # =============================================================================================================
    # layout

    def finish(self) -> SynthDriver:
        x64 = self.x64
        text = self.text
        lib = self.lib
        ptr = 8 if x64 else 4
        image_base = IMAGE_BASE_X64 if x64 else IMAGE_BASE_X86
        nfunc = len(self.funcs)

        # ---- import thunks at the end of .text
        while len(text) % 16:
            text += b"\xcc"
        thunk_start = len(text)
        thunk_abs: list[tuple[int, int]] = []
        thunk_rip: list[tuple[int, int]] = []
        for name in lib.thunk_names:
            p = len(text)
            text += b"\xff\x25\0\0\0\0\x90\x90"
            if x64:
                thunk_rip.append((p + 2, self.slot[name]))
            else:
                thunk_abs.append((p + 2, self.slot[name]))
        text_vsize = len(text)

        # ---- .rdata: IAT, strings, import directory, ILT, hint/names, DLL name, unwind infos
        rdata_rva = TEXT_RVA + _align(text_vsize, SECTION_ALIGN)
        rdata = bytearray()
        nimp = len(self.imports)
        iat_off = 0
        rdata += b"\0" * ((nimp + 1) * ptr)
        while len(rdata) % 16:
            rdata += b"\0"
        str_off = len(rdata)
        srng = random.Random(99)
        for i in range(lib.nstr):
            if i % 3 == 0:
                s = f"\\Device\\Synth{i:02d}".encode("utf-16-le")
            elif i % 3 == 1:
                s = f"\\DosDevices\\Synth{i:02d}".encode("utf-16-le")
            else:
                what = srng.choice(("Init", "Read", "Close", "Ioctl"))
                s = f"synth!{what}: status %08x ({i})\n".encode()
            rdata += s[:62].ljust(64, b"\0")
        imp_dir_off = len(rdata)
        rdata += b"\0" * 40
        ilt_off = len(rdata)
        rdata += b"\0" * ((nimp + 1) * ptr)
        hint_offs = []
        for i, name in enumerate(self.imports):
            hint_offs.append(len(rdata))
            rdata += struct.pack("<H", (0x100 + 37 * i) % 0x900) + name.encode() + b"\0"
            if len(rdata) % 2:
                rdata += b"\0"
        dll_off = len(rdata)
        rdata += b"ntoskrnl.exe\0"
        while len(rdata) % 8:
            rdata += b"\0"
        for i in range(nimp):
            v = rdata_rva + hint_offs[i]
            struct.pack_into("<Q" if x64 else "<I", rdata, iat_off + i * ptr, v)
            struct.pack_into("<Q" if x64 else "<I", rdata, ilt_off + i * ptr, v)
        struct.pack_into(
            "<IIIII", rdata, imp_dir_off, rdata_rva + ilt_off, 0, 0, rdata_rva + dll_off, rdata_rva + iat_off
        )
        pdata = bytearray()
        if x64:
            unwind_rva: dict[bytes, int] = {}
            entries: list[tuple[int, int, int]] = []
            for start, end, split, info in self.funcs:
                u = unwind_rva.get(info)
                if u is None:
                    u = unwind_rva[info] = rdata_rva + len(rdata)
                    rdata += info
                    while len(rdata) % 4:
                        rdata += b"\0"
                if split:
                    entries.append((TEXT_RVA + start, TEXT_RVA + split, u))
                    chained_rva = rdata_rva + len(rdata)
                    rdata += struct.pack("<BBBB", 1 | (4 << 3), 0, 0, 0)
                    rdata += struct.pack("<III", TEXT_RVA + start, TEXT_RVA + split, u)
                    entries.append((TEXT_RVA + split, TEXT_RVA + end, chained_rva))
                else:
                    entries.append((TEXT_RVA + start, TEXT_RVA + end, u))
            pd = array("I")
            for e in entries:
                pd.extend(e)
            if sys.byteorder != "little":
                pd.byteswap()
            pdata = bytearray(pd.tobytes())
        rdata_vsize = len(rdata)

        # ---- .data: security cookie, a dispatch table of function pointers, globals
        data_rva = rdata_rva + _align(rdata_vsize, SECTION_ALIGN)
        data = bytearray(0x40 + 0x20 * ptr)
        if x64:
            struct.pack_into("<QQ", data, 0, 0x00002B992DDFA232, 0xFFFFD466D2205DCD)
        else:
            struct.pack_into("<II", data, 0, 0xBB40E64E, 0x44BF19B1)
        table_off = 0x40
        drng = random.Random(nfunc)
        data_relocs: list[int] = []
        for i in range(0x20):
            f = self.funcs[drng.randrange(nfunc)][0] if nfunc else 0
            if x64:
                struct.pack_into("<Q", data, table_off + 8 * i, image_base + TEXT_RVA + f)
            else:
                struct.pack_into("<I", data, table_off + 4 * i, image_base + TEXT_RVA + f)
            data_relocs.append(data_rva + table_off + ptr * i)
        globals_off = len(data)
        data += bytes(drng.getrandbits(8) if drng.random() < 0.1 else 0 for _ in range(lib.nglobals * 4))
        data_vsize = len(data) + 0x2000  # plus zero-initialised tail (lookaside lists, bss)

        regions = {R_DATA: data_rva + globals_off, R_STR: rdata_rva + str_off, R_IAT: rdata_rva + iat_off}
        # ---- patch .text
        func_starts = [f[0] for f in self.funcs]
        pack_into = struct.pack_into
        for pos, t in self.call_fix:
            if t >= nfunc or t < 0:
                t %= nfunc
            pack_into("<i", text, pos, func_starts[t] - (pos + 4))
        for pos, ti in self.thunk_fix:
            pack_into("<i", text, pos, thunk_start + 8 * ti - (pos + 4))
        relocs: list[int] = []
        if x64:
            base = TEXT_RVA
            for pos, ed, reg, val in self.rip_fix:
                pack_into("<i", text, pos, regions[reg] + val - (base + pos + ed))
            for pos, slot in thunk_rip:
                pack_into("<i", text, pos, regions[R_IAT] + slot * 8 - (base + pos + 4))
        else:
            ib = image_base
            for pos, reg, val in self.abs_fix:
                pack_into("<I", text, pos, ib + regions[reg] + val)
                relocs.append(TEXT_RVA + pos)
            for pos, slot in thunk_abs:
                pack_into("<I", text, pos, ib + regions[R_IAT] + slot * 4)
                relocs.append(TEXT_RVA + pos)
        relocs.extend(data_relocs)
        relocs.sort()

        # ---- .pdata / .reloc placement
        sections: list[tuple[bytes, bytes, int, int]] = []  # (name, raw, vsize, characteristics)
        sections.append((b".text", bytes(text), text_vsize, 0x60000020))
        sections.append((b".rdata", bytes(rdata), rdata_vsize, 0x40000040))
        sections.append((b".data", bytes(data), data_vsize, 0xC0000040))
        next_rva = data_rva + _align(data_vsize, SECTION_ALIGN)
        pdata_rva = 0
        if x64:
            pdata_rva = next_rva
            sections.append((b".pdata", bytes(pdata), len(pdata), 0x40000040))
            next_rva += _align(len(pdata), SECTION_ALIGN)
        reloc_rva = next_rva
        reloc = _build_relocs(relocs, 10 if x64 else 3)
        sections.append((b".reloc", reloc, len(reloc), 0x42000040))

        # ---- headers
        nsec = len(sections)
        opt_size = 0xF0 if x64 else 0xE0
        e_lfanew = 0x80
        hdr = bytearray(SIZEOF_HEADERS)
        dos = struct.pack(
            "<2sHHHHHHHHHHHHH8sHH20sI",
            b"MZ",
            0x90,
            3,
            0,
            4,
            0,
            0xFFFF,
            0,
            0xB8,
            0,
            0,
            0,
            0x40,
            0,
            b"\0" * 8,
            0,
            0,
            b"\0" * 20,
            e_lfanew,
        )
        hdr[0 : len(dos)] = dos
        stub = b"\x0e\x1f\xba\x0e\x00\xb4\x09\xcd\x21\xb8\x01\x4c\xcd\x21This program cannot be run in DOS mode.\r\r\n$"
        hdr[0x40 : 0x40 + len(stub)] = stub
        off = e_lfanew
        hdr[off : off + 4] = b"PE\0\0"
        machine = 0x8664 if x64 else 0x14C
        characteristics = 0x22 if x64 else 0x102
        struct.pack_into("<HHIIIHH", hdr, off + 4, machine, nsec, TIMESTAMP, 0, 0, opt_size, characteristics)
        opt = off + 24

        # raw layout
        file_off = SIZEOF_HEADERS
        rva = TEXT_RVA
        layout = []
        for sname, raw, vsize, ch in sections:
            rawsize = _align(len(raw), FILE_ALIGN)
            layout.append((sname, raw, vsize, ch, rva, file_off, rawsize))
            file_off += rawsize
            rva += _align(vsize, SECTION_ALIGN)
        size_of_image = rva
        size_code = sum(lt[6] for lt in layout if lt[3] & 0x20)
        size_idata = sum(lt[6] for lt in layout if lt[3] & 0x40)
        entry = TEXT_RVA + (self.funcs[0][0] if nfunc else thunk_start)
        dirs = [(0, 0)] * 16
        dirs[1] = (rdata_rva + imp_dir_off, 40)
        if x64:
            dirs[3] = (pdata_rva, len(pdata))
        dirs[5] = (reloc_rva, len(reloc))
        dirs[12] = (rdata_rva + iat_off, (nimp + 1) * ptr)
        if x64:
            struct.pack_into("<HBBIIIII", hdr, opt, 0x20B, 14, 29, size_code, size_idata, 0, entry, TEXT_RVA)
            struct.pack_into(
                "<QIIHHHHHHIIIIHHQQQQII",
                hdr,
                opt + 24,
                image_base,
                SECTION_ALIGN,
                FILE_ALIGN,
                10,
                0,
                10,
                0,
                10,
                0,
                0,
                size_of_image,
                SIZEOF_HEADERS,
                0,
                1,
                0x0160,
                0x40000,
                0x1000,
                0x100000,
                0x1000,
                0,
                16,
            )
            dd = opt + 112
        else:
            struct.pack_into(
                "<HBBIIIIII", hdr, opt, 0x10B, 14, 29, size_code, size_idata, 0, entry, TEXT_RVA, rdata_rva
            )
            struct.pack_into(
                "<IIIHHHHHHIIIIHHIIIIII",
                hdr,
                opt + 28,
                image_base,
                SECTION_ALIGN,
                FILE_ALIGN,
                10,
                0,
                10,
                0,
                10,
                0,
                0,
                size_of_image,
                SIZEOF_HEADERS,
                0,
                1,
                0x0140,
                0x40000,
                0x1000,
                0x100000,
                0x1000,
                0,
                16,
            )
            dd = opt + 96
        for i, (a, sz) in enumerate(dirs):
            struct.pack_into("<II", hdr, dd + 8 * i, a, sz)
        sh = opt + opt_size
        for sname, _raw, vsize, ch, srva, foff, rawsize in layout:
            struct.pack_into("<8sIIIIIIHHI", hdr, sh, sname, vsize, srva, rawsize, foff, 0, 0, 0, 0, ch)
            sh += 40
        assert sh <= SIZEOF_HEADERS

        out = bytearray(hdr)
        for _name, raw, _vsize, _ch, _srva, foff, rawsize in layout:
            assert len(out) == foff
            out += raw
            out += b"\0" * (rawsize - len(raw))
        cks_off = opt + 64
        struct.pack_into("<I", out, cks_off, pe_checksum(out, cks_off))

        truth = tuple(
            TruthSite(
                rva=TEXT_RVA + pos,
                api=api,
                tag=tag.decode("latin-1") if tag is not None else None,
                tag_rva=TEXT_RVA + tpos if tpos is not None else None,
                function_rva=TEXT_RVA + fstart,
                kind=kind,
            )
            for pos, api, tag, tpos, fstart, kind in self.truth
        )
        functions = tuple((TEXT_RVA + f[0], TEXT_RVA + f[1]) for f in self.funcs)
        thunks = tuple((name, TEXT_RVA + thunk_start + 8 * i) for i, name in enumerate(lib.thunk_names))
        return SynthDriver(bytes(out), truth, self.arch, image_base, functions, thunks)


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def _build_relocs(rvas: list[int], rtype: int) -> bytes:
    out = bytearray()
    i = 0
    n = len(rvas)
    while i < n:
        page = rvas[i] & ~0xFFF
        j = i
        while j < n and rvas[j] & ~0xFFF == page:
            j += 1
        entries = array("H", ((rtype << 12) | (r & 0xFFF) for r in rvas[i:j]))
        if len(entries) % 2:
            entries.append(0)  # IMAGE_REL_BASED_ABSOLUTE padding
        if sys.byteorder != "little":
            entries.byteswap()
        out += struct.pack("<II", page, 8 + 2 * len(entries))
        out += entries.tobytes()
        i = j
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def build_driver(code_size: int = 20 << 20, sites: int = 10_000, seed: int = 1, arch: str = "x64") -> SynthDriver:
    """Build a synthetic driver with at least ``code_size`` bytes of ``.text`` and exactly ``sites`` pool sites."""
    return _Builder(code_size, sites, seed, arch).build()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate a synthetic Windows driver and its pool-site ground truth.")
    ap.add_argument("out", help="output .sys path; the truth goes to OUT.truth.json")
    ap.add_argument("--mb", type=float, default=20.0, help="minimum .text size in MiB (default 20)")
    ap.add_argument("--sites", type=int, default=10_000, help="number of pool call sites (default 10000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--arch", choices=("x64", "x86"), default="x64")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    drv = build_driver(int(args.mb * (1 << 20)), args.sites, args.seed, args.arch)
    dt = time.perf_counter() - t0
    with open(args.out, "wb") as f:
        f.write(drv.data)
    with open(args.out + ".truth.json", "w", encoding="utf-8") as f:
        json.dump(drv.truth_json(), f, indent=1)
        f.write("\n")
    print(
        f"{args.out}: {len(drv.data)} bytes, {len(drv.functions)} functions, {len(drv.truth)} sites, "
        f"{args.arch}, {dt:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
