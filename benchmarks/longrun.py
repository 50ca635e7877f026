"""`python benchmarks/longrun.py ARGS` is `hpcwalk bench longrun ARGS` writing to benchmarks/results/ by default.

The harness itself is installed with the package (hpcwalk/bench/longrun.py); this file keeps the source
checkout's old command working. `--help` lists the options.
"""

import sys
from pathlib import Path

from hpcwalk.bench import run

if __name__ == "__main__":
    sys.exit(run("longrun", sys.argv[1:], default_out=str(Path(__file__).resolve().parent / "results")))
