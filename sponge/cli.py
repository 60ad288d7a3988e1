"""The `sponge` command: serve, and the subcommands each part registers."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sponge.config import ConfigError, ServerConfig


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the Open Inference Protocol (V2)")
    p.add_argument("--config", help="TOML or JSON config file (flags and SPONGE_* env vars override it)")
    p.add_argument("--model", help="path to an .onnx model (default: packaged EfficientNet-Lite0)")
    p.add_argument("--model-name", dest="model_name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--cpu-m", dest="cpu_m", type=int, help="CPU per replica in millicores (static allocation)")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--max-batch", dest="max_batch", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument("--default-slo-ms", dest="default_slo_ms", type=float)
    p.add_argument("--expiry-policy", dest="expiry_policy", choices=["reject", "serve_late"])
    p.add_argument("--queue-capacity", dest="queue_capacity", type=int)
    p.add_argument("--policy", choices=["sponge", "paper", "static"])
    p.add_argument("--actuator", choices=["auto", "cgroup-v2", "cgroup-v1", "affinity", "none"])
    p.add_argument("--interval-ms", dest="interval_ms", type=float)
    p.add_argument("--admin-token", dest="admin_token")
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from sponge.server.serve import run

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    cfg = ServerConfig.load(args.config, overrides)
    run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sponge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from sponge import client
    from sponge.report import cli as report_cli
    from sponge.workload import loadgen

    client.register(sub)
    loadgen.register(sub)
    report_cli.register(sub)
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
