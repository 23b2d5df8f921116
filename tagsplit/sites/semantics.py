"""What one x86/x64 instruction does to one tracked location, read backwards.

The scanner asks "where did the value in r8d / [esp+8] at this call come from?" and walks the instructions
backwards from the call. Each step answers either "not defined here, keep looking for this location (possibly
renamed: a copy, a push, a stack-pointer move)" or "defined here, and this is its origin".

Instructions come from capstone's lite mode (address, size, mnemonic, operand text), which is an order of
magnitude faster than detail mode. The operand text is parsed here. Mnemonics that are not modelled fall back to
capstone detail mode for that one instruction, so an unknown instruction can never silently define a location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple, Union

import capstone

# --- registers -------------------------------------------------------------------------------------------------

_FAMILIES = {
    "rax": ("rax", "eax", "ax", "al", "ah"),
    "rbx": ("rbx", "ebx", "bx", "bl", "bh"),
    "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"),
    "rsi": ("rsi", "esi", "si", "sil"),
    "rdi": ("rdi", "edi", "di", "dil"),
    "rbp": ("rbp", "ebp", "bp", "bpl"),
    "rsp": ("rsp", "esp", "sp", "spl"),
}
REG: dict[str, tuple[str, int]] = {}
for _fam, _names in _FAMILIES.items():
    for _n, _w in zip(_names, (64, 32, 16, 8, 8)):
        REG[_n] = (_fam, _w)
for _i in range(8, 16):
    for _suffix, _w in (("", 64), ("d", 32), ("w", 16), ("b", 8)):
        REG[f"r{_i}{_suffix}"] = (f"r{_i}", _w)

VOLATILE = {
    "x64": frozenset({"rax", "rcx", "rdx", "r8", "r9", "r10", "r11"}),
    "x86": frozenset({"rax", "rcx", "rdx"}),
}
PARAM_REGS_X64 = ("rcx", "rdx", "r8", "r9")
SP = "rsp"

_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8, "tbyte": 10, "xmmword": 16, "ymmword": 32, "zmmword": 64}


# --- operands --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mem:
    size: int  # 0 when the text gives none (lea)
    base: str | None  # register family, "rip", or None
    index: str | None
    scale: int
    disp: int
    segment: str | None


@dataclass(frozen=True)
class Op:
    kind: str  # "reg" | "imm" | "mem"
    reg: str | None = None
    width: int = 0
    value: int = 0
    mem: Mem | None = None


_MEM_RE = re.compile(r"^(?:(\w+) ptr )?(?:(\ws):)?\[(.*)\]$")


def _int(text: str) -> int:
    return int(text, 0)


@lru_cache(maxsize=65536)
def parse_operands(op_str: str) -> tuple[Op, ...]:
    if not op_str:
        return ()
    out = []
    for part in op_str.split(", "):
        part = part.strip()
        r = REG.get(part)
        if r is not None:
            out.append(Op("reg", reg=r[0], width=r[1]))
            continue
        m = _MEM_RE.match(part)
        if m:
            size = _SIZES.get(m.group(1) or "", 0)
            base = index = None
            scale, disp = 1, 0
            for sign, term in re.findall(r"([+-]?)\s*([^+\-\s]+)", m.group(3)):
                term = term.strip()
                if "*" in term:
                    reg, sc = term.split("*")
                    index, scale = REG.get(reg, (reg, 0))[0], int(sc)
                elif term in ("rip", "eip"):
                    base = "rip"
                elif term in ("eiz", "riz"):
                    index = term
                elif term in REG:
                    if base is None:
                        base = REG[term][0]
                    else:
                        index = REG[term][0]
                else:
                    try:
                        v = _int(term)
                    except ValueError:
                        return ()
                    disp += -v if sign == "-" else v
            out.append(Op("mem", mem=Mem(size, base, index, scale, disp, m.group(2))))
            continue
        try:
            out.append(Op("imm", value=_int(part)))
        except ValueError:
            out.append(Op("other"))
    return tuple(out)


# --- locations and origins -------------------------------------------------------------------------------------


# Locations are named tuples (not dataclasses): the backward walk hashes them in every step, and a tuple hashes in C.
# No two kinds can compare equal: a RegLoc holds a str, a StackLoc an int, a FrameLoc two fields.
class RegLoc(NamedTuple):
    reg: str


class StackLoc(NamedTuple):
    offset: int  # from the stack pointer at the current point of the walk


class FrameLoc(NamedTuple):
    """A slot addressed through a frame register ([rbp-4]); turned into a StackLoc where the frame is set up."""

    base: str
    disp: int


Loc = Union[RegLoc, StackLoc, FrameLoc]


class Origin(NamedTuple):
    """Where a value comes from (a named tuple, for the same reason as the locations)."""

    kind: str  # imm | param | memory | computed | register | stack | import
    value: int | None = None
    rva: int | None = None  # instruction that defines it
    imm_offset: int | None = None
    param: int | None = None
    api: str | None = None  # kind import: the IAT slot's routine
    detail: str = ""


class Insn(NamedTuple):
    """One decoded instruction (a tuple: scanning creates hundreds of thousands of them)."""

    rva: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes


class Context:
    """What the semantics need from the rest of the scanner."""

    def __init__(
        self,
        arch: str,
        image_base: int,
        import_at: Callable[[int], str | None],
        call_pop: Callable[[Insn], int | None],
        stub_body: Callable[[int], tuple[tuple[Insn, ...], int] | None] | None = None,
    ) -> None:
        self.arch = arch
        self.ptr = 8 if arch == "x64" else 4
        self.image_base = image_base
        self.import_at = import_at  # IAT slot RVA -> import name, or None
        self.call_pop = call_pop  # bytes a call's callee removes from the stack (x86 stdcall), None if unknown
        # a stub's instructions before its final jump: a call to a stub runs them on the caller's behalf
        self.stub_body = stub_body or (lambda _target: None)
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)
        self.cs.detail = True


Step = Union[Loc, Origin, "Fork"]


@dataclass(frozen=True)
class Fork:
    """A conditional move: the value is either the old one or the source, depending on flags."""

    steps: tuple[Loc | Origin, ...]


_NO_EFFECT = frozenset(
    [
        "cmp", "test", "bt", "jmp", "ret", "retn", "retf", "nop", "int3", "lfence", "mfence", "sfence", "pause",
        "endbr64", "endbr32", "clc", "stc", "cld", "std", "cmc", "prefetch", "prefetchw", "prefetcht0",
        "prefetcht1", "prefetcht2", "prefetchnta", "clflush", "ud2", "hlt", "int", "wait", "fwait", "sti", "cli",
        "ucomiss", "ucomisd", "comiss", "comisd", "ptest", "vptest", "invlpg", "wbinvd",
    ]
)
_ARITH = frozenset(
    [
        "add", "sub", "and", "or", "xor", "adc", "sbb", "shl", "shr", "sar", "sal", "rol", "ror", "rcl", "rcr",
        "neg", "not", "inc", "dec", "imul", "bsf", "bsr", "popcnt", "lzcnt", "tzcnt", "andn", "bswap", "shld",
        "shrd", "bts", "btr", "btc", "movzx", "movsx", "sete", "setne", "setb", "setae", "setbe", "seta", "setl",
        "setge", "setle", "setg", "sets", "setns", "seto", "setno", "setp", "setnp", "blsr", "blsi", "blsmsk",
        "bzhi", "pdep", "pext", "sarx", "shlx", "shrx", "rorx", "xadd",
    ]
)
_KNOWN_SIMPLE = frozenset(
    [
        "mov", "movabs", "movsxd", "movzx", "movsx", "lea", "xchg", "add", "sub", "and", "or", "xor", "adc", "sbb",
        "shl", "shr", "sar", "sal", "rol", "ror", "neg", "not", "inc", "dec", "test", "cmp", "bt", "bts", "btr",
        "btc", "bsf", "bsr", "popcnt", "lzcnt", "tzcnt", "bswap",
    ]
    + [f"cmov{c}" for c in ["e", "ne", "b", "ae", "be", "a", "l", "ge", "le", "g", "s", "ns", "o", "no", "p", "np"]]
    + [f"set{c}" for c in ["e", "ne", "b", "ae", "be", "a", "l", "ge", "le", "g", "s", "ns", "o", "no", "p", "np"]]
)
_JCC = frozenset(
    [
        "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg",
        "jcxz", "jecxz", "jrcxz", "loop", "loope", "loopne",
    ]
)


def _width_full(width: int) -> bool:
    return width >= 32


def _stack_disp(mem: Mem, ctx: Context) -> int | None:
    """The offset from the stack pointer of a [rsp+d] operand, or None."""
    if mem.base == SP and mem.index is None and mem.segment is None:
        return mem.disp
    return None


def _covers(mem: Mem, disp: int, loc_off: int) -> bool:
    size = mem.size or 1
    return disp < loc_off + 4 and loc_off < disp + size


def _writes_loc(op: Op, loc: Loc, ctx: Context) -> bool:
    if isinstance(loc, RegLoc):
        return op.kind == "reg" and op.reg == loc.reg
    if op.kind != "mem" or op.mem is None:
        return False
    if isinstance(loc, StackLoc):
        d = _stack_disp(op.mem, ctx)
        return d is not None and _covers(op.mem, d, loc.offset)
    return op.mem.base == loc.base and op.mem.index is None and _covers(op.mem, op.mem.disp, loc.disp)


def _source(insn: Insn, op: Op, ctx: Context, loc_width_ok: bool = True) -> Step:
    """The origin of a value read from operand `op` by `insn` (a copy continues the walk)."""
    if op.kind == "imm":
        value = op.value & 0xFFFFFFFF
        raw = insn.raw
        imm = value.to_bytes(4, "little")
        off = raw.rfind(imm)
        return Origin("imm", value=value, rva=insn.rva, imm_offset=off if off >= 0 else None)
    if op.kind == "reg" and op.reg is not None:
        if not _width_full(op.width):
            return Origin("computed", rva=insn.rva, detail=f"partial register in `{insn.mnemonic} {insn.op_str}`")
        return RegLoc(op.reg)
    if op.kind == "mem" and op.mem is not None:
        m = op.mem
        d = _stack_disp(m, ctx)
        if d is not None:
            return StackLoc(d)
        if m.base in ("rbp", "rbx", "rsi", "rdi") and m.index is None and m.segment is None and m.base == "rbp":
            return FrameLoc(m.base, m.disp)
        slot = None
        if m.base == "rip" and m.index is None:
            slot = insn.rva + insn.size + m.disp
        elif m.base is None and m.index is None and m.segment is None:
            slot = (m.disp - ctx.image_base) & 0xFFFFFFFFFFFFFFFF
        if slot is not None:
            return global_origin(insn.rva, slot, ctx)
        return Origin("memory", rva=insn.rva, detail=f"`{insn.mnemonic} {insn.op_str}`")
    return Origin("computed", rva=insn.rva, detail=f"`{insn.mnemonic} {insn.op_str}`")


def global_origin(rva: int, slot: int, ctx: Context) -> Origin:
    """The origin of a value the instruction at `rva` loads from the global at RVA `slot` (an IAT slot or not)."""
    api = ctx.import_at(slot)
    if api is not None:
        return Origin("import", rva=rva, api=api, detail=f"IAT slot {slot:#x}")
    return Origin("memory", rva=rva, detail=f"global at RVA {slot:#x}")


_PASSIVE = _NO_EFFECT | _JCC | _KNOWN_SIMPLE

# Mnemonics whose effect on a location is not visible in their operand text (implicit registers, the stack).
_IMPLICIT = frozenset(
    [
        "push", "pop", "call", "lcall", "leave", "enter", "pushfq", "pushfd", "popfq", "popfd", "pushal", "pushad",
        "popal", "popad", "pushf", "popf", "mul", "imul", "div", "idiv", "cdq", "cqo", "cwd", "cdqe", "cwde", "cbw",
        "cpuid", "rdtsc", "rdtscp", "rdmsr", "xgetbv", "lodsb", "lodsw", "lodsd", "lodsq", "stosb", "stosw",
        "stosd", "stosq", "movsb", "movsw", "movsd", "movsq", "scasb", "scasd", "cmpsb", "cmpsd", "syscall", "lahf",
        "in", "xlatb", "cmpxchg", "cmpxchg8b", "cmpxchg16b", "loop", "loope", "loopne", "rdpmc", "rdrand", "rdseed",
    ]
)
_FAMILY_NAMES = {fam: names for fam, names in _FAMILIES.items()}
for _i in range(8, 16):
    _FAMILY_NAMES[f"r{_i}"] = (f"r{_i}",)


def passes(insn: Insn) -> tuple[bool, frozenset[str]]:
    """The locations `step_back` passes through `insn` unchanged at its first test, for all locations at once: whether
    every stack slot does, and the registers that do. The walk asks this once per instruction bytes instead of once
    per (bytes, location); for anything else `step_back` decides."""
    mn = insn.mnemonic
    ops_text = insn.op_str
    if mn in _SIMD_MOVES:
        return (True, _ALL_FAMILIES) if _into_xmm(parse_operands(ops_text)) else (False, frozenset())
    if mn.startswith("lock "):
        mn = mn[5:]  # the same operation on memory: it passes what the plain one passes
    if not _passive(mn, ops_text):
        return False, frozenset()
    return True, _ALL_FAMILIES.difference(*map(_families_in, _WORDS.findall(ops_text)))


def _passive(mn: str, ops_text: str) -> bool:
    """`step_back`'s first test: an instruction with no implicit effect and no stack pointer in its text, of a kind
    that writes at most the registers and memory its text names."""
    return mn not in _IMPLICIT and not mn.startswith(("rep", "lock")) and "sp" not in ops_text and mn in _PASSIVE


def _into_xmm(ops: tuple[Op, ...]) -> bool:
    """The operands of an SSE move (`_SIMD_MOVES`) that writes only an xmm register."""
    return len(ops) == 2 and ops[0].kind == "other"


_ALL_FAMILIES = frozenset(_FAMILY_NAMES)
# Register names can only occur inside a word that starts with a letter (numbers are 0x-prefixed hex or decimal)
_WORDS = re.compile(r"\b[a-z]\w*")
_WORD_FAMILIES: dict[str, frozenset[str]] = {}


def _families_in(word: str) -> frozenset[str]:
    """The register families `step_back`'s substring test finds in `word` (capstone's operand words are few)."""
    got = _WORD_FAMILIES.get(word)
    if got is None:
        got = _WORD_FAMILIES[word] = frozenset(
            fam for fam, names in _FAMILY_NAMES.items() if any(n in word for n in names)
        )
    return got


def step_back(insn: Insn, loc: Loc, ctx: Context) -> Step:
    """Walk one instruction backwards: the location to keep following before `insn`, or the origin `insn` gives."""
    mn = insn.mnemonic
    # Most instructions on a path neither name the tracked register nor touch the stack: pass them quickly.
    if _passive(mn, insn.op_str):
        if isinstance(loc, RegLoc):
            if not any(n in insn.op_str for n in _FAMILY_NAMES.get(loc.reg, (loc.reg,))):
                return loc
        elif isinstance(loc, StackLoc):
            return loc
    if mn.startswith("rep ") or mn.startswith("repne ") or mn.startswith("repe "):
        return _fallback(insn, loc, ctx)
    if mn.startswith("lock "):
        mn = mn[5:]
    if mn in _NO_EFFECT or mn in _JCC:
        return loc
    ops = parse_operands(insn.op_str)
    ptr = ctx.ptr

    if mn == "push":
        if isinstance(loc, StackLoc):
            if loc.offset == 0:
                return _source(insn, ops[0], ctx) if ops else Origin("computed", rva=insn.rva)
            if 0 < loc.offset < ptr:
                return Origin("computed", rva=insn.rva, detail="misaligned stack slot")
            return StackLoc(loc.offset - ptr)
        return loc
    if mn == "pop":
        if ops and _writes_loc(ops[0], loc, ctx) and isinstance(loc, RegLoc):
            return StackLoc(0)
        if isinstance(loc, StackLoc):
            return StackLoc(loc.offset + ptr)
        return loc
    if mn in ("mov", "movabs", "movsxd"):
        if len(ops) != 2:
            return _fallback(insn, loc, ctx)
        dst, src = ops
        if dst.kind == "reg" and dst.reg == SP:
            return _lost_stack(insn, loc)
        if isinstance(loc, FrameLoc) and dst.kind == "reg" and dst.reg == loc.base:
            # `mov rbp, rsp`: the frame register equals the stack pointer from here on.
            if src.kind == "reg" and src.reg == SP:
                return StackLoc(loc.disp)
            return Origin("stack", rva=insn.rva, detail=f"frame register {loc.base} set by `{mn} {insn.op_str}`")
        if _writes_loc(dst, loc, ctx):
            if isinstance(loc, RegLoc) and not _width_full(dst.width):
                return Origin("computed", rva=insn.rva, detail=f"partial write `{mn} {insn.op_str}`")
            return _source(insn, src, ctx)
        return loc
    if mn == "xchg":
        if len(ops) == 2:
            a, b = ops
            if _writes_loc(a, loc, ctx):
                return _source(insn, b, ctx)
            if _writes_loc(b, loc, ctx):
                return _source(insn, a, ctx)
            if (a.kind == "reg" and a.reg == SP) or (b.kind == "reg" and b.reg == SP):
                return _lost_stack(insn, loc)
            return loc
        return _fallback(insn, loc, ctx)
    if mn == "lea":
        if len(ops) != 2:
            return _fallback(insn, loc, ctx)
        dst, src = ops
        if dst.kind == "reg" and dst.reg == SP:
            if src.mem is not None and src.mem.base == SP and src.mem.index is None and isinstance(loc, StackLoc):
                return StackLoc(loc.offset + src.mem.disp)
            return _lost_stack(insn, loc)
        if isinstance(loc, FrameLoc) and dst.kind == "reg" and dst.reg == loc.base:
            if src.mem is not None and src.mem.base == SP and src.mem.index is None:
                return StackLoc(loc.disp + src.mem.disp)
            return Origin("stack", rva=insn.rva, detail=f"frame register set by `lea {insn.op_str}`")
        if _writes_loc(dst, loc, ctx):
            return Origin("computed", rva=insn.rva, detail=f"address computed by `lea {insn.op_str}`")
        return loc
    if mn in ("sub", "add") and len(ops) == 2 and ops[0].kind == "reg" and ops[0].reg == SP:
        if ops[1].kind != "imm":
            return _lost_stack(insn, loc)
        delta = ops[1].value if mn == "sub" else -ops[1].value
        if isinstance(loc, StackLoc):
            new = loc.offset - delta
            if new < 0:
                return Origin("stack", rva=insn.rva, detail="slot was below the stack pointer (never written)")
            return StackLoc(new)
        return loc
    if mn == "xor" and len(ops) == 2 and ops[0].kind == "reg" and ops[1].kind == "reg" and ops[0].reg == ops[1].reg:
        if _writes_loc(ops[0], loc, ctx):
            return Origin("imm", value=0, rva=insn.rva, detail="zeroing idiom")
        return loc
    if mn in ("call", "lcall"):
        return _call(insn, loc, ctx)
    if mn in ("leave", "enter"):
        if isinstance(loc, StackLoc):
            return _lost_stack(insn, loc)
        if isinstance(loc, RegLoc) and loc.reg in ("rbp", SP):
            return Origin("computed", rva=insn.rva)
        return loc
    if mn in ("pushfq", "pushfd", "pushal", "pushad", "popfq", "popfd", "popal", "popad", "pushf", "popf"):
        if mn.startswith("pop") and mn[-1] in "ad" and isinstance(loc, RegLoc):
            return Origin("computed", rva=insn.rva)
        return _lost_stack(insn, loc) if isinstance(loc, StackLoc) else loc
    if mn.startswith("cmov") and len(ops) == 2:
        if _writes_loc(ops[0], loc, ctx):
            if isinstance(loc, RegLoc) and not _width_full(ops[0].width):
                return Origin("computed", rva=insn.rva, detail=f"`{mn} {insn.op_str}`")
            came = _source(insn, ops[1], ctx)
            if isinstance(came, Fork):
                return Origin("computed", rva=insn.rva)
            return Fork((loc, came))
        return loc
    if mn in _SIMD_MOVES and _into_xmm(ops):
        return loc  # only an xmm register is written (stores to memory are left to `_fallback`)
    if mn in _ARITH:
        if not ops:
            return _fallback(insn, loc, ctx)
        if ops[0].kind == "reg" and ops[0].reg == SP:
            return _lost_stack(insn, loc)
        if _writes_loc(ops[0], loc, ctx):
            return Origin("computed", rva=insn.rva, detail=f"`{mn} {insn.op_str}`")
        if mn == "xadd" and len(ops) == 2 and _writes_loc(ops[1], loc, ctx):
            return Origin("computed", rva=insn.rva, detail=f"`{mn} {insn.op_str}`")
        if mn == "imul" and len(ops) == 1 and isinstance(loc, RegLoc) and loc.reg in ("rax", "rdx"):
            return Origin("computed", rva=insn.rva, detail=f"`{mn} {insn.op_str}`")
        return loc
    return _fallback(insn, loc, ctx)


_SIMD_MOVES = frozenset(["movups", "movaps", "movdqu", "movdqa", "xorps", "pxor"])


def _lost_stack(insn: Insn, loc: Loc) -> Step:
    if isinstance(loc, StackLoc):
        return Origin("stack", rva=insn.rva, detail=f"stack pointer changed by `{insn.mnemonic} {insn.op_str}`")
    if isinstance(loc, RegLoc) and loc.reg == SP:
        return Origin("computed", rva=insn.rva)
    return loc


def _call(insn: Insn, loc: Loc, ctx: Context) -> Step:
    if branch_target(insn) == insn.rva + insn.size:
        # `call $+5` (position-independent code): only pushes its own address
        if isinstance(loc, StackLoc):
            if loc.offset < ctx.ptr:
                return Origin("computed", rva=insn.rva, detail="the address pushed by `call $+5`")
            return StackLoc(loc.offset - ctx.ptr)
        return loc
    target = branch_target(insn)
    found = ctx.stub_body(target) if target is not None else None
    if found is not None:
        # a call into a stub (tagsplit's own, with instructions moved out of the caller): follow the location back
        # through the routine's return (x86: it pops its arguments) and the stub's instructions
        body, popped = found
        inner: Loc = StackLoc(loc.offset + popped + ctx.ptr) if isinstance(loc, StackLoc) else loc
        for stub_insn in reversed(body):
            res = step_back(stub_insn, inner, ctx)
            if isinstance(res, Origin):
                return res
            if isinstance(res, Fork):
                return Origin("computed", rva=stub_insn.rva, detail="conditional move in a stub")
            inner = res
        if isinstance(inner, StackLoc):
            if inner.offset < ctx.ptr:
                return Origin("computed", rva=insn.rva, detail="a stub's return address")
            return StackLoc(inner.offset - ctx.ptr)
        return inner
    if isinstance(loc, RegLoc) or ctx.arch == "x64":
        return across_call(insn.rva, loc, ctx.arch)
    if isinstance(loc, StackLoc):
        pop = ctx.call_pop(insn)
        if pop is None:
            return Origin("stack", rva=insn.rva, detail=f"unknown stack effect of the call at {insn.rva:#x}")
        # the callee removed its arguments: after the call the stack pointer is `pop` bytes higher
        return StackLoc(loc.offset + pop)
    return loc


def across_call(rva: int, loc: Loc, arch: str) -> Step:
    """A register, or on x64 any location, across the call at `rva` to an ordinary routine: the volatile registers
    and (x64) the home area are lost. (x86 stack slots depend on what the callee pops: see `_call`.)"""
    if isinstance(loc, RegLoc):
        if loc.reg in VOLATILE[arch]:
            if loc.reg == "rax":
                return Origin("computed", rva=rva, detail=f"return value of the call at {rva:#x}")
            return Origin("register", rva=rva, detail=f"{loc.reg} is clobbered by the call at {rva:#x}")
        return loc
    if arch == "x64" and isinstance(loc, StackLoc) and loc.offset < 0x20:
        return Origin("stack", rva=rva, detail="home-area slot reused across a call")
    return loc


_CS_REG_FAMILY: dict[int, str] = {}


def _fallback(insn: Insn, loc: Loc, ctx: Context) -> Step:
    """An instruction the text model does not cover: ask capstone's detail mode what it writes."""
    try:
        full = next(ctx.cs.disasm(insn.raw, insn.rva, 1))
    except StopIteration:
        return Origin("computed", rva=insn.rva, detail="undecodable instruction")
    _, written = full.regs_access()
    names = {REG.get(full.reg_name(r), (full.reg_name(r), 0))[0] for r in written}
    if SP in names and isinstance(loc, StackLoc):
        return Origin("stack", rva=insn.rva, detail=f"stack pointer changed by `{insn.mnemonic} {insn.op_str}`")
    if isinstance(loc, RegLoc) and loc.reg in names:
        return Origin("computed", rva=insn.rva, detail=f"`{insn.mnemonic} {insn.op_str}`")
    if not isinstance(loc, RegLoc):
        for op in full.operands:
            if op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                return Origin("stack", rva=insn.rva, detail=f"memory written by `{insn.mnemonic} {insn.op_str}`")
        if insn.mnemonic.startswith(("rep", "stos", "movs")):
            return Origin("stack", rva=insn.rva, detail=f"memory written by `{insn.mnemonic} {insn.op_str}`")
    return loc


def entry_origin(loc: Loc, arch: str) -> Origin:
    """What a location holds at function entry."""
    if isinstance(loc, RegLoc):
        if arch == "x64" and loc.reg in PARAM_REGS_X64:
            return Origin("param", param=PARAM_REGS_X64.index(loc.reg) + 1)
        return Origin("register", detail=f"{loc.reg} at function entry")
    if isinstance(loc, StackLoc):
        ptr = 8 if arch == "x64" else 4
        if loc.offset >= ptr and loc.offset % ptr == 0:
            n = loc.offset // ptr
            # x64: [rsp+8..+0x20] is the home area of params 1-4, the 5th argument is at [rsp+0x28].
            return Origin("param", param=n)
        return Origin("stack", detail=f"stack slot {loc.offset:#x} at function entry")
    return Origin("stack", detail=f"[{loc.base}{loc.disp:+#x}] before the frame was set up")


def is_branch(mnemonic: str) -> bool:
    return mnemonic in _JCC or mnemonic == "jmp"


def branch_target(insn: Insn) -> int | None:
    """The RVA a direct branch or call goes to (lite mode prints it as the operand), else None."""
    s = insn.op_str
    if s.startswith("0x") and " " not in s:
        return int(s, 16)
    if s.isdigit():
        return int(s)
    return None
