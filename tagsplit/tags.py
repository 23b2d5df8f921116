"""Pool tags: parsing user input, display, and the kernel's validity rules.

A tag is a ULONG. Its display form (PoolMon, !poolused, !poolfind) is the four bytes in memory order, which is
also the order of the imm32 bytes in machine code: 'Abc ' is 0x20636241. PROTECTED_POOL (bit 31) marks tags whose
frees are checked; it does not belong to the display characters.
"""

from __future__ import annotations

import re

from .errors import TagError

PROTECTED_POOL = 0x80000000
_HEX = re.compile(r"^0[xX][0-9a-fA-F]{1,8}$")


def display(value: int) -> str:
    """The four display characters of a tag value (protected bit removed); unprintable bytes become '.'."""
    raw = (value & ~PROTECTED_POOL & 0xFFFFFFFF).to_bytes(4, "little")
    return "".join(chr(b) if 0x20 <= b <= 0x7E else "." for b in raw)


def printable(value: int) -> bool:
    """Whether every display byte (protected bit removed) is printable ASCII."""
    raw = (value & ~PROTECTED_POOL & 0xFFFFFFFF).to_bytes(4, "little")
    return all(0x20 <= b <= 0x7E for b in raw)


def display_or_none(value: int | None) -> str | None:
    if value is None or not printable(value):
        return None
    return display(value)


def hex_value(value: int) -> str:
    """The dword as `ed nt!PoolHitTag` takes it."""
    return f"0x{value & 0xFFFFFFFF:08x}"


def parse(text: str) -> int:
    """A tag as the user types it: `Abc`, `'Abc '`, `"Ab c"` (PoolMon display, padded with spaces) or `0x20636241`."""
    t = text.strip() if not (text.startswith(("'", '"'))) else text
    if _HEX.match(t):
        value = int(t, 16)
        if value == 0:
            raise TagError(f"tag {text!r}: a tag of 0 is not a tag")
        return value
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        t = t[1:-1]
    if not 1 <= len(t) <= 4:
        raise TagError(f"tag {text!r}: give 1 to 4 characters (as PoolMon shows them) or a 0x dword")
    if any(not 0x20 <= ord(c) <= 0x7E for c in t):
        raise TagError(f"tag {text!r}: tag characters must be printable ASCII")
    return int.from_bytes(t.ljust(4).encode("ascii"), "little")


def problems(value: int) -> list[str]:
    """Why a value may not be used as a new tag (empty when it is fine); rules from BAD_POOL_CALLER 0x9B-0x9D."""
    out = []
    plain = value & ~PROTECTED_POOL & 0xFFFFFFFF
    raw = plain.to_bytes(4, "little")
    if plain == 0:
        out.append("tag is zero (bugcheck 0xC2/0x9B)")
    if not all(0x20 <= b <= 0x7E for b in raw):
        out.append("every tag byte must be printable, 0x20-0x7E")
    if not any(chr(b).isalnum() for b in raw):
        out.append("tag needs at least one letter or digit (bugcheck 0xC2/0x9D)")
    if raw.rstrip(b" ") == b"BIG":
        out.append("'BIG' is reserved (bugcheck 0xC2/0x9C)")
    return out
