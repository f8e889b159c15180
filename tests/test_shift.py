"""Corruptions of pyro_kfacvi.experiments.shift against independent references (scipy, PIL, colorsys)."""
import colorsys

import numpy as np
import pytest
import torch

from pyro_kfacvi.experiments.shift import (CORRUPTIONS, SEVERITIES, box_resize, brightness, contrast, corrupt, gaussian_blur,
                               gaussian_noise, pixelate)


@pytest.fixture
def images():
    """Smooth random RGB images in [0, 1] (a few 8x8 blocks upsampled), float64."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_severity_keeps_shape_dtype_and_range(images, name):
    for severity in range(1, 6):
        out = corrupt(images, name, severity, seed=3)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast", "brightness"])
def test_corruption_grows_with_severity(images, name):
    """Mean squared distance to the clean images strictly increases with the severity."""
    distances = [(corrupt(images, name, s, seed=1) - images).pow(2).mean().item() for s in range(6)]
    assert distances[0] == 0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_pixelation_resolution_falls_with_severity():
    """Pixelate's measurable effect is the resolution: int(32 s) distinct values per row of a
    white-noise image (its distance to the clean image is not monotonic on smooth images, as the
    resampling grids alias differently)."""
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    resolutions = [torch.unique(corrupt(noise, "pixelate", s)[0, 0, 5]).numel() for s in range(1, 6)]
    assert resolutions == [30, 28, 27, 24, 20]


def test_neutral_levels_are_the_identity(images):
    for out in (gaussian_noise(images, 0.0), gaussian_blur(images, 0.0), contrast(images, 1.0),
                brightness(images, 0.0), pixelate(images, 1.0), corrupt(images, "contrast", 0)):
        torch.testing.assert_close(out, images, rtol=0, atol=1e-12)


def test_noise_is_seeded_and_leaves_the_global_rng_alone(images):
    state = torch.get_rng_state()
    a = corrupt(images, "gaussian_noise", 5, seed=7)
    b = corrupt(images, "gaussian_noise", 5, seed=7)
    c = corrupt(images, "gaussian_noise", 5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    # the same ε at every severity: the unclipped residuals scale with σ
    inside = (a > 0) & (a < 1) & (corrupt(images, "gaussian_noise", 1, seed=7) > 0)
    residual5, residual1 = (a - images)[inside], (corrupt(images, "gaussian_noise", 1, seed=7) - images)[inside]
    torch.testing.assert_close(residual5, residual1 * (0.10 / 0.04))
    assert abs((a - images).std().item() - 0.10) < 0.01


def test_blur_matches_scipy(images):
    ndimage = pytest.importorskip("scipy.ndimage")
    for sigma in SEVERITIES["gaussian_blur"]:
        reference = ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        torch.testing.assert_close(gaussian_blur(images, sigma), torch.from_numpy(reference).clamp(0, 1))


def test_pixelate_matches_pil_box_resampling(images):
    from PIL import Image

    for scale in SEVERITIES["pixelate"]:
        size = int(32 * scale)
        reference = np.array([[np.asarray(Image.fromarray(channel.numpy().astype(np.float32), mode="F")
                                          .resize((size, size), Image.BOX).resize((32, 32), Image.BOX))
                               for channel in image] for image in images])
        torch.testing.assert_close(pixelate(images, scale), torch.from_numpy(reference).double(), atol=1e-6, rtol=0)


def test_box_resize_by_an_integer_factor_averages_blocks(images):
    torch.testing.assert_close(box_resize(images, 16, 16), torch.nn.functional.avg_pool2d(images, 2))


def test_contrast_scales_each_channels_deviation_from_its_mean(images):
    out = contrast(images, 0.3)
    mean = images.mean((2, 3), keepdim=True)
    torch.testing.assert_close(out - mean, 0.3 * (images - mean))


def test_brightness_matches_colorsys_hsv(images):
    out = brightness(images, 0.2)
    pixels = images[0].reshape(3, -1).T.tolist()
    reference = []
    for r, g, b in pixels[:200]:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        reference.append(colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)))
    torch.testing.assert_close(out[0].reshape(3, -1).T[:200], torch.tensor(reference, dtype=torch.float64))
    black = brightness(torch.zeros(1, 3, 2, 2), 0.1)
    torch.testing.assert_close(black, torch.full((1, 3, 2, 2), 0.1))


def test_rejects_unknown_corruptions_and_severities(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)
