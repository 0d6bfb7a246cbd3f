"""SSIM against scikit-image's implementation on real photos with synthetic degradations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from dod_jax.data import degradations as deg
from dod_jax.data.demo import demo_photos
from dod_jax.losses.ssim import batch_ssim, ssim_loss


@pytest.fixture(scope="module")
def photos():
    chosen = demo_photos()
    return [chosen[n][:200, :240].astype(np.float32) / 255.0 for n in ("astronaut", "coffee", "china")]


def reference(x, y, data_range):
    return structural_similarity(x, y, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


@pytest.mark.parametrize("degrade", [lambda c: deg.gaussian_noise(c, 25, seed=0),
                                     lambda c: deg.haze(c, beta=1.2, airlight=0.9),
                                     lambda c: deg.motion_blur(c, 9, 30.0),
                                     lambda c: deg.jpeg(c, 20)])
def test_ssim_matches_scikit_image_on_photos(photos, degrade):
    clean = np.stack(photos)
    degraded = np.stack([degrade(c) for c in photos])
    got = np.asarray(jax.jit(lambda a, b: batch_ssim(a, b, data_range=1.0))(degraded, clean))
    want = np.array([reference(d, c, 1.0) for d, c in zip(degraded, clean)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # On [-1, 1] with data range 2 (the stage-2 loss). SSIM's luminance term is not
    # shift-invariant, so these values differ from the [0, 1] ones; skimage agrees on both.
    signed_d, signed_c = degraded * 2 - 1, clean * 2 - 1
    signed = np.asarray(batch_ssim(jnp.asarray(signed_d), jnp.asarray(signed_c), data_range=2.0))
    np.testing.assert_allclose(signed, [reference(d, c, 2.0) for d, c in zip(signed_d, signed_c)], atol=1e-5)


def test_ssim_of_identical_images_is_one_and_the_loss_has_gradients(photos):
    x = jnp.asarray(np.stack(photos[:2]) * 2 - 1)
    np.testing.assert_allclose(np.asarray(batch_ssim(x, x, data_range=2.0)), 1.0, atol=1e-6)
    noisy = x + 0.1 * jax.random.normal(jax.random.key(0), x.shape)
    loss, grad = jax.value_and_grad(ssim_loss)(noisy, x)
    assert 0 < float(loss) < 1 and float(jnp.abs(grad).max()) > 0
    with pytest.raises(ValueError, match="at least 11x11"):
        batch_ssim(x[:, :8, :8], x[:, :8, :8], data_range=2.0)
