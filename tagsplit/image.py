"""A driver image in RVA layout: the first stage of the pipeline (image -> sites -> plan -> target -> report).

pefile is used for the headers, imports and exports; `.pdata` and `.reloc` are read with `struct` because they
can hold hundreds of thousands of entries and pefile's per-entry objects would dominate the scan time.
The same `Image` serves a driver file (sections copied to their RVAs, based at the preferred ImageBase) and a
memory image of a loaded driver (`.writemem`), which is already in RVA layout and relocated to its load address.
"""

from __future__ import annotations

import array
import bisect
import hashlib
import operator
import os
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pefile

from .errors import ImageError, InputError, UnsupportedImageError

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Iterable

MACHINES = {0x8664: "x64", 0x14C: "x86"}
_OTHER_MACHINES = {0xAA64: "ARM64", 0x1C4: "ARM (Thumb-2)", 0x1C0: "ARM", 0x200: "IA-64", 0xA641: "ARM64EC"}
SCN_MEM_EXECUTE = 0x20000000
SCN_CNT_CODE = 0x00000020
SCN_MEM_DISCARDABLE = 0x02000000
SCN_MEM_NOT_PAGED = 0x08000000
SUBSYSTEM_NATIVE = 1
KERNEL_DLLS = frozenset({"ntoskrnl.exe", "hal.dll", "ndis.sys", "fltmgr.sys", "wdfldr.sys", "ksecdd.sys", "cng.sys"})
MAX_IMAGE_SIZE = 1 << 30  # a driver larger than 1 GiB in memory is a corrupt header, not a driver
# Bounds that keep a hostile file from costing more than a few times its own size in memory and time:
MAX_FILE_SIZE = 512 << 20  # the largest shipped drivers are ~100 MiB; anything above 512 MiB is refused unread
# SizeOfImage may exceed the file by this much (uninitialised data, section alignment). The image is materialised
# in memory, so a 7 KiB file claiming SizeOfImage 0x36000000 must not allocate and copy 864 MiB.
MAX_VIRTUAL_EXCESS = 64 << 20
MAX_PDATA_ENTRIES = 1 << 20  # the largest drivers have ~200,000 functions
MAX_RELOCATIONS = 1 << 22
THREADED_HASH_BYTES = 4 << 20
UNW_FLAG_CHAININFO = 0x4


@dataclass(frozen=True)
class Section:
    name: str
    rva: int
    size: int  # the larger of VirtualSize and SizeOfRawData, as the loader maps it
    raw_offset: int
    raw_size: int
    characteristics: int
    virtual_size: int = 0
    header_offset: int = 0  # file offset of this section's 40-byte header

    @property
    def end(self) -> int:
        return self.rva + self.size

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & (SCN_MEM_EXECUTE | SCN_CNT_CODE))

    @property
    def discardable(self) -> bool:
        # The kernel discards INIT by name as well as by flag.
        return bool(self.characteristics & SCN_MEM_DISCARDABLE) or self.name.upper().startswith("INIT")

    @property
    def pageable(self) -> bool:
        # "If a section name begins with PAGE, the I/O manager makes the section pageable."
        return self.name.upper().startswith("PAGE")


class Function(NamedTuple):
    """A function as one or more [begin, end) RVA ranges (x64 chained unwind entries give several).

    A named tuple rather than a dataclass: `Image.functions` makes one per `.pdata` function, hundreds of thousands
    in a large driver.
    """

    rva: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class FunctionTable:
    """The functions of `.pdata` as sorted, disjoint [begin, end) ranges, each with the entry of its function.

    Kept as columns, not objects: a large driver has hundreds of thousands of functions and a scan looks up a few
    thousand of them. `Function` objects are made on demand. The chained entries are followed on first use
    (`links`): a scan forks the processes that search the code first, and follows them meanwhile.
    """

    begins: list[int]
    ends: list[int]
    unwind: list[int] = field(repr=False)  # the RVA of each range's UNWIND_INFO
    mem: bytes = field(repr=False)  # the image (where the UNWIND_INFO is)
    size: int = field(repr=False)  # SizeOfImage

    @cached_property
    def links(self) -> tuple[list[int], dict[int, tuple[tuple[int, int], ...]]]:
        """The entry RVA of the function each range belongs to (itself unless chained), and entry -> all its ranges
        for the functions of several ranges."""
        if not self.begins:
            return [], {}
        return _chained(self.mem, self.begins, self.ends, self.unwind, self.size)

    @property
    def roots(self) -> list[int]:
        return self.links[0]

    @property
    def chained(self) -> dict[int, tuple[tuple[int, int], ...]]:
        return self.links[1]

    def at(self, rva: int) -> Function | None:
        i = bisect.bisect_right(self.begins, rva) - 1
        if i < 0 or rva >= self.ends[i]:
            return None
        root = self.roots[i]
        ranges = self.chained.get(root)
        return Function(root, ranges if ranges is not None else ((self.begins[i], self.ends[i]),))

    def containing(self, rvas: Iterable[int]) -> tuple[dict[int, tuple[tuple[int, int], ...]], list[int]]:
        """The functions holding `rvas` (entry -> ranges) and the RVAs outside every function, in one
        sorted pass: a large driver asks this for thousands of call sites at once."""
        found: dict[int, tuple[tuple[int, int], ...]] = {}
        outside: list[int] = []
        begins, ends, roots, chained = self.begins, self.ends, self.roots, self.chained
        end = -1  # the end of the range the previous RVA fell in
        for rva in sorted(rvas):
            if rva < end:
                continue
            i = bisect.bisect_right(begins, rva) - 1
            if i < 0 or rva >= ends[i]:
                outside.append(rva)
                end = -1
                continue
            end = ends[i]
            root = roots[i]
            if root not in found:
                found[root] = chained.get(root) or ((begins[i], end),)
        return found, outside

    def __len__(self) -> int:
        return len(self.begins)

    def all(self) -> tuple[Function, ...]:
        """Every function, by entry RVA."""
        out = {r: Function(r, ((b, e),)) for b, e, r in zip(self.begins, self.ends, self.roots)}
        out.update((r, Function(r, rs)) for r, rs in self.chained.items())
        return tuple(out[r] for r in sorted(out))


NO_FUNCTIONS = FunctionTable([], [], [], b"", 0)


@dataclass(frozen=True)
class Import:
    dll: str
    name: str


@dataclass(frozen=True, eq=False)
class Image:
    path: str
    sha256: str
    arch: str
    mapped: bool
    base: int  # the address the bytes in `mem` are relocated to
    preferred_base: int
    entry_rva: int
    timestamp: int
    size_of_image: int
    checksum: int
    subsystem: int
    section_alignment: int
    characteristics: int
    mem: bytes = field(repr=False)
    sections: tuple[Section, ...]
    imports: dict[int, Import] = field(repr=False)  # IAT slot RVA -> import
    exports: dict[int, str] = field(repr=False)  # RVA -> name
    function_table: FunctionTable = field(repr=False)  # x64: from .pdata; x86: empty
    relocations: tuple[int, ...] = field(repr=False)  # sorted RVAs of relocated fields
    relocation_sizes: tuple[int, ...] = field(repr=False)
    relocation_entries: tuple[int, ...] = field(repr=False)  # RVA of each relocation's 2-byte .reloc entry
    warnings: tuple[str, ...] = ()

    @property
    def ptr_size(self) -> int:
        return 8 if self.arch == "x64" else 4

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def is_driver(self) -> bool:
        if self.subsystem == SUBSYSTEM_NATIVE:
            return True
        return any(imp.dll.lower() in KERNEL_DLLS for imp in self.imports.values())

    def section_at(self, rva: int) -> Section | None:
        for s in self.sections:
            if s.rva <= rva < s.end:
                return s
        return None

    def code_sections(self) -> list[Section]:
        return [s for s in self.sections if s.executable]

    def read(self, rva: int, size: int) -> bytes:
        if rva < 0 or size < 0 or rva + size > len(self.mem):
            raise ImageError(f"read of {size} bytes at RVA {rva:#x} is outside the image")
        return self.mem[rva : rva + size]

    def rva_to_offset(self, rva: int) -> int | None:
        """File offset of an RVA, or None where the byte has no file backing (or the image is a memory dump)."""
        if self.mapped:
            return None
        for s in self.sections:
            if s.rva <= rva < s.rva + s.raw_size:
                return s.raw_offset + (rva - s.rva)
        return None

    def relocated_in(self, rva: int, size: int) -> list[int]:
        """RVAs of relocated fields that overlap [rva, rva+size)."""
        out = []
        i = bisect.bisect_left(self.relocations, rva - 8)
        while i < len(self.relocations) and self.relocations[i] < rva + size:
            r, n = self.relocations[i], self.relocation_sizes[i]
            if r + n > rva:
                out.append(r)
            i += 1
        return out

    def function_at(self, rva: int) -> Function | None:
        """The .pdata function containing rva (x64 only)."""
        return self.function_table.at(rva)

    @cached_property
    def functions(self) -> tuple[Function, ...]:
        """Every .pdata function, by entry RVA (x64; empty on x86)."""
        return self.function_table.all()


def load(
    path: str | Path,
    *,
    mapped_base: int | None = None,
    imports_from: Image | None = None,
) -> Image:
    """Read a driver file, or a memory image (`.writemem`) of a driver loaded at `mapped_base`.

    Only regular files are read (never a FIFO or a device), and at most MAX_FILE_SIZE bytes of them.

    Raises:
        InputError: the file cannot be read, or is not a regular file.
        ImageError: not a PE, or a PE whose headers are corrupt, or too large.
        UnsupportedImageError: a PE for another architecture, or a .NET image.
    """
    p = Path(path)
    data = read_file(p)
    return parse(data, str(p), mapped_base=mapped_base, imports_from=imports_from)


def read_file(p: Path, limit: int | None = None) -> bytes:
    """The bytes of regular file `p`, refusing directories, devices, FIFOs and files above `limit` unread.

    Raises:
        InputError: cannot be opened or read, or not a regular file.
        ImageError: larger than `limit`.
    """
    limit = MAX_FILE_SIZE if limit is None else limit
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block open()
    try:
        fd = os.open(p, flags)
    except IsADirectoryError as e:
        raise InputError(f"{p}: is a directory") from e
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{p}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{p}: not a regular file (a device, FIFO or socket)")
        if st.st_size > limit:
            raise ImageError(f"{p}: {st.st_size:,} bytes is too large for a driver (limit {limit >> 20} MiB)")
        chunks = []
        left = limit + 1  # the file may grow after fstat: never read more than the limit
        step = max(st.st_size + 1, 1 << 24)  # the whole file in one read where it can: then nothing is joined
        while left > 0:
            chunk = os.read(fd, min(left, step))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ImageError(f"{p}: more than {limit >> 20} MiB is too large for a driver")
    return data


def parse(
    data: bytes,
    path: str = "<memory>",
    *,
    mapped_base: int | None = None,
    imports_from: Image | None = None,
) -> Image:
    """Parse an image held in memory; see `load`."""
    if not data:
        raise ImageError(f"{path}: empty file")
    if len(data) > MAX_FILE_SIZE:
        raise ImageError(f"{path}: {len(data):,} bytes is too large for a driver (limit {MAX_FILE_SIZE >> 20} MiB)")
    if data[:2] != b"MZ":
        raise ImageError(f"{path}: not a PE file (no MZ header)")
    sha256 = _sha256_soon(data)
    if mapped_base is not None:
        try:
            data = _as_file_layout(data)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from e
    try:
        pe = pefile.PE(data=data, fast_load=True)
    except pefile.PEFormatError as e:
        raise ImageError(f"{path}: not a valid PE file: {e.value if hasattr(e, 'value') else e}") from e
    except Exception as e:  # pefile raises assorted builtins on hostile headers
        raise ImageError(f"{path}: corrupt PE headers ({type(e).__name__}: {e})") from e
    # No pe.close(): for a PE made from bytes it only runs gc.collect(), a full collection that costs 10-100 ms per
    # file in a large process (folder scans, test runs) and frees nothing here.
    return _build(pe, data, path, sha256, mapped_base, imports_from)


def _sha256_soon(data: bytes) -> Callable[[], str]:
    """The SHA-256 of `data`, to be asked for later: a large image is hashed in a thread (hashlib lets go of the
    interpreter lock while it hashes) while its headers and tables are read."""
    if len(data) < THREADED_HASH_BYTES:
        digest = hashlib.sha256(data).hexdigest()
        return lambda: digest
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(hashlib.sha256(data).hexdigest()), daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        return out[0] if out else hashlib.sha256(data).hexdigest()

    return result


def _as_file_layout(mem: bytes) -> bytes:
    """A memory image with its section table rewritten so that every file offset equals its RVA.

    pefile reads directories through file offsets; this lets it read a `.writemem` dump unchanged.
    """
    buf = bytearray(mem)
    try:
        pe_off = struct.unpack_from("<I", buf, 0x3C)[0]
        count, opt_size = struct.unpack_from("<H12xH", buf, pe_off + 6)
        table = pe_off + 24 + opt_size
        for i in range(count):
            h = table + 40 * i
            vsize, vaddr = struct.unpack_from("<II", buf, h + 8)
            struct.pack_into("<II", buf, h + 16, vsize, vaddr)
    except struct.error as e:
        raise ImageError("memory image: truncated headers") from e
    return bytes(buf)


def code_file_ranges(data: bytes | mmap.mmap) -> list[tuple[int, int]] | None:
    """File ranges [start, end) whose bytes `parse` can place in an executable section, read from the headers alone
    with `struct` (microseconds, no pefile). None unless the headers pass the checks `parse` makes of them (so a
    caller that gets None must use `parse`, which explains what is wrong). Used by folder scans to skip files
    whose tag bytes occur only outside code.

    Conservative: a range is included whenever `parse` might map it into code (the headers too, if an executable
    section starts inside them); never raises.
    """
    try:
        if data[:2] != b"MZ" or len(data) > MAX_FILE_SIZE:
            return None
        pe_off = struct.unpack_from("<I", data, 0x3C)[0]
        if data[pe_off : pe_off + 4] != b"PE\0\0":
            return None
        machine, count, opt_size = struct.unpack_from("<H H 12x H", data, pe_off + 4)
        opt = pe_off + 24
        magic = struct.unpack_from("<H", data, opt)[0]
        if machine not in MACHINES or not 0 < count <= 96 or magic != (0x20B if MACHINES[machine] == "x64" else 0x10B):
            return None
        dirs = opt + (112 if magic == 0x20B else 96)
        if opt_size < dirs - opt or opt + opt_size > len(data):
            return None
        size_of_image, size_of_headers = struct.unpack_from("<II", data, opt + 56)
        if not 0 < size_of_image <= min(MAX_IMAGE_SIZE, len(data) + MAX_VIRTUAL_EXCESS):
            return None
        n_dirs = min(struct.unpack_from("<I", data, dirs - 4)[0], (opt_size - (dirs - opt)) // 8)
        if n_dirs > 14 and any(struct.unpack_from("<II", data, dirs + 8 * 14)):
            return None  # .NET
        table = opt + opt_size
        if table + 40 * count > len(data):
            return None
        out: list[tuple[int, int]] = []
        spans = []
        headers_in_code = False
        for i in range(count):
            vsize, rva, raw_size, raw_off, chars = struct.unpack_from("<8x4I12xI", data, table + 40 * i)
            size = max(vsize or raw_size, raw_size)
            if rva >= size_of_image or rva + size > size_of_image + 0x1000:
                return None
            if raw_size and raw_off + min(raw_size, size) > len(data):
                return None
            spans.append((rva, rva + min(size, size_of_image - rva)))
            if not chars & (SCN_MEM_EXECUTE | SCN_CNT_CODE):
                continue
            if raw_size:
                out.append((raw_off, raw_off + raw_size))
            if rva < size_of_headers:  # `parse` copies the headers first: this section's range shows them
                headers_in_code = True
        spans.sort()
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])) or (not out and not headers_in_code):
            return None
        if headers_in_code:
            out.append((0, size_of_headers))
        return out
    except struct.error:
        return None


def _build(
    pe: pefile.PE,
    data: bytes,
    path: str,
    sha256: Callable[[], str],
    mapped_base: int | None,
    imports_from: Image | None,
) -> Image:
    machine = pe.FILE_HEADER.Machine
    if machine not in MACHINES:
        what = _OTHER_MACHINES.get(machine, f"machine type {machine:#x}")
        raise UnsupportedImageError(f"{path}: unsupported architecture {what}; tagsplit handles x64 and x86 drivers")
    arch = MACHINES[machine]
    oh = pe.OPTIONAL_HEADER
    if (arch == "x64") != (oh.Magic == 0x20B):
        raise ImageError(f"{path}: optional header magic {oh.Magic:#x} does not match machine {arch}")
    dirs = oh.DATA_DIRECTORY
    if len(dirs) > 14 and dirs[14].VirtualAddress and dirs[14].Size:
        raise UnsupportedImageError(f"{path}: a .NET image; tagsplit handles native drivers")
    size_of_image = oh.SizeOfImage
    if not 0 < size_of_image <= MAX_IMAGE_SIZE:
        raise ImageError(f"{path}: implausible SizeOfImage {size_of_image:#x}")
    if size_of_image > len(data) + MAX_VIRTUAL_EXCESS:
        raise ImageError(
            f"{path}: implausible SizeOfImage {size_of_image:#x} for a file of {len(data):#x} bytes (more than "
            f"{MAX_VIRTUAL_EXCESS >> 20} MiB of uninitialised data; a corrupt header?)"
        )
    mapped = mapped_base is not None
    sections = _sections(pe, path, size_of_image, len(data), mapped)
    warnings: list[str] = []
    if mapped:
        mem = bytes(data[:size_of_image])
        if len(mem) < size_of_image:
            warnings.append(f"memory image is {len(mem):#x} bytes, SizeOfImage is {size_of_image:#x}; rest read as 0")
            mem = mem.ljust(size_of_image, b"\0")
        base = mapped_base
    else:
        mem = _mapped_layout(data, sections, min(oh.SizeOfHeaders, len(data), size_of_image), size_of_image)
        base = oh.ImageBase
    assert base is not None

    try:
        pe.parse_data_directories(
            directories=[
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_IMPORT"],
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"],
            ]
        )
    except Exception as e:  # pefile raises assorted builtins on hostile directories
        raise ImageError(f"{path}: corrupt import or export directory ({type(e).__name__}: {e})") from e
    imports = dict(imports_from.imports) if imports_from is not None else _imports(pe, size_of_image, warnings)
    if mapped and not imports and imports_from is None:
        warnings.append(
            "no import names in the memory image (INIT discarded?); give the driver file with --imports-from"
        )
    exports = _exports(pe, size_of_image)
    functions = _pdata(mem, dirs[3], path, size_of_image, warnings) if arch == "x64" and len(dirs) > 3 else NO_FUNCTIONS
    relocs, reloc_sizes, reloc_entries = (
        _relocations(mem, dirs[5], size_of_image, warnings) if len(dirs) > 5 else ((), (), ())
    )
    warnings.extend(str(w) for w in pe.get_warnings()[:5])
    return Image(
        path=path,
        sha256=sha256(),
        arch=arch,
        mapped=mapped,
        base=base,
        preferred_base=oh.ImageBase,
        entry_rva=oh.AddressOfEntryPoint,
        timestamp=pe.FILE_HEADER.TimeDateStamp,
        size_of_image=size_of_image,
        checksum=oh.CheckSum,
        subsystem=oh.Subsystem,
        section_alignment=oh.SectionAlignment,
        characteristics=pe.FILE_HEADER.Characteristics,
        mem=mem,
        sections=sections,
        imports=imports,
        exports=exports,
        function_table=functions,
        relocations=relocs,
        relocation_sizes=reloc_sizes,
        relocation_entries=reloc_entries,
        warnings=tuple(warnings),
    )


def _mapped_layout(data: bytes, sections: tuple[Section, ...], headers: int, size: int) -> bytes:
    """The file's headers and sections at their RVAs, zeros elsewhere, as the loader maps them."""
    spans = [(0, 0, headers)]
    for s in sections:
        n = min(s.raw_size, s.size, max(0, len(data) - s.raw_offset), size - s.rva)
        if n > 0:
            spans.append((s.rva, s.raw_offset, n))
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    at = 0
    for rva, offset, n in spans:
        if rva < at:
            break  # a section over the headers or another section: copied in order below, the later one wins
        pieces += (bytes(rva - at), view[offset : offset + n])
        at = rva + n
    else:
        pieces.append(bytes(size - at))
        return b"".join(pieces)  # (one copy of each piece, straight into the result)
    buf = bytearray(size)
    for rva, offset, n in spans:
        buf[rva : rva + n] = view[offset : offset + n]
    return bytes(buf)


def _sections(pe: pefile.PE, path: str, size_of_image: int, file_size: int, mapped: bool) -> tuple[Section, ...]:
    out = []
    for s in pe.sections:
        name = s.Name.rstrip(b"\0").decode("latin-1")
        vsize = s.Misc_VirtualSize or s.SizeOfRawData
        size = max(vsize, s.SizeOfRawData) if not mapped else vsize
        if s.VirtualAddress >= size_of_image or s.VirtualAddress + size > size_of_image + 0x1000:
            raise ImageError(f"{path}: section {name!r} at RVA {s.VirtualAddress:#x} lies outside SizeOfImage")
        size = min(size, size_of_image - s.VirtualAddress)
        if not mapped and s.SizeOfRawData and s.PointerToRawData + min(s.SizeOfRawData, size) > file_size:
            raise ImageError(f"{path}: section {name!r} extends past the end of the file (truncated?)")
        out.append(
            Section(
                name,
                s.VirtualAddress,
                size,
                s.PointerToRawData,
                s.SizeOfRawData,
                s.Characteristics,
                s.Misc_VirtualSize,
                s.get_file_offset(),
            )
        )
    out.sort(key=lambda s: s.rva)
    for a, b in zip(out, out[1:]):
        if b.rva < a.end:
            raise ImageError(f"{path}: sections {a.name!r} and {b.name!r} overlap")
    if not any(s.executable for s in out):
        raise ImageError(f"{path}: no executable section")
    return tuple(out)


def _imports(pe: pefile.PE, size: int, warnings: list[str]) -> dict[int, Import]:
    out: dict[int, Import] = {}
    base = pe.OPTIONAL_HEADER.ImageBase
    outside = 0
    for entry in getattr(pe, "DIRECTORY_ENTRY_IMPORT", []):
        dll = entry.dll.decode("latin-1") if entry.dll else "?"
        for imp in entry.imports:
            if imp.address is None or not 0 <= imp.address - base <= size - 4:
                outside += 1  # an IAT slot outside the image: nothing in the image can call through it
                continue
            name = imp.name.decode("latin-1") if imp.name else f"#{imp.ordinal}"
            out[imp.address - base] = Import(dll, name)
    if outside:
        warnings.append(f"{outside} import slots outside the image were ignored")
    return out


def _exports(pe: pefile.PE, size: int) -> dict[int, str]:
    out: dict[int, str] = {}
    d = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    for sym in getattr(d, "symbols", []) if d else []:
        if sym.name and not sym.forwarder and isinstance(sym.address, int) and 0 <= sym.address < size:
            out.setdefault(sym.address, sym.name.decode("latin-1"))
    return out


def _pdata(mem: bytes, d: pefile.Structure, path: str, size: int, warnings: list[str]) -> FunctionTable:
    if not d.VirtualAddress or not d.Size:
        return NO_FUNCTIONS
    start, length = d.VirtualAddress, d.Size - d.Size % 12
    if start + length > size:
        warnings.append(".pdata extends past the image; truncated")
        length = max(0, (size - start) // 12 * 12)
    cap = max(1, min(MAX_PDATA_ENTRIES, size // 4))
    if length // 12 > cap:
        warnings.append(f".pdata has {length // 12} entries; only the first {cap} are read")
        length = 12 * cap
    words = array.array("I", mem[start : start + length])
    if sys.byteorder != "little":
        words.byteswap()
    begins, ends, unwind = words[0::3].tolist(), words[1::3].tolist(), words[2::3].tolist()
    if not begins:
        return NO_FUNCTIONS
    # What every sane image has (each entry in range, sorted, disjoint, its unwind data inside the image) is
    # checked a column at a time; anything else is sorted out entry by entry.
    if (
        min(begins) > 0
        and max(ends) <= size
        and all(map(operator.lt, begins, ends))
        and all(map(operator.le, ends[:-1], begins[1:]))
    ):
        return FunctionTable(begins, ends, unwind, mem, size)
    entries = list(zip(begins, ends, unwind))
    valid = [ent for ent in entries if 0 < ent[0] < ent[1] <= size]
    bad = len(entries) - len(valid)
    valid.sort()
    # .pdata is sorted and its ranges are disjoint (RtlLookupFunctionEntry searches it): an entry overlapping an
    # earlier one is corrupt, and 100,000 copies of one range would make the scanner disassemble it 100,000 times.
    kept: list[tuple[int, int, int]] = []
    last_end = 0
    for ent in valid:
        if ent[0] >= last_end:
            kept.append(ent)
            last_end = ent[1]
    if bad:
        warnings.append(f"{bad} .pdata entries out of range were ignored")
    if len(valid) > len(kept):
        warnings.append(f"{len(valid) - len(kept)} .pdata entries overlapping others were ignored")
    if not kept:
        return NO_FUNCTIONS
    return FunctionTable([b for b, _, _ in kept], [e for _, e, _ in kept], [u for _, _, u in kept], mem, size)


def _chained(
    mem: bytes, begins: list[int], ends: list[int], unwind: list[int], size: int
) -> tuple[list[int], dict[int, tuple[tuple[int, int], ...]]]:
    """`FunctionTable.links` of sorted, disjoint .pdata ranges: a chained entry (its UNWIND_INFO's flags say so)
    describes a fragment of another function; its chain is followed to the primary."""
    chain = UNW_FLAG_CHAININFO << 3
    inside = unwind if min(unwind) > 0 and max(unwind) < size - 4 else [u if 0 < u < size - 4 else 0 for u in unwind]
    flags = bytes_at(mem, inside)
    fragments = [i for i in compress(range(len(inside)), flags.translate(_CHAINED)) if inside[i]]
    roots = begins[:]
    if not fragments:
        return roots, {}
    # Nearly every chain is one link long, to a primary entry of the table: those are read a column at a time,
    # the others followed link by link below.
    ups = [unwind[i] for i in fragments]
    offsets = [u + 4 + ((count + 1) & ~1) * 2 for u, count in zip(ups, bytes_at(mem, [u + 2 for u in ups]))]
    longer = []
    if max(offsets) + 12 <= size:
        firsts = [_U32(mem, o)[0] for o in offsets]
        for i, root in zip(fragments, firsts):
            j = bisect.bisect_left(begins, root)
            if j < len(begins) and begins[j] == root and not (inside[j] and mem[inside[j]] & chain):
                roots[i] = root
            else:
                longer.append(i)
    else:
        longer = fragments
    for i in longer:
        u = unwind[i]
        root = begins[i]
        seen = 0
        while 0 < u < size - 4 and mem[u] & chain and seen < 32:
            count = mem[u + 2]
            off = u + 4 + ((count + 1) & ~1) * 2
            if off + 12 > size:
                break
            parent = struct.unpack_from("<III", mem, off)
            root = parent[0]
            j = bisect.bisect_left(begins, root)
            u = unwind[j] if j < len(begins) and begins[j] == root else parent[2]
            seen += 1
        roots[i] = root
    # a function of several ranges: its own entry (the one whose begin is its entry RVA) and its fragments
    several: dict[int, set[tuple[int, int]]] = {}
    for i in fragments:
        several.setdefault(roots[i], set()).add((begins[i], ends[i]))
    for r, rs in several.items():
        j = bisect.bisect_left(begins, r)
        if j < len(begins) and begins[j] == r and roots[j] == r:
            rs.add((r, ends[j]))
    return roots, {r: tuple(sorted(rs)) for r, rs in several.items()}


_CHAINED = bytes(1 if b & (UNW_FLAG_CHAININFO << 3) else 0 for b in range(256))
_U32 = struct.Struct("<I").unpack_from


def bytes_at(mem: bytes | memoryview, positions: list[int]) -> bytes:
    """mem[p] for each p, as one bytes object (gathered in C: the scanner reads columns of opcode bytes so)."""
    return bytes(operator.itemgetter(*positions)(mem)) if len(positions) > 1 else bytes(mem[p] for p in positions)


def _relocations(
    mem: bytes, d: pefile.Structure, size: int, warnings: list[str]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if not d.VirtualAddress or not d.Size:
        return (), (), ()
    pos, end = d.VirtualAddress, min(d.VirtualAddress + d.Size, size)
    rvas: list[int] = []
    sizes: list[int] = []
    where: list[int] = []
    widths = {1: 2, 2: 2, 3: 4, 10: 8}
    cap = max(1, min(MAX_RELOCATIONS, size // 2))
    outside = 0
    while pos + 8 <= end and len(rvas) < cap:
        page, block = struct.unpack_from("<II", mem, pos)
        if block < 8 or pos + block > end:
            if block:
                warnings.append(f"malformed base relocation block at RVA {pos:#x}")
            break
        for i, (entry,) in enumerate(struct.iter_unpack("<H", mem[pos + 8 : pos + block - (block - 8) % 2])):
            kind, off = entry >> 12, entry & 0xFFF
            if kind in widths:
                if page + off + widths[kind] > size:
                    outside += 1
                    continue
                rvas.append(page + off)
                sizes.append(widths[kind])
                where.append(pos + 8 + 2 * i)
        pos += block
    if outside:
        warnings.append(f"{outside} base relocations outside the image were ignored")
    if len(rvas) >= cap:
        warnings.append(f"more than {cap} base relocations; the rest were not read")
        del rvas[cap:], sizes[cap:], where[cap:]
    order = sorted(range(len(rvas)), key=rvas.__getitem__)
    return tuple(rvas[i] for i in order), tuple(sizes[i] for i in order), tuple(where[i] for i in order)
