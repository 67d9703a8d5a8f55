"""`python -m bench.report results/<grid> [results/<other>]`: regenerate report.md and report.html from the cell
folders without rerunning (the report itself: bench/reporting/report.py)."""
import sys

from bench.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
