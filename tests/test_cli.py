"""`colm-stream`: one command line whose subcommands run every job through that job's own entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from colm_stream.cli import JOBS, main

SCRIPTS = Path(sys.executable).parent

# Per subcommand: the program its --help names, and an option only that job has.
OWN_HELP = {"demo": ("colm-stream demo", "--strategies"), "serve": ("colm-stream serve", "--config"),
            "train": ("colm-stream train", "--selector"), "data": ("colm-stream data", "synthetic"),
            "status": ("colm-stream status", "--health"), "model": ("colm-stream model", "warm")}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)``'s exit code (SystemExit or return value) and what it printed."""
    try:
        code = main(argv) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand_with_its_line(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert set(JOBS) == set(OWN_HELP)
    flat = " ".join(out.split())
    for name, (_, line) in JOBS.items():
        assert f"    {name} " in out and " ".join(line.split()) in flat


@pytest.mark.parametrize("name", sorted(OWN_HELP))
def test_each_subcommand_shows_its_own_options(name, capsys):
    prog, option = OWN_HELP[name]
    code, out, _ = run([name, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: {prog} ") and option in out


@pytest.mark.parametrize(("argv", "message"), [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
    (["--bogus", "demo"], "unrecognized arguments: --bogus"),  # options go after the subcommand
])
def test_no_or_an_unknown_subcommand_is_a_usage_error(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: colm-stream ") and message in err


def test_a_subcommand_gets_the_rest_of_the_line_and_its_exit_code(tmp_path, capsys):
    argv = ["data", "synthetic", "--out", str(tmp_path), "--records", "30", "--seed", "4"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "records: 30" in out
    assert json.loads((tmp_path / "manifest.json").read_text())["inputs"] == ["synthetic(seed=4)"]
    code, _, err = run(["data", "synthetic", "--out", str(tmp_path), "--records", "0"], capsys)
    assert code == 2 and "--records" in err


def test_the_installed_scripts_and_the_older_names_work():
    scripts = {ep.name: ep for ep in metadata.distribution("colm-stream").entry_points
               if ep.group == "console_scripts"}
    assert {"colm-stream", "colm-selector", "colm-train", "colm-data", "colm-status"} <= set(scripts)
    assert all(callable(ep.load()) for ep in scripts.values())
    for argv, expected in ((["colm-stream", "--help"], "model"),
                           (["colm-stream", "status", "--help"], "--health"),
                           (["colm-selector", "serve", "--help"], "--config"),
                           (["colm-selector", "--help"], "serve")):
        exe = shutil.which(argv[0], path=str(SCRIPTS))
        if exe is None:
            pytest.skip(f"{argv[0]} is not installed beside {sys.executable}")
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and expected in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "colm_stream.cli", "nonsense"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr
