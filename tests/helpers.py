"""Small pieces several test modules share: running one CLI sub-command, a scripted policy."""

from __future__ import annotations

import argparse
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
