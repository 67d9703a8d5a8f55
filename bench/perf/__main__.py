"""`python -m bench.perf NAME [overrides]` (the dispatcher: bench/perf/__init__.py)."""
import sys

from bench.perf import main

if __name__ == "__main__":
    sys.exit(main())
