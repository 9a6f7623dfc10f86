"""Writing one benchmark's section of docs/BENCHMARKS.md without touching the others."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nMeasured figures and how to reproduce them.\n"


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with `heading` (a `## ` line), or append it."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
