"""Small pieces several test modules share: running one CLI sub-command, a scripted policy, waiting for a
condition on the event loop."""

from __future__ import annotations

import argparse
import asyncio
import selectors
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from sponge.policy.types import Decision, Observation


def run_subcommand(register: Callable[[argparse._SubParsersAction], None], argv: list[str]) -> int:
    """Parse `argv` with only the sub-command `register` adds, and run it (its exit status)."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


@dataclass
class Scripted:
    """A test policy: the decision scripted for a tick's time is the one in force after it (otherwise the
    decision in force); it records every observation."""

    script: dict[float, Decision]
    name: str = "scripted"
    seen: list[Observation] = field(default_factory=list)

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return self.script.get(obs.now_ms, obs.current)


async def until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait (polling every 2 ms) until `cond()` holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def wait_listening(p: subprocess.Popen[str], timeout_s: float = 60.0) -> int:
    """The port a `sponge worker` subprocess (stdout piped, text) prints as `listening PORT` once it serves;
    RuntimeError if it exits or says nothing within `timeout_s` (a bound on a hang, not a timing check)."""
    sel = selectors.DefaultSelector()
    assert p.stdout is not None
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(0.2):
            line = p.stdout.readline()
            if line.startswith("listening "):
                return int(line.split()[1])
            if not line:
                break
    raise RuntimeError(f"worker did not start (exit code {p.poll()})")

