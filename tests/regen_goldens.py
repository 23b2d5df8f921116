"""Write the golden parse (`<name>.json`) next to each debugger-output sample `tests/data/windbg/<name>.txt`.

Goldens are never written by the tests. Regenerate them deliberately, then review `git diff tests/data/windbg`:

    cd /work/main && python tests/regen_goldens.py                      # every sample
    cd /work/main && python tests/regen_goldens.py poolused_4_notes.txt # only these samples

`expected(text)` is also what tests/test_snapshot_parsers.py compares against the goldens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagsplit.snapshots import (
    PoolBlock,
    detect_format,
    parse_poolfind,
    parse_poolmon_snapshots,
    parse_poolused_tables,
)

DATA = Path(__file__).resolve().parent / "data" / "windbg"


def _hex(value: int | None) -> str | None:
    return None if value is None else hex(value)


def _block(block: PoolBlock) -> dict[str, Any]:
    out = asdict(block)
    for key in ("address", "size", "previous_size"):
        out[key] = _hex(out[key])
    return out


def expected(text: str) -> dict[str, Any]:
    """The parse of one sample as JSON-ready data (addresses and sizes of blocks in hex, as the debugger prints)."""
    fmt = detect_format(text)
    if fmt == "poolused":
        tables = [
            {
                "sort": t.sort,
                "verbose": t.verbose,
                "total": None if t.total is None else asdict(t.total),
                "usages": [asdict(u) for u in t.usages],
            }
            for t in parse_poolused_tables(text)
        ]
        return {"format": fmt, "tables": tables}
    if fmt == "poolfind":
        return {"format": fmt, "blocks": [_block(b) for b in parse_poolfind(text)]}
    return {"format": fmt, "snapshots": [[asdict(u) for u in s] for s in parse_poolmon_snapshots(text)]}


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


def main(argv: list[str]) -> int:
    samples = [DATA / name for name in argv] if argv else sorted(DATA.glob("*.txt"))
    for sample in samples:
        golden = sample.with_suffix(".json")
        golden.write_text(dumps(expected(sample.read_bytes().decode("utf-8"))), encoding="utf-8")
        print(f"wrote {golden.relative_to(DATA.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
