"""The backward step of a few common encodings, read from their bytes instead of capstone's text.

Most steps of the walk are answered by the memo (`flow.StepMemo`, keyed by instruction bytes). A few kinds of
instruction miss it nearly every time, because their bytes are unique: the instruction that sets a tag
(`mov r32, imm32`, `mov dword [rsp+d], imm32`, `push imm32` — one tag value each), the direct `call rel32`
(its bytes hold its target) and, on x64, `call qword ptr [rip + disp32]` and moves between a register and
[rip + disp32] (each addresses its global from where it is). The plain moves between registers and stack or frame
slots (`mov r, [rsp + d]`, `mov [rsp + d], r`, ...) repeat, but they are the commonest instruction there is, and
most of the texts the walk still decoded were theirs.
Decoding their text and parsing it costs more than the rest of the walk. Their effect on a location follows from
the encoding alone, and `step_bytes` gives exactly what `semantics.step_back` gives for them
(tests/test_scan_encodings.py compares the two on every instruction of every sample driver); anything else, or any
variant it does not recognise, is None: ask `step_back`.
"""

from __future__ import annotations

from .semantics import Context, FrameLoc, Loc, Origin, RegLoc, StackLoc, Step, across_call, global_origin

_REG64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def step_bytes(raw: bytes, rva: int, loc: Loc, ctx: Context) -> Step | None:
    """What `step_back` makes of `loc` through the instruction `raw` at `rva`, or None where the bytes do not say."""
    n = len(raw)
    b0 = raw[0]
    x64 = ctx.arch == "x64"
    if x64 and b0 == 0x41 and n == 6 and 0xB8 <= raw[1] <= 0xBF:
        return _mov_imm(8 + raw[1] - 0xB8, raw, rva, loc)  # mov r8d..r15d, imm32
    if n == 5:
        if 0xB8 <= b0 <= 0xBF:
            return _mov_imm(b0 - 0xB8, raw, rva, loc)  # mov eax..edi, imm32
        if b0 == 0xE8 and x64:
            return _call64(raw, rva, loc, ctx)
        if b0 == 0x68 and not x64:
            return _push_imm(raw, rva, loc, ctx)
        return None
    if x64 and raw[-6:-4] == b"\xff\x15" and (n == 6 or (n == 7 and b0 == 0x48)):
        return across_call(rva, loc, "x64")  # call qword ptr [rip + disp32] (an IAT slot: unique bytes at every call)
    if x64 and (n == 6 or (n == 7 and 0x40 <= b0 <= 0x4F)) and raw[-5] & 0xC7 == 0x05 and raw[-6] in _RIP_MOVES:
        return _rip_move(raw, rva, loc, ctx)  # mov r, [rip + disp32]; lea r, [rip + disp32]; mov [rip + disp32], r
    rex = b0 if x64 and 0x40 <= b0 <= 0x4F else 0
    op = raw[1:] if rex else raw
    if len(op) >= 2 and (op[0] == 0x89 or op[0] == 0x8B):
        return _move(op, rex, loc)
    # mov dword/qword [rsp+disp8|disp32], imm32: C7 44 24 d8 / C7 84 24 d32 (REX.W 48 before: qword)
    if (
        (rex == 0 or rex == 0x48)
        and len(op) in (8, 11)
        and op[0] == 0xC7
        and op[2] == 0x24
        and op[1] == (0x44 if len(op) == 8 else 0x84)
    ):
        disp = int.from_bytes(op[3:-4], "little", signed=True)
        return _store_imm(disp, 8 if rex else 4, raw, rva, loc)
    return None


def _move(op: bytes, rex: int, loc: Loc) -> Step | None:
    """`mov` of 32 or 64 bits (opcode 89: store, 8B: load) between two registers, or between a register and
    [base], [base + disp8] or [base + disp32]; None for any other addressing (its answer is worded from the text)."""
    modrm = op[1]
    mod, rm = modrm >> 6, modrm & 7
    reg = (modrm >> 3 & 7) + (8 if rex & 4 else 0)
    if mod == 3:
        if len(op) != 2:
            return None
        other = rm + (8 if rex & 1 else 0)
        dst, src = (other, reg) if op[0] == 0x89 else (reg, other)
        if dst == 4:
            return None  # the stack pointer changes
        if type(loc) is RegLoc:
            return RegLoc(_REG64[src]) if loc.reg == _REG64[dst] else loc
        return loc if type(loc) is StackLoc else None
    if rm == 4:  # a SIB byte: only 24 without REX.X or REX.B, [rsp]
        if len(op) < 3 or op[2] != 0x24 or rex & 3:
            return None
        base, at = 4, 3
    elif mod == 0 and rm == 5:
        return None  # [rip + disp32] or [disp32]
    else:
        base, at = rm + (8 if rex & 1 else 0), 2
    if len(op) != at + (0, 1, 4)[mod]:
        return None
    disp = int.from_bytes(op[at:], "little", signed=True)
    if type(loc) is not RegLoc and type(loc) is not StackLoc:
        return None  # a frame slot: the text model words its answer from the text
    if op[0] == 0x8B:  # load
        if reg == 4:
            return None  # the stack pointer changes
        if type(loc) is StackLoc or loc.reg != _REG64[reg]:  # type: ignore[union-attr]
            return loc
        if base == 4:
            return StackLoc(disp)
        return FrameLoc("rbp", disp) if base == 5 else None  # (any other base: a memory origin, worded from the text)
    if type(loc) is StackLoc and base == 4:  # store
        size = 8 if rex & 8 else 4
        return RegLoc(_REG64[reg]) if disp < loc.offset + 4 and loc.offset < disp + size else loc
    return loc


_RIP_MOVES = frozenset([0x8B, 0x8D, 0x89])


def _rip_move(raw: bytes, rva: int, loc: Loc, ctx: Context) -> Step | None:
    """`mov`/`lea` between a register and [rip + disp32] (opcode 8B, 8D or 89, optionally behind a REX prefix)."""
    opcode = raw[-6]
    if opcode == 0x89:
        return loc if type(loc) is RegLoc or type(loc) is StackLoc else None  # a store to a global
    reg = (raw[-5] >> 3 & 7) + (8 if len(raw) == 7 and raw[0] & 4 else 0)
    if reg == 4:
        return None  # the stack pointer is loaded: as the text model says, in its own words
    if type(loc) is StackLoc:
        return loc
    if type(loc) is not RegLoc:
        return None  # a frame slot: the text model words its answer from the text
    if loc.reg != _REG64[reg]:
        return loc
    if opcode == 0x8D:
        return None  # the tracked register gets an address: described with the instruction's text
    return global_origin(rva, rva + len(raw) + int.from_bytes(raw[-4:], "little", signed=True), ctx)


def _imm_origin(raw: bytes, rva: int) -> Origin:
    value = int.from_bytes(raw[-4:], "little")
    # `semantics._source` looks for the value's bytes from the end: for these encodings they are the last four
    return Origin("imm", value=value, rva=rva, imm_offset=len(raw) - 4)


def _mov_imm(reg: int, raw: bytes, rva: int, loc: Loc) -> Step | None:
    if reg == 4:
        return None  # mov esp, imm: the stack is lost, as the text model says in its own words
    if type(loc) is RegLoc:
        return _imm_origin(raw, rva) if loc.reg == _REG64[reg] else loc
    if type(loc) is StackLoc:
        return loc
    return None


def _store_imm(disp: int, size: int, raw: bytes, rva: int, loc: Loc) -> Step | None:
    if type(loc) is RegLoc:
        return loc
    if type(loc) is StackLoc:
        # `semantics._covers`: a store overlapping the tracked dword defines it
        return _imm_origin(raw, rva) if disp < loc.offset + 4 and loc.offset < disp + size else loc
    return None


def _push_imm(raw: bytes, rva: int, loc: Loc, ctx: Context) -> Step | None:
    if type(loc) is RegLoc:
        return loc
    if type(loc) is StackLoc:
        if loc.offset == 0:
            return _imm_origin(raw, rva)
        if 0 < loc.offset < ctx.ptr:
            return None
        return StackLoc(loc.offset - ctx.ptr)
    return None


def _call64(raw: bytes, rva: int, loc: Loc, ctx: Context) -> Step | None:
    target = (rva + 5 + int.from_bytes(raw[1:], "little", signed=True)) & 0xFFFFFFFFFFFFFFFF
    if target == rva + 5 or ctx.stub_body(target) is not None:
        return None  # `call $+5`, or a call into a stub whose instructions act for the caller
    return across_call(rva, loc, "x64")
