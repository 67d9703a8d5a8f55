"""`python -m bench.perf [NAME] [overrides]`: benchmarks that print figures and ratios (one module each: bench/perf/NAME.py);
without a name (or with options only) it runs `methods`, the per-preset iteration cost on digits and sd3 tiny."""
from __future__ import annotations

import importlib
import pkgutil
import sys

DEFAULT = "methods"


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        argv = [DEFAULT, *argv]
    if argv[0] not in available():
        given = argv[0] if argv else "(none)"
        print(f"error: unknown benchmark '{given}'; valid: {', '.join(available())}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"bench.perf.{argv[0]}").main(argv[1:]) or 0)

