"""Writing files the way users expect: whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def safe_name(name: str, default: str = "untitled") -> str:
    """A file name made of letters, digits and _.+- only (no folders, no hidden files)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name.strip()).strip("._") or default


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False, folder: bool = False):
    """Yield a temporary path beside `path` to write a file (or, with `folder`, a folder) into; on
    success it is renamed into place with the permissions of a normal file or folder (mkstemp's
    0600 and mkdtemp's 0700 would hide exports from other users). An existing `path` is replaced
    only with `overwrite`; on failure nothing is left behind and an existing `path` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path.name} exists; tick 'overwrite' (--overwrite) to replace it, or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        tmp.chmod((0o777 if folder else 0o666) & ~umask())
        if folder and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            path.rename(old / "x")
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


PRESETS = Path(__file__).resolve().parents[1] / "presets"  # this checkout's presets folder


def portable_preset(preset) -> str:
    """How a recipe inside an image or a zip names its preset: a preset of this checkout's presets
    folder by its path in that folder (so it renders on another checkout with the same files), any
    other by its absolute path."""
    full = Path(preset).resolve()
    return full.relative_to(PRESETS).as_posix() if full.is_relative_to(PRESETS) else str(full)
