"""The one small protocol every writable backend implements."""

from __future__ import annotations

from typing import Protocol


class Target(Protocol):
    """Memory of one loaded (or to-be-loaded) driver image.

    `read` returns exactly `size` bytes or raises TargetReadError; `write` writes all of `data` or raises
    TargetWriteError. Addresses are virtual addresses: the module base plus an RVA.
    """

    name: str

    def module_base(self) -> int: ...

    def read(self, va: int, size: int) -> bytes: ...

    def write(self, va: int, data: bytes) -> None: ...
