"""`python -m hpcwalk.cli`: the same as the `hpcwalk` command."""

from hpcwalk.cli import main

main()
