"""WinDbg/KD command scripts that apply or revert a plan with no Python in the debugger.

`render_apply(plan)` and `render_revert(plan)` are pure: they return the script text. Run it while broken in with
`$$><path`. Each script has three phases:

1. guard: check the module identity (TimeDateStamp, CheckSum, SizeOfImage read from the resident PE header) and the
   current bytes of EVERY patch range (apply: the plan's original, any resident alternative, or already the
   replacement; revert: the replacement, or already the original/an alternative). If anything differs, print which
   range and stop WITHOUT writing anything.
2. writes: `eb` per patch; apply writes stubs before the calls redirected into them, revert the reverse. A range that
   already holds the target bytes is skipped, so running a script twice is harmless.
3. read-back: one `tagsplit: OK` or `tagsplit: FAILED` line per patch, then a summary.

Addresses are module-relative (`<module>+0x1234`); nothing depends on the load address.

Debugger syntax relied on (MicrosoftDocs/windows-driver-docs, windows-driver-docs-pr/):
- `debuggercmds/-----------------------a---run-script-file-.md`: `$$><` "replace[s] all carriage returns with
  semicolons, and execute[s] the resulting text as a single command block", which multi-line `.if` blocks need.
- `debugger/debugger-command-program-examples.md`: multi-line programs with braces and `$$` comments, run with `$$><`.
- `debugger/elements-of-a-debugger-command-program.md`: "You should not insert a comment between a token and its
  elements (such as braces or conditions)"; never `*` comments (they swallow the rest of the condensed script).
- `debuggercmds/-----comment-specifier-.md`: a `$$` comment ends at a semicolon, so comments contain none.
- `debuggercmds/-if.md`: `.if (Condition) { Commands } .else { Commands }`; `.else` stays on the `}` line here.
- `debuggercmds/-block.md`: `.block { Commands }`.
- `debuggercmds/pseudo-register-syntax.md`: user pseudo-registers `$t0`..`$t19`, `r $t1 = @$t2`, `@` before a
  pseudo-register in expressions.
- `debuggercmds/masm-numbers-and-operators.md`: `by`/`wo`/`dwo`/`qwo` memory operators, `$vvalid(Address, Length)`,
  comparisons evaluate to 1 or 0, `and` binds tighter than `or`, `0x` overrides the radix.
- `debuggercmds/sign-extension.md`: in kernel mode a constant 0x80000000-0xFFFFFFFF is sign-extended unless written
  with a grave accent. Every comparison here is on `wo`/`by` values (< 0x10000), so sign extension never applies.
- `debuggercmds/-echo--echo-comment-.md`: a quoted `.echo` string may not contain quotation marks.
- `e, ea, eb, ...` (Enter Values): `eb Address Values`, numbers in the current radix unless prefixed `0x`; `ed`/`eq`
  write a dword/qword. `debuggercmds/evaluating-expressions.md`: "All commands ... interpret their arguments through
  the default expression evaluator", so `ed Address @$t4` writes a computed value (used only for relocated fields).
- `debugger/symbol-syntax-and-symbol-matching.md`: a name that could be read as a hexadecimal number or a register
  "should always be prefixed by an exclamation point" ([INFERRED] that this holds for module names: the header tells
  the user to check `? <module>` against `lm`).

Relocated pointer fields: a resident alternative that wildcards a pointer-sized field whose file value lies inside the
image (x86 `call [abs32]`: `ff15????????`) is checked, and restored by revert, as module + (value - ImageBase); the
file form would be wrong code in a driver the loader rebased. Other wildcards (the x64 loader's `call rel32` to the
kernel export) cannot be computed; revert restores the file form there, which is equivalent code.

Pseudo-registers used: $t0 guard failures, $t1 match state of the range being checked, $t2 PE header address,
$t3 read-back failures, $t4 a relocated value being restored.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..plan.model import CODE, digest

if TYPE_CHECKING:
    from ..plan.model import Patch, Plan

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEXLIKE = re.compile(r"^[0-9a-fA-F]+[hH]?$")
_REGISTER_NAMES = (  # names MASM reads as registers
    "al ah ax eax rax bl bh bx ebx rbx cl ch cx ecx rcx dl dh dx edx rdx si esi rsi di edi rdi sp esp rsp bp ebp rbp "
    "ip eip rip cs ds es fs gs ss efl fl r8 r9 r10 r11 r12 r13 r14 r15"
)
_REGISTERS = frozenset(_REGISTER_NAMES.split())
_UNSAFE = re.compile(r'[;{}"$*\r\n]')  # would end a comment, unbalance a block, end a string or start an alias/comment


def _text(s: str) -> str:
    return _UNSAFE.sub(" ", s).strip()


def _modexpr(plan: Plan, module: str | None) -> str:
    name = module or plan.module
    if not _SYMBOL.match(name):
        raise PlanError(f"module name {name!r} is not a plain debugger symbol; pass the name `lm` shows for the driver")
    if _HEXLIKE.match(name) or name.lower() in _REGISTERS:
        return "!" + name  # would otherwise read as a number or a register
    return name


def _addr(mod: str, rva: int) -> str:
    return f"{mod}+{rva:#x}"


Relocs = dict[int, tuple[int, int]]  # offset in the patch -> (value - ImageBase, field size)


def _relocated(plan: Plan, p: Patch, pattern: str) -> Relocs:
    """Pointer-sized fields the loader relocates, as {offset in patch: (value - ImageBase, size)}.

    A resident alternative wildcards such a field (x86 `call [abs32]`: `ff15????????`), and the plan's original holds
    it as the file has it, an address in the image at its preferred base. Resident memory holds module base +
    (value - ImageBase) there, which a script computes; the file form would be wrong code in a rebased driver.
    """
    size = 8 if plan.driver.arch == "x64" else 4
    base, image = plan.driver.image_base, plan.driver.size_of_image
    out: Relocs = {}
    k = 0
    n = len(p.original)
    while k + size <= n:
        if pattern[2 * k : 2 * (k + size)] == "??" * size:
            v = int.from_bytes(p.original[k : k + size], "little")
            if base <= v < base + image:
                out[k] = (v - base, size)
                k += size
                continue
        k += 1
    return out


def _match(mod: str, rva: int, data: bytes | str, relocs: Relocs | None = None) -> str:
    """A MASM condition that is 1 when memory at mod+rva holds `data`: bytes, or a hex pattern where `?` is any
    nibble (`Patch.resident_alternatives`). `relocs` turns wildcarded pointer fields into exact checks against the
    relocated value. Word/byte reads only, so no read is ever sign-extended."""
    pattern = data.hex() if isinstance(data, bytes) else data.lower()
    n = len(pattern) // 2
    reloc_byte: dict[int, tuple[int, int]] = {}  # byte offset -> (value - ImageBase, byte index in the field)
    for off, (value, size) in (relocs or {}).items():
        for j in range(size):
            reloc_byte[off + j] = (value, j)
    terms = []
    i = 0
    while i < n:
        if i in reloc_byte:
            value, j = reloc_byte[i]
            terms.append(f"(by({_addr(mod, rva + i)}) == ((({mod}+{value:#x}) >> {8 * j:#x}) & 0xff))")
            i += 1
            continue
        width = 2 if i + 1 < n and i + 1 not in reloc_byte else 1
        mask = value = 0
        for k in range(width):
            for half, c in enumerate(pattern[2 * (i + k) : 2 * (i + k) + 2]):  # high nibble first
                if c != "?":
                    shift = 8 * k + (4 if half == 0 else 0)
                    mask |= 0xF << shift
                    value |= int(c, 16) << shift
        if mask:
            digits = 2 * width
            read = f"{'wo' if width == 2 else 'by'}({_addr(mod, rva + i)})"
            if mask != (1 << (8 * width)) - 1:
                read = f"({read} & {mask:#0{digits + 2}x})"
            terms.append(f"({read} == {value:#0{digits + 2}x})")
        i += width
    return "(" + " and ".join(terms or ["1"]) + ")"


def _restore(mod: str, p: Patch, relocs: Relocs) -> list[str]:
    """Commands that put the original back, with relocated pointer fields recomputed for this load address."""
    cmds = [_eb(mod, p.rva, p.original)]
    for off, (value, size) in sorted(relocs.items()):
        cmds += [f"r $t4 = {mod}+{value:#x}", f"{'eq' if size == 8 else 'ed'} {_addr(mod, p.rva + off)} @$t4"]
    return cmds


def _candidates(plan: Plan, p: Patch, first: list[bytes]) -> list[tuple[bytes | str, Relocs]]:
    """`first` (exact byte strings), then each resident alternative with its relocated fields."""
    out: list[tuple[bytes | str, Relocs]] = [(b, {}) for b in first]
    for alt in p.resident_alternatives:
        if all(alt != c for c, _ in out):
            out.append((alt, _relocated(plan, p, alt)))
    return out


def _eb(mod: str, rva: int, data: bytes) -> str:
    return f"eb {_addr(mod, rva)} " + " ".join(f"{b:#04x}" for b in data)


def _label(i: int, p: Patch, mod: str) -> str:
    what = _text(p.what)
    return f"patch {i} at {_addr(mod, p.rva)} ({len(p.original)} bytes{', ' + what if what else ''})"


def _numbered(plan: Plan) -> list[tuple[int, Patch]]:
    return list(enumerate(plan.patches(scope=CODE), 1))


def _is_stub(p: Patch) -> bool:
    return p.what.startswith("stub")


def _header(plan: Plan, mod: str, kind: str, n: int) -> list[str]:
    d = plan.driver
    return [
        f"$$ tagsplit {kind} script for {_text(d.name)} (debugger module {mod.lstrip('!')})",
        f"$$ plan sha256 {digest(plan)}",
        f"$$ driver sha256 {d.sha256}  arch {d.arch}  timestamp {d.timestamp:#x}  checksum {d.checksum:#x}  "
        f"size_of_image {d.size_of_image:#x}",
        f"$$ {n} patches. Run it while broken in, never in local kernel debugging (lkd), as  $$><path-of-this-file",
        f"$$ First check that  ? {mod}  prints the start address  lm m {mod.lstrip('!')}  shows.",
        "$$ Needs the MASM expression evaluator, the default (.expr shows it).",
        "$$ Phase 1 checks the module and every range and writes nothing if anything differs.",
        "$$ Phase 2 writes with eb. Phase 3 reads every range back and prints OK or FAILED.",
    ]


def _identity(plan: Plan, mod: str) -> list[str]:
    d = plan.driver
    checks = []
    for off, value in ((0x8, d.timestamp), (0x58, d.checksum), (0x50, d.size_of_image)):
        # e_lfanew + 8: FileHeader.TimeDateStamp; +0x58: OptionalHeader.CheckSum; +0x50: SizeOfImage (PE32 and PE32+)
        checks.append(f"(wo(@$t2+{off:#x}) == {value & 0xFFFF:#06x})")
        checks.append(f"(wo(@$t2+{off + 2:#x}) == {(value >> 16) & 0xFFFF:#06x})")
    return [
        "$$ module identity, from the resident PE header",
        "r $t2 = 0",
        f".if ($vvalid({mod}, 0x40)) {{ r $t2 = {mod} + wo({mod}+0x3c) }}",
        ".if ((@$t2 == 0) or ($vvalid(@$t2, 0x60) == 0)) {",
        f'  .echo "tagsplit: DIFFERS: the PE header of {mod.lstrip("!")} is not readable"',
        "  r $t0 = @$t0 + 1",
        "} .else {",
        f"  .if (({' and '.join(checks)}) == 0) {{",
        f'    .echo "tagsplit: DIFFERS: {mod.lstrip("!")} is another build (timestamp, checksum or size differ '
        'from the plan)"',
        "    r $t0 = @$t0 + 1",
        "  }",
        "}",
    ]


def _guard(mod: str, i: int, p: Patch, ok: list[tuple[bytes | str, Relocs]], ok_text: str) -> list[str]:
    lines = [
        f"$$ guard {_label(i, p, mod)}",
        "r $t1 = 0",
        f".if ($vvalid({_addr(mod, p.rva)}, {len(p.original):#x}) == 0) {{",
        f'  .echo "tagsplit: NOT PRESENT: {_label(i, p, mod)} is paged out or discarded - run .pagein /f '
        f'{_addr(mod, p.rva)} then g and run this script again when the target breaks in"',
        "  r $t0 = @$t0 + 1",
        "} .else {",
    ]
    for data, relocs in ok:
        lines.append(f"  .if {_match(mod, p.rva, data, relocs)} {{ r $t1 = 1 }}")
    lines += [
        "  .if (@$t1 == 0) {",
        f'    .echo "tagsplit: DIFFERS: {_label(i, p, mod)} holds neither {ok_text}"',
        "    r $t0 = @$t0 + 1",
        "  }",
        "}",
    ]
    return lines


def _restore_relocs(plan: Plan, p: Patch) -> Relocs:
    """Relocated fields of the first resident alternative that has any (revert recomputes them)."""
    for alt in p.resident_alternatives:
        relocs = _relocated(plan, p, alt)
        if relocs:
            return relocs
    return {}


def _wildcard(data: bytes, relocs: Relocs) -> str:
    h = list(data.hex())
    for off, (_, size) in relocs.items():
        h[2 * off : 2 * (off + size)] = "?" * (2 * size)
    return "".join(h)


def render_apply(plan: Plan, *, module: str | None = None) -> str:
    """The apply script for `plan` (code-scope patches only: the resident driver).

    Raises:
        PlanError: the module name cannot be written in a MASM expression.
    """
    mod = _modexpr(plan, module)
    patches = _numbered(plan)
    out = _header(plan, mod, "apply", len(patches))
    out += ["", "r $t0 = 0", "r $t3 = 0", *_identity(plan, mod)]
    for i, p in patches:
        out += _guard(
            mod,
            i,
            p,
            _candidates(plan, p, [p.original, p.replacement]),
            "the original nor the replacement bytes",
        )
    out += [
        "",
        ".if (@$t0 != 0) {",
        '  .echo "tagsplit: nothing written - the target differs from the plan (see DIFFERS / NOT PRESENT above)"',
        "} .else {",
        "  $$ phase 2 - writes, stubs before the calls redirected into them",
    ]
    for i, p in sorted(patches, key=lambda ip: (not _is_stub(ip[1]), ip[1].rva)):
        out += [
            f"  $$ write {_label(i, p, mod)}",
            f"  .if ({_match(mod, p.rva, p.replacement)} == 0) {{ {_eb(mod, p.rva, p.replacement)} }}",
        ]
    out.append("  $$ phase 3 - read back")
    for i, p in patches:
        out += [
            f"  .if {_match(mod, p.rva, p.replacement)} {{",
            f'    .echo "tagsplit: OK {_label(i, p, mod)}"',
            "  } .else {",
            f'    .echo "tagsplit: FAILED {_label(i, p, mod)} - the write did not take, HVCI or Memory integrity on?"',
            "    r $t3 = @$t3 + 1",
            "  }",
        ]
    out += [
        "  .if (@$t3 == 0) {",
        f'    .echo "tagsplit: applied - all {len(patches)} patches verified"',
        "  } .else {",
        '    .echo "tagsplit: FAILED - some patches did not take, run the revert script now"',
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def render_revert(plan: Plan, *, module: str | None = None) -> str:
    """The revert script for `plan`: restores the plan's original bytes where the replacement is found.

    Raises:
        PlanError: the module name cannot be written in a MASM expression.
    """
    mod = _modexpr(plan, module)
    patches = _numbered(plan)
    out = _header(plan, mod, "revert", len(patches))
    alts = [i for i, p in patches if p.resident_alternatives]
    if alts:
        out += [
            f"$$ Patches {', '.join(map(str, alts))} may have held a resident form the loader wrote before they were",
            "$$ applied. A script cannot know which form it was, so it restores the plan's original, the file form,",
            "$$ which is equivalent code, except that pointer fields the loader relocates (x86 call via an absolute",
            "$$ IAT address) are recomputed for the module's load address. tagsplit.live revert restores the exact",
            "$$ bytes it journalled.",
        ]
    out += ["", "r $t0 = 0", "r $t3 = 0", *_identity(plan, mod)]
    for i, p in patches:
        out += _guard(
            mod,
            i,
            p,
            _candidates(plan, p, [p.replacement, p.original]),
            "the replacement nor the original bytes",
        )
    out += [
        "",
        ".if (@$t0 != 0) {",
        '  .echo "tagsplit: nothing written - the target differs from the plan (see DIFFERS / NOT PRESENT above)"',
        "} .else {",
        "  $$ phase 2 - restore, calls before the stubs they jump into",
    ]
    for i, p in sorted(patches, key=lambda ip: (_is_stub(ip[1]), ip[1].rva)):
        out += [
            f"  $$ restore {_label(i, p, mod)}",
            f"  .if {_match(mod, p.rva, p.replacement)} {{",
            *(f"    {c}" for c in _restore(mod, p, _restore_relocs(plan, p))),
            "  }",
        ]
    out.append("  $$ phase 3 - read back")
    for i, p in patches:
        relocs = _restore_relocs(plan, p)
        if relocs:  # exactly what was restored: the original with its pointer fields relocated
            restored = _match(mod, p.rva, _wildcard(p.original, relocs), relocs)
        else:
            restored = " or ".join(_match(mod, p.rva, c, r) for c, r in _candidates(plan, p, [p.original]))
        out += [
            f"  .if ({restored}) {{",
            f'    .echo "tagsplit: OK {_label(i, p, mod)} restored"',
            "  } .else {",
            f'    .echo "tagsplit: FAILED {_label(i, p, mod)} still differs from the original"',
            "    r $t3 = @$t3 + 1",
            "  }",
        ]
    out += [
        "  .if (@$t3 == 0) {",
        f'    .echo "tagsplit: reverted - all {len(patches)} ranges hold their original bytes"',
        "  } .else {",
        '    .echo "tagsplit: FAILED - some ranges were not restored"',
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"
