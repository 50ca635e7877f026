"""The `hpcwalk` command line: parse, call, print. Bad input exits with code 2 and one line.

  common.py   the Typer app, logging, one-line errors (any HpcwalkError), the shared option set
  render.py   render, study            outputs.py  video, view, score
  inspect.py  models, needs, verify, bench
"""

import sys

from hpcwalk.cli.common import app, expand_ray_flag

# isort: off
# Each module registers its commands on `app`; this order is the order `hpcwalk --help` lists them in.
from hpcwalk.cli import render  # noqa: F401, E402
from hpcwalk.cli import outputs  # noqa: F401, E402
from hpcwalk.cli import inspect  # noqa: F401, E402
# isort: on

__all__ = ["app", "expand_ray_flag", "main"]


def main() -> None:
    """The `hpcwalk` entry point (pyproject [project.scripts])."""
    app(args=expand_ray_flag(sys.argv[1:]))
