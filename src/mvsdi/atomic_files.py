"""Files written atomically: into a temporary file beside the target, flushed to disk, then renamed
over it, so a reader (or a run killed mid-write) sees the old content or the new, never half of it."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

# the names of the temporary files (".NAME.<random>.tmp"): what a writer killed mid-write leaves behind
TEMPORARY_FILES = ".*.tmp"


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file in ``path``'s folder, opened for writing: (descriptor, its path).

    Created by ``os.open`` with mode 0o666 so that the umask (and a default ACL) applies as it does
    to a plain ``open()``; ``tempfile.mkstemp`` would make every atomically written file 0600.
    The name ``.NAME.<random>.tmp`` (``TEMPORARY_FILES``) is what a resume sweeps up after a kill
    (``RunDirectory._resume``).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file, flushed to disk, then renamed over ``path``."""
    fd, tmp = _temporary_beside(Path(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))
