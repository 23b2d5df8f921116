"""Find every pool call site of an image and resolve the tag each one passes."""

from __future__ import annotations

import bisect
import dataclasses
import gc
import multiprocessing
import operator
import os
import pickle
import re
import struct
import threading
from collections import Counter, defaultdict, deque
from contextlib import contextmanager
from itertools import chain, compress
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import capstone

from .. import apis
from . import model
from .flow import DecodeMismatch, FunctionCode, StepMemo
from .model import CallSite, DriverScan, Instruction, TagSource, make
from .refs import CHUNK, JMP_MEM, LOAD, FunctionStarts, Ref, direct_branches_to, find_refs, split_code
from .semantics import Context, Fork, Insn, Loc, Origin, RegLoc, StackLoc, branch_target, parse_operands, step_back
from .stubs import Stub, Tails, find_stubs, find_tails, stub_tails, stub_window

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from multiprocessing.connection import Connection

    from ..apis import PoolApi
    from ..image import Image

_X64_REG_OF = {"r8": "r8", "rdx": "rdx", "r9": "r9", "rcx": "rcx"}



class _Scanner:
    def __init__(self, image: Image) -> None:
        self.image = image
        self.pool: dict[int, PoolApi] = {}
        for slot, imp in image.imports.items():
            api = apis.lookup(imp.name)
            if api is not None and imp.dll.lower() == api.dll:
                self.pool[slot] = api
        mode = capstone.CS_MODE_64 if image.arch == "x64" else capstone.CS_MODE_32
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
        self.ctx = Context(image.arch, image.base, self._import_at, self._call_pop, self._stub_body)
        self._starts: FunctionStarts | None = None
        self._pops: dict[int, int | None] = {}
        self.notes: list[str] = []
        self.thunks: dict[int, bool] = {}
        self.stubs: dict[int, Stub] = {}
        self._stub_insns: dict[int, Insn] = {}
        self._memo = StepMemo()
        self._make: Callable[..., Any] = make  # `_record` in a child (see `_analyse_in_parallel`)
        self._refs_at: dict[int, Ref] = {}
        self._ref_rvas: list[int] = []
        self._stub_calls: list[int] = []

    # --- helpers the semantics call back into -------------------------------------------------------------

    def _import_at(self, slot: int) -> str | None:
        imp = self.image.imports.get(slot)
        return imp.name if imp else None

    def _stub_body(self, target: int) -> tuple[tuple[Insn, ...], int] | None:
        stub = self.stubs.get(target)
        if stub is None or stub.is_plain_thunk or stub.ends_in_call:
            return None
        pop = stub.api.arg_bytes_x86 if (stub.api is not None and self.image.arch == "x86") else 0
        if stub.api is None and self.image.arch == "x86":
            return None  # a `jmp reg` stub on x86: the routine's stack effect is not known here
        return stub.insns[:-1], pop

    def _call_pop(self, insn: Insn) -> int | None:
        """Bytes an x86 callee pops (stdcall), from the pool table or the callee's own `ret N`."""
        target = branch_target(insn)
        if target is None:
            ops = parse_operands(insn.op_str)
            if ops and ops[0].mem is not None and ops[0].mem.base is None and ops[0].mem.index is None:
                api = self.pool.get((ops[0].mem.disp - self.image.base) & 0xFFFFFFFF)
                return api.arg_bytes_x86 if api else None
            return None
        if target not in self._pops:
            self._pops[target] = self._ret_size(target)
        return self._pops[target]

    def _ret_size(self, start: int) -> int | None:
        mem = self.image.mem
        for _, _, mn, ops in self.cs.disasm_lite(mem[start : start + 0x2000], start):
            if mn in ("ret", "retn"):
                return int(ops, 0) if ops else 0
            if mn == "jmp" and ops.startswith("dword ptr ["):
                o = parse_operands(ops)
                if o and o[0].mem is not None and o[0].mem.base is None:
                    api = self.pool.get((o[0].mem.disp - self.image.base) & 0xFFFFFFFF)
                    return api.arg_bytes_x86 if api else None
        return None

    # --- function bounds -----------------------------------------------------------------------------------

    def _function(self, rva: int) -> tuple[int, tuple[tuple[int, int], ...]] | None:
        f = self.image.function_at(rva)
        if f is not None:
            return f.rva, f.ranges
        if self._starts is None:
            self._starts = FunctionStarts(self.image)
        b = self._starts.bounds(rva)
        if b is None:
            return None
        return b[0], (b,)

    # --- the scan ------------------------------------------------------------------------------------------

    def run(self) -> list[CallSite]:
        if not self.pool:
            return []
        refs, tails, branches = self._search()
        stubs, callers, unused = find_stubs(self.image, refs, self.pool, self.cs, tails, branches)
        self.stubs = stubs
        stub_insns = {i.rva for st in stubs.values() for i in st.insns}
        self.thunks = {**{e: True for e, st in stubs.items() if st.is_plain_thunk}, **{t: False for t in unused}}
        refs = [r for r in refs if r.rva not in unused and r.rva not in stub_insns]
        by_function: dict[int, tuple[tuple[int, int], ...]] = {}
        wanted = [r.rva for r in refs] + [src for cs in callers.values() for src, _ in cs]
        if self.image.function_table:
            # .pdata answers for most at once; the rest (leaf functions without unwind data) as below
            by_function, wanted = self.image.function_table.containing(wanted)
        for rva in wanted:
            fn = self._function(rva)
            if fn is None:
                self.notes.append(f"reference at {rva:#x} is outside every function")
                continue
            by_function.setdefault(fn[0], fn[1])
        self._refs_at = {r.rva: r for r in refs}
        self._ref_rvas = sorted(self._refs_at)
        self._stub_calls = sorted({src for cs in callers.values() for src, _ in cs})
        work = sorted(by_function.items())
        workers = _workers(len(work))
        if workers > 1:
            sites, feeds = self._analyse_in_parallel(work, workers)
        else:
            sites, feeds = self.analyse(work)
            self._memo = StepMemo()  # let it go now, while the collector is paused (scan_image)
        # in RVA order, read from `feeds`: thousands of scattered site objects cost more to visit than these tuples
        rvas = [rva for rva, _ in feeds]
        order = sorted(range(len(sites)), key=rvas.__getitem__)
        return _mark_shared([sites[i] for i in order], [feeds[i] for i in order])

    def _search(self) -> tuple[list[Ref], Tails, list[tuple[int, int, bool]] | None]:
        """The byte searches: IAT references, stub endings and, where the code is large enough for several
        processes to pay, the direct branches into the stubs' window (else `find_stubs` searches those).

        The processes take the code's 1 MiB parts in turn; the window needs the stub endings of all of them, so this
        process sends it on before all search their parts again for branches into it."""
        slots = set(self.pool)
        code = sum(s.size for s in self.image.code_sections())
        if code < PARALLEL_SEARCH_BYTES or _cores() < 2:
            return find_refs(self.image, slots), find_tails(self.image, self.pool, self.cs), None
        processes = _cores()
        spans = split_code(self.image, max(-(-code // CHUNK), 2 * processes))
        searches, sweeps = _Shares(len(spans)), _Shares(len(spans))
        x64 = self.image.arch == "x64"

        def search() -> list[tuple[list[Ref], Tails]]:
            out = []
            for i in searches:
                jmp_reg: list[int] | None = [] if x64 else None
                refs = find_refs(self.image, slots, spans[i], jmp_reg)
                out.append((refs, find_tails(self.image, self.pool, self.cs, spans[i], jmp_reg)))
            return out

        def sweep(window: set[int]) -> list[tuple[int, int, bool]]:
            return [b for i in sweeps for b in direct_branches_to(self.image, window, spans[i])]

        def child(_: None, listen: Callable[[], bytes]) -> Iterator[bytes]:
            yield pickle.dumps(search(), pickle.HIGHEST_PROTOCOL)
            yield pickle.dumps(sweep(pickle.loads(listen())), pickle.HIGHEST_PROTOCOL)

        others = [None] * (processes - 1)
        with _Children(child, others, talk=True) as children:
            self.image.function_table.links  # noqa: B018  (follow the .pdata chains while the children search)
            got = search()
            for more in map(pickle.loads, children.receive(len(others))):
                got += more
            refs = sorted((r for found, _ in got for r in found), key=lambda r: r.rva)
            pic = {k: v for _, tails in got for k, v in tails.pic.items()}
            tails = Tails(pic, sorted(x for _, tails in got for x in tails.jmp_reg))
            window = stub_window(stub_tails(self.image, refs, self.pool, tails))
            children.tell(pickle.dumps(window, pickle.HIGHEST_PROTOCOL))
            branches = sweep(window)
            for found in map(pickle.loads, children.finish()):
                branches += found
        return refs, tails, sorted(branches)

    def _analyse_in_parallel(self, work: list[tuple[int, tuple[tuple[int, int], ...]]], workers: int) -> Analysed:
        """Share the functions out between this process and forked children, in small chunks taken in turn as
        each process gets free: a static split leaves one process idle whenever the other runs slower (on a shared
        machine it often does). The children send back the sites of each chunk as they go."""
        chunks = _chunks(work, PARALLEL_CHUNK, workers)
        shares = _Shares(len(chunks))

        def take() -> Iterator[tuple[int, list[tuple[int, tuple[tuple[int, int], ...]]]]]:
            return ((i, chunks[i]) for i in shares)

        # A child makes its sites as tuples (`_record`): cheaper to make and to pickle than the dataclasses, which
        # cost this process about as much to rebuild from the tuples as to unpickle.
        def child(_: None) -> Iterator[bytes]:
            self._make = _record  # (this forked copy of the scanner only)
            return (pickle.dumps((i, self.analyse(chunk)), pickle.HIGHEST_PROTOCOL) for i, chunk in take())

        def rebuilt(got: Analysed) -> Analysed:
            sites = list(map(_rebuilt, got[0]))
            return sites, list(map(_feed, sites))

        done: list[Analysed | None] = [None] * len(chunks)
        with _Children(child, [None] * (workers - 1)) as children:
            for i, chunk in take():
                done[i] = self.analyse(chunk)
                for j, got in map(pickle.loads, children.arrived()):
                    done[j] = rebuilt(got)
            self._memo = StepMemo()  # let it go while the children finish their last chunks
            for j, got in map(pickle.loads, children.finish()):
                done[j] = rebuilt(got)
        # in the order of the work (function entries): nearly the sites' RVA order, which makes sorting them cheap
        sites: list[CallSite] = []
        feeds: list[tuple[int, tuple[int, ...]]] = []
        for got in done:
            assert got is not None
            sites += got[0]
            feeds += got[1]
        return sites, feeds

    def analyse(self, work: list[tuple[int, tuple[tuple[int, int], ...]]]) -> Analysed:
        """The sites of the functions in `work`, and for each site its RVA and the instructions that set its constant
        tag (read here, while the site is fresh in the cache: `_mark_shared` needs them for every site)."""
        sites: list[CallSite] = []
        feeds: list[tuple[int, tuple[int, ...]]] = []
        mem = self.image.mem
        for entry, ranges in work:
            refs = self._references(ranges)
            # The instructions after the last reference need decoding only as far as they can branch back
            # (`decode.layout`); all of them where the function loads an IAT slot into a register (every indirect
            # call in it is then a candidate).
            upto = max(refs[0]) if refs[0] and not refs[1] else None
            try:
                code = FunctionCode(mem, entry, ranges, self.cs, fast=True, memo=self._memo, upto=upto)
                found = list(self._sites_in(code, self._refs_at, self.stubs, refs))
            except DecodeMismatch:
                # iced-x86 and capstone disagree somewhere in this function: capstone's sweep decides
                code = FunctionCode(mem, entry, ranges, self.cs)
                found = list(self._sites_in(code, self._refs_at, self.stubs, refs))
            sites += found
            if self._make is make:  # (a child's records get theirs where they are rebuilt)
                feeds += map(_feed, found)
        return sites, feeds

    def _references(self, ranges: tuple[tuple[int, int], ...]) -> tuple[list[int], list[int]]:
        """The IAT references and stub calls in `ranges`, and those of the references that load an IAT slot into a
        register."""
        found: list[int] = []
        loads: list[int] = []
        refs_at, ref_rvas, stub_calls = self._refs_at, self._ref_rvas, self._stub_calls
        for begin, end in ranges:
            got = ref_rvas[bisect.bisect_left(ref_rvas, begin) : bisect.bisect_left(ref_rvas, end)]
            found += got
            loads += [rva for rva in got if refs_at[rva].kind == LOAD]
            found += stub_calls[bisect.bisect_left(stub_calls, begin) : bisect.bisect_left(stub_calls, end)]
        return found, loads

    def _candidates(
        self, code: FunctionCode, refs_at: dict[int, Ref], found: list[int], loads: list[int]
    ) -> tuple[Iterable[int], bool]:
        """The instructions that can be sites: IAT references and calls/jumps to stubs (`found`, see `_references`)
        and, where the function loads an IAT slot into a register, every indirect call/jump; and whether it does."""
        if not code.fast:
            has_load = any(refs_at.get(i.rva) is not None and refs_at[i.rva].kind == LOAD for i in code.insns)
            return range(len(code.starts)), has_load
        at = code.at
        ks = {k for k in map(at, found) if k is not None}
        has_load = any(at(rva) is not None for rva in loads)
        if has_load:
            ks.update(code.register_branches())
        return sorted(ks), has_load

    def _sites_in(
        self, code: FunctionCode, refs_at: dict[int, Ref], stubs: dict[int, Stub], refs: tuple[list[int], list[int]]
    ) -> Iterable[CallSite]:
        candidates, has_load = self._candidates(code, refs_at, *refs)
        n = len(code.starts)
        mask = (1 << (8 * self.image.ptr_size)) - 1
        for k in candidates:
            # The instruction's text is decoded only where it is read: `[REX] FF 15/25` (an IAT reference of the
            # instruction's own size) is `call`/`jmp`, and an instruction starting with E8/E9 is `call`/`jmp` rel32.
            rva, size, raw = code.starts[k], code.sizes[k], code.raw(k)
            ref = refs_at.get(rva)
            api: PoolApi | None = None
            call = ""
            notes: list[str] = []
            if ref is not None and ref.size == size:
                if ref.kind == "call":
                    api, call = self.pool[ref.slot], model.DIRECT
                    if raw[:1] == b"\x48" and k + 1 < n and code.raw(k + 1) == b"\x0f\x1f\x44\x00\x00":
                        notes.append("import-call-optimisation form (REX.W call + 5-byte NOP)")
                    yield self._site(code, k, api, call, notes, "call")
                elif ref.kind == JMP_MEM:
                    yield self._site(code, k, self.pool[ref.slot], model.TAIL, notes, "jmp")
                elif ref.kind == LOAD and raw[:1] == b"\x4c" and code.insn(k).op_str.startswith("r10,"):
                    nxt = code.insn(k + 1) if k + 1 < n else None
                    if nxt is not None and nxt.mnemonic == "call" and nxt.raw[:1] == b"\xe8":
                        # Reported at the mov, so the site keeps the RVA it has in the file (48 FF 15 + NOP).
                        notes.append("resident import-call-optimisation form (mov r10,[IAT]; call rel32)")
                        yield self._site(code, k, self.pool[ref.slot], model.DIRECT, notes, "mov", span=2)
                continue
            if raw[:1] in (b"\xe8", b"\xe9"):
                mnemonic = "call" if raw[0] == 0xE8 else "jmp"
                target = (rva + 5 + int.from_bytes(raw[1:5], "little", signed=True)) & mask
                stub = stubs.get(target)
                if stub is not None:
                    api = stub.api if stub.api is not None else self._stub_register_api(code, k, stub)
                    if not stub.is_plain_thunk:
                        text = "; ".join(f"{i.mnemonic} {i.op_str}".strip() for i in stub.insns)
                        notes.append(f"through the stub at {stub.entry:#x}: {text}")
                    if mnemonic == "jmp":
                        notes.append(
                            "tail jump to the stub" if not stub.is_plain_thunk else "tail jump to the import thunk"
                        )
                    if api is not None:
                        yield self._site(code, k, api, model.THUNK, notes, mnemonic, target=target)
                continue
            if not has_load or raw[-6:-4] in (b"\xff\x15", b"\xff\x25"):
                continue  # (`call`/`jmp` through [rip + disp32] or [disp32]: not through a register)
            insn = code.insn(k)
            if insn.mnemonic in ("call", "jmp"):
                ops = parse_operands(insn.op_str)
                if ops and ops[0].kind == "reg" and ops[0].reg is not None:
                    found = code.origins(k, RegLoc(ops[0].reg), self.ctx)
                    names = {o.api for o in found if o.kind == "import"}
                    if len(found) == 1 and len(names) == 1:
                        api = apis.lookup(names.pop() or "")
                        if insn.mnemonic == "jmp":
                            notes.append("tail jump through a register")
                        if api is not None:
                            yield self._site(code, k, api, model.REGISTER_CALL, notes, insn.mnemonic)

    def _stub_register_api(self, code: FunctionCode, k: int, stub: Stub) -> PoolApi | None:
        """The routine a `jmp reg` stub reaches: the register followed back through the stub into the caller."""
        ops = parse_operands(stub.insns[-1].op_str)
        if not ops or ops[0].kind != "reg" or ops[0].reg is None:
            return None
        found = self._through_stub(code, k, stub, RegLoc(ops[0].reg))
        names = {o.api for o in found if o.kind == "import"}
        if len(found) == 1 and len(names) == 1:
            return apis.lookup(names.pop() or "")
        return None

    def _through_stub(self, code: FunctionCode, k: int, stub: Stub, loc: Loc) -> list[Origin]:
        """Origins of `loc` (as at the stub's final jump), followed through the stub and then into the caller."""
        found: dict[Origin, None] = {}
        work: list[tuple[int, Loc]] = [(len(stub.insns) - 1, loc)]
        caller = code.insn(k)
        while work:
            i, loc = work.pop()
            if i == 0:
                if isinstance(loc, StackLoc) and caller.mnemonic == "call":
                    if loc.offset < self.image.ptr_size:
                        found[Origin("computed", detail="the stub reads its own return address")] = None
                        continue
                    loc = StackLoc(loc.offset - self.image.ptr_size)
                for o in code.origins(k, loc, self.ctx):
                    found[o] = None
                continue
            insn = stub.insns[i - 1]
            res = step_back(insn, loc, self.ctx)
            for r in res.steps if isinstance(res, Fork) else (res,):
                if isinstance(r, Origin):
                    if r.rva is not None:
                        self._stub_insns[r.rva] = insn
                    found[r] = None
                else:
                    work.append((i - 1, r))
        return list(found)

    def _site(
        self,
        code: FunctionCode,
        k: int,
        api: PoolApi,
        call: str,
        notes: list[str],
        mnemonic: str,
        span: int = 1,
        target: int | None = None,
    ) -> CallSite:
        rva = code.starts[k]
        raw = code.raw(k) if span == 1 else b"".join(code.raw(j) for j in range(k, k + span))
        image = self.image
        stub = self.stubs.get(target) if target is not None and call == model.THUNK else None
        if stub is not None and not stub.is_plain_thunk:
            source = self._tag_source(code, k, api, tail=mnemonic == "jmp", stub=stub)
        else:
            source = self._tag_source(code, k, api, tail=mnemonic == "jmp")
        sec = image.section_at(rva)
        return self._make(  # type: ignore[no-any-return]
            CallSite,
            rva,
            len(raw),  # size
            raw,
            api.name,
            api.role,
            call,
            code.entry,  # function_rva
            image.exports.get(code.entry),  # function_name
            sec.name if sec else "?",  # section
            source,  # tag_source
            (),  # shared_with (set by _mark_shared)
            bool(sec and sec.pageable),
            bool(sec and sec.discardable),
            tuple(notes),
        )

    def _tag_source(
        self, code: FunctionCode, k: int, api: PoolApi, tail: bool, stub: Stub | None = None
    ) -> TagSource:
        where = api.tag_location(self.image.arch)
        if where is None:
            return _source(model.NONE, detail=f"{api.name} takes no tag", build=self._make)
        loc: Loc
        if isinstance(where, str):
            loc = RegLoc(_X64_REG_OF[where])
        elif stub is not None and stub.ends_in_call:
            loc = StackLoc(where)  # at the stub's own call of the routine: the call-time layout
        elif stub is not None:
            loc = StackLoc(where + self.image.ptr_size)  # at the stub's final jump: the routine's entry layout
        else:
            # At a tail jump the return address is already on the stack, one slot above the call-time layout.
            loc = StackLoc(where + (self.image.ptr_size if tail else 0))
        if stub is not None:
            found = self._through_stub(code, k, stub, loc)
            return _classify(found, code, self.image, self._stub_insns, build=self._make)
        return _classify(code.origins(k, loc, self.ctx), code, self.image, build=self._make)


Analysed = tuple[list[CallSite], list[tuple[int, tuple[int, ...]]]]  # sites, (RVA, tag instructions) of each
PARALLEL_MIN_FUNCTIONS = 400
PARALLEL_SEARCH_BYTES = 4 << 20  # code below this is searched in one process: a fork costs more than it saves
PARALLEL_CHUNK = 48  # functions handed to a process at a time
_W = TypeVar("_W")


def _chunks(work: list[_W], size: int, workers: int) -> list[list[_W]]:
    """`work` in chunks of `size`, the last few a quarter of that: when the work runs out, a process still busy with
    its last chunk keeps the others waiting for less."""
    small = max(1, size // 4)
    head = max(0, len(work) - 4 * small * workers) // size * size
    return [work[i : i + size] for i in range(0, head, size)] + [
        work[i : i + small] for i in range(head, len(work), small)
    ]


def _cores() -> int:
    """Processes a scan may share its work between: one per core, where fork exists."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _workers(functions: int) -> int:
    """Processes for the per-function analysis: worth more than one only for large drivers."""
    return 1 if functions < PARALLEL_MIN_FUNCTIONS else _cores()


_T = TypeVar("_T")


class _Shares:
    """The numbers 0..n-1 handed out in turn to whichever process asks next (forked processes share them)."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self._n = n
        self._next = ctx.RawValue("l", 0)
        self._lock = ctx.Lock()

    def __iter__(self) -> Iterator[int]:
        while True:
            with self._lock:
                i = self._next.value
                self._next.value = i + 1
            if i >= self._n:
                return
            yield i


class _Children:
    """Forked children, each running `fn(arg)` for one of `args` and sending back every bytes object it yields.

    A child inherits everything this process holds (the image, the scanner) instead of having it pickled. One thread
    per child reads what it sends as it comes (a pipe holds only 64 KiB: a child must not wait for this process to
    finish its own share before it can go on). With `talk`, `fn` is called as `fn(arg, listen)`: `listen()` waits
    for the next message this process sends with `tell`."""

    def __init__(self, fn: Callable[..., Iterable[bytes]], args: list[_T], talk: bool = False) -> None:
        ctx = multiprocessing.get_context("fork")
        self._arrived: deque[bytes] = deque()
        self._count = threading.Semaphore(0)  # one release per message arrived
        self._failed: list[str] = []
        self._children: list[tuple[multiprocessing.process.BaseProcess, Connection, threading.Thread]] = []
        self._tell: list[Connection] = []
        gc.freeze()  # the children's collector leaves the inherited objects (and their pages) alone
        try:
            for arg in args:
                recv, send = ctx.Pipe(duplex=False)
                listen, tell = ctx.Pipe(duplex=False) if talk else (None, None)
                child = ctx.Process(target=_run_child, args=(fn, arg, send, listen), daemon=True)
                child.start()
                send.close()
                if listen is not None and tell is not None:
                    listen.close()
                    self._tell.append(tell)
                reader = threading.Thread(target=self._read, args=(child, recv), daemon=True)
                reader.start()
                self._children.append((child, recv, reader))
        except BaseException:
            self.close()
            raise

    def _read(self, child: multiprocessing.process.BaseProcess, recv: Connection) -> None:
        try:
            while True:
                data = recv.recv_bytes()
                if not data:
                    return  # the child's last word
                self._arrived.append(data)
                self._count.release()
        except (EOFError, OSError):
            child.join()
            self._failed.append(f"scan worker {child.pid} died (exit code {child.exitcode})")
            self._count.release()  # wake `receive`: it reports the failure

    def arrived(self) -> list[bytes]:
        """What the children have sent since the last call."""
        out = []
        while self._arrived:
            out.append(self._arrived.popleft())
        return out

    def receive(self, n: int) -> list[bytes]:
        """The next `n` messages, waiting for them."""
        out: list[bytes] = []
        while len(out) < n:
            self._count.acquire()  # (at least as many as the messages waiting: `arrived` takes some without it)
            if self._failed:
                raise RuntimeError(self._failed[0])
            if self._arrived:
                out.append(self._arrived.popleft())
        return out

    def tell(self, data: bytes) -> None:
        """Send `data` to every child (see `talk`)."""
        for conn in self._tell:
            conn.send_bytes(data)

    def finish(self) -> list[bytes]:
        """Everything still to come, once every child is done."""
        for _, _, reader in self._children:
            reader.join()
        if self._failed:
            raise RuntimeError(self._failed[0])
        return self.arrived()

    def close(self) -> None:
        for conn in self._tell:
            conn.close()
        for child, recv, _ in self._children:
            recv.close()
            child.join()
        gc.unfreeze()

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _run_child(fn: Callable[..., Iterable[bytes]], arg: _T, send: Connection, listen: Connection | None) -> None:
    gc.disable()
    try:
        for data in fn(arg) if listen is None else fn(arg, listen.recv_bytes):
            send.send_bytes(data)
        send.send_bytes(b"")
    except EOFError:
        pass  # the scanning process stopped talking to this child: it failed, and says so itself
    finally:
        send.close()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A scan allocates millions of short-lived, acyclic objects (freed by reference counting); the cyclic collector
    would walk the long-lived ones (the image's tables, the caches, the sites found so far) again and again for
    nothing. It is paused for the scan and runs again afterwards, when the caller next allocates.

    What the scan keeps (the sites, the image's tables) lives as long as the scan result: it is moved to the oldest
    generation on the way out (freeze + unfreeze), or the first young collection afterwards would examine every
    object of it only to find it all alive."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _instruction(
    code: FunctionCode, rva: int | None, extra: dict[int, Insn] | None = None, build: Callable[..., Any] = make
) -> Instruction | None:
    if rva is None:
        return None
    k = code.at(rva)
    if k is not None:
        ins = code.insn(k)
    elif extra and rva in extra:
        ins = extra[rva]
    else:
        return None
    return build(Instruction, ins.rva, ins.raw, f"{ins.mnemonic} {ins.op_str}".strip())  # type: ignore[no-any-return]


def _source(
    kind: str,
    value: int | None = None,
    insn: Instruction | None = None,
    imm_offset: int | None = None,
    other_sources: tuple[int, ...] = (),
    param_index: int | None = None,
    detail: str = "",
    build: Callable[..., Any] = make,
) -> TagSource:
    return build(TagSource, kind, value, insn, imm_offset, other_sources, param_index, detail)  # type: ignore[no-any-return]


def _classify(
    origins: list[Origin],
    code: FunctionCode,
    image: Image,
    extra: dict[int, Insn] | None = None,
    build: Callable[..., Any] = make,
) -> TagSource:
    """What `origins` make of a site's tag. `build` makes the result: `make`, or `_record` in a scan child."""
    if not origins:
        return _source(model.COMPUTED, detail="no path reaches the call", build=build)
    kinds = {o.kind for o in origins}
    if kinds == {"imm"}:
        values = {o.value for o in origins}
        if len(values) == 1:
            first, *rest = sorted(origins, key=lambda o: o.rva or 0) if len(origins) > 1 else origins
            return _source(
                model.IMM,
                value=first.value,
                insn=_instruction(code, first.rva, extra, build),
                imm_offset=first.imm_offset,
                other_sources=tuple(o.rva for o in rest if o.rva is not None),
                detail=first.detail,
                build=build,
            )
        shown = ", ".join(f"{v:#010x}" for v in sorted(v for v in values if v is not None))
        return _source(model.COMPUTED, detail=f"one of several constants: {shown}", build=build)
    if len(origins) == 1:
        o = origins[0]
        kind = {"import": model.MEMORY}.get(o.kind, o.kind)
        if kind == model.PARAM:
            detail = f"argument {o.param} of the function"
            return _source(model.PARAM, param_index=o.param, detail=detail, build=build)
        return _source(kind, detail=o.detail or kind, build=build)
    if kinds == {"param"} and len({o.param for o in origins}) == 1:
        detail = f"argument {origins[0].param}"
        return _source(model.PARAM, param_index=origins[0].param, detail=detail, build=build)
    parts = sorted({o.kind for o in origins})
    return _source(model.COMPUTED, detail="different sources meet: " + ", ".join(parts), build=build)


def _record(cls: type, *values: Any) -> tuple[Any, ...]:
    """`make` in a scan child: the fields alone, nested as the objects would be (`_rebuilt` makes the objects)."""
    return values


_SOURCE_AT = [f.name for f in dataclasses.fields(CallSite)].index("tag_source")
_INSN_AT = [f.name for f in dataclasses.fields(TagSource)].index("insn")


def _rebuilt(rec: Any) -> CallSite:
    """The site a child sent as a `_record`."""
    ts = list(rec[_SOURCE_AT])
    if ts[_INSN_AT] is not None:
        ts[_INSN_AT] = make(Instruction, *ts[_INSN_AT])
    return make(CallSite, *rec[:_SOURCE_AT], make(TagSource, *ts), *rec[_SOURCE_AT + 1 :])


def mark_shared(sites: list[CallSite]) -> list[CallSite]:
    """`sites`, each with the other sites its constant tag's instruction feeds (`shared_with`)."""
    return _mark_shared(sites, [_feed(s) for s in sites])


def _feed(site: CallSite) -> tuple[int, tuple[int, ...]]:
    """The site's RVA and the instructions that set its constant tag (none unless it has one)."""
    ts = site.tag_source
    if ts.kind == model.IMM and ts.insn is not None and ts.imm_offset is not None:
        return site.rva, (ts.insn.rva, *ts.other_sources)
    return site.rva, ()


def _mark_shared(sites: list[CallSite], feeds: list[tuple[int, tuple[int, ...]]]) -> list[CallSite]:
    # Most tag instructions feed one site: the few that feed several are found by counting (in C), and only the
    # sites they feed are visited and changed.
    insns_of = operator.itemgetter(1)
    counts = Counter(chain.from_iterable(map(insns_of, feeds)))
    shared = {r for r, n in counts.items() if n > 1}
    if not shared:
        return sites
    feeding = list(compress(range(len(feeds)), map(operator.not_, map(shared.isdisjoint, map(insns_of, feeds)))))
    by_insn: dict[int, list[int]] = defaultdict(list)  # shared tag instruction -> the sites it feeds
    for i in feeding:
        rva, insns = feeds[i]
        for r in insns:
            if r in shared:
                by_insn[r].append(rva)
    out = list(sites)
    for i in feeding:
        rva, insns = feeds[i]
        others = {x for r in insns for x in by_insn.get(r, ()) if x != rva}
        if others:
            out[i] = model.replaced(sites[i], shared_with=tuple(sorted(others)))
    return out


def unexplained(image: Image, sites: list[CallSite], values: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """Occurrences of each tag's 4 bytes in executable sections that no site's tag instruction accounts for."""
    wanted = sorted({v & 0xFFFFFFFF for v in values})
    if not wanted:
        return {}
    explained = set()
    for s in sites:
        ts = s.tag_source
        if ts.rva is not None and ts.imm_offset is not None:
            explained.add(ts.rva + ts.imm_offset)
    mem = image.mem
    found = _occurrences(mem, [(sec.rva, sec.end) for sec in image.code_sections()], wanted)
    return {v: tuple(p for p in found[v] if p not in explained) for v in wanted}


def _occurrences(mem: bytes, spans: list[tuple[int, int]], values: list[int]) -> dict[int, list[int]]:
    """Every position in `spans` where one of the dwords `values` is stored, by value (overlaps included)."""
    needles = {struct.pack("<I", v): v for v in values}
    out: dict[int, list[int]] = {v: [] for v in values}
    alphabet = set(b"".join(needles))
    marks = bytes(1 if b in alphabet else 0 for b in range(256))
    for begin, end in spans:
        runs: list[re.Match[bytes]] = []
        if len(needles) > FEW_NEEDLES:
            # Many tags (a whole driver's): a needle can only start where four bytes in a row come from the tags'
            # alphabet (mostly letters); those runs are found in C and only their windows are looked up, unless
            # the windows are so many that a search per tag costs less.
            runs = list(_RUN4.finditer(mem[begin:end].translate(marks)))
            if sum(r.end() - r.start() - 3 for r in runs) * WINDOW_COST > len(needles) * (end - begin):
                runs = []
        if runs:
            for run in runs:
                for p in range(begin + run.start(), begin + run.end() - 3):
                    v = needles.get(mem[p : p + 4])
                    if v is not None:
                        out[v].append(p)
            continue
        for needle, v in needles.items():
            pos = mem.find(needle, begin, end)
            while pos >= 0:
                out[v].append(pos)
                pos = mem.find(needle, pos + 1, end)
    return out


FEW_NEEDLES = 8
WINDOW_COST = 250  # a window looked up in Python costs about as much as searching this many bytes per tag
_RUN4 = re.compile(rb"\x01{4,}", re.S)


CROSS_CHECK_ALL_BELOW = 4 << 20


def scan_image(image: Image, tags: Iterable[int] | None = None) -> DriverScan:
    """All pool call sites of `image`.

    `tags` are the values whose bytes are cross-checked against the sites found. Without them every constant
    tag found is cross-checked in drivers of up to 4 MiB; larger ones are cross-checked only for requested tags.
    """
    with _collector_paused():
        return _scan(image, tags)


def _scan(image: Image, tags: Iterable[int] | None) -> DriverScan:
    scanner = _Scanner(image)
    sites = scanner.run()
    if tags is not None:
        wanted = list(tags)
    elif image.size_of_image <= CROSS_CHECK_ALL_BELOW:
        wanted = [s.tag_value for s in sites if s.tag_value]
    else:
        wanted = []
    return DriverScan(
        path=image.path,
        sha256=image.sha256,
        arch=image.arch,
        image_base=image.base,
        mapped=image.mapped,
        is_driver=image.is_driver,
        timestamp=image.timestamp,
        size_of_image=image.size_of_image,
        checksum=image.checksum,
        sites=tuple(sites),
        unexplained_tag_bytes=unexplained(image, sites, [w for w in wanted if w is not None]),
        warnings=tuple(image.warnings) + tuple(scanner.notes),
        import_thunks=dict(sorted(scanner.thunks.items())),
        stubs={e: st.insns[-1].rva for e, st in sorted(scanner.stubs.items()) if not st.is_plain_thunk},
    )
