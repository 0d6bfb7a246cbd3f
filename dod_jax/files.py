"""Files and folders written atomically, with the modes the user's umask gives.

A file is written under a temporary name in its folder and renamed into place; a folder is
filled under a temporary name beside it and renamed. Readers see the old thing or the whole
new one, never half. Python's temporary files and folders are created private (0600, 0700);
what is renamed into place (a folder with everything in it) gets the mode any other tool's
output would get: 0666 or 0777 less the umask.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in blocks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """`write(temporary_path)` writes the file; it then takes `path`'s place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = False) -> Path:
    """`fill(staging)` writes the folder's contents; the folder then takes `path`'s place
    (replacing an existing folder there only when `replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(staging)
        for place, folders, files in os.walk(staging):  # some writers (safetensors) create 0600 files
            os.chmod(place, folder_mode())
            for name in files:
                os.chmod(os.path.join(place, name), file_mode())
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
