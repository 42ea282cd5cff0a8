"""Console entry points: `colm-stream demo` and `colm-selector serve`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    """`colm-stream`: the user-facing jobs."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print("usage: colm-stream demo [options]", file=sys.stderr)
        raise SystemExit(2)
    from colm_server.demo import main as demo

    demo(argv[1:])


def selector_main(argv: list[str] | None = None) -> None:
    """`colm-selector serve --config job.yaml --set selector.batch_size=16 ...`."""
    from colm_server.config import add_cli_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="colm-selector")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the selector server for one job")
    add_cli_arguments(serve_p)
    serve_p.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        config.validate_for_serving()  # missing shards, token or TLS files: a usage error, not a traceback
        config.service.check_work_dir()  # a file, or a folder it cannot write to: the same
    except ValueError as exc:
        parser.error(str(exc))
    from colm_server.service.server import serve

    serve(config)
