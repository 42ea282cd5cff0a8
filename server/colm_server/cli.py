"""The selector's entry points: ``colm-selector serve`` and ``model warm``.

``colm_stream.cli`` offers both again as ``colm-stream serve`` and ``colm-stream model``, beside the
jobs that train, prepare data and report. ``dispatch`` is the one subcommand parser both use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

Entry = Callable[[list[str]], "int | None"]
SERVE_HELP = "run the selector service for one job"


def selector_main(argv: list[str] | None = None) -> None:
    """``colm-selector serve --config job.yaml --set selector.batch_size=16 ...``."""
    jobs: dict[str, tuple[Entry, str]] = {
        "serve": (lambda rest: serve_main(rest, prog="colm-selector serve"), SERVE_HELP),
    }
    dispatch("colm-selector", "The selector service.", jobs, sys.argv[1:] if argv is None else list(argv))


def serve_main(argv: list[str], prog: str = "colm-stream serve") -> None:
    """Run the selector server for the job that ``argv`` configures (YAML file and --set overrides)."""
    from colm_server.config import add_cli_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description="Run the selector service for one job.")
    add_cli_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args, parser)
    from colm_server.service.server import ServingConfigError, serve

    try:
        serve(config)  # checks first that this machine can serve it (build_engine)
    except ServingConfigError as exc:  # missing shards, token or TLS files, a bad work dir: usage errors
        parser.error(str(exc))


def model_main(argv: list[str], prog: str = "colm-stream model") -> None:
    """``colm-stream model warm SOURCE``: convert a GGUF source into the cache ahead of time."""
    parser = argparse.ArgumentParser(prog=prog, description="Prepare models ahead of time.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    warm = sub.add_parser(
        "warm", help="convert a GGUF source into the model cache now, so that no job has to",
        description="Convert a GGUF source into the model cache now (e.g. while building an image), "
                    "so that no job has to; prints the cached folder. Safe to run beside jobs that "
                    "load the same model.")
    warm.add_argument("source", help="'smollm2' or a .gguf file")
    warm.add_argument("--cache-dir", type=Path, default=None,
                      help="cache root (default: $COLM_GGUF_CACHE, else ~/.cache/colm-stream/gguf)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from colm_server.model.load import warm_cache

    try:
        folder = warm_cache(args.source, args.cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        warm.error(str(exc))
    except (RuntimeError, OSError) as exc:  # a failed conversion, or a cache it cannot write to
        warm.exit(1, f"{warm.prog}: {exc}\n")
    print(folder)


def dispatch(prog: str, description: str, jobs: dict[str, tuple[Entry, str]], argv: list[str]) -> int | None:
    """Run ``jobs[argv[0]]`` on the rest of ``argv``; otherwise print help or a usage error and exit."""
    if argv and argv[0] in jobs:
        return jobs[argv[0]][0](argv[1:])
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=f"'{prog} COMMAND --help' shows a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (_, help_text) in jobs.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.parse_args(argv)  # exits: help (0), or no / an unknown command (2)
    parser.error(f"cannot run {argv!r}")  # not reached: every command was dispatched above


if __name__ == "__main__":
    raise SystemExit(selector_main())
