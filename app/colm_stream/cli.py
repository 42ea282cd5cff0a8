"""Console entry point ``colm-stream COMMAND``: every job, one subcommand each.

``colm-stream COMMAND ARGS`` hands ARGS to that job's own entry point, so ``colm-stream train`` is
``colm-train``, ``colm-stream serve`` is ``colm-selector serve`` and so on; the older script names
keep working. Each job's module is imported only when it runs, so ``--help`` stays quick.
"""

from __future__ import annotations

import sys

from colm_server.cli import SERVE_HELP, Entry, dispatch, model_main, serve_main


def _demo(argv: list[str]) -> int | None:
    from colm_stream.demo import main as demo

    return demo(argv)


def _train(argv: list[str]) -> int | None:
    from colm_stream.train import main as train

    return train(argv, prog="colm-stream train")


def _data(argv: list[str]) -> int | None:
    from colm_server.data.prepare import main as data

    return data(argv, prog="colm-stream data")


def _status(argv: list[str]) -> int | None:
    from colm_client.status import main as status

    return status(argv, prog="colm-stream status")


def _serve(argv: list[str]) -> None:
    serve_main(argv, prog="colm-stream serve")


def _model(argv: list[str]) -> None:
    model_main(argv, prog="colm-stream model")


JOBS: dict[str, tuple[Entry, str]] = {
    "demo": (_demo, "coreset training end to end on a built-in synthetic mixture, offline"),
    "serve": (_serve, f"{SERVE_HELP} (= colm-selector serve)"),
    "train": (_train, "train LoRA on the selector's weighted coresets (= colm-train)"),
    "data": (_data, "write WebDataset shards from JSONL, datasets or the synthetic mixture (= colm-data)"),
    "status": (_status, "show a running selector's progress and health (= colm-status)"),
    "model": (_model, "prepare models ahead of time: 'model warm SOURCE' converts a GGUF into the cache"),
}


def main(argv: list[str] | None = None) -> int | None:
    """``colm-stream``: the user-facing jobs, one subcommand each."""
    return dispatch(
        "colm-stream", "Coreset selection for LoRA fine-tuning: every job, one subcommand each.",
        JOBS, sys.argv[1:] if argv is None else list(argv),
    )


if __name__ == "__main__":
    raise SystemExit(main())
