"""The `sponge` command: serve, and the subcommands each part registers."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal, Sequence, get_args, get_origin

from sponge.config import ConfigError, ServerConfig


def _flag_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """argparse type and choices for a config field's annotation (X | None, Literal[...], bool ...)."""
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    inner = args[0] if len(args) == 1 else annotation
    if get_origin(inner) is Literal:
        return str, get_args(inner)
    return (inner if inner in (int, float, str, bool) else str), None


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """`sponge serve`: one flag per ServerConfig field, so flags and config can never drift apart."""
    p = sub.add_parser("serve", help="serve a model over the Open Inference Protocol (V2)")
    p.add_argument("--config", help="TOML or JSON config file (flags and SPONGE_* env vars override it)")
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        typ, choices = _flag_type(field.annotation)
        helptext = (field.description or "").replace("%", "%%")  # argparse %-formats help strings
        if typ is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, dest=name, type=typ, choices=choices, default=None,
                           help=f"{helptext} (default: {field.default})".strip())
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from sponge.server.serve import StartupError, run

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    cfg = ServerConfig.load(args.config, overrides)
    try:
        run(cfg)
    except StartupError as exc:
        print(f"sponge: error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sponge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from sponge import client
    from sponge import experiment
    from sponge.perf import cli as profile_cli
    from sponge.report import cli as report_cli
    from sponge.runtime import remote_worker
    from sponge.sim import cli as sim_cli
    from sponge.workload import loadgen

    client.register(sub)
    profile_cli.register(sub)
    loadgen.register(sub)
    sim_cli.register(sub)
    experiment.register(sub)
    report_cli.register(sub)
    remote_worker.register(sub)  # `sponge worker`: a remote replica (runtime/remote_worker.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"sponge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
