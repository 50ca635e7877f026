"""The shared benchmark helpers for scripts in this folder (scaling.py): hpcwalk.bench.common, with
RESULTS pointing at benchmarks/results/. `python benchmarks/common.py table RESULT.json` prints a
result's table, as `python -m hpcwalk.bench.common table RESULT.json` does."""

import sys
from pathlib import Path

from hpcwalk.bench.common import *  # noqa: F401,F403
from hpcwalk.bench.common import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    import json

    if len(sys.argv) != 3 or sys.argv[1] != "table":
        sys.exit("usage: python benchmarks/common.py table RESULT.json")
    print(markdown_table(json.loads(Path(sys.argv[2]).read_text())))
