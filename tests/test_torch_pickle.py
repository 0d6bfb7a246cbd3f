"""torch.save files read without torch: every tensor kind the authors' checkpoints hold comes
back equal, and a file that asks for anything else, or is damaged, is refused by name."""

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT
from dod_jax.weights.torch_pickle import TorchFileError, load


def test_tensors_and_plain_data_come_back_equal(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    saved = {
        "rank_unet": 8, "ratio": 0.5, "flag": True, "none": None, "targets": ["to_q", "conv"],
        "regex": r"^encoder\..*(conv1)$", "pair": (1, "a"),
        "state_dict_unet": collections.OrderedDict([
            ("conv_in.weight", torch.randn(32, 4, 3, 3, generator=generator)),
            ("half", torch.randn(3, 5, generator=generator).half()),
            ("bf16", torch.randn(7, generator=generator).bfloat16()),
            ("long", torch.arange(5)), ("bool", torch.tensor([True, False])),
            ("scalar", torch.tensor(2.5)), ("empty", torch.zeros(0, 3)),
            ("view", base[1:, ::3]),             # an offset, strided view of a shared storage
            ("transposed", base.t()), ("same_storage", base),
            ("param", torch.nn.Parameter(torch.randn(4, generator=generator))),
        ]),
    }
    path = tmp_path / "checkpoint.pkl"
    torch.save(saved, path)
    loaded = load(path)
    assert {k: v for k, v in loaded.items() if k != "state_dict_unet"} == {
        k: v for k, v in saved.items() if k != "state_dict_unet"}
    state = loaded["state_dict_unet"]
    assert isinstance(state, collections.OrderedDict) and list(state) == list(saved["state_dict_unet"])
    for name, tensor in saved["state_dict_unet"].items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        got = state[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else state[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert str(state["bf16"].dtype) == "bfloat16"


def test_reading_needs_no_torch(tmp_path):
    path = tmp_path / "prompt_embeds.pt"
    torch.save(torch.randn(1, 77, 16), path)
    code = (f"import sys; from dod_jax.weights.torch_pickle import load; a = load({str(path)!r}); "
            "assert a.shape == (1, 77, 16) and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def _torch_file_with(path, pickled: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")


def test_a_pickle_that_names_anything_else_is_refused_before_it_runs(tmp_path):
    path = tmp_path / "evil.pkl"
    _torch_file_with(path, pickle.dumps({"state_dict_unet": _Payload()}, protocol=2))
    with pytest.raises(TorchFileError, match=r"evil\.pkl: refuses to unpickle (posix|os)\.system"):
        load(path)
    assert not (tmp_path / "PAYLOAD_RAN").exists() and not (ROOT / "PAYLOAD_RAN").exists()
    _torch_file_with(path, pickle.dumps(collections.Counter("ab"), protocol=2))
    with pytest.raises(TorchFileError, match="refuses to unpickle collections.Counter"):
        load(path)


def test_damaged_files_are_named_with_what_is_wrong(tmp_path):
    path = tmp_path / "stage1.pkl"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match=r"truncated\.pkl: not a torch.save file in the zip format"):
        load(tmp_path / "truncated.pkl")
    with pytest.raises(TorchFileError, match=r"absent\.pkl: no such file"):
        load(tmp_path / "absent.pkl")

    buffer = io.BytesIO()
    torch.save({"w": torch.randn(4)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source:
        records = {n: source.read(n) for n in source.namelist()}
    short = dict(records)
    storage = next(n for n in records if "/data/" in n and not n.endswith("serialization_id"))
    short[storage] = records[storage][:8]
    with zipfile.ZipFile(tmp_path / "short.pkl", "w") as archive:
        for name, blob in short.items():
            archive.writestr(name, blob)
    with pytest.raises(TorchFileError, match=r"short\.pkl: storage data/0 holds 8 bytes, expected 4 x 4"):
        load(tmp_path / "short.pkl")
    del short[storage]
    with zipfile.ZipFile(tmp_path / "nostorage.pkl", "w") as archive:
        for name, blob in short.items():
            archive.writestr(name, blob)
    with pytest.raises(TorchFileError, match=r"nostorage\.pkl: the storage record data/0 is missing"):
        load(tmp_path / "nostorage.pkl")


def test_a_view_outside_its_storage_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(4)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source:
        records = {n: source.read(n) for n in source.namelist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    # The tensor's shape (4,) is pickled as the tuple K\x04\x85; make it (40,).
    assert records[pkl].count(b"K\x04\x85") == 1
    records[pkl] = records[pkl].replace(b"K\x04\x85", b"K\x28\x85")
    with zipfile.ZipFile(tmp_path / "oversized.pkl", "w") as archive:
        for name, blob in records.items():
            archive.writestr(name, blob)
    with pytest.raises(TorchFileError, match=r"oversized\.pkl: a tensor view .* reaches outside its storage of 4"):
        load(tmp_path / "oversized.pkl")
