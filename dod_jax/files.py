"""Files and folders written atomically, with the modes the user's umask gives.

A file is written under a temporary name in its folder and renamed into place; a folder is
filled under a temporary name beside it and renamed. Readers see the old thing or the whole
new one, never half. Python's temporary files and folders are created private (0600, 0700);
what is renamed into place (a folder with everything in it) gets the mode any other tool's
output would get: 0666 or 0777 less the umask.

Weights files are identified by path, size and sha256 (`file_identity`), which checkpoints
and restore bundles record of the frozen weights a method builds on (`same_base` compares two).
"""

from __future__ import annotations

import hashlib
import json
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


def file_identity(path: str | os.PathLike, root: Path | None = None) -> dict:
    """{path, bytes, sha256} of a weights file, or of each weights file in a folder (named by
    its place in the folder, so a symlinked cache entry keeps its folder's path); a relative
    `path` is read under `root` and recorded as it is."""
    path = Path(path)
    inside = root is not None and not path.is_absolute()
    local = root / path if inside else path
    recorded = path if inside else path.resolve()
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".msgpack", ".json")) \
        if local.is_dir() else [local]
    out = []
    for f in files:
        name = recorded / f.relative_to(local) if local.is_dir() else recorded
        out.append({"path": str(name), "bytes": f.stat().st_size, "sha256": sha256(f)})
    return {"path": str(recorded), "files": out}


def same_base(a: dict, b: dict) -> bool:
    """Two base identities name the same weights (same hashes, wherever the files now are)."""
    digests = lambda identity: json.dumps(
        {k: ([f["sha256"] for f in v["files"]] if isinstance(v, dict) and "files" in v else v)
         for k, v in identity.items()}, sort_keys=True)
    return digests(a) == digests(b)
