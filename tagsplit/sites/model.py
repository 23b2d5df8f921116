"""The data the scanner produces. Frozen: a scan result is a value, later stages only read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import tags

# Where a tag value comes from (see docs/scanner.md):
IMM = "imm"  # a constant in one instruction (possibly copied through registers or stack slots)
PARAM = "param"  # an argument of the enclosing function
MEMORY = "memory"  # loaded from non-stack memory
COMPUTED = "computed"  # arithmetic, a call's return value, or different constants meeting at a join
REGISTER = "register"  # a register whose origin could not be followed
STACK = "stack"  # a stack slot whose writer could not be followed
NONE = "none"  # the routine takes no tag

# How the allocator is reached from the site:
DIRECT = "direct"  # call [IAT] (also REX.W + 5-byte NOP, and the resident mov r10,[IAT] + call form)
TAIL = "tail"  # jmp [IAT]
REGISTER_CALL = "register"  # call reg, reg loaded from the IAT
THUNK = "thunk"  # call to a jmp [IAT] stub


@dataclass(frozen=True)
class Instruction:
    rva: int
    raw: bytes
    text: str

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class TagSource:
    kind: str
    value: Optional[int] = None  # the tag dword where it is a constant
    insn: Optional[Instruction] = None  # the instruction holding the constant (kind imm)
    imm_offset: Optional[int] = None  # offset of the 4 tag bytes inside `insn.raw`
    other_sources: tuple[int, ...] = ()  # further instructions that set the same constant on other paths
    param_index: Optional[int] = None  # 1-based, kind param
    detail: str = ""  # why it is not an immediate, in words

    @property
    def rva(self) -> Optional[int]:
        return self.insn.rva if self.insn else None


@dataclass(frozen=True)
class CallSite:
    rva: int  # the call or jmp instruction in the caller
    size: int
    raw: bytes
    api: str
    role: str
    call: str
    function_rva: Optional[int]
    function_name: Optional[str]
    section: str
    tag_source: TagSource
    shared_with: tuple[int, ...] = ()  # other sites fed by the same tag instruction
    pageable: bool = False
    discardable: bool = False
    notes: tuple[str, ...] = ()

    @property
    def tag_value(self) -> Optional[int]:
        return self.tag_source.value

    @property
    def tag(self) -> Optional[str]:
        return tags.display_or_none(self.tag_value)


@dataclass(frozen=True)
class DriverScan:
    path: str
    sha256: str
    arch: str
    image_base: int
    mapped: bool
    is_driver: bool
    timestamp: int
    size_of_image: int
    checksum: int
    sites: tuple[CallSite, ...]
    unexplained_tag_bytes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # tag value -> RVAs
    import_thunks: dict[int, bool] = field(default_factory=dict)  # jmp [IAT] stub RVA -> called by any code
    stubs: dict[int, int] = field(default_factory=dict)  # stub entry RVA -> RVA of its final jump
    warnings: tuple[str, ...] = ()
