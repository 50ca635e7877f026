"""`--help` of every command is plain text that keeps the TOML table names ([render], [compile], ...)
the options override; `render` and `study` offer the same job overrides."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app

OVERRIDES = ["--model", "--device", "--dtype", "--compile", "--attention", "--batch-size", "--no-progress",
             "--ray", "--workers", "--gpus-per-worker", "--retries", "--shard-timeout"]


@pytest.mark.parametrize("command", ["render", "study"])
def test_help_keeps_table_names_and_lists_the_shared_overrides(command):
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for table in ("[model]", "[render]", "[compile]"):
        assert f"Override {table}" in text, (table, text)
    for flag in OVERRIDES:
        assert flag in text, flag


def test_every_command_has_help():
    res = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert res.exit_code == 0
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    for name in commands:
        sub = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
        assert sub.exit_code == 0 and len(sub.output.strip()) > 40, (name, sub.output)


def test_cli_and_file_commands_start_without_torch():
    """`hpcwalk --help`, `video` and `view` need no torch (importing it costs seconds): the job schema,
    run index, video writer and viewer import without it; torch loads only where frames render."""
    import subprocess
    import sys

    code = ("import sys, hpcwalk.cli, hpcwalk.job, hpcwalk.store, hpcwalk.store.runindex, hpcwalk.see.video, hpcwalk.see.viewer; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
