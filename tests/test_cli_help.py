"""Every command's --help works (a '%' in a config field's description once crashed `sponge serve --help`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["serve", "classify", "profile", "load", "simulate", "experiment", "report", "worker"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command: str | None) -> None:
    args = [sys.executable, "-m", "sponge.cli", *([command] if command else []), "--help"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "Traceback" not in out.stderr
