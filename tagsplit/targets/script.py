"""WinDbg/KD command scripts that apply or revert a plan with no Python in the debugger.

`render_apply(plan)` and `render_revert(plan)` are pure: they return the script text. Run it while broken in with
`$$><path`. Each script has three phases:

1. guard: check the module identity (TimeDateStamp, CheckSum, SizeOfImage read from the resident PE header) and the
   current bytes of EVERY patch range (apply: the plan's original, any resident alternative, or already the
   replacement; revert: byte by byte the replacement's or the original's (or a resident alternative's) value, which
   takes in a range torn by a crash in the middle of an `eb`, as `apply._torn` does for the pykd route). If anything
   differs, print which range and stop WITHOUT writing anything.
2. writes: `eb` per patch; apply writes stubs before the calls redirected into them, revert the reverse. A range that
   already holds the target bytes (revert: or an untouched resident alternative) is skipped, so running a script
   twice is harmless.
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
from dataclasses import dataclass
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
    return "(" + " and ".join(_match_terms(mod, rva, data, relocs) or ["1"]) + ")"


def _hex(data: bytes | str) -> str:
    return data.hex() if isinstance(data, bytes) else data.lower()


def _reloc_bytes(relocs: Relocs | None) -> dict[int, tuple[int, int]]:
    """{byte offset: (value - ImageBase, byte index in the field)} for every byte of a relocated field."""
    out: dict[int, tuple[int, int]] = {}
    for off, (value, size) in (relocs or {}).items():
        for j in range(size):
            out[off + j] = (value, j)
    return out


def _reloc_byte(mod: str, rva: int, value: int, j: int) -> str:
    return f"(by({_addr(mod, rva)}) == ((({mod}+{value:#x}) >> {8 * j:#x}) & 0xff))"


def _match_terms(mod: str, rva: int, data: bytes | str, relocs: Relocs | None = None) -> list[str]:
    pattern = _hex(data)
    n = len(pattern) // 2
    reloc_byte = _reloc_bytes(relocs)
    terms = []
    i = 0
    while i < n:
        if i in reloc_byte:
            terms.append(_reloc_byte(mod, rva + i, *reloc_byte[i]))
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
    return terms


def _bytewise(mod: str, rva: int, forms: list[tuple[bytes | str, Relocs]]) -> str:
    """A MASM condition that is 1 when every byte of the range holds the value that one of `forms` has at that byte
    (any value where a form has `??`, the masked nibble where it has one `?`, the loader's value for this load
    address in a relocated field).

    This is the script's form of `apply._torn`: `eb` can die after some of its bytes, and a revert of such a range
    can die again (its `eb`, or the `ed` that relocates a field), so a byte may come from any of the forms a
    tagsplit write goes between, but never from anywhere else. Bytes on which every form agrees are read as words,
    as `_match` does."""
    n = len(_hex(forms[0][0])) // 2
    per_form = [(_hex(data), _reloc_bytes(relocs)) for data, relocs in forms]
    terms: list[str] = []
    run = bytearray()  # consecutive bytes that can hold one value only

    def flush(end: int) -> None:
        if run:
            terms.extend(_match_terms(mod, rva + end - len(run), bytes(run)))
            run.clear()

    for i in range(n):
        exact: dict[int, None] = {}  # ordered: the replacement's value first, then the original's
        other: dict[str, None] = {}
        free = False
        for pattern, reloc_byte in per_form:
            if i in reloc_byte:
                other[_reloc_byte(mod, rva + i, *reloc_byte[i])] = None
                continue
            nibbles = pattern[2 * i : 2 * i + 2]
            if nibbles == "??":
                free = True  # a value only the loader knows: the guard cannot check it, as for a whole form
                break
            if "?" in nibbles:
                mask = 0xF0 if nibbles[1] == "?" else 0x0F
                value = int(nibbles.replace("?", "0"), 16)
                other[f"((by({_addr(mod, rva + i)}) & {mask:#04x}) == {value:#04x})"] = None
            else:
                exact[int(nibbles, 16)] = None
        if free:
            flush(i)
            continue
        if len(exact) == 1 and not other:
            run += bytes(exact)
            continue
        flush(i)
        options = [f"(by({_addr(mod, rva + i)}) == {v:#04x})" for v in exact] + list(other)
        terms.append(options[0] if len(options) == 1 else "(" + " or ".join(options) + ")")
    flush(n)
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


@dataclass(frozen=True)
class _Range:
    """One patch range as a script handles it; the rest of the script is the same for apply and revert."""

    i: int
    patch: Patch
    accept: list[str]  # phase 1: conditions, any of which lets phase 2 touch the range
    done: str  # the range holds what phase 2 would write: phase 2 skips it, phase 3 reports it OK
    write: list[str]  # phase 2 commands


@dataclass(frozen=True)
class _Wording:
    """The texts in which the apply and the revert script differ."""

    kind: str  # "apply" or "revert", for the header
    differs: str  # what a range that fails phase 1 holds
    stubs_first: bool  # phase 2 order: stubs before the calls redirected into them (apply) or after (revert)
    writes: str  # the phase 2 comment
    verb: str  # per range in phase 2
    ok: str  # after the label in the OK line
    failed: str  # after the label in the FAILED line
    all_ok: str
    some_failed: str


def _guard(mod: str, r: _Range, differs: str) -> list[str]:
    label = _label(r.i, r.patch, mod)
    at = _addr(mod, r.patch.rva)
    return [
        f"$$ guard {label}",
        "r $t1 = 0",
        f".if ($vvalid({at}, {len(r.patch.original):#x}) == 0) {{",
        f'  .echo "tagsplit: NOT PRESENT: {label} is paged out or discarded - run .pagein /f {at} then g and run '
        'this script again when the target breaks in"',
        "  r $t0 = @$t0 + 1",
        "} .else {",
        *(f"  .if {cond} {{ r $t1 = 1 }}" for cond in r.accept),
        "  .if (@$t1 == 0) {",
        f'    .echo "tagsplit: DIFFERS: {label} holds {differs}"',
        "    r $t0 = @$t0 + 1",
        "  }",
        "}",
    ]


def _render(plan: Plan, mod: str, ranges: list[_Range], words: _Wording, notes: list[str]) -> str:
    """The three phases (module docstring) around the per-range conditions and commands of `ranges`."""
    out = _header(plan, mod, words.kind, len(ranges)) + notes
    out += ["", "r $t0 = 0", "r $t3 = 0", *_identity(plan, mod)]
    for r in ranges:
        out += _guard(mod, r, words.differs)
    out += [
        "",
        ".if (@$t0 != 0) {",
        '  .echo "tagsplit: nothing written - the target differs from the plan (see DIFFERS / NOT PRESENT above)"',
        "} .else {",
        f"  $$ phase 2 - {words.writes}",
    ]
    for r in sorted(ranges, key=lambda r: (_is_stub(r.patch) != words.stubs_first, r.patch.rva)):
        out.append(f"  $$ {words.verb} {_label(r.i, r.patch, mod)}")
        if len(r.write) == 1:
            out.append(f"  .if ({r.done} == 0) {{ {r.write[0]} }}")
        else:
            out += [f"  .if ({r.done} == 0) {{", *(f"    {c}" for c in r.write), "  }"]
    out.append("  $$ phase 3 - read back")
    for r in ranges:
        out += [
            f"  .if {r.done} {{",
            f'    .echo "tagsplit: OK {_label(r.i, r.patch, mod)}{words.ok}"',
            "  } .else {",
            f'    .echo "tagsplit: FAILED {_label(r.i, r.patch, mod)}{words.failed}"',
            "    r $t3 = @$t3 + 1",
            "  }",
        ]
    out += [
        "  .if (@$t3 == 0) {",
        f'    .echo "tagsplit: {words.all_ok}"',
        "  } .else {",
        f'    .echo "tagsplit: {words.some_failed}"',
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def render_apply(plan: Plan, *, module: str | None = None) -> str:
    """The apply script for `plan` (code-scope patches only: the resident driver).

    Raises:
        PlanError: the module name cannot be written in a MASM expression.
    """
    mod = _modexpr(plan, module)
    ranges = [
        _Range(
            i,
            p,
            accept=[_match(mod, p.rva, c, r) for c, r in _candidates(plan, p, [p.original, p.replacement])],
            done=_match(mod, p.rva, p.replacement),
            write=[_eb(mod, p.rva, p.replacement)],
        )
        for i, p in _numbered(plan)
    ]
    words = _Wording(
        kind="apply",
        differs="neither the original nor the replacement bytes",
        stubs_first=True,
        writes="writes, stubs before the calls redirected into them",
        verb="write",
        ok="",
        failed=" - the write did not take, HVCI or Memory integrity on?",
        all_ok=f"applied - all {len(ranges)} patches verified",
        some_failed="FAILED - some patches did not take, run the revert script now",
    )
    return _render(plan, mod, ranges, words, [])


def _reverted(mod: str, plan: Plan, p: Patch) -> str:
    """The range holds what revert restores (the original, its relocated fields for this load address) or, never
    written, one of the loader's resident forms.

    Not the original's file form where a field is relocated: in a rebased driver only a revert that died between
    its `eb` and its `ed` leaves that, and it is wrong code, so the next run must finish the job."""
    relocs = _restore_relocs(plan, p)
    conds = [_match(mod, p.rva, _wildcard(p.original, relocs), relocs)]
    for alt in p.resident_alternatives:
        cond = _match(mod, p.rva, alt, _relocated(plan, p, alt))
        if cond not in conds:
            conds.append(cond)
    return conds[0] if len(conds) == 1 else "(" + " or ".join(conds) + ")"


def _revertible(mod: str, plan: Plan, p: Patch) -> list[str]:
    """Revert guard: the range holds, byte by byte, the replacement, the original or the resident form it was
    applied over, each alternative in turn (a range held one form before apply, never a mix of two).

    That covers the replacement and every untouched form, a range torn by apply's `eb`, and one torn again by this
    script's own `eb` or by its `ed` of a relocated field. A wildcarded byte of a resident form is the loader's and
    cannot be checked, as in the apply guard."""
    forms = _candidates(plan, p, [p.replacement, p.original])
    if len(forms) == 2:
        return [_bytewise(mod, p.rva, forms)]
    return [_bytewise(mod, p.rva, [*forms[:2], alt]) for alt in forms[2:]]


def render_revert(plan: Plan, *, module: str | None = None) -> str:
    """The revert script for `plan`: restores the plan's original bytes in every range that holds the replacement or
    is torn (each byte the replacement's or the original's, as a crash in the middle of an `eb` leaves it).

    Raises:
        PlanError: the module name cannot be written in a MASM expression.
    """
    mod = _modexpr(plan, module)
    numbered = _numbered(plan)
    ranges = [
        _Range(
            i,
            p,
            accept=_revertible(mod, plan, p),
            done=_reverted(mod, plan, p),
            write=_restore(mod, p, _restore_relocs(plan, p)),
        )
        for i, p in numbered
    ]
    notes = [
        "$$ A range torn by a crash in the middle of an eb or ed (some bytes new, some old) passes phase 1 if",
        "$$ every byte is the replacement's or the original's (or a resident form's), and is restored.",
    ]
    alts = [i for i, p in numbered if p.resident_alternatives]
    if alts:
        notes += [
            f"$$ Patches {', '.join(map(str, alts))} may have held a resident form the loader wrote before they were",
            "$$ applied. A script cannot know which form it was, so it restores the plan's original, the file form,",
            "$$ which is equivalent code, except that pointer fields the loader relocates (x86 call via an absolute",
            "$$ IAT address) are recomputed for the module's load address. tagsplit.live revert restores the exact",
            "$$ bytes it journalled.",
        ]
    words = _Wording(
        kind="revert",
        differs="a byte from neither the replacement nor the original",
        stubs_first=False,
        writes="restore, calls before the stubs they jump into",
        verb="restore",
        ok=" restored",
        failed=" still differs from the original",
        all_ok=f"reverted - all {len(ranges)} ranges hold their original bytes",
        some_failed="FAILED - some ranges were not restored",
    )
    return _render(plan, mod, ranges, words, notes)
