"""Reading `torch.save` files without torch, and without running anything they name.

`load(path)` reads the zip format torch has written since 1.6 (`archive/data.pkl` plus one
record per storage under `archive/data/`) and returns the saved object with every tensor as a
NumPy array (bfloat16 through ml_dtypes). The unpickler resolves exactly the names such files
use for tensors and state dicts: `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the
typed storage classes (`torch.FloatStorage`, ...) and `collections.OrderedDict`; dicts, lists,
tuples, strings, numbers, booleans and None come from pickle itself. Any other global (a class,
a function such as `os.system`) is refused before anything is built, with the file and the
name in the message. A tensor's view (offset, shape, strides) is checked against its storage's
length before it is read.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from dod_jax.weights.diffusers import WeightsError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchFileError(WeightsError):
    """A torch.save file that cannot be read, or that asks for more than tensors and plain data."""


class _StorageType:
    """Stands for a `torch.<Dtype>Storage` class inside the pickle: it only carries the dtype."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Reader(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix, self.source = archive, prefix, source
        order = archive.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in archive.namelist() else "little"
        if order != "little":
            raise TorchFileError(f"{source}: saved with {order!r} byte order; only little-endian files are read")
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, backward_hooks, *_: data
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise TorchFileError(f"{self.source}: refuses to unpickle {module}.{name} "
                             "(only tensors, dicts, lists, tuples, strings and numbers are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"{self.source}: unsupported persistent record {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            try:
                data = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise TorchFileError(f"{self.source}: the storage record data/{key} is missing") from None
            dtype = storage_type.dtype
            if len(data) != numel * dtype.itemsize:
                raise TorchFileError(f"{self.source}: storage data/{key} holds {len(data)} bytes, "
                                     f"expected {numel} x {dtype.itemsize}")
            self.storages[key] = np.frombuffer(data, dtype)
        return self.storages[key]

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, *_):
        if not isinstance(storage, np.ndarray):
            raise TorchFileError(f"{self.source}: a tensor without a storage record")
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
            raise TorchFileError(f"{self.source}: a tensor view (offset {offset}, shape {size}, "
                                 f"strides {stride}) reaches outside its storage of {storage.size}")
        view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride],
                                               writeable=False)
        return np.array(view)


def load(path: str | os.PathLike):
    """The object saved in a torch.save (zip format) file, tensors as NumPy arrays."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise TorchFileError(f"{source}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TorchFileError(f"{source}: not a torch.save file in the zip format (damaged, truncated, "
                             "or saved before torch 1.6: re-save it with torch)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError(f"{source}: expected one <name>/data.pkl record, found {len(pickles)}")
        try:
            return _Reader(archive, pickles[0][: -len("data.pkl")], source).load()
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, OSError) as e:
            raise TorchFileError(f"{source}: not a readable torch.save file ({type(e).__name__}: {e})") from None
