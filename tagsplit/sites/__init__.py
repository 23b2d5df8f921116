"""Stage 2 of the pipeline: find the pool call sites of an image and where each site's tag comes from."""

from __future__ import annotations

from .model import CallSite, DriverScan, TagSource
from .scan import scan_image

__all__ = ["CallSite", "DriverScan", "TagSource", "scan_image"]
