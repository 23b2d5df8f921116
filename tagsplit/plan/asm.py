"""keystone for assembling replacement instructions and stubs; capstone to check what was assembled."""

from __future__ import annotations

import re
from functools import lru_cache

import capstone
import keystone

from ..errors import DisasmError


@lru_cache(maxsize=2)
def _ks(arch: str) -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64 if arch == "x64" else keystone.KS_MODE_32)


@lru_cache(maxsize=2)
def _cs(arch: str) -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)


def assemble(text: str, arch: str, address: int = 0) -> bytes:
    """Machine code for `text` (instructions separated by `;`) placed at `address`.

    Raises:
        DisasmError: keystone rejects the text.
    """
    try:
        encoding, _ = _ks(arch).asm(text, address)
    except keystone.KsError as e:
        raise DisasmError(f"keystone cannot assemble {text!r}: {e}") from e
    if not encoding:
        raise DisasmError(f"keystone produced nothing for {text!r}")
    return bytes(encoding)


def disassemble(code: bytes, arch: str, address: int = 0) -> list[str]:
    return [f"{m} {o}".strip() for _, _, m, o in _cs(arch).disasm_lite(code, address)]


_LAST_IMM = re.compile(r"(-?0x[0-9a-f]+|-?\d+)$")


def retag(raw: bytes, text: str, imm_offset: int, new: int, arch: str, address: int) -> bytes:
    """The instruction `raw` (`text` as capstone prints it) with its 4-byte tag immediate replaced by `new`.

    keystone assembles the edited text; the result must have the same length and differ from `raw` only inside
    the immediate. Where keystone picks another encoding (a shorter form for some value), the bytes are edited
    directly and capstone must then read back exactly the edited text.

    Raises:
        DisasmError: neither way gives a same-length instruction that changes only the tag.
    """
    m = _LAST_IMM.search(text)
    if m is None:
        raise DisasmError(f"`{text}` has no immediate operand")
    printed = int(m.group(1), 0)
    value = new & 0xFFFFFFFF
    if printed > 0xFFFFFFFF or printed < 0:
        # capstone prints a sign-extended imm32 (push/mov r/m64 in 64-bit mode); keep the same form
        value = value - (1 << 32) if value & 0x80000000 else value
        if printed > 0xFFFFFFFF and value < 0:
            value &= 0xFFFFFFFFFFFFFFFF
    new_text = text[: m.start()] + hex(value)
    direct = raw[:imm_offset] + (new & 0xFFFFFFFF).to_bytes(4, "little") + raw[imm_offset + 4 :]
    try:
        assembled = assemble(new_text, arch, address)
    except DisasmError:
        assembled = b""
    if assembled == direct:
        return assembled
    if disassemble(direct, arch, address) == [new_text]:
        return direct
    raise DisasmError(f"cannot re-encode `{text}` with tag {new:#010x} in {len(raw)} bytes")
