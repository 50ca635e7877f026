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
    """The `hpcwalk` entry point (pyproject [project.scripts]). SIGTERM and SIGINT stop a command at a safe point
    with one line (hpcwalk/cli/common.py: `stopped`), from the moment this function starts; once the command
    has ended, and while the interpreter shuts down, they are ignored: its exit code stands."""
    import signal

    import click
    import typer

    from hpcwalk.cli.common import last_words, resume_command, stopped
    from hpcwalk.core import interrupt

    args = expand_ray_flag(sys.argv[1:])
    for s in interrupt.SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # what `handling` restores on its way out
    with interrupt.handling(last_words(resume_command(args))):
        try:
            app(args=args)
        except interrupt.Interrupted as e:  # before the command group began (or as it returned)
            try:
                stopped(e, resume_command(args))
            except (click.exceptions.Exit, typer.Exit) as x:
                sys.exit(x.exit_code)
