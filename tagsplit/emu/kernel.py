"""An emulated kernel: a driver's real machine code running in unicorn, with a pool allocator that keeps books.

Windows cannot run here; this is the nearest real thing. The driver is loaded as the kernel loader would load it
and its ntoskrnl imports are bound to hooks: the pool routines allocate and free from a heap with per-tag
accounting (allocations, frees, bytes, nonpaged/paged) and make the tag check the kernel makes on free; the driver's
exported workload routines run on demand. A debugger view of the same kernel (`debugger`, a
`tagsplit.emu.pykd_standin.PykdStandIn`) shows the driver at a kernel address, takes patches through the pykd API
exactly like a live WinDbg session, and answers `!poolused` and `!poolfind` in their real text formats from the
books. So `apply --live`, `snapshot --live` and `revert` run unchanged against it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import apis, tags
from ..errors import TagsplitError
from ..image import Image, load
from ..snapshots.model import TagUsage
from .machine import STACK, STACK_SIZE, Call, Machine
from .pykd_standin import PykdStandIn

HEAP = {"x64": 0x7FF040000000, "x86": 0xC0000000}
HEAP_SIZE = 0x4000000
ALIGN = 16
PAGED_POOL = 1  # POOL_TYPE: odd values are paged
POOL_FLAG_PAGED = 0x100  # POOL_FLAGS (ExAllocatePool2/3)
NONE_TAG = int.from_bytes(b"None", "little")  # what ExAllocatePool records (ReactOS: TAG_NONE)


class EmulationError(TagsplitError):
    """The driver did something the emulated kernel does not provide or allow."""


class BugCheck(EmulationError):
    def __init__(self, code: int, *params: int) -> None:
        shown = ", ".join(f"{p:#x}" for p in params)
        super().__init__(f"bugcheck {code:#x} ({shown})")
        self.code = code
        self.params = params


@dataclass
class Block:
    address: int
    size: int
    tag: int
    paged: bool
    caller: int  # return address of the allocation call (RVA in the driver, -1 if outside)


@dataclass
class TagBooks:
    allocs: list[int] = field(default_factory=lambda: [0, 0])  # [nonpaged, paged]
    frees: list[int] = field(default_factory=lambda: [0, 0])
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # outstanding bytes


class Pool:
    """Per-tag accounting like the kernel's pool tracking table, and the blocks themselves for !poolfind."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.next = base
        self.free_lists: dict[int, list[int]] = {}
        self.blocks: dict[int, Block] = {}
        self.books: dict[int, TagBooks] = {}
        self.tag_mismatches: list[tuple[int, int, int]] = []  # (address, allocated tag, tag passed to free)

    def allocate(self, size: int, tag: int, paged: bool, caller: int) -> int:
        rounded = max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)
        reuse = self.free_lists.get(rounded)
        if reuse:
            addr = reuse.pop()
        else:
            if self.next + rounded > self.base + self.size:
                return 0  # out of pool: the routine returns NULL, as the kernel does
            addr = self.next
            self.next += rounded
        self.blocks[addr] = Block(addr, size, tag, paged, caller)
        books = self.books.setdefault(tag & ~tags.PROTECTED_POOL, TagBooks())
        books.allocs[paged] += 1
        books.bytes[paged] += size
        return addr

    def free(self, address: int, tag: int | None) -> None:
        block = self.blocks.pop(address, None)
        if block is None:
            raise BugCheck(0xC2, 0x7, 0, address)  # BAD_POOL_CALLER: freeing a block that is not allocated
        stored = block.tag
        if tag and (tag & ~tags.PROTECTED_POOL) != (stored & ~tags.PROTECTED_POOL):
            if stored & tags.PROTECTED_POOL:
                # the check ReactOS makes (expool.c) and old NT made for protected tags
                raise BugCheck(0xC2, 0x0A, address, stored, tag)
            self.tag_mismatches.append((address, stored, tag))
        books = self.books[stored & ~tags.PROTECTED_POOL]
        books.frees[block.paged] += 1
        books.bytes[block.paged] -= block.size
        rounded = max(ALIGN, (block.size + ALIGN - 1) // ALIGN * ALIGN)
        self.free_lists.setdefault(rounded, []).append(address)


class EmulatedKernel:
    """A driver loaded into the emulated kernel. `debugger` is its WinDbg view (pass it as `pykd=`)."""

    def __init__(self, driver: str | Path | Image, name: str | None = None) -> None:
        image = driver if isinstance(driver, Image) else load(driver)
        self.image = image
        self.name = name or Path(image.name).stem
        self.debugger = PykdStandIn(is64=image.arch == "x64")
        info = self.debugger.map_driver(image, name=self.name)
        self.debugger_base = info.begin
        self._debug_image = self.debugger.module_memory(self.name)
        self.loaded_image = self._debug_image  # as the loader left it, for checking a revert
        self.machine = Machine(image)
        self.pool = Pool(HEAP[image.arch], HEAP_SIZE)
        self.machine.uc.mem_map(HEAP[image.arch], HEAP_SIZE)
        self._return_hook = self.machine.kernel + self.machine.kernel_size - 0x10
        self.machine.name_at[self._return_hook] = "__return__"
        self.machine.handlers["__return__"] = self._on_return
        for name in {n for _, n in self.machine.address_of}:
            api = apis.lookup(name)
            if api is not None:
                self.machine.handlers[name] = self._pool_handler(api)
            else:
                self.machine.handlers[name] = self._missing(name)
        self.debugger.commands["!poolused"] = self._poolused
        self.debugger.commands["!poolfind"] = self._poolfind
        self.calls = 0

    # --- the debugger's patches reach the machine ------------------------------------------------------------

    def _sync(self) -> None:
        """Copy every byte the debugger changed in the driver image into the running machine."""
        current = self.debugger.module_memory(self.name)
        if current == self._debug_image:
            return
        base = self.machine.base
        i, n = 0, len(current)
        while i < n:
            if current[i] != self._debug_image[i]:
                j = i
                while j < n and current[j] != self._debug_image[j]:
                    j += 1
                self.machine.write(base + i, current[i:j])
                # unicorn keeps translated blocks of the old code: drop them, or the patch is never executed
                self.machine.uc.ctl_remove_cache(base + i, base + j)
                i = j
            else:
                i += 1
        self._debug_image = current

    # --- running driver code -----------------------------------------------------------------------------------

    def export(self, name: str) -> int:
        for rva, export in self.image.exports.items():
            if export == name or export.lstrip("_").split("@")[0] == name:
                return rva
        raise EmulationError(f"{self.image.name} exports no {name}")

    def call(self, export: str, *args: int, limit: int = 50_000_000) -> int:
        """Run an exported routine to completion and return its result (stdcall on x86)."""
        self._sync()
        m = self.machine
        if m.arch == "x64":
            for reg, value in zip(("rcx", "rdx", "r8", "r9"), args):
                m.set_reg(reg, value)
            extra = b"".join(struct.pack("<Q", a & (2**64 - 1)) for a in args[4:])
            frame = struct.pack("<Q", self._return_hook) + b"\0" * 0x20 + extra
        else:
            frame = struct.pack("<I", self._return_hook) + b"".join(struct.pack("<I", a & 0xFFFFFFFF) for a in args)
        # the return address sits at rsp, and rsp % 16 == 8 at a function's entry, as after a real call
        sp = (STACK[m.arch] + STACK_SIZE - 0x1000 - len(frame)) & ~0xF
        if m.arch == "x64":
            sp -= 8
        m.write(sp, frame)
        m.uc.reg_write(m.sp_reg, sp)
        self._result: int | None = None
        m.calls.clear()
        try:
            m.run(m.base + self.export(export), count=limit)
        except RuntimeError as e:
            raise EmulationError(f"{export}: {e}") from e
        if self._result is None:
            raise EmulationError(f"{export} did not return within {limit} instructions")
        self.calls += 1
        return self._result

    def _on_return(self, machine: Machine, call: Call) -> int:
        self._result = machine.reg("rax") & (0xFFFFFFFF if machine.arch == "x86" else 2**64 - 1)
        machine.stop()
        return self._result

    def _missing(self, name: str) -> Callable[[Machine, Call], int]:
        def handler(machine: Machine, call: Call) -> int:
            machine.stop()
            raise EmulationError(f"the driver called {name}, which the emulated kernel does not provide")

        return handler

    def _pool_handler(self, api: apis.PoolApi) -> Callable[[Machine, Call], int]:
        def handler(machine: Machine, call: Call) -> int:
            args = call.regs if machine.arch == "x64" else call.stack[:4]
            caller = call.ret - machine.base if machine.base <= call.ret < machine.base + len(machine.initial) else -1
            if api.role == apis.ALLOC:
                if api.name in ("ExAllocatePool2", "ExAllocatePool3"):
                    if machine.arch == "x64":
                        flags, size, tag = args[0], args[1], args[2]
                    else:
                        flags, size, tag = call.stack[0] | call.stack[1] << 32, call.stack[2], call.stack[3]
                    paged = bool(flags & POOL_FLAG_PAGED)
                elif api.tagged:
                    pool_type, size, tag = args[0], args[1], args[2]
                    paged = bool(pool_type & PAGED_POOL)
                else:
                    pool_type, size, tag = args[0], args[1], NONE_TAG
                    paged = bool(pool_type & PAGED_POOL)
                tag &= 0xFFFFFFFF
                if tag & ~tags.PROTECTED_POOL == 0:
                    return 0  # tag 0: ExAllocatePool2 fails, and so does WithTag since Windows 10 1903
                return self.pool.allocate(size & 0xFFFFFFFF, tag, paged, caller)
            if api.role == apis.FREE:
                address = args[0] & (2**64 - 1 if machine.arch == "x64" else 0xFFFFFFFF)
                tag_arg = (args[1] & 0xFFFFFFFF) if api.tagged else None
                self.pool.free(address, tag_arg)
                return 0
            return 0  # lookaside initialisation: the list itself allocates nothing until used

        return handler

    # --- what the debugger prints ------------------------------------------------------------------------------

    def usages(self) -> list[TagUsage]:
        out = []
        for tag, b in sorted(self.pool.books.items()):
            out.append(
                TagUsage(
                    tag=tags.display(tag),
                    nonpaged_outstanding=b.allocs[0] - b.frees[0],
                    nonpaged_bytes=b.bytes[0],
                    paged_outstanding=b.allocs[1] - b.frees[1],
                    paged_bytes=b.bytes[1],
                    nonpaged_allocs=b.allocs[0],
                    nonpaged_frees=b.frees[0],
                    paged_allocs=b.allocs[1],
                    paged_frees=b.frees[1],
                    description=f"UNKNOWN pooltag '{tags.display(tag)}', please update pooltag.txt",
                )
            )
        return out

    def _poolused(self, command: str) -> str:
        from ..snapshots.render import render_poolused

        words = command.split()
        flags = int(words[1], 0) if len(words) > 1 else 0
        pattern = words[2] if len(words) > 2 else None
        usages = [u for u in self.usages() if pattern is None or _matches(u.tag, pattern)]
        return render_poolused(usages, flags)

    def _poolfind(self, command: str) -> str:
        from ..snapshots.model import PoolBlock
        from ..snapshots.render import render_poolfind

        words = command.split()
        if len(words) < 2:
            return "Usage: !poolfind TagString [PoolType]"
        pattern = words[1]
        pool_type = int(words[2], 0) if len(words) > 2 and words[2][0].isdigit() else 0
        want_paged = pool_type == 1
        blocks = [
            PoolBlock(
                address=b.address,
                size=b.size,
                tag=tags.display(b.tag),
                pool="paged" if b.paged else "nonpaged",
                allocated=True,
                protected=bool(b.tag & tags.PROTECTED_POOL),
                previous_size=None,
            )
            for b in sorted(self.pool.blocks.values(), key=lambda b: b.address)
            if b.paged == want_paged and _matches(tags.display(b.tag), pattern)
        ]
        return render_poolfind(blocks, pattern, pool_type)


def _matches(tag: str, pattern: str) -> bool:
    """!poolused/!poolfind tag patterns: `*` any run, `?` one character, otherwise exactly four characters."""
    import fnmatch

    if pattern.lower().startswith("0x"):
        return tag == tags.display(int(pattern, 16))
    p = pattern if ("*" in pattern or "?" in pattern) else pattern.ljust(4)
    return fnmatch.fnmatchcase(tag, p)
