"""A tiny interpreter for exactly the WinDbg command subset `tagsplit.targets.script` emits, run against the pykd
stand-in's memory. Strict on purpose: anything outside the subset, or written in a way the real debugger may not
accept, is a ScriptError rather than a guess.

What it models (MicrosoftDocs/windows-driver-docs, see the module docstring of tagsplit/targets/script.py):
- `$$><file`: every line break becomes `;` and the whole text runs as one command block.
- `$$ comment` ends at the next `;` (a `}` inside a comment is swallowed, so the block no longer balances).
- `.if (cond) { ... } [.elsif (cond) { ... }]* [.else { ... }]`; the `{` must follow the condition and `.else` must
  follow the `}` on the same line (a `.else` after `;` is a stray command here); `.block { ... }`.
- `.echo "text"` (quoted; no quotes inside), `r $tN = expr` ($t0..$t19), `eb Address Values` (radix 16 unless
  0x/0n), `ed`/`eq Address Expression` (arguments go through the expression evaluator), all through the stand-in's
  writeBytes, so fault injection and write counting apply to scripts too.
- MASM expressions: numbers (radix 16, 0x, 0n, grave accent), `@$tN`, module names (`name` or `!name`, resolved by
  pykd's `module(name).begin()`), `by wo dwo qwo poi`, `$vvalid(a, n)`, `not`, unary `-`, `* / mod`, `+ -`,
  `<< >>`, comparisons (1 or 0), `and &`, `xor ^`, `or |`, with the documented precedence; arithmetic on 64 bits.
  Kernel mode: numeric constants 0x80000000-0xFFFFFFFF are sign-extended unless written with a grave accent.
- A failed memory access stops the whole script ("Memory access error").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MASK = (1 << 64) - 1


class ScriptError(Exception):
    """What the debugger reports before it stops running the script."""


# --- parsing -------------------------------------------------------------------------------------------------


@dataclass
class If:
    branches: list[tuple[str, list[Any]]]  # (condition, block); condition "" is .else


@dataclass
class Block:
    body: list[Any]


@dataclass
class Simple:
    kind: str  # "echo", "r", "eb", "ed", "eq"
    text: str


@dataclass
class _Cursor:
    s: str
    i: int = 0

    def peek(self, n: int = 1) -> str:
        return self.s[self.i : self.i + n]

    def skip_spaces(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def done(self) -> bool:
        return self.i >= len(self.s)


def condense(text: str) -> str:
    """What `$$><` does to a script file: line breaks become semicolons."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", ";")


def parse(text: str) -> list[Any]:
    c = _Cursor(text)
    out = _parse_commands(c, top=True)
    if not c.done():
        raise ScriptError(f"unbalanced '}}' at offset {c.i}")
    return out


def _parse_commands(c: _Cursor, top: bool) -> list[Any]:
    out: list[Any] = []
    while True:
        while not c.done() and c.s[c.i] in " \t;":
            c.i += 1
        if c.done():
            if not top:
                raise ScriptError("missing '}' at the end of the script")
            return out
        if c.peek() == "}":
            if top:
                return out
            return out
        if c.peek(2) == "$$":
            end = c.s.find(";", c.i)
            c.i = len(c.s) if end < 0 else end
            continue
        word = re.match(r"[.$\w]+", c.s[c.i :])
        w = word.group(0) if word else c.peek()
        if w == ".if":
            c.i += 3
            out.append(_parse_if(c))
        elif w in (".else", ".elsif"):
            raise ScriptError(f"{w} without .if (an .else must follow the closing brace on the same line)")
        elif w == ".block":
            c.i += len(w)
            out.append(Block(_parse_braced(c)))
        elif w == ".echo":
            c.i += len(w)
            c.skip_spaces()
            if c.peek() != '"':
                raise ScriptError("the renderer must quote .echo text")
            end = c.s.find('"', c.i + 1)
            if end < 0:
                raise ScriptError("unterminated .echo string")
            out.append(Simple("echo", c.s[c.i + 1 : end]))
            c.i = end + 1
            c.skip_spaces()
            if not c.done() and c.peek() not in ";}":
                raise ScriptError(f"text after .echo string: {c.s[c.i : c.i + 20]!r}")
        elif w in ("r", "eb", "ed", "eq"):
            c.i += len(w)
            start = c.i
            depth = 0
            while not c.done():
                ch = c.s[c.i]
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch in ";}" and depth == 0:
                    break
                c.i += 1
            out.append(Simple(w, c.s[start : c.i].strip()))
        else:
            raise ScriptError(f"unsupported command {c.s[c.i : c.i + 30]!r}")


def _parse_braced(c: _Cursor) -> list[Any]:
    c.skip_spaces()
    if c.peek() != "{":
        raise ScriptError(f"expected '{{' at {c.s[c.i : c.i + 20]!r}")
    c.i += 1
    body = _parse_commands(c, top=False)
    if c.peek() != "}":
        raise ScriptError("missing '}'")
    c.i += 1
    return body


def _parse_condition(c: _Cursor) -> str:
    c.skip_spaces()
    if c.peek() != "(":
        raise ScriptError("the renderer must parenthesise .if conditions")
    depth = 0
    start = c.i
    while not c.done():
        ch = c.s[c.i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                c.i += 1
                return c.s[start : c.i]
        elif ch in ";{}":
            break
        c.i += 1
    raise ScriptError("unbalanced parentheses in a condition")


def _parse_if(c: _Cursor) -> If:
    branches = [(_parse_condition(c), _parse_braced(c))]
    while True:
        save = c.i
        c.skip_spaces()
        if c.s.startswith(".elsif", c.i):
            c.i += len(".elsif")
            branches.append((_parse_condition(c), _parse_braced(c)))
        elif c.s.startswith(".else", c.i):
            c.i += len(".else")
            branches.append(("", _parse_braced(c)))
            return If(branches)
        else:
            c.i = save
            return If(branches)


# --- expressions ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F`]*|0n[0-9]+|[0-9][0-9a-fA-F`]*)(?![\w$!])"
    r"|(?P<preg>@?\$t[0-9]+)"
    r"|(?P<func>\$vvalid)"
    r"|(?P<name>!?[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|>>|<<|[-+*/%&|^()<>=,]))"
)
_WORDS = {"by": 1, "wo": 2, "dwo": 4, "qwo": 8}


@dataclass
class _Expr:
    interp: Interp
    toks: list[tuple[str, str]] = field(default_factory=list)
    pos: int = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.pos] if self.pos < len(self.toks) else ("end", "")

    def take(self) -> tuple[str, str]:
        t = self.peek()
        self.pos += 1
        return t

    def expect(self, v: str) -> None:
        if self.take()[1] != v:
            raise ScriptError(f"syntax error: expected {v!r}")

    def binary(self, level: int) -> int:
        levels: list[tuple[str, ...]] = [
            ("or", "|"),
            ("xor", "^"),
            ("and", "&"),
            ("==", "=", "!=", "<", ">", "<=", ">="),
            ("<<", ">>"),
            ("+", "-"),
            ("*", "/", "mod", "%"),
        ]
        if level == len(levels):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[1].lower() in levels[level] and self.peek()[0] in ("op", "name"):
            op = self.take()[1].lower()
            right = self.binary(level + 1)
            left = _apply(op, left, right)
        return left

    def unary(self) -> int:
        kind, v = self.peek()
        lv = v.lower()
        if kind == "op" and v in "+-" and v:
            self.take()
            x = self.unary()
            return x if v == "+" else (-x) & MASK
        if kind == "name" and lv == "not":
            self.take()
            return int(self.unary() == 0)
        if kind == "name" and (lv in _WORDS or lv == "poi"):
            self.take()
            addr = self.unary()
            size = _WORDS.get(lv, 8 if self.interp.dbg.is64bitSystem() else 4)
            return self.interp.read_int(addr, size)
        if kind == "func":
            self.take()
            self.expect("(")
            addr = self.binary(0)
            self.expect(",")
            n = self.binary(0)
            self.expect(")")
            return self.interp.vvalid(addr, n)
        return self.primary()

    def primary(self) -> int:
        kind, v = self.take()
        if kind == "op" and v == "(":
            x = self.binary(0)
            self.expect(")")
            return x
        if kind == "num":
            return _number(v)
        if kind == "preg":
            return self.interp.t[_treg(v)]
        if kind == "name":
            return self.interp.symbol(v)
        raise ScriptError(f"syntax error at {v!r}")


def _number(text: str) -> int:
    grave = "`" in text
    t = text.replace("`", "").lower()
    if t.startswith("0n"):
        v = int(t[2:] or "0", 10)
    else:
        v = int(t[2:] if t.startswith("0x") else t, 16) if t not in ("0x",) else 0
    if not grave and 0x80000000 <= v <= 0xFFFFFFFF:  # kernel mode: sign-extended (sign-extension.md)
        v |= 0xFFFFFFFF00000000
    return v & MASK


def _treg(name: str) -> int:
    n = int(name.lstrip("@")[2:])
    if not 0 <= n <= 19:
        raise ScriptError(f"no pseudo-register {name}")
    return n


def _apply(op: str, a: int, b: int) -> int:
    if op in ("==", "="):
        return int(a == b)
    if op == "!=":
        return int(a != b)
    if op == "<":
        return int(a < b)
    if op == ">":
        return int(a > b)
    if op == "<=":
        return int(a <= b)
    if op == ">=":
        return int(a >= b)
    if op in ("and", "&"):
        return a & b
    if op in ("or", "|"):
        return a | b
    if op in ("xor", "^"):
        return a ^ b
    if op == "<<":
        return (a << b) & MASK
    if op == ">>":
        return a >> b
    if op == "+":
        return (a + b) & MASK
    if op == "-":
        return (a - b) & MASK
    if op == "*":
        return (a * b) & MASK
    if b == 0:
        raise ScriptError("Operand error (division by zero)")
    return (a // b) & MASK if op == "/" else a % b


# --- running -------------------------------------------------------------------------------------------------


class Interp:
    def __init__(self, dbg: Any) -> None:
        self.dbg = dbg
        self.t = [0] * 20
        self.output: list[str] = []

    def run_script(self, text: str) -> list[str]:
        """Run a script file's text as `$$><` does; returns the .echo lines. Raises ScriptError where the debugger
        would stop with an error."""
        self.run(parse(condense(text)))
        return self.output

    def run(self, cmds: list[Any]) -> None:
        for cmd in cmds:
            if isinstance(cmd, If):
                for cond, body in cmd.branches:
                    if cond == "" or self.eval(cond):
                        self.run(body)
                        break
            elif isinstance(cmd, Block):
                self.run(cmd.body)
            elif cmd.kind == "echo":
                self.output.append(cmd.text)
            elif cmd.kind == "r":
                m = re.fullmatch(r"(\$t[0-9]+)\s*=\s*(.+)", cmd.text, re.S)
                if not m:
                    raise ScriptError(f"r: syntax error in {cmd.text!r}")
                self.t[_treg(m.group(1))] = self.eval(m.group(2))
            elif cmd.kind == "eb":
                self.eb(cmd.text)
            else:
                self.e_wide(cmd.kind, cmd.text)

    def eval(self, text: str) -> int:
        toks: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise ScriptError(f"syntax error at {text[pos : pos + 20]!r}")
            kind = m.lastgroup or ""
            toks.append((kind, m.group(kind).strip()))
            pos = m.end()
        e = _Expr(self, toks)
        v = e.binary(0)
        if e.pos != len(toks):
            raise ScriptError(f"syntax error: extra {e.peek()[1]!r} in {text!r}")
        return v & MASK

    def symbol(self, name: str) -> int:
        bare = name.lstrip("!")
        if not name.startswith("!") and re.fullmatch(r"[0-9a-fA-F]+", bare):
            return _number(bare)  # MASM tries a hexadecimal number first
        try:
            return int(self.dbg.module(bare).begin()) & MASK
        except self.dbg.DbgException as e:
            raise ScriptError(f"Couldn't resolve error at '{name}'") from e

    def read_int(self, addr: int, size: int) -> int:
        try:
            data = self.dbg.loadBytes(addr, size)
        except self.dbg.MemoryException as e:
            raise ScriptError(f"Memory access error at {addr:#x}") from e
        return int.from_bytes(bytes(data), "little")

    def vvalid(self, addr: int, n: int) -> int:
        page = 0x1000
        a = addr
        while a < addr + max(n, 1):
            if not self.dbg.isValid(a):
                return 0
            a = (a & ~(page - 1)) + page
        return 1

    def eb(self, text: str) -> None:
        parts = text.split()
        if len(parts) < 2:
            raise ScriptError(f"eb without values: {text!r}")
        addr = self.eval(parts[0])
        values = []
        for p in parts[1:]:
            v = _number(p) if not p.lower().startswith("0n") else int(p[2:], 10)
            if v > 0xFF:
                raise ScriptError(f"eb: {p} is not a byte")
            values.append(v)
        try:
            self.dbg.writeBytes(addr, values)
        except self.dbg.MemoryException as e:
            raise ScriptError(f"Memory access error at {addr:#x}") from e

    def e_wide(self, kind: str, text: str) -> None:
        parts = text.split()
        if len(parts) != 2:
            raise ScriptError(f"{kind}: expected one address and one value: {text!r}")
        size = 4 if kind == "ed" else 8
        addr = self.eval(parts[0])
        value = self.eval(parts[1]) & ((1 << (8 * size)) - 1)
        try:
            self.dbg.writeBytes(addr, list(value.to_bytes(size, "little")))
        except self.dbg.MemoryException as e:
            raise ScriptError(f"Memory access error at {addr:#x}") from e
