"""The live target: resident memory of a loaded driver, read and written through pykd inside WinDbg/KD.

This is the only module in tagsplit that imports `pykd`, and it does so lazily, inside `_import_pykd`: pykd exists only
as Windows wheels for CPython <= 3.9 and only works inside the debugger (docs/live.md). Standard library only.

pykd API used (names and semantics from `ivellioscolin/pykd` 0.3.4.15, see /work/shared/docs/windows-facts.md §1.3):

- `module(name)` -> object with `begin()`, `size()`, `timestamp()`, `checksum()`; raises `DbgException` if the
  module is not loaded. The values are the debugger's DEBUG_MODULE_PARAMETERS Base/Size/TimeDateStamp/Checksum.
  On a 32-bit target kdlib sign-extends addresses (`addr64`), so `begin()` may be 0xffffffff8xxxxxxx; base + RVA
  arithmetic is unaffected.
- `loadBytes(va, n)` returns a *list* of ints; `writeBytes(va, list)` takes a *list* (Boost.Python checks the type),
  never checks the written count, so every write is read back here (and again by the apply engine).
- `isValid(va)`: False for a page that is not present (paged out, discarded INIT); KD cannot read or write it.
- `dbgCommand(cmd)` returns the captured text, or None when the command printed nothing.
- `isKernelDebugging()`, `isLocalKernelDebuggerEnabled()`, `isDumpAnalyzing()`, `is64bitSystem()`.
- `MemoryException` (a `DbgException`) on failed memory access.

Safety policy (windows-facts.md §6): writes only in a real kernel debugging session while the target is broken in
(a command can only run then); local kernel debugging (`lkd`, machine keeps running, writes race with other CPUs) is
refused unless `allow_local`; crash dumps are never written; the module must be the build the plan was made for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PlanError, TargetError, TargetReadError, TargetWriteError

if TYPE_CHECKING:
    from ..plan.model import Driver

PAGE = 0x1000

UNAVAILABLE = "pykd is not available: run this inside WinDbg/KD (`.load pykd`, then `!py ...`)"


class TargetUnavailableError(TargetError):
    """The backend cannot be used here (no pykd, not a kernel debugging session, ...)."""


def _import_pykd() -> Any:
    try:
        import pykd  # the only `import pykd` in tagsplit
    except ImportError as e:
        raise TargetUnavailableError(UNAVAILABLE) from e
    return pykd


def _pages(va: int, size: int) -> list[int]:
    """One address in every page that [va, va+size) touches (va itself first)."""
    out = [va]
    page = (va & ~(PAGE - 1)) + PAGE
    while page < va + max(size, 1):
        out.append(page)
        page += PAGE
    return out


def pagein_hint(va: int) -> str:
    return (
        f"the page at {va:#x} is not present (paged-out PAGE code, or a discarded INIT section): "
        f"run `.pagein /f {va:#x}`, then `g`; when the target breaks in again, retry"
    )


class PykdTarget:
    """Resident memory of `module`, through pykd. Implements `tagsplit.targets.base.Target`.

    Args:
        module: the debugger's module name (`lm` shows it; usually the file name without extension).
        plan_driver: the plan's driver identity; when given, the loaded module must have the same timestamp,
            checksum and size, and the same pointer size.
        pykd: the pykd module (or a stand-in with the same functions); imported lazily when None.
        allow_local: allow writes in local kernel debugging (the machine keeps running; writes race with other CPUs).
        read_only: for status checks; allows local kernel debugging and crash dumps, refuses every write.

    Raises:
        TargetUnavailableError: pykd is missing, the session is not kernel debugging, or it is one tagsplit must not
            write to (local kernel debugging without `allow_local`, a crash dump).
        TargetError: the module is not loaded.
        PlanError: the loaded module is another build than the plan's ("another build of <module>: ...").
    """

    name = "pykd"

    def __init__(
        self,
        module: str,
        plan_driver: Driver | None = None,
        pykd: Any = None,
        allow_local: bool = False,
        *,
        read_only: bool = False,
    ) -> None:
        self.module = module
        self.read_only = read_only
        self._pykd = pykd if pykd is not None else _import_pykd()
        self._check_session(allow_local)
        self._base, size, timestamp, checksum = self._module_identity()
        if plan_driver is not None:
            self._check_identity(plan_driver, size, timestamp, checksum)

    # --- session and identity ----------------------------------------------------------------------------

    def _call(self, what: str, *args: Any) -> Any:
        try:
            return getattr(self._pykd, what)(*args)
        except Exception as e:  # pykd raises DbgException and friends; all are one-line errors for the user
            raise TargetError(f"pykd.{what} failed: {e}") from e

    def _check_session(self, allow_local: bool) -> None:
        if not self._call("isKernelDebugging"):
            raise TargetUnavailableError(
                "not a kernel debugging session: tagsplit patches drivers, attach WinDbg/KD to the target's kernel"
            )
        if self.read_only:
            return
        if self._call("isDumpAnalyzing"):
            raise TargetUnavailableError("this is a crash dump: there is no live kernel to patch")
        if self._call("isLocalKernelDebuggerEnabled") and not allow_local:
            raise TargetUnavailableError(
                "local kernel debugging (lkd): the machine keeps running and writes race with other CPUs; "
                "use a real kernel debugger connection and break in (or pass --allow-local at your own risk)"
            )

    def _module_identity(self) -> tuple[int, int, int, int]:
        try:
            m = self._pykd.module(self.module)
        except Exception as e:
            raise TargetError(
                f"module {self.module!r} is not loaded (`lm m {self.module}` lists it when it is): {e}"
            ) from e
        try:
            return int(m.begin()), int(m.size()), int(m.timestamp()), int(m.checksum())
        except Exception as e:
            raise TargetError(f"cannot read the identity of module {self.module!r}: {e}") from e

    def _check_identity(self, d: Driver, size: int, timestamp: int, checksum: int) -> None:
        diffs = []
        if timestamp != d.timestamp:
            diffs.append(f"timestamp {timestamp:#x} (plan {d.timestamp:#x})")
        if checksum != d.checksum:
            diffs.append(f"checksum {checksum:#x} (plan {d.checksum:#x})")
        if size != d.size_of_image:
            diffs.append(f"size {size:#x} (plan {d.size_of_image:#x})")
        if diffs:
            raise PlanError(
                f"another build of {self.module}: loaded module has {', '.join(diffs)}; "
                f"the plan was made for {d.name} sha256 {d.sha256[:16]}..."
            )
        is64 = bool(self._call("is64bitSystem"))
        if (d.arch == "x64") != is64:
            raise PlanError(
                f"another build of {self.module}: the plan is for an {d.arch} driver, the target is "
                f"{'64' if is64 else '32'}-bit"
            )

    # --- Target ------------------------------------------------------------------------------------------

    def module_base(self) -> int:
        return self._base

    def _present(self, va: int, size: int, error: type[TargetError]) -> None:
        for p in _pages(va, size):
            try:
                ok = bool(self._pykd.isValid(p))
            except Exception as e:
                raise error(f"cannot check {p:#x}: {e}") from e
            if not ok:
                raise error(pagein_hint(p))

    def read(self, va: int, size: int) -> bytes:
        if size <= 0:
            return b""
        self._present(va, size, TargetReadError)
        try:
            data = self._pykd.loadBytes(va, size)
        except Exception as e:  # MemoryException, DbgException, or anything else pykd throws
            raise TargetReadError(f"cannot read {size} bytes at {va:#x}: {e}") from e
        try:
            out = bytes(data)
        except (TypeError, ValueError) as e:
            raise TargetReadError(f"pykd.loadBytes at {va:#x} returned {type(data).__name__}, not bytes") from e
        if len(out) != size:
            raise TargetReadError(f"short read at {va:#x}: {len(out)} of {size} bytes")
        return out

    def write(self, va: int, data: bytes) -> None:
        if self.read_only:
            raise TargetWriteError(f"refusing to write at {va:#x}: this target was opened read-only")
        if not data:
            return
        self._present(va, len(data), TargetWriteError)
        try:
            self._pykd.writeBytes(va, list(data))
        except Exception as e:
            raise TargetWriteError(f"cannot write {len(data)} bytes at {va:#x}: {e}") from e
        # WriteVirtual's written count is never checked by pykd: a partial or refused write is only seen here.
        try:
            back = self.read(va, len(data))
        except TargetReadError as e:
            raise TargetWriteError(f"cannot read back {len(data)} bytes written at {va:#x}: {e}") from e
        if back != bytes(data):
            raise TargetWriteError(
                f"read-back at {va:#x} gives {back.hex()}, wrote {bytes(data).hex()}: the write did not take "
                "(Memory integrity/HVCI on? see docs/live.md)"
            )

    # --- SupportsCommand ---------------------------------------------------------------------------------

    def command(self, text: str) -> str:
        """A debugger command's captured output ("" when it printed nothing)."""
        try:
            out = self._pykd.dbgCommand(text)
        except Exception as e:
            raise TargetError(f"debugger command {text!r} failed: {e}") from e
        return "" if out is None else str(out)
