"""A unicorn machine that runs driver code with its kernel imports replaced by hooks.

Each import gets its own address in a fake kernel region. Executing there calls a Python handler with the
arguments read per the calling convention, then returns to the caller like the real routine would (x86 stdcall
pops its arguments). Unmapped memory the driver touches is mapped on demand as zeroed pages, so a fragment of
driver code can run from an arbitrary starting point with made-up register values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import unicorn
from unicorn import x86_const as X

from .mapping import map_image

if TYPE_CHECKING:
    from ..image import Image, Import

PAGE = 0x1000
# unicorn cannot fetch instructions from the kernel half of the x64 address space (0xffff8000...), so the emulated
# kernel lives high in the lower half; what matters is that the driver runs relocated away from its ImageBase.
KERNEL = {"x64": 0x7FF010000000, "x86": 0x90000000}
BASE = {"x64": 0x7FF012340000, "x86": 0x91230000}
STACK = {"x64": 0x7FF020000000, "x86": 0xA0000000}
STACK_SIZE = 0x20000
SCRATCH = {"x64": 0x7FF030000000, "x86": 0xB0000000}

_REGS64 = {
    "rax": X.UC_X86_REG_RAX,
    "rbx": X.UC_X86_REG_RBX,
    "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX,
    "rsi": X.UC_X86_REG_RSI,
    "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP,
    "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9,
    "r10": X.UC_X86_REG_R10,
    "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12,
    "r13": X.UC_X86_REG_R13,
    "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15,
}
_REGS32 = {
    "rax": X.UC_X86_REG_EAX,
    "rbx": X.UC_X86_REG_EBX,
    "rcx": X.UC_X86_REG_ECX,
    "rdx": X.UC_X86_REG_EDX,
    "rsi": X.UC_X86_REG_ESI,
    "rdi": X.UC_X86_REG_EDI,
    "rbp": X.UC_X86_REG_EBP,
}


@dataclass(frozen=True)
class Call:
    name: str
    ret: int  # return address
    sp: int  # stack pointer at the routine's entry
    regs: tuple[int, ...]  # x64: rcx, rdx, r8, r9
    stack: tuple[int, ...]  # the dwords (x86) / qwords (x64) above the return address


Handler = Callable[["Machine", Call], int]


class Stop(Exception):
    """Raised by a handler to end the run."""


@dataclass
class Machine:
    image: Image
    base: int = 0
    memory: bytes | None = None  # the mapped image; default: map_image(image, base)
    handlers: dict[str, Handler] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        arch = self.image.arch
        self.arch = arch
        self.ptr = 8 if arch == "x64" else 4
        if not self.base:
            self.base = BASE[arch]
        names = sorted({(i.dll.lower(), i.name) for i in self.image.imports.values()})
        self.kernel = KERNEL[arch]
        self.address_of = {n: self.kernel + 0x10 * k for k, n in enumerate(names)}
        self.name_at = {a: n[1] for n, a in self.address_of.items()}
        mem = self.memory if self.memory is not None else map_image(self.image, self.base, self._resolve)
        mode = unicorn.UC_MODE_64 if arch == "x64" else unicorn.UC_MODE_32
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        size = (len(mem) + PAGE - 1) // PAGE * PAGE
        uc.mem_map(self.base, size)
        uc.mem_write(self.base, mem)
        ksize = (0x10 * (len(names) + 1) + PAGE - 1) // PAGE * PAGE
        uc.mem_map(self.kernel, ksize)
        uc.mem_write(self.kernel, b"\xc3" * ksize)
        self.kernel_size = ksize
        uc.mem_map(STACK[arch], STACK_SIZE)
        uc.mem_map(SCRATCH[arch], 0x10000)
        uc.hook_add(unicorn.UC_HOOK_CODE, self._on_kernel, begin=self.kernel, end=self.kernel + ksize - 1)
        uc.hook_add(
            unicorn.UC_HOOK_MEM_READ_UNMAPPED | unicorn.UC_HOOK_MEM_WRITE_UNMAPPED | unicorn.UC_HOOK_MEM_FETCH_UNMAPPED,
            self._on_unmapped,
        )
        self.uc = uc
        self.sp_reg = X.UC_X86_REG_RSP if arch == "x64" else X.UC_X86_REG_ESP
        self.pc_reg = X.UC_X86_REG_RIP if arch == "x64" else X.UC_X86_REG_EIP
        self.ax_reg = X.UC_X86_REG_RAX if arch == "x64" else X.UC_X86_REG_EAX
        self.fetch_faults = 0
        self.heap = SCRATCH[arch] + 0x8000
        self.initial = bytes(mem)
        self.demand_pages: list[tuple[int, int]] = []
        # every register, segment registers included: a run through arbitrary code may load any of them
        self.context = uc.context_save()

    def _resolve(self, imp: Import) -> int:
        return self.address_of[(imp.dll.lower(), imp.name)]

    # --- memory helpers ---------------------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(addr, size))

    def write(self, addr: int, data: bytes) -> None:
        self.uc.mem_write(addr, data)

    def read_ptr(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, self.ptr), "little")

    def reg(self, name: str) -> int:
        table = _REGS64 if self.arch == "x64" else _REGS32
        return int(self.uc.reg_read(table[name]))

    def set_reg(self, name: str, value: int) -> None:
        table = _REGS64 if self.arch == "x64" else _REGS32
        self.uc.reg_write(table[name], value & ((1 << (8 * self.ptr)) - 1))

    @property
    def sp(self) -> int:
        return int(self.uc.reg_read(self.sp_reg))

    def _on_unmapped(self, uc: unicorn.Uc, access: int, address: int, size: int, value: int, data: object) -> bool:
        if access == unicorn.UC_MEM_FETCH_UNMAPPED:
            self.fetch_faults += 1
            return False
        page = address & ~(PAGE - 1)
        length = PAGE * 2 if (address + size) > page + PAGE else PAGE
        try:
            uc.mem_map(page, length)
        except unicorn.UcError:
            return False
        self.demand_pages.append((page, length))
        return True

    def _on_kernel(self, uc: unicorn.Uc, address: int, size: int, data: object) -> None:
        name = self.name_at.get(address)
        if name is None:
            return
        sp = self.sp
        ret = self.read_ptr(sp)
        if self.arch == "x64":
            regs = tuple(self.reg(r) for r in ("rcx", "rdx", "r8", "r9"))
            stack = tuple(self.read_ptr(sp + 8 * i) for i in range(1, 9))
        else:
            regs = ()
            stack = tuple(int.from_bytes(self.read(sp + 4 * i, 4), "little") for i in range(1, 9))
        call = Call(name, ret, sp, regs, stack)
        self.calls.append(call)
        handler = self.handlers.get(name)
        result = handler(self, call) if handler is not None else 0
        uc.reg_write(self.ax_reg, result & ((1 << (8 * self.ptr)) - 1))
        # return like the routine: pop the return address, and on x86 the stdcall arguments
        from ..apis import lookup

        api = lookup(name)
        pop = api.arg_bytes_x86 if (api is not None and self.arch == "x86") else 0
        uc.reg_write(self.sp_reg, sp + self.ptr + pop)
        uc.reg_write(self.pc_reg, ret)

    def run(self, start: int, until: int = 0, count: int = 200_000) -> None:
        """Execute from `start` until `until` (an address) or `count` instructions."""
        try:
            self.uc.emu_start(start, until or (1 << (8 * self.ptr)) - 1, count=count)
        except unicorn.UcError as e:
            raise RuntimeError(f"emulation stopped at {self.uc.reg_read(self.pc_reg):#x}: {e}") from e

    def stop(self) -> None:
        self.uc.emu_stop()

    def reset(self) -> None:
        """The image as it was mapped, and zeroed demand pages: runs must not see each other's writes."""
        self.uc.mem_write(self.base, self.initial)
        self.uc.mem_write(self.kernel, b"\xc3" * self.kernel_size)
        self.uc.context_restore(self.context)
        for page, length in self.demand_pages:
            self.uc.mem_write(page, bytes(length))

    def prepare(self, seed: int = 1) -> None:
        """Deterministic registers pointing into a zeroed scratch area, and a fresh stack."""
        self.reset()
        for k, name in enumerate(_REGS64 if self.arch == "x64" else _REGS32):
            # different seeds give different low bits, so runs take both sides of simple flag tests
            self.set_reg(name, SCRATCH[self.arch] + 0x100 * (k + seed) + (seed * 0x15 & 0x3F))
        self.uc.reg_write(self.sp_reg, STACK[self.arch] + STACK_SIZE // 2)
        self.write(STACK[self.arch], bytes(STACK_SIZE))
        self.write(SCRATCH[self.arch], bytes(0x10000))
