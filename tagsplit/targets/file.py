"""The patched-file backend: a copy of the driver file, patched in memory and written out once, atomically."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pefile

from ..errors import InputError, PlanError, TargetReadError, TargetWriteError
from . import apply as _apply

if TYPE_CHECKING:
    from ..image import Image
    from ..plan.model import Plan


def atomic_write(out: Path, data: bytes) -> Path:
    """Replace `out` with `data`: a temporary file in the same folder, written in full and fsynced, then renamed
    over `out`. A crash or an error at any point leaves `out` as it was or as `data`, never half-written.

    Raises:
        InputError: the folder is missing or not writable, or the write failed (the temporary file is removed).
    """
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    try:
        _apply.fault_point("output: before creating the temporary file")
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=str(out.parent))
    except OSError as e:
        raise InputError(f"{out}: cannot write there: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            _apply.fault_point("output: temporary file half written")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        _apply.fault_point("output: temporary file written, not yet renamed")
        Path(tmp).replace(out)
        _apply.fault_point("output: renamed")
    except OSError as e:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise InputError(f"{out}: cannot write: {e.strerror or e}") from e
    _apply.sync_folder(out.parent)
    return out


class PatchedFile:
    """A Target over a copy of a driver file; addresses are the preferred ImageBase plus an RVA.

    Nothing touches the disk until `commit`, which recomputes the PE checksum and replaces the output file by
    renaming a fully written temporary file, so the output is never half-written.
    """

    name = "file"

    def __init__(self, image: Image, data: bytes) -> None:
        if image.mapped:
            raise InputError("a patched file is made from the driver file, not from a memory image")
        self.image = image
        self.buf = bytearray(data)

    @classmethod
    def open(cls, image: Image, path: str | Path | None = None) -> PatchedFile:
        p = Path(path or image.path)
        try:
            return cls(image, p.read_bytes())
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from e

    def module_base(self) -> int:
        return self.image.preferred_base

    def _offset(self, va: int, size: int) -> int:
        rva = va - self.image.preferred_base
        if rva < 0:
            raise TargetReadError(f"address {va:#x} is below the image")
        hdr_end = self.image.sections[0].raw_offset if self.image.sections else 0
        if rva + size <= hdr_end:
            return rva  # headers: file offset equals RVA
        off = self.image.rva_to_offset(rva)
        if off is None or self.image.rva_to_offset(rva + size - 1) != off + size - 1:
            raise TargetReadError(f"RVA {rva:#x}..{rva + size:#x} has no bytes in the file")
        return off

    def read(self, va: int, size: int) -> bytes:
        off = self._offset(va, size)
        return bytes(self.buf[off : off + size])

    def write(self, va: int, data: bytes) -> None:
        try:
            off = self._offset(va, len(data))
        except TargetReadError as e:
            raise TargetWriteError(str(e)) from e
        self.buf[off : off + len(data)] = data

    def checksum_field(self) -> tuple[int, bytes, bytes]:
        """(RVA, current bytes, bytes after recomputing) of OptionalHeader.CheckSum for the patched buffer."""
        pe_off = struct.unpack_from("<I", self.buf, 0x3C)[0]
        at = pe_off + 24 + 64
        cur = bytes(self.buf[at : at + 4])
        # not pe.close(): for a PE made from bytes it only forces a full gc.collect()
        value = pefile.PE(data=bytes(self.buf), fast_load=True).generate_checksum()
        return at, cur, struct.pack("<I", value)

    def commit(self, out: str | Path, *, in_place: bool = False) -> Path:
        """Write the patched buffer to `out` atomically (see `atomic_write`).

        `in_place` allows `out` to be the file the image was read from (revert of a patched file); otherwise writing
        over the input driver is refused.
        """
        out = Path(out)
        if not in_place and out.resolve() == Path(self.image.path).resolve():
            raise InputError(f"{out}: refusing to overwrite the input driver; choose another output file")
        return atomic_write(out, bytes(self.buf))


class ExistingFile(PatchedFile):
    """An already patched output file, for `revert`: changes are committed back to the same path."""

    def __init__(self, image: Image, data: bytes, path: Path) -> None:
        super().__init__(image, data)
        self.path = path


def patched_file_bytes(plan: Plan, image: Image, data: bytes) -> bytes:
    """The driver file with every patch of the plan applied (file-only ones included) and a fresh checksum."""
    pf = PatchedFile(image, data)
    base = pf.module_base()
    for p in plan.patches():
        cur = pf.read(base + p.rva, len(p.original))
        if cur != p.original:
            raise PlanError(f"{image.name}: bytes at {p.rva:#x} are not the plan's original (another build?)")
        pf.write(base + p.rva, p.replacement)
    at, _, new = pf.checksum_field()
    pf.buf[at : at + 4] = new
    return bytes(pf.buf)
