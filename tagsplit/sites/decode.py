"""Instruction boundaries and control-flow edges of a function, decoded with iced-x86.

The scanner needs the boundaries of every instruction of a function (a byte-search hit must start one, and the
backward walk must know every branch into a block), but the text of only the few instructions the walk reads.
iced-x86 finds boundaries about ten times faster than capstone's lite mode; capstone stays the source of every
instruction's text and meaning (`semantics.py`), decoded on demand by `flow.FunctionCode`.

The boundaries must be exactly capstone's. The two decoders agree on everything compilers emit; where they can
disagree (measured by decoding every one-byte, 0F, 0F 38 and 0F 3A opcode with every ModRM byte under 34 legacy
and REX prefix combinations with both, in both modes), the instruction is confirmed with capstone:

* an instruction iced rejects: the function is decoded with capstone instead (`layout` returns None);
* an opcode on which the two were seen to differ (`RISKY_CODES`: reserved NOPs, UD0/UD1, VIA PadLock, x87
  aliases, ...), any VEX/EVEX/XOP/3DNow! encoding, and any instruction with two or more legacy prefixes (or a REX
  before a legacy prefix): its length is checked with capstone;
* control flow: the common encodings (`jcc`/`jmp` rel8/rel32, `call` rel32, `ret`, `int3`, `hlt`, `call`/`jmp` through
  a register or memory) are read from their bytes; any other control-flow instruction is decoded with capstone,
  which gives its length, its mnemonic (does it fall through?) and its target exactly as before.

Instructions whose text is read later are decoded by capstone at that point and compared with these boundaries
again (`flow.DecodeMismatch`).

Per instruction only its length and validity are read from iced; its code only where the opcode byte (found for
all instructions at once, `_screened`) can start control flow or a risky encoding.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import operator
import re
import struct
import threading
from itertools import accumulate, compress
from typing import Callable, NamedTuple

import capstone
from iced_x86 import Code, Decoder, EncodingKind, FlowControl, Mnemonic

from ..image import bytes_at

# Opcodes on which capstone 5 and iced-x86 1.x were seen to differ (length, or valid in one only) with at most one
# legacy prefix, control flow excluded (it is classified separately).
_RISKY_NAMES = (
    "AADD_M32_R32", "AADD_M64_R64", "AAND_M32_R32", "AAND_M64_R64", "AESDEC128KL_XMM_M384", "AESDEC256KL_XMM_M512",
    "AESDECWIDE128KL_M384", "AESDECWIDE256KL_M512", "AESENC128KL_XMM_M384", "AESENC256KL_XMM_M512",
    "AESENCWIDE128KL_M384", "AESENCWIDE256KL_M512", "AOR_M32_R32", "AOR_M64_R64", "AXOR_M32_R32", "AXOR_M64_R64",
    "BSF_R32_RM32", "BSR_R32_RM32", "CCS_ENCRYPT_32", "CCS_ENCRYPT_64", "CCS_HASH_32", "CCS_HASH_64",
    "ENCODEKEY128_R32_R32", "ENCODEKEY256_R32_R32", "ENQCMDS_R32_M512", "ENQCMDS_R64_M512", "ENQCMD_R32_M512",
    "ENQCMD_R64_M512", "FCOMP_ST0_STI_DCD8", "FCOMP_ST0_STI_DED0", "FCOM_ST0_STI_DCD0", "FSTP_STI_DFD0",
    "FSTP_STI_DFD8", "FXCH_ST0_STI_DDC8", "FXCH_ST0_STI_DFC8", "HRESET_IMM8", "INVLPGBD", "INVLPGBQ", "INVLPGBW",
    "LFENCE_E9", "LFENCE_EA", "LFENCE_EB", "LFENCE_EC", "LFENCE_ED", "LFENCE_EE", "LFENCE_EF", "LKGS_R32M16",
    "LKGS_R64M16", "LOADIWKEY_XMM_XMM", "MFENCE_F1", "MFENCE_F2", "MFENCE_F3", "MFENCE_F4", "MFENCE_F5",
    "MFENCE_F6", "MFENCE_F7", "MONTMUL_32", "MONTMUL_64", "MOVSXD_R16_RM16", "MOVSXD_R32_RM32", "PAUSE", "PBNDKB",
    "PREFETCHRESERVED3_M8", "PREFETCHRESERVED4_M8", "PREFETCHRESERVED5_M8", "PREFETCHRESERVED6_M8",
    "PREFETCHRESERVED7_M8", "PSMASH", "PVALIDATED", "PVALIDATEQ", "PVALIDATEW", "RDMSRLIST", "RDPRU",
    "RESERVEDNOP_RM16_R16_0F0D", "RESERVEDNOP_RM16_R16_0F18", "RESERVEDNOP_RM16_R16_0F19",
    "RESERVEDNOP_RM16_R16_0F1A", "RESERVEDNOP_RM16_R16_0F1B", "RESERVEDNOP_RM16_R16_0F1C",
    "RESERVEDNOP_RM16_R16_0F1D", "RESERVEDNOP_RM16_R16_0F1E", "RESERVEDNOP_RM16_R16_0F1F",
    "RESERVEDNOP_RM32_R32_0F0D", "RESERVEDNOP_RM32_R32_0F18", "RESERVEDNOP_RM32_R32_0F19",
    "RESERVEDNOP_RM32_R32_0F1A", "RESERVEDNOP_RM32_R32_0F1B", "RESERVEDNOP_RM32_R32_0F1C",
    "RESERVEDNOP_RM32_R32_0F1D", "RESERVEDNOP_RM32_R32_0F1E", "RESERVEDNOP_RM32_R32_0F1F",
    "RESERVEDNOP_RM64_R64_0F0D", "RESERVEDNOP_RM64_R64_0F18", "RESERVEDNOP_RM64_R64_0F19",
    "RESERVEDNOP_RM64_R64_0F1A", "RESERVEDNOP_RM64_R64_0F1B", "RESERVEDNOP_RM64_R64_0F1C",
    "RESERVEDNOP_RM64_R64_0F1D", "RESERVEDNOP_RM64_R64_0F1E", "RESERVEDNOP_RM64_R64_0F1F", "RMPADJUST", "RMPQUERY",
    "RMPUPDATE", "SEAMOPS", "SEAMRET", "SENDUIPI_R64", "SERIALIZE", "SFENCE_F9", "SFENCE_FA", "SFENCE_FB",
    "SFENCE_FC", "SFENCE_FD", "SFENCE_FE", "SFENCE_FF", "TDCALL", "TESTUI", "TLBSYNC", "UD0_R16_RM16",
    "UD0_R32_RM32", "UD0_R64_RM64", "UD0", "UD1_R16_RM16", "UD1_R32_RM32", "UD1_R64_RM64", "UIRET",
    "VIA_UNDOC_F30FA6F0_16", "VIA_UNDOC_F30FA6F0_32", "VIA_UNDOC_F30FA6F0_64", "VIA_UNDOC_F30FA6F8_16",
    "VIA_UNDOC_F30FA6F8_32", "VIA_UNDOC_F30FA6F8_64", "WRMSRLIST", "WRMSRNS", "XCRYPTCBC_16", "XCRYPTCBC_32",
    "XCRYPTCBC_64", "XCRYPTCFB_16", "XCRYPTCFB_32", "XCRYPTCFB_64", "XCRYPTCTR_16", "XCRYPTCTR_32", "XCRYPTCTR_64",
    "XCRYPTECB_16", "XCRYPTECB_32", "XCRYPTECB_64", "XCRYPTOFB_16", "XCRYPTOFB_32", "XCRYPTOFB_64", "XRESLDTRK",
    "XSHA1_16", "XSHA1_32", "XSHA1_64", "XSHA256_16", "XSHA256_32", "XSHA256_64", "XSHA512_16", "XSHA512_32",
    "XSHA512_64", "XSHA512_ALT_16", "XSHA512_ALT_32", "XSHA512_ALT_64", "XSTORE_16", "XSTORE_32", "XSTORE_64",
    "XSTORE_ALT_16", "XSTORE_ALT_32", "XSTORE_ALT_64", "XSUSLDTRK", "MONTMUL_16", "CCS_ENCRYPT_16", "CCS_HASH_16",
)
RISKY_CODES = frozenset(getattr(Code, n) for n in _RISKY_NAMES if hasattr(Code, n))
INVALID = Code.INVALID

PLAIN, SPECIAL, RISKY = 0, 1, 2
_CLASS: dict[int, int] = {}  # iced Code -> PLAIN | SPECIAL | RISKY, filled from the first instruction seen
_SPECIAL: set[int] = set()
_RISKY: set[int] = set()


def _classify(code: int, flow: int, mnemonic: int, encoding: int) -> int:
    if flow != FlowControl.NEXT or mnemonic == Mnemonic.HLT:
        return SPECIAL
    if encoding != EncodingKind.LEGACY or code in RISKY_CODES:
        return RISKY
    return PLAIN


_LEGACY = b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3"

# Control-flow instructions in their common encodings, by iced code: (kind, length without any prefix but REX).
JCC, JMP, CALL, STOP, INDIRECT = 1, 2, 3, 4, 5
_JCC_NAMES = ["JO", "JNO", "JB", "JAE", "JE", "JNE", "JBE", "JA", "JS", "JNS", "JP", "JNP", "JL", "JGE", "JLE", "JG"]


def _canonical(bits: int) -> dict[int, tuple[int, int]]:
    w = str(bits)
    out = {getattr(Code, f"{j}_REL8_{w}"): (JCC, 2) for j in _JCC_NAMES}
    out.update({getattr(Code, f"{j}_REL32_{w}"): (JCC, 6) for j in _JCC_NAMES})
    out[getattr(Code, f"JMP_REL8_{w}")] = (JMP, 2)
    out[getattr(Code, f"JMP_REL32_{w}")] = (JMP, 5)
    out[getattr(Code, f"CALL_REL32_{w}")] = (CALL, 5)
    ret = "RETNQ" if bits == 64 else "RETND"
    out[getattr(Code, ret)] = (STOP, 1)
    out[getattr(Code, f"{ret}_IMM16")] = (STOP, 3)
    out[Code.INT3] = (STOP, 1)
    out[Code.HLT] = (STOP, 1)
    out[getattr(Code, f"CALL_RM{w}")] = (INDIRECT, 0)
    out[getattr(Code, f"JMP_RM{w}")] = (INDIRECT, 0)
    return out


_FORMS = {64: _canonical(64), 32: _canonical(32)}
# code -> length of its canonical encoding (INDIRECT codes are checked byte by byte instead)
_CANONICAL = {bits: {c: n for c, (kind, n) in forms.items() if kind != INDIRECT} for bits, forms in _FORMS.items()}
_INDIRECT = {bits: frozenset(c for c, (kind, _) in forms.items() if kind == INDIRECT) for bits, forms in _FORMS.items()}
_BRANCH = {bits: frozenset(c for c, (kind, _) in forms.items() if kind in (JCC, JMP)) for bits, forms in _FORMS.items()}
_NOFALL = {
    bits: frozenset(c for c, (kind, _) in forms.items() if kind in (JMP, STOP)) for bits, forms in _FORMS.items()
}
_JMP_RM = {Code.JMP_RM64, Code.JMP_RM32}


class Layout(NamedTuple):
    starts: list[int]  # RVA of each instruction, ascending
    sizes: list[int]
    range_first: list[int]  # index of the first instruction of each range
    reldep: list[int]  # control-flow instructions whose text depends on their address (relative targets)
    branches: list[tuple[int, int]]  # (index, target RVA) of jcc/jmp rel8/rel32
    passthru: list[int]  # jcc/jmp rel8/rel32: `step_back` passes every location through them unchanged
    nofall: list[int]  # jmp, ret, int3, hlt: the next instruction is not reached from them
    indirect: list[int]  # call/jmp through a register or memory (without legacy prefixes)
    text: list[int]  # any other control-flow instruction: classified from capstone's text
    checks: list[int]  # indices whose length must be confirmed with capstone
    complete: list[bool]  # [False] when the decoding stopped early (see `layout`'s upto)


_MAX_INSN = 15
# Any byte that could start a relative jump: jcc/jmp/loop/jcxz rel8, jmp rel32, jcc rel32 (prefixes come before).
_REL8 = re.compile(rb"[\x70-\x7f\xe0-\xe3\xeb]", re.S)
_REL8_BACK = re.compile(rb"[\x70-\x7f\xe0-\xe3\xeb](?=[\x80-\xff])", re.S)  # ... with a negative displacement
_REL32 = (re.compile(rb"\xe9", re.S), re.compile(rb"\x0f[\x80-\x8f]", re.S))


def _may_branch_into(mem: bytes, tail: list[tuple[int, int]], decoded: list[tuple[int, int]]) -> bool:
    """Whether any byte in the `tail` spans, read as the opcode of a relative jump (rel8, rel16 or rel32), would
    land in one of the `decoded` spans. An over-approximation: it ignores instruction boundaries altogether."""
    lo = min(b for b, _ in decoded)
    hi = max(e for _, e in decoded)
    one = len(decoded) == 1  # (nearly always: a function of one range)
    low = lo < 0x10000  # a 16-bit target (operand-size prefix) could land there too
    limit = len(mem)
    # every tail byte lies at or after `hi`: below 64 KiB a 16-bit target can wrap around, else only a negative
    # displacement reaches back
    rel8 = _REL8 if low else _REL8_BACK
    for a, b in tail:
        # a rel8 lands at most 129 bytes before its opcode: only the start of the tail can reach back
        for q in [m.end() for m in rel8.finditer(mem, a, min(b, hi + 130, limit - 1))]:
            t = q + 1 + ((mem[q] ^ 0x80) - 0x80)
            if (lo <= t < hi or (low and lo <= t & 0xFFFF < hi)) and (one or _lands(t, decoded, low)):
                return True
        for rx in _REL32:
            for m in rx.finditer(mem, a, b):
                q = m.end()
                targets = [q + 2 + _REL16_AT(mem, q)[0]] if q + 2 <= limit else []
                if q + 4 <= limit:
                    targets.append(q + 4 + _REL32_AT(mem, q)[0])
                for t in targets:
                    if (lo <= t < hi or (low and lo <= t & 0xFFFF < hi)) and (one or _lands(t, decoded, low)):
                        return True
    return False


def _lands(t: int, decoded: list[tuple[int, int]], low: bool) -> bool:
    return any(b <= t < e for b, e in decoded) or (low and any(b <= t & 0xFFFF < e for b, e in decoded))


def layout(
    mem: bytes,
    ranges: tuple[tuple[int, int], ...],
    bits: int,
    max_checks: int | None = None,
    upto: int | None = None,
) -> Layout | None:
    """The instructions of `ranges` as capstone's linear sweep would find them, or None where iced cannot tell.

    With `upto`, decoding may stop after the instruction that follows the one at (or over) `upto`, when no byte
    after that point could be a branch back into what was decoded: then nothing further on can be a predecessor
    of anything decoded (the backward walk never gets there), and `Layout.complete` is False.
    """
    lay = Layout([], [], [], [], [], [], [], [], [], [], [True])
    starts, sizes, reldep, branches, passthru, nofall, indirect, text, checks = (
        lay.starts, lay.sizes, lay.reldep, lay.branches, lay.passthru, lay.nofall, lay.indirect, lay.text,
        lay.checks,
    )
    rel32 = _REL32_AT
    canonical = _CANONICAL[bits]
    mask = (1 << bits) - 1
    indirect_codes, branch_codes, nofall_codes = _INDIRECT[bits], _BRANCH[bits], _NOFALL[bits]
    marks = _PREFIX_MARKS[bits]
    prev_end = -1
    for begin, end in ranges:
        if begin < prev_end or end < begin:
            return None  # overlapping or unsorted ranges: leave them to the capstone sweep
        prev_end = end
        base = len(starts)
        lay.range_first.append(base)
        if begin == end or not lay.complete[0]:
            continue  # (past the point where the decoding stopped: nothing from here on is needed)
        cut = end
        if upto is not None and begin <= upto and upto + 2 * _MAX_INSN < end:
            cut = upto + 2 * _MAX_INSN + 1
        data = mem[begin:cut]
        insns = list(Decoder(bits, data, ip=begin))
        lens = list(map(len, insns))
        pos = list(accumulate(lens, initial=begin))
        if upto is not None and cut != end:
            # keep the instruction at (or over) `upto` and the next one; the rest is decoded only if needed
            keep = bisect.bisect_right(pos, upto) + 1
            del insns[keep:], lens[keep:], pos[keep + 1 :]
        if not all(insns):
            return None  # undecodable or cut off by the range end: capstone resynchronises byte by byte
        stop = pos.pop()
        if cut != end:
            decoded = [*((b, e) for b, e in ranges if e <= begin), (begin, stop)]
            tail = [(stop, end), *((b, e) for b, e in ranges if b >= end)]
            if _may_branch_into(mem, tail, decoded):
                # the rest may be a predecessor after all: decode it too, on from where the decoding stopped
                more = list(Decoder(bits, mem[stop:end], ip=stop))
                if not all(more):
                    return None
                insns += more
                lens += map(len, more)
                pos += accumulate(lens[len(pos) :], initial=stop)
                stop = pos.pop()
                data = mem[begin:end]
            else:
                lay.complete[0] = False
        if stop != end and lay.complete[0]:
            return None
        starts += pos
        sizes += lens
        # Only instructions whose opcode byte is in `_SCREEN` can be control flow or risky: read their codes.
        cand = _screened(mem, pos, bits)
        ccodes = [insns[k].code for k in cand]
        uniq = set(ccodes)
        for c in uniq.difference(_CLASS):
            i = insns[cand[ccodes.index(c)]]
            cls = _CLASS[c] = _classify(c, i.flow_control, i.mnemonic, i.encoding)
            (_SPECIAL if cls == SPECIAL else _RISKY if cls == RISKY else set()).add(c)
        if not uniq.isdisjoint(_RISKY):
            risky = _RISKY
            checks += [base + k for k, c in zip(cand, ccodes) if c in risky]
        # two prefix bytes in a row inside an instruction's prefixes: confirm its length
        m = data.translate(marks)
        for pair in (b"\x01\x01", b"\x02\x01"):
            q = m.find(pair)
            while q >= 0:
                k = bisect.bisect_right(pos, begin + q) - 1
                if k >= 0 and m.count(b"\x00", pos[k] - begin, q) == 0:
                    checks.append(base + k)
                q = m.find(pair, q + 1)
        if uniq.isdisjoint(_SPECIAL):
            continue
        sp = _SPECIAL
        # the common encodings, recognised by code and length (any prefix but REX makes it longer)
        is_plain = list(map(operator.eq, map(canonical.get, ccodes), map(lens.__getitem__, cand)))
        plain_k = list(compress(cand, is_plain))
        plain_c = list(compress(ccodes, is_plain))
        reldep += map(base.__add__, plain_k)
        for k, c in [(k, c) for k, c, p in zip(cand, ccodes, is_plain) if not p and c in sp]:
            s = pos[k]
            b0 = mem[s]
            if c in indirect_codes and (b0 == 0xFF or (bits == 64 and 0x40 <= b0 <= 0x4F and mem[s + 1] == 0xFF)):
                # call/jmp through a register or memory without legacy prefixes (a REX is fine)
                indirect.append(base + k)
                if c in _JMP_RM:
                    nofall.append(base + k)
            else:
                text.append(base + k)
                reldep.append(base + k)
        br = list(compress(plain_k, map(branch_codes.__contains__, plain_c)))
        if br:
            branches += zip(
                map(base.__add__, br),
                [
                    (p + 2 + ((mem[p + 1] ^ 0x80) - 0x80) if n == 2 else p + n + rel32(mem, p + n - 4)[0]) & mask
                    for p, n in zip(map(pos.__getitem__, br), map(lens.__getitem__, br))
                ],
            )
            passthru += map(base.__add__, br)
        nofall += map(base.__add__, compress(plain_k, map(nofall_codes.__contains__, plain_c)))
        if max_checks is not None and len(checks) > max_checks:
            return None
    if len(checks) > 1:
        checks[:] = sorted(set(checks))
    return lay


# The opcode byte (on x64 the byte after a REX prefix, if there is one) of every instruction that can be control
# flow or is in RISKY_CODES, or that has a legacy prefix (tests/test_scan_decode.py checks it against iced's tables).
_SCREEN = frozenset(
    [
        *(0x0F, 0x62, 0x63, 0x8F, 0x90, 0x9A, 0xC2, 0xC3, 0xC4, 0xC5, 0xC7, 0xF1, 0xF4, 0xFF),
        *range(0x70, 0x80),
        *range(0xCA, 0xD0),
        *range(0xDC, 0xE4),
        *range(0xE8, 0xEC),
        *_LEGACY,
    ]
)
_REX = range(0x40, 0x50)
# first byte: 1 screened, 2 a REX prefix (x64: look at the next byte), 0 neither
_FIRST = {
    64: bytes(2 if b in _REX else 1 if b in _SCREEN else 0 for b in range(256)),
    32: bytes(1 if b in _SCREEN else 0 for b in range(256)),
}
_SECOND = bytes(1 if b in _SCREEN or b in _REX else 0 for b in range(256))  # after a REX: 1 screened (or a REX)
_ONES = bytes(1 if b == 1 else 0 for b in range(256))
_TWOS = bytes(1 if b == 2 else 0 for b in range(256))


_REL32_AT = struct.Struct("<i").unpack_from
_REL16_AT = struct.Struct("<h").unpack_from


def _screened(mem: bytes, pos: list[int], bits: int) -> list[int]:
    """Indices of the instructions at `pos` whose opcode byte is in `_SCREEN`."""
    first = bytes_at(mem, pos).translate(_FIRST[bits])
    if bits == 64 and b"\x02" in first:
        if pos[-1] + 1 < len(mem):
            second = bytes_at(memoryview(mem)[1:], pos)
        else:
            second = bytes_at(mem, [min(p + 1, len(mem) - 1) for p in pos])
        second = second.translate(_SECOND)
        n = len(pos)
        mask = (
            int.from_bytes(first.translate(_ONES), "little")
            | (int.from_bytes(first.translate(_TWOS), "little") & int.from_bytes(second, "little"))
        ).to_bytes(n, "little")
    else:
        mask = first
    return list(compress(range(len(mask)), mask))
# Prefix bytes as marks: 1 a legacy prefix, 2 a REX prefix (x64), 0 anything else.
_PREFIX_MARKS = {
    bits: bytes(1 if b in _LEGACY else 2 if bits == 64 and 0x40 <= b <= 0x4F else 0 for b in range(256))
    for bits in (64, 32)
}


def confirm(text: TextDecoder, mem: bytes, lay: Layout, ranges: tuple[tuple[int, int], ...]) -> bool:
    """Whether capstone decodes each instruction in `lay.checks` with the same length as iced."""
    for k in lay.checks:
        s = lay.starts[k]
        r = bisect.bisect_right(lay.range_first, k) - 1
        got = text.one(mem[s : min(s + 15, ranges[r][1])], s)
        if got is None or got[1] != lay.sizes[k]:
            return False
    return True


_TEXT = threading.local()


def text_decoder(bits: int) -> TextDecoder:
    """One `TextDecoder` per mode and thread (it decodes into one buffer)."""
    mine: dict[int, TextDecoder] | None = getattr(_TEXT, "decoders", None)
    if mine is None:
        mine = _TEXT.decoders = {}
    dec = mine.get(bits)
    if dec is None:
        dec = mine[bits] = TextDecoder(bits)
    return dec


class _CsInsn(ctypes.Structure):
    """capstone 5's `cs_insn`, lite mode (no detail)."""

    _fields_ = [
        ("id", ctypes.c_uint),
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint16),
        ("bytes", ctypes.c_ubyte * 24),
        ("mnemonic", ctypes.c_char * 32),
        ("op_str", ctypes.c_char * 160),
        ("detail", ctypes.c_void_p),
    ]


class TextDecoder:
    """capstone's lite-mode text of one instruction at a time.

    `Cs.disasm_lite` allocates and frees a buffer for up to a few dozen instructions per call and builds a
    generator; asking for one instruction that way costs several microseconds. `cs_disasm_iter` decodes into one
    `cs_insn` allocated once, the same decoder and printer, at about a third of the cost. Where the library does not
    offer it (or answers differently from `disasm_lite` on a probe), `disasm_lite` is used.
    """

    def __init__(self, bits: int) -> None:
        self._cs = cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
        self._iter: Callable[..., bool] | None = None
        try:
            lib = ctypes.CDLL(capstone._cs._name)
            insn_p = ctypes.POINTER(_CsInsn)
            malloc = lib.cs_malloc
            malloc.restype, malloc.argtypes = insn_p, [ctypes.c_size_t]
            it = lib.cs_disasm_iter
            it.restype = ctypes.c_bool
            it.argtypes = [
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_char_p),
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.POINTER(ctypes.c_uint64),
                insn_p,
            ]
            self._free = lib.cs_free
            self._free.restype, self._free.argtypes = None, [ctypes.c_void_p, ctypes.c_size_t]
            self._ptr = malloc(cs.csh)
            if not self._ptr:
                return
            self._insn = self._ptr.contents
            self._code = ctypes.c_char_p()
            self._size = ctypes.c_size_t()
            self._addr = ctypes.c_uint64()
            self._args = (cs.csh, ctypes.byref(self._code), ctypes.byref(self._size), ctypes.byref(self._addr))
            self._iter = it
            probe = b"\x48\x8b\x05\x10\x00\x00\x00\xe8\x00\x00\x00\x00"
            for at in (0, 7):
                if self.one(probe[at:], 0x1000 + at) != next(cs.disasm_lite(probe[at:], 0x1000 + at, 1), None):
                    self._iter = None
        except Exception:
            self._iter = None

    def one(self, code: bytes, addr: int) -> tuple[int, int, str, str] | None:
        """(address, size, mnemonic, op_str) of the instruction at the start of `code`, or None."""
        it = self._iter
        if it is None:
            return next(self._cs.disasm_lite(code, addr, 1), None)
        self._code.value = code
        self._size.value = len(code)
        self._addr.value = addr
        if not it(*self._args, self._ptr):
            return None
        ins = self._insn
        return addr, ins.size, ins.mnemonic.decode("ascii"), ins.op_str.decode("ascii")

    def __del__(self) -> None:
        if getattr(self, "_iter", None) is not None and getattr(self, "_ptr", None):
            with contextlib.suppress(Exception):  # at interpreter exit the library may be gone already
                self._free(self._ptr, 1)
