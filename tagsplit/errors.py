"""One error hierarchy. Library code raises these; only the CLI turns them into a message and an exit code."""

from __future__ import annotations


class TagsplitError(Exception):
    """Root of every error tagsplit reports to the user as one line."""

    exit_code = 2


class UsageError(TagsplitError, ValueError):
    """A malformed argument (tag, address, option combination)."""


class TagError(UsageError):
    """A tag that cannot be parsed or breaks the kernel's tag rules."""


class InputError(TagsplitError, OSError):
    """A file or folder that cannot be read or written."""


class ImageError(TagsplitError, ValueError):
    """The input is not a PE image tagsplit can work on."""


class UnsupportedImageError(ImageError):
    """A well-formed PE that tagsplit does not handle (architecture, .NET, ...)."""


class DisasmError(TagsplitError):
    """Disassembly or assembly failed where it had to succeed."""


class PlanError(TagsplitError, ValueError):
    """A plan that cannot be made, read or trusted."""


class TargetError(TagsplitError):
    """A target (live kernel, script, file, emulator) could not be read or written."""

    exit_code = 3


class TargetReadError(TargetError, OSError):
    pass


class TargetWriteError(TargetError, OSError):
    pass


class PatchConflictError(TargetError):
    """The target's bytes are neither the plan's original nor its replacement bytes."""


class DebuggerOutputError(TagsplitError, ValueError):
    """Debugger or PoolMon text that cannot be parsed."""
