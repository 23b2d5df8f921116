"""`encodings.step_bytes` and `semantics.passes` answer exactly as `semantics.step_back` does, wherever they answer."""

from __future__ import annotations

import random
import struct
from typing import TYPE_CHECKING

import capstone
import pytest
from conftest import BIN, corpus_drivers

from tagsplit.image import load
from tagsplit.sites import semantics
from tagsplit.sites.encodings import step_bytes
from tagsplit.sites.semantics import Context, FrameLoc, Insn, Loc, RegLoc, StackLoc, step_back

if TYPE_CHECKING:
    from pathlib import Path

REGS = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16))]
LOCS: list[Loc] = [
    *(RegLoc(r) for r in REGS),
    *(StackLoc(o) for o in range(-8, 0x48, 2)),
    FrameLoc("rbp", -8),
]
REXES = [bytes([r]) for r in range(0x40, 0x50)]
STUB = 0x5000
IAT = 0x7000  # an IAT slot that `import_at` knows  # a call target that `stub_body` knows


def _ctx(arch: str) -> Context:
    def stub_body(target: int) -> tuple[tuple[Insn, ...], int] | None:
        return ((), 0) if target == STUB else None

    def import_at(slot: int) -> str | None:
        return "ExAllocatePoolWithTag" if slot == IAT else None

    return Context(arch, 0x140000000 if arch == "x64" else 0x10000, import_at, lambda _insn: 8, stub_body)


def _text(cs: capstone.Cs, raw: bytes, rva: int) -> Insn | None:
    got = next(cs.disasm_lite(raw, rva, 1), None)
    if got is None or got[1] != len(raw):
        return None
    return Insn(rva, len(raw), got[2], got[3], raw)


def _compare(arch: str, samples: list[tuple[bytes, int]]) -> int:
    """Every location through every sample: the byte reading, where there is one, equals the text reading."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)
    ctx = _ctx(arch)
    answered = 0
    for raw, rva in samples:
        insn = _text(cs, raw, rva)
        if insn is None:
            continue
        stack_passes, regs_pass = semantics.passes(insn)
        for loc in LOCS:
            got = step_bytes(raw, rva, loc, ctx)
            if got is not None:
                assert got == step_back(insn, loc, ctx), (raw.hex(), hex(rva), loc, insn.mnemonic, insn.op_str)
                answered += 1
            if (isinstance(loc, RegLoc) and loc.reg in regs_pass) or (isinstance(loc, StackLoc) and stack_passes):
                assert step_back(insn, loc, ctx) == loc, ("passes", raw.hex(), loc, insn.mnemonic, insn.op_str)
                answered += 1
    return answered


def _encodings(rnd: random.Random, arch: str) -> list[tuple[bytes, int]]:
    out = []
    for _ in range(300):
        imm = struct.pack("<I", rnd.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rnd.getrandbits(32)]))
        rva = rnd.randrange(0x1000, 0x100000)
        reg = rnd.randrange(8)
        d8 = rnd.randrange(256)
        d32 = struct.pack("<i", rnd.choice([0, 8, 0x28, 0x30, -8, 0x1000, rnd.randrange(-(2**31), 2**31)]))
        rel = struct.pack("<i", rnd.choice([0, STUB - rva - 5, rnd.randrange(-(2**31), 2**31)]))
        out += [
            (bytes([0xB8 + reg]) + imm, rva),
            (bytes([0xC7, 0x44, 0x24, d8]) + imm, rva),
            (bytes([0xC7, 0x84, 0x24]) + d32 + imm, rva),
            (b"\xe8" + rel, rva),
            (b"\x68" + imm, rva),
        ]
        # mov between registers, or a register and memory: every ModRM, [rsp] and other SIB bytes, both widths
        rexes = [b"", rnd.choice(REXES), rnd.choice(REXES)] if arch == "x64" else [b""]
        for op in (0x89, 0x8B):
            for rex in rexes:
                modrm = rnd.randrange(256)
                sib = bytes([rnd.choice([0x24, 0x24, rnd.randrange(256)])]) if modrm & 7 == 4 and modrm < 0xC0 else b""
                disp = (b"", bytes([d8]), d32[:4])[modrm >> 6] if modrm < 0xC0 else b""
                if modrm < 0x40 and (modrm & 7 == 5 or (sib and sib[0] & 7 == 5)):
                    disp = d32
                out.append((rex + bytes([op, modrm]) + sib + disp, rva))
        if arch == "x64":
            out += [
                (bytes([0x41, 0xB8 + reg]) + imm, rva),
                (bytes([0x48, 0xC7, 0x44, 0x24, d8]) + imm, rva),
                (bytes([0x48, 0xC7, 0x84, 0x24]) + d32 + imm, rva),
                (b"\xff\x15" + d32, rva),
                (b"\x48\xff\x15" + d32, rva),
            ]
            for op in (0x8B, 0x8D, 0x89):
                for rex in (b"", rnd.choice(REXES)):
                    to_iat = struct.pack("<i", IAT - rva - len(rex) - 6)
                    out += [(rex + bytes([op, 0x05 | reg << 3]) + d, rva) for d in (d32, to_iat)]
    return out


@pytest.mark.parametrize("arch", ["x64", "x86"])
def test_encodings_read_from_bytes_as_from_text(arch: str) -> None:
    assert _compare(arch, _encodings(random.Random(3), arch)) > 1000


@pytest.mark.parametrize(
    "path", sorted(BIN.glob("*.sys")) + [p for p in corpus_drivers() if "arm64" not in p.name], ids=lambda p: p.name
)
def test_every_instruction_of_a_driver_reads_the_same(path: Path) -> None:
    image = load(path)
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if image.arch == "x64" else capstone.CS_MODE_32)
    samples = []
    for sec in image.code_sections():
        for rva, size, _, _ in cs.disasm_lite(image.mem[sec.rva : sec.end], sec.rva):
            samples.append((image.mem[rva : rva + size], rva))
    assert _compare(image.arch, samples) > 0


@pytest.mark.parametrize("arch", ["x64", "x86"])
def test_simd_moves_read_as_capstone_detail_mode_says(arch: str) -> None:
    """The text model's reading of SSE moves into an xmm register equals `_fallback` (capstone's detail mode)."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)
    ctx = _ctx(arch)
    rnd = random.Random(5)
    opcodes = [b"\x0f\x10", b"\x0f\x11", b"\x0f\x28", b"\x0f\x29", b"\xf3\x0f\x6f", b"\xf3\x0f\x7f", b"\x66\x0f\x6f",
               b"\x66\x0f\x7f", b"\x0f\x57", b"\x66\x0f\xef"]
    compared = 0
    locs = [*(RegLoc(r) for r in REGS), StackLoc(0), StackLoc(0x20), StackLoc(0x24), FrameLoc("rbp", -8)]
    for _ in range(1200):
        op = rnd.choice(opcodes)
        rex = bytes([rnd.choice([0x40, 0x44, 0x41, 0x4C])]) if arch == "x64" and rnd.random() < 0.3 else b""
        tail = bytes([rnd.randrange(256)]) + bytes([0x24]) + bytes(rnd.randrange(256) for _ in range(4))
        raw = (op[:-2] + rex + op[-2:] if len(op) == 3 else rex + op) + tail
        insn = _text(cs, raw[: _length(cs, raw)], 0x2000)
        if insn is None or insn.mnemonic not in semantics._SIMD_MOVES or not insn.op_str.startswith("xmm"):
            continue
        for loc in locs:
            assert step_back(insn, loc, ctx) == semantics._fallback(insn, loc, ctx), (raw.hex(), insn.op_str, loc)
            compared += 1
    assert compared > 2000


def _length(cs: capstone.Cs, raw: bytes) -> int:
    got = next(cs.disasm_lite(raw, 0x2000, 1), None)
    return got[1] if got else 0
