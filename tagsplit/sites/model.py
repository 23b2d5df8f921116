"""The data the scanner produces. Frozen: a scan result is a value, later stages only read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    value: int | None = None  # the tag dword where it is a constant
    insn: Instruction | None = None  # the instruction holding the constant (kind imm)
    imm_offset: int | None = None  # offset of the 4 tag bytes inside `insn.raw`
    other_sources: tuple[int, ...] = ()  # further instructions that set the same constant on other paths
    param_index: int | None = None  # 1-based, kind param
    detail: str = ""  # why it is not an immediate, in words

    @property
    def rva(self) -> int | None:
        return self.insn.rva if self.insn else None


@dataclass(frozen=True)
class CallSite:
    rva: int  # the call or jmp instruction in the caller
    size: int
    raw: bytes
    api: str
    role: str
    call: str
    function_rva: int | None
    function_name: str | None
    section: str
    tag_source: TagSource
    shared_with: tuple[int, ...] = ()  # other sites fed by the same tag instruction
    pageable: bool = False
    discardable: bool = False
    notes: tuple[str, ...] = ()

    @property
    def tag_value(self) -> int | None:
        return self.tag_source.value

    @property
    def tag(self) -> str | None:
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


_T = TypeVar("_T")
_FIELDS: dict[type, tuple[str, ...]] = {}


def make(cls: type[_T], *values: Any) -> _T:
    """An instance of the frozen dataclass `cls` with every field, in declaration order, set from `values`.

    The same object the generated `__init__` makes, without its cost: a frozen dataclass's `__init__` assigns each
    field through `object.__setattr__`, which is most of the time a scan spends building its results.
    """
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if len(values) != len(names):
        raise TypeError(f"{cls.__name__} has {len(names)} fields, got {len(values)} values")
    obj = object.__new__(cls)
    obj.__dict__.update(zip(names, values))
    return obj


def replaced(obj: _T, **changes: Any) -> _T:
    """`dataclasses.replace` for the frozen dataclasses here, without running `__init__` (see `make`)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new
