"""Gather this machine's pip settings into one folder that docker/Dockerfile mounts at /run/pip.

    python3 docker/pip_context.py OUT [--pip "python3 -m pip"] [--local-indexes]

An offline build needs what pip here uses to reach its package index: the index URLs, the CA
bundle, constraints and local wheel folders. This reads them the way pip does (``pip config
list``: config files, then ``PIP_*`` variables, which win), copies every local file and folder
they name into OUT, and writes ``OUT/pip.conf`` with those paths rewritten under ``/run/pip``.
The Dockerfile mounts OUT there only while it runs pip, so none of it ends up in a layer.

Local ``file://`` index folders (``index-url``/``extra-index-url``) are left out unless
``--local-indexes`` is given: they are often gigabytes, and a mirror of an index that pip can
reach anyway changes nothing. Local files are hard-linked where possible, so OUT costs little.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

MOUNT = "/run/pip"  # where docker/Dockerfile mounts OUT during its pip installs
PATH_KEYS = ("cert", "client-cert", "constraint")  # a local file each
LIST_KEYS = ("find-links", "extra-index-url", "constraint")  # whitespace-separated values
LOCAL_INDEX_KEYS = ("index-url", "extra-index-url")


def effective_settings(pip: list[str]) -> dict[str, str]:
    """``{name: value}`` as ``pip install`` sees it: env over [install] over [global] (files merged)."""
    listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    by_section: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        by_section.setdefault(section, {})[name] = ast.literal_eval(value)
    settings: dict[str, str] = {}
    for section in ("global", "install", ":env:"):  # later wins, as in pip
        settings.update(by_section.get(section, {}))
    return settings


def local_path(value: str) -> Path | None:
    """The local path a setting names (a plain path or a file:// URL), or None for a remote URL."""
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path))
    if "://" in value:
        return None
    return Path(value).expanduser()


class Folder:
    """OUT: copies local files and folders into it under stable names, returns their mounted paths."""

    def __init__(self, root: Path):
        self.root = root
        self.names: dict[Path, str] = {}

    def add(self, path: Path, kind: str) -> str:
        path = path.resolve()
        if path not in self.names:
            name = f"{kind}-{len(self.names)}{path.suffix if path.is_file() else ''}"
            target = self.root / name
            if path.is_dir():
                shutil.copytree(path, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(path, target)
            self.names[path] = name
        return f"{MOUNT}/{self.names[path]}"


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def rewrite(settings: dict[str, str], out: Path, local_indexes: bool) -> tuple[dict[str, str], list[str]]:
    """Settings with local paths moved into ``out``; also what was left out, as messages."""
    folder, kept, notes = Folder(out), {}, []
    for name, value in settings.items():
        if name not in PATH_KEYS and name not in LIST_KEYS and name not in LOCAL_INDEX_KEYS:
            kept[name] = value
            continue
        items = value.split() if name in LIST_KEYS else [value]
        moved = []
        for item in items:
            path = local_path(item)
            if path is None:
                moved.append(item)
            elif not path.exists():
                notes.append(f"{name}: {item} does not exist here, left out")
            elif name in LOCAL_INDEX_KEYS and not local_indexes:
                notes.append(f"{name}: local index {item} left out (--local-indexes copies it)")
            elif name in LOCAL_INDEX_KEYS or item.startswith("file:"):
                moved.append("file://" + folder.add(path, name))
            else:
                moved.append(folder.add(path, name))
        if moved:
            kept[name] = " ".join(moved)
    return kept, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--pip", default=f"{shlex.quote(sys.executable)} -m pip",
                   help="the pip whose settings to take (default: this Python's)")
    p.add_argument("--local-indexes", action="store_true", help="copy local file:// index folders too")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True)
    settings, notes = rewrite(effective_settings(shlex.split(args.pip)), args.out, args.local_indexes)
    lines = ["[global]"] + [f"{name} = {value}" for name, value in sorted(settings.items())]
    (args.out / "pip.conf").write_text("\n".join(lines) + "\n")
    for note in notes:
        print(f"pip_context: {note}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
