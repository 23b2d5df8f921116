"""An in-process stand-in for pykd inside a kernel debugger: an emulated kernel address space with loaded modules.

It implements exactly the pykd functions `tagsplit.targets.pykd.PykdTarget` uses, with pykd's semantics
(windows-facts.md §1.3): `module(name)` (begin/end/size/name/image/timestamp/checksum, `int(m) == m.begin()`,
`DbgException` when not loaded), `loadBytes` returning a *list* of ints, `writeBytes` accepting *only* a list
(`TypeError` for bytes, as Boost.Python's ArgumentError is one), `isValid`, `dbgCommand` returning a str or None,
`isKernelDebugging`, `isLocalKernelDebuggerEnabled`, `isDumpAnalyzing`, `is64bitSystem`, and the `DbgException` /
`MemoryException` classes. A 32-bit target behaves like kdlib's `addr64`: addresses are sign-extended
(`module.begin()` is 0xffffffff8xxxxxxx for a kernel module) and both forms are accepted.

Memory is 4 KiB pages of bytearrays. Tests inject faults: pages not present (`page_out`), the N-th `writeBytes` call
failing (`fail_writes`), tearing (`torn_writes`: all but the last byte land, then MemoryException), silently partial
writes (`partial_writes`: only the first byte lands, no error) and a dying debugger connection (`crash_writes`: raises
`SimulatedCrash`, a BaseException, so nothing in tagsplit catches it).

`dbgCommand` answers from `commands`, a dict from the command's first word (e.g. "!poolused") to a function of the
full command text; unknown commands print nothing (None), as pykd returns for output it did not capture.

This module imports only the standard library at import time: `add_module` builds a stand-in from raw memory bytes;
`map_driver` (which lays a driver file out with `tagsplit.emu.mapping`, hence pefile) imports lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pathlib import Path

    from ..image import Image, Import

PAGE = 0x1000
_MASK64 = (1 << 64) - 1

NT_BASE_X64 = 0xFFFFF80000000000
NT_BASE_X86 = 0x80400000
NT_SIZE = 0x20000
DRIVER_BASE_X64 = 0xFFFFF80012340000
DRIVER_BASE_X86 = 0x8A3C0000


class DbgException(Exception):
    """pykd.DbgException: the root of pykd's exceptions."""


class MemoryException(DbgException):
    """pykd.MemoryException: a failed read or write of target memory."""

    def __init__(self, va: int) -> None:
        super().__init__(f"Memory exception at 0x{va:x} type:Virtual")
        self.va = va


class SimulatedCrash(BaseException):
    """The debugger connection died in the middle of a write (tests only). Not an Exception: nothing catches it."""


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    begin: int  # as the debugger reports it (sign-extended on a 32-bit target)
    size: int
    timestamp: int
    checksum: int
    image: str


class _Module:
    """What `pykd.module(name)` returns."""

    def __init__(self, info: ModuleInfo) -> None:
        self._info = info

    def begin(self) -> int:
        return self._info.begin

    def end(self) -> int:
        return (self._info.begin + self._info.size) & _MASK64

    def size(self) -> int:
        return self._info.size

    def name(self) -> str:
        return self._info.name

    def image(self) -> str:
        return self._info.image

    def timestamp(self) -> int:
        return self._info.timestamp

    def checksum(self) -> int:
        return self._info.checksum

    def __int__(self) -> int:
        return self._info.begin

    def __index__(self) -> int:
        return self._info.begin


class PykdStandIn:
    """A kernel debugging session over emulated memory. Pass it as `pykd=` wherever tagsplit takes pykd."""

    DbgException = DbgException
    MemoryException = MemoryException

    def __init__(self, *, is64: bool = True, kernel: bool = True, local: bool = False, dump: bool = False) -> None:
        self.is64 = is64
        self.kernel = kernel
        self.local = local
        self.dump = dump
        self._pages: dict[int, bytearray] = {}
        self._absent: set[int] = set()
        self._modules: dict[str, ModuleInfo] = {}
        self._nt_exports: dict[str, int] = {}
        # fault injection (write numbers count writeBytes calls from 1)
        self.fail_writes: set[int] = set()
        self.torn_writes: set[int] = set()
        self.crash_writes: set[int] = set()
        self.partial_writes = False
        self.writes = 0
        self.write_log: list[tuple[int, bytes]] = []
        self.commands: dict[str, Callable[[str], str]] = {}
        self.command_log: list[str] = []

    # --- addresses -----------------------------------------------------------------------------------------

    def _canon(self, va: int) -> int | None:
        """The internal address of `va`, or None for one this target cannot have (kdlib addr64 semantics)."""
        va &= _MASK64
        if self.is64:
            return va
        high = va >> 32
        if high == 0:
            return va
        if high == 0xFFFFFFFF and va & 0x80000000:
            return va & 0xFFFFFFFF
        return None

    def debugger_address(self, va: int) -> int:
        """`va` as the debugger shows it: sign-extended on a 32-bit target."""
        c = self._canon(va)
        if c is None:
            raise ValueError(f"{va:#x} is not an address of this target")
        if not self.is64 and c & 0x80000000:
            return c | 0xFFFFFFFF00000000
        return c

    def _page(self, va: int, write: bool = False) -> tuple[bytearray, int]:
        c = self._canon(va)
        if c is None:
            raise MemoryException(va)
        n = c // PAGE
        page = self._pages.get(n)
        if page is None or n in self._absent:
            raise MemoryException(va)
        return page, c % PAGE

    # --- building the address space ----------------------------------------------------------------------

    def map_memory(self, va: int, data: bytes) -> None:
        """Map `data` at `va` (page-granular; the rest of a new page is zero)."""
        c = self._canon(va)
        if c is None:
            raise ValueError(f"{va:#x} is not an address of this target")
        for n in range(c // PAGE, (c + max(len(data), 1) - 1) // PAGE + 1):
            self._pages.setdefault(n, bytearray(PAGE))
        self.poke(va, data)

    def add_module(
        self,
        name: str,
        base: int,
        mem: bytes,
        *,
        timestamp: int,
        checksum: int,
        size: int | None = None,
        image: str | None = None,
    ) -> ModuleInfo:
        """Map `mem` at `base` and register it as loaded module `name` (no pefile needed)."""
        self.map_memory(base, mem)
        info = ModuleInfo(
            name,
            self.debugger_address(base),
            size if size is not None else len(mem),
            timestamp,
            checksum,
            image or name,
        )
        self._modules[name.lower()] = info
        return info

    def map_driver(
        self,
        path_or_image: str | Path | Image,
        base: int | None = None,
        name: str | None = None,
        import_call_optimization: bool = False,
        discard_init: bool = False,
    ) -> ModuleInfo:
        """Load a driver as the kernel loader would (`tagsplit.emu.mapping.map_image`) and register the module.

        Imports resolve to addresses inside a fake `nt` module. With `discard_init`, INIT pages are not present.
        """
        from pathlib import Path

        from ..emu.mapping import map_image
        from ..image import Image, load

        image = path_or_image if isinstance(path_or_image, Image) else load(path_or_image)
        if (image.arch == "x64") != self.is64:
            raise ValueError(f"{image.name} is an {image.arch} driver; this stand-in is a {self._bits()}-bit target")
        if base is None:
            base = DRIVER_BASE_X64 if self.is64 else DRIVER_BASE_X86
        self._ensure_nt()
        mem = map_image(
            image,
            base & (_MASK64 if self.is64 else 0xFFFFFFFF),
            self._resolve,
            import_call_optimization=import_call_optimization,
            discard_init=discard_init,
        )
        info = self.add_module(
            name or Path(image.name).stem,
            base,
            mem,
            timestamp=image.timestamp,
            checksum=image.checksum,
            size=image.size_of_image,
            image=image.name,
        )
        if discard_init:
            for sec in image.sections:
                if sec.discardable:
                    self.page_out(base + sec.rva, sec.size)
        return info

    def _bits(self) -> int:
        return 64 if self.is64 else 32

    def _ensure_nt(self) -> None:
        if "nt" not in self._modules:
            base = NT_BASE_X64 if self.is64 else NT_BASE_X86
            self.add_module("nt", base, b"\xcc" * NT_SIZE, timestamp=0, checksum=0, image="ntoskrnl.exe")

    def _resolve(self, imp: Import) -> int:
        """A fake ntoskrnl export address for every import (same name, same address)."""
        if imp.name not in self._nt_exports:
            self._nt_exports[imp.name] = 0x1000 + 0x10 * len(self._nt_exports)
        return (self._modules["nt"].begin + self._nt_exports[imp.name]) & _MASK64

    def export_address(self, name: str) -> int:
        """The fake ntoskrnl address an import of `name` was bound to."""
        return (self._modules["nt"].begin + self._nt_exports[name]) & _MASK64

    # --- test helpers (no fault injection, not counted) --------------------------------------------------

    def peek(self, va: int, size: int) -> bytes:
        """Raw memory, ignoring presence (reads never fault); for tests."""
        out = bytearray()
        for i in range(size):
            page, off = self._raw(va + i)
            out.append(page[off])
        return bytes(out)

    def poke(self, va: int, data: bytes) -> None:
        """Raw write, ignoring presence and fault injection; for tests."""
        for i, b in enumerate(data):
            page, off = self._raw(va + i)
            page[off] = b

    def _raw(self, va: int) -> tuple[bytearray, int]:
        c = self._canon(va)
        page = self._pages.get(c // PAGE) if c is not None else None
        if c is None or page is None:
            raise ValueError(f"{va:#x} is not mapped")
        return page, c % PAGE

    def module_memory(self, name: str) -> bytes:
        """The whole memory of a loaded module; for before/after comparisons."""
        info = self._modules[name.lower()]
        return self.peek(info.begin, info.size)

    def module_info(self, name: str) -> ModuleInfo:
        return self._modules[name.lower()]

    def page_out(self, va: int, size: int = 1) -> None:
        """Mark every page of [va, va+size) not present: isValid False, reads and writes fault."""
        for n in self._page_numbers(va, size):
            self._absent.add(n)

    def page_in(self, va: int, size: int = 1) -> None:
        for n in self._page_numbers(va, size):
            self._absent.discard(n)

    def _page_numbers(self, va: int, size: int) -> range:
        c = self._canon(va)
        if c is None:
            raise ValueError(f"{va:#x} is not an address of this target")
        return range(c // PAGE, (c + max(size, 1) - 1) // PAGE + 1)

    # --- the pykd API --------------------------------------------------------------------------------------

    def module(self, name_or_address: str | int) -> _Module:
        if isinstance(name_or_address, str):
            info = self._modules.get(name_or_address.lower())
            if info is None:
                raise DbgException(f"module {name_or_address} not found")
            return _Module(info)
        c = self._canon(int(name_or_address))
        for info in self._modules.values():
            b = self._canon(info.begin)
            if c is not None and b is not None and b <= c < b + info.size:
                return _Module(info)
        raise DbgException(f"module not found at 0x{int(name_or_address):x}")

    def loadBytes(self, offset: int, count: int, phyAddr: bool = False) -> list[int]:
        if phyAddr:
            raise DbgException("physical memory is not emulated")
        out: list[int] = []
        for i in range(count):
            page, off = self._page(offset + i)
            out.append(page[off])
        return out

    def writeBytes(self, offset: int, values: list[int], phyAddr: bool = False) -> None:
        if not isinstance(values, list):
            # Boost.Python: "Python argument types in pykd.writeBytes(int, bytes) did not match C++ signature"
            raise TypeError(
                f"Python argument types in pykd.writeBytes(int, {type(values).__name__}) did not match C++ signature: "
                "writeBytes(unsigned __int64 offset, class boost::python::list list, bool phyAddr=False)"
            )
        if phyAddr:
            raise DbgException("physical memory is not emulated")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"writeBytes: list item {v!r} is not an int")
            if not 0 <= v <= 0xFF:
                raise OverflowError(f"writeBytes: {v} does not fit in an unsigned char")
        self.writes += 1
        n = self.writes
        if n in self.crash_writes:
            raise SimulatedCrash(f"debugger connection lost during write #{n}")
        for i in range(len(values)):
            self._page(offset + i)  # every byte must be writable, else nothing is written
        if n in self.fail_writes:
            raise MemoryException(offset)
        data = bytes(values)
        if n in self.torn_writes:
            data = data[: max(1, len(data) - 1)]  # all but the last byte landed
        elif self.partial_writes:
            data = data[:1]
        for i, b in enumerate(data):
            page, off = self._page(offset + i)
            page[off] = b
        self.write_log.append((offset, data))
        if n in self.torn_writes:
            raise MemoryException(offset + 1)

    def isValid(self, addr: int) -> bool:
        try:
            self._page(addr)
        except MemoryException:
            return False
        return True

    def dbgCommand(self, command: str, suppressOutput: bool = True, outputMask: Any = None) -> str | None:
        self.command_log.append(command)
        words = command.split(None, 1)
        handler = self.commands.get(words[0]) if words else None
        if handler is None:
            return None
        out = handler(command)
        return out if out else None

    def isKernelDebugging(self) -> bool:
        return self.kernel

    def isLocalKernelDebuggerEnabled(self) -> bool:
        return self.local

    def isDumpAnalyzing(self) -> bool:
        return self.dump

    def is64bitSystem(self) -> bool:
        return self.is64
