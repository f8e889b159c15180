"""Dataset shift: CIFAR-10-C-style image corruptions, generated on the fly as batched tensor ops.

All functions act on **raw** images: RGB in ``[0, 1]``, shape ``(N, 3, H, W)``, on any device
(corrupt first, then :func:`pyro_kfacvi.data.normalize`), and return images in ``[0, 1]``.
The corruptions and their five severities follow Hendrycks & Dietterich (2019), "Benchmarking
neural network robustness to common corruptions and perturbations" (their ``make_cifar_c.py``
parameters for 32×32 images, :data:`SEVERITIES`):

* ``gaussian_noise``: x + σε, ε ~ N(0, I), clipped to [0, 1];
* ``gaussian_blur``: convolution with a Gaussian of standard deviation σ pixels (truncated at
  radius ⌊4σ + ½⌋, edges replicated: ``skimage.filters.gaussian``, i.e. scipy's
  ``gaussian_filter(mode="nearest")``);
* ``contrast``: (x − m)c + m with m the image's mean over pixels, per channel;
* ``brightness``: the HSV value v = max(r, g, b) becomes min(v + δ, 1) with hue and saturation
  kept, i.e. x·v'/v (a black pixel becomes grey δ);
* ``pixelate``: resized down to ⌊H·s⌋ pixels and back up with PIL's ``BOX`` filter, as in the
  original: an output pixel averages the input pixels whose centres fall in its box.

:func:`corrupt` seeds the random ones (only Gaussian noise draws), so a corrupted set is a
function of ``(images, name, severity, seed)``; the same ε is used at every severity.
"""
import torch
import torch.nn.functional as F

from .evaluation import private_rng

__all__ = ["CORRUPTIONS", "SEVERITIES", "box_resize", "box_resize_matrix", "brightness", "contrast", "corrupt",
           "gaussian_blur", "gaussian_noise", "pixelate"]


def gaussian_noise(images, std):
    """``clip(x + std·ε, 0, 1)``, ε ~ N(0, I) from the global torch RNG."""
    return (images + std * torch.randn_like(images)).clamp_(0, 1)


def gaussian_blur(images, sigma):
    r"""Separable convolution with :math:`k_i \propto \exp(-i^2 / 2σ^2)`, :math:`|i| \le ⌊4σ + ½⌋`,
    replicated edges; ``sigma = 0`` is the identity."""
    radius = int(4 * sigma + 0.5)
    if radius == 0:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels).clamp_(0, 1)


def contrast(images, factor):
    """``clip((x - m)·factor + m, 0, 1)``, m the mean of each image's channel over its pixels."""
    mean = images.mean((2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp_(0, 1)


def brightness(images, delta):
    """HSV value v = max_c x_c raised to min(v + delta, 1), hue and saturation kept: x·v'/v
    (grey v' where v = 0)."""
    value = images.amax(1, keepdim=True)
    brighter = (value + delta).clamp(max=1)
    return torch.where(value > 0, images * brighter / value.clamp(min=1e-12), brighter).clamp_(0, 1)


def box_resize_matrix(size_in, size_out, dtype=torch.float32, device=None):
    r"""The ``(size_out, size_in)`` matrix of PIL's ``BOX`` resampling along one axis: with
    r = size_in / size_out and centre c_i = (i + ½)r, output i averages the inputs j with
    :math:`-\tfrac12 < (j + \tfrac12 - c_i) / \max(r, 1) \le \tfrac12`."""
    scale = size_in / size_out
    centres = (torch.arange(size_out, dtype=torch.float64, device=device) + 0.5) * scale
    offsets = (torch.arange(size_in, dtype=torch.float64, device=device) + 0.5 - centres[:, None]) / max(scale, 1.0)
    weights = ((offsets > -0.5) & (offsets <= 0.5)).double()
    return (weights / weights.sum(1, keepdim=True)).to(dtype)


def box_resize(images, height, width):
    """``images (N, C, H, W)`` resized to ``height × width`` with PIL's ``BOX`` filter."""
    rows = box_resize_matrix(images.shape[-2], height, images.dtype, images.device)
    cols = box_resize_matrix(images.shape[-1], width, images.dtype, images.device)
    return rows @ images @ cols.T


def pixelate(images, scale):
    """:func:`box_resize` down to ``int(H·scale) × int(W·scale)`` pixels and back to ``H × W``;
    ``scale = 1`` is the identity."""
    height, width = images.shape[-2:]
    return box_resize(box_resize(images, int(height * scale), int(width * scale)), height, width)


#: name → corruption ``f(images, level)``.
CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}
#: name → the level of severities 1..5 (Hendrycks & Dietterich's CIFAR-10-C parameters).
SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # σ
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # σ in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # c
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # δ
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # s
}


def corrupt(images, name, severity, seed=0):
    """``images`` (raw, ``[0, 1]``) under corruption ``name`` at ``severity`` 1..5 (0: a copy of
    the clean images). Random corruptions draw from a private RNG stream seeded with ``seed``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in range(len(SEVERITIES[name]) + 1):
        raise ValueError(f"severity must be in 0..{len(SEVERITIES[name])}, got {severity}")
    if severity == 0:
        return images.clone()
    with private_rng(seed, images.device):
        return CORRUPTIONS[name](images, SEVERITIES[name][severity - 1])
