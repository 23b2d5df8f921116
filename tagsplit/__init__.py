"""tagsplit: split one pool tag into one tag per call site, then attribute pool leaks to call sites."""

from __future__ import annotations

__version__ = "0.1.0"
