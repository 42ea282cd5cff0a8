"""GGUF files converted once into Hugging Face folders, shared safely by concurrent loaders.

Trainer ranks and the selector may all ask for the same conversion at once. One process converts
while holding a lock on the cache entry; the others wait for it. A folder is used only once its
completion marker exists, and the marker is written last, after the weights, config and tokenizer
were checked, so an interrupted or incomplete conversion is replaced rather than loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

CACHE_ENV = "COLM_GGUF_CACHE"  # overrides the default cache root
DEFAULT_CACHE = Path("~/.cache/colm-stream/gguf")
COMPLETE = "colm-complete.json"  # the completion marker: present only in whole, checked folders

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$COLM_GGUF_CACHE``, else ``~/.cache/colm-stream/gguf``."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser()


def entry_folder(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the conversion of ``gguf`` lives: keyed by the file's resolved path, size and mtime
    in whole seconds (image layers and some file systems keep no finer times)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    return cache_root(cache_dir) / f"{gguf.stem}-{key[:16]}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (complete folders are never modified)."""
    return (folder / COMPLETE).is_file()


def converted(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The complete Hugging Face folder (model + tokenizer) converted from ``gguf``, made if needed.

    A complete entry is read without locking, so a read-only cache made ahead of time works.
    """
    folder = entry_folder(gguf, cache_dir)
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _entry_lock(folder, gguf):
        if is_complete(folder):  # converted by the process we waited for
            return folder
        if folder.exists():
            try:  # a whole folder converted before completion markers existed: keep it
                check_converted(folder)
            except ValueError as exc:
                logger.warning("replacing incomplete GGUF conversion %s: %s", folder, exc)
                shutil.rmtree(folder)
            else:
                _write_marker(folder, gguf)
                return folder
        for stale in folder.parent.glob(f".{folder.name}.*"):  # left by a killed conversion
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _convert_in_subprocess(gguf, tmp)
            try:
                check_converted(tmp)
            except ValueError as exc:
                raise RuntimeError(f"converting {str(gguf)!r} gave an incomplete folder: {exc}") from exc
            _fsync_files(tmp)
            _write_marker(tmp, gguf)  # last: the folder is whole from here on
            _share_like(tmp, gguf)
            tmp.rename(folder)  # atomic: readers see a whole folder or none
            _fsync_dir(folder.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_converted(folder: Path) -> None:
    """Raise ValueError unless ``folder`` holds a config with a model_type, weights and a tokenizer."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no readable config.json ({exc})") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ValueError("config.json has no model_type")
    files = _weight_files(folder)
    if not files:
        raise ValueError("no model weights (model.safetensors)")
    tensors = 0
    for path in files:
        try:
            with safe_open(str(path), "pt") as weights:
                tensors += len(list(weights.keys()))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"unreadable weights {path.name} ({exc})") from exc
    if tensors == 0:
        raise ValueError("the weight files hold no tensors")
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError("no tokenizer_config.json")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved model: the single file, or every shard its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"unreadable {index.name} ({exc})") from exc
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise ValueError(f"weight shards missing: {missing}")
        return [folder / n for n in sorted(names)]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


@contextmanager
def _entry_lock(folder: Path, gguf: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s entry; the kernel releases it if this process dies."""
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting %s into %s", gguf, folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _convert_in_subprocess(gguf: Path, dest: Path) -> None:
    """Run ``gguf_convert`` in a fresh interpreter (see its docstring for why not in this one)."""
    logger.info("converting %s into a Hugging Face folder (once; later loads read the cache)", gguf)
    cmd = [sys.executable, "-m", "colm_server.model.gguf_convert", str(gguf.resolve()), str(dest)]
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise RuntimeError(f"converting {str(gguf)!r} failed (exit code {code}); see the messages above")


def _write_marker(folder: Path, gguf: Path) -> None:
    """Write the completion marker atomically (a temporary name, fsync, rename)."""
    stat = gguf.stat()
    body = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    tmp = folder / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE)
    _fsync_dir(folder)


def _share_like(folder: Path, gguf: Path) -> None:
    """Give ``folder`` and its files the GGUF's read permissions (mkdtemp makes a private folder)."""
    read = gguf.stat().st_mode & 0o444
    folder.chmod(0o700 | read | (read >> 2))  # read implies search (x) for folders
    for path in folder.rglob("*"):
        path.chmod((0o700 | read | (read >> 2)) if path.is_dir() else (0o600 | read))


def _fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so a marker never outlives the data after a crash."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
