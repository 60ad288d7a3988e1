"""Shared test setup: tests/ on the import path, and a fixture for child processes the tests start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def spawn():
    """Start Python children; at teardown kill exactly those PIDs."""
    procs: list[subprocess.Popen] = []

    def start(code: str, wait_ready: bool = True) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        procs.append(p)
        if wait_ready:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, 9)
        p.wait(timeout=5)
