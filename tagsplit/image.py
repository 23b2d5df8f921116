"""A driver image in RVA layout: the first stage of the pipeline (image -> sites -> plan -> target -> report).

pefile is used for the headers, imports and exports; `.pdata` and `.reloc` are read with `struct` because they
can hold hundreds of thousands of entries and pefile's per-entry objects would dominate the scan time.
The same `Image` serves a driver file (sections copied to their RVAs, based at the preferred ImageBase) and a
memory image of a loaded driver (`.writemem`), which is already in RVA layout and relocated to its load address.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pefile

from .errors import ImageError, InputError, UnsupportedImageError

MACHINES = {0x8664: "x64", 0x14C: "x86"}
_OTHER_MACHINES = {0xAA64: "ARM64", 0x1C4: "ARM (Thumb-2)", 0x1C0: "ARM", 0x200: "IA-64", 0xA641: "ARM64EC"}
SCN_MEM_EXECUTE = 0x20000000
SCN_CNT_CODE = 0x00000020
SCN_MEM_DISCARDABLE = 0x02000000
SCN_MEM_NOT_PAGED = 0x08000000
SUBSYSTEM_NATIVE = 1
KERNEL_DLLS = frozenset({"ntoskrnl.exe", "hal.dll", "ndis.sys", "fltmgr.sys", "wdfldr.sys", "ksecdd.sys", "cng.sys"})
MAX_IMAGE_SIZE = 1 << 30  # a driver larger than 1 GiB in memory is a corrupt header, not a driver
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


@dataclass(frozen=True)
class Function:
    """A function as one or more [begin, end) RVA ranges (x64 chained unwind entries give several)."""

    rva: int
    ranges: tuple[tuple[int, int], ...]


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
    functions: tuple[Function, ...] = field(repr=False)  # x64: from .pdata; x86: empty
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

    def section_at(self, rva: int) -> Optional[Section]:
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

    def rva_to_offset(self, rva: int) -> Optional[int]:
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

    def function_at(self, rva: int) -> Optional[Function]:
        """The .pdata function containing rva (x64 only)."""
        i = bisect.bisect_right(self._range_starts, rva) - 1
        if i >= 0 and rva < self._range_ends[i]:
            return self._range_owner[i]
        return None

    def __post_init__(self) -> None:
        rows = sorted((b, e, f.rva) for f in self.functions for b, e in f.ranges)
        by_rva = {f.rva: f for f in self.functions}
        # frozen: the lookup index is derived data, set once here
        object.__setattr__(self, "_range_starts", [r[0] for r in rows])
        object.__setattr__(self, "_range_ends", [r[1] for r in rows])
        object.__setattr__(self, "_range_owner", [by_rva[r[2]] for r in rows])

    _range_starts: list[int] = field(init=False, repr=False, default_factory=list)
    _range_ends: list[int] = field(init=False, repr=False, default_factory=list)
    _range_owner: list[Function] = field(init=False, repr=False, default_factory=list)


def load(
    path: str | Path,
    *,
    mapped_base: Optional[int] = None,
    imports_from: Optional[Image] = None,
) -> Image:
    """Read a driver file, or a memory image (`.writemem`) of a driver loaded at `mapped_base`.

    Raises:
        InputError: the file cannot be read.
        ImageError: not a PE, or a PE whose headers are corrupt.
        UnsupportedImageError: a PE for another architecture, or a .NET image.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError as e:
        raise InputError(f"{p}: is a directory") from e
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from e
    return parse(data, str(p), mapped_base=mapped_base, imports_from=imports_from)


def parse(
    data: bytes,
    path: str = "<memory>",
    *,
    mapped_base: Optional[int] = None,
    imports_from: Optional[Image] = None,
) -> Image:
    """Parse an image held in memory; see `load`."""
    if not data:
        raise ImageError(f"{path}: empty file")
    if data[:2] != b"MZ":
        raise ImageError(f"{path}: not a PE file (no MZ header)")
    sha256 = hashlib.sha256(data).hexdigest()
    if mapped_base is not None:
        data = _as_file_layout(data)
    try:
        pe = pefile.PE(data=data, fast_load=True)
    except pefile.PEFormatError as e:
        raise ImageError(f"{path}: not a valid PE file: {e.value if hasattr(e, 'value') else e}") from e
    except Exception as e:  # pefile raises assorted builtins on hostile headers
        raise ImageError(f"{path}: corrupt PE headers ({type(e).__name__}: {e})") from e
    try:
        return _build(pe, data, path, sha256, mapped_base, imports_from)
    finally:
        pe.close()


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
        raise ImageError(f"memory image: truncated headers ({e})") from e
    return bytes(buf)


def _build(
    pe: pefile.PE, data: bytes, path: str, sha256: str, mapped_base: Optional[int], imports_from: Optional[Image]
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
        buf = bytearray(size_of_image)
        hdr = min(oh.SizeOfHeaders, len(data), size_of_image)
        buf[:hdr] = data[:hdr]
        for s in sections:
            n = min(s.raw_size, s.size, max(0, len(data) - s.raw_offset), size_of_image - s.rva)
            if n > 0:
                buf[s.rva : s.rva + n] = data[s.raw_offset : s.raw_offset + n]
        mem = bytes(buf)
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
    imports = dict(imports_from.imports) if imports_from is not None else _imports(pe)
    if mapped and not imports and imports_from is None:
        warnings.append("no import names in the memory image (INIT discarded?); give the driver file with --imports-from")
    exports = _exports(pe)
    functions = _pdata(mem, dirs[3], path, size_of_image, warnings) if arch == "x64" and len(dirs) > 3 else ()
    relocs, reloc_sizes, reloc_entries = (
        _relocations(mem, dirs[5], size_of_image, warnings) if len(dirs) > 5 else ((), (), ())
    )
    warnings.extend(str(w) for w in pe.get_warnings()[:5])
    return Image(
        path=path,
        sha256=sha256,
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
        functions=functions,
        relocations=relocs,
        relocation_sizes=reloc_sizes,
        relocation_entries=reloc_entries,
        warnings=tuple(warnings),
    )


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


def _imports(pe: pefile.PE) -> dict[int, Import]:
    out: dict[int, Import] = {}
    base = pe.OPTIONAL_HEADER.ImageBase
    for entry in getattr(pe, "DIRECTORY_ENTRY_IMPORT", []):
        dll = entry.dll.decode("latin-1") if entry.dll else "?"
        for imp in entry.imports:
            name = imp.name.decode("latin-1") if imp.name else f"#{imp.ordinal}"
            out[imp.address - base] = Import(dll, name)
    return out


def _exports(pe: pefile.PE) -> dict[int, str]:
    out: dict[int, str] = {}
    d = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    for sym in getattr(d, "symbols", []) if d else []:
        if sym.name and not sym.forwarder:
            out.setdefault(sym.address, sym.name.decode("latin-1"))
    return out


def _pdata(mem: bytes, d: pefile.Structure, path: str, size: int, warnings: list[str]) -> tuple[Function, ...]:
    if not d.VirtualAddress or not d.Size:
        return ()
    start, length = d.VirtualAddress, d.Size - d.Size % 12
    if start + length > size:
        warnings.append(".pdata extends past the image; truncated")
        length = max(0, (size - start) // 12 * 12)
    entries = list(struct.iter_unpack("<III", mem[start : start + length]))
    by_begin = {b: (b, e, u) for b, e, u in entries}
    roots: dict[int, list[tuple[int, int]]] = {}
    bad = 0
    for b, e, u in entries:
        if not (0 < b < e <= size):
            bad += 1
            continue
        root = b
        seen = 0
        # A chained entry describes a fragment of another function; follow the chain to its primary entry.
        while 0 < u < size - 4 and mem[u] & (UNW_FLAG_CHAININFO << 3) and seen < 32:
            count = mem[u + 2]
            off = u + 4 + ((count + 1) & ~1) * 2
            if off + 12 > size:
                break
            parent = struct.unpack_from("<III", mem, off)
            root = parent[0]
            u = by_begin.get(root, parent)[2]
            seen += 1
        roots.setdefault(root, []).append((b, e))
    if bad:
        warnings.append(f"{bad} .pdata entries out of range were ignored")
    return tuple(Function(r, tuple(sorted(rs))) for r, rs in sorted(roots.items()))


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
    while pos + 8 <= end:
        page, block = struct.unpack_from("<II", mem, pos)
        if block < 8 or pos + block > end:
            if block:
                warnings.append(f"malformed base relocation block at RVA {pos:#x}")
            break
        for i, (entry,) in enumerate(struct.iter_unpack("<H", mem[pos + 8 : pos + block - (block - 8) % 2])):
            kind, off = entry >> 12, entry & 0xFFF
            if kind in widths:
                rvas.append(page + off)
                sizes.append(widths[kind])
                where.append(pos + 8 + 2 * i)
        pos += block
    order = sorted(range(len(rvas)), key=rvas.__getitem__)
    return tuple(rvas[i] for i in order), tuple(sizes[i] for i in order), tuple(where[i] for i in order)
