"""``tandem router --config FILE [--host H] [--port P]``."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from tandem.router import server, settings

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem router",
        description="Run the gateway router (OpenAI API in front of the pools).",
    )
    parser.add_argument(
        "--config", required=True, help="router settings (JSON, as the operator writes them)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = settings.load(args.config)
    except OSError as exc:
        print(f"{args.config}: cannot read: {exc}", file=sys.stderr)
        return 1
    except (ValidationError, ValueError) as exc:
        print(f"{args.config}: invalid router settings: {exc}", file=sys.stderr)
        return 1
    server.build(
        config, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log
    ).run()
    return 0
