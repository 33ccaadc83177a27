"""Augmentation of whole batches on the worker's device, each image with its own random draw.

The recipes' ImageDataGenerator settings (flips, rotation, shear, zoom, shift, brightness) keep
their meaning, but instead of one torchvision call per image on a CPU decode task, a batch of
uint8 images already on the device gets per-sample parameters drawn at once: one affine matrix per
image, applied in a single ``affine_grid`` + ``grid_sample``; flips folded into that matrix (or a
mask when nothing else moves the pixels); brightness as a per-image factor. torchvision's v2
transforms draw one set of parameters per call, so a batch through them would move every image
alike (pytorch/vision#8484).

Draws come from a CPU generator seeded by (seed, epoch, rank), so they are reproducible whatever
the device; they are not the draws the old per-image path made for the same image.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hotdog_ray.config import AugmentSettings


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A CPU generator for one worker's epoch: stable across processes and machines."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low


def affine_matrices(cfg: "AugmentSettings", n: int, gen: torch.Generator) -> torch.Tensor | None:
    """``n`` inverse affine matrices (n x 2 x 3, output -> input in normalised coordinates) for
    ``F.affine_grid``, or None when the settings move no pixel.

    As torchvision's RandomAffine: rotation and x-shear uniform in +-degrees, scale in
    [1-zoom, 1+zoom], shifts uniform in +- the fraction of the side; flips with probability 1/2.
    """
    moves = cfg.rotation or cfg.shear or cfg.zoom or cfg.width_shift or cfg.height_shift
    if not moves:
        return None
    angle = torch.deg2rad(_uniform(n, -cfg.rotation, cfg.rotation, gen))
    shear = torch.deg2rad(_uniform(n, -cfg.shear, cfg.shear, gen))
    scale = _uniform(n, 1 - cfg.zoom, 1 + cfg.zoom, gen)
    # Normalised coordinates span 2 across the image: a shift of f of the side is 2f.
    tx = _uniform(n, -cfg.width_shift, cfg.width_shift, gen) * 2
    ty = _uniform(n, -cfg.height_shift, cfg.height_shift, gen) * 2
    fx = _flips(cfg.horizontal_flip, n, gen)
    fy = _flips(cfg.vertical_flip, n, gen)
    # Forward map: translate . rotate . shear . scale . flip; affine_grid wants its inverse.
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    a = cos * scale * fx
    b = (cos * tan - sin) * scale * fy
    c = sin * scale * fx
    d = (sin * tan + cos) * scale * fy
    det = a * d - b * c
    inv = torch.stack(
        [
            torch.stack([d / det, -b / det, (b * ty - d * tx) / det], dim=1),
            torch.stack([-c / det, a / det, (c * tx - a * ty) / det], dim=1),
        ],
        dim=1,
    )
    return inv.float()


def _flips(enabled: bool, n: int, gen: torch.Generator) -> torch.Tensor:
    """+1 or -1 per image (-1 with probability 1/2 when ``enabled``)."""
    if not enabled:
        return torch.ones(n, dtype=torch.float64)
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()


def augment(images: torch.Tensor, cfg: "AugmentSettings", gen: torch.Generator) -> torch.Tensor:
    """Augment a float NCHW batch (pixel values 0..255) on its own device; returns a new batch.

    Areas moved in from outside the image are black, as torchvision's RandomAffine fills them.
    """
    n = images.shape[0]
    theta = affine_matrices(cfg, n, gen)
    if theta is not None:
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        for enabled, dim in ((cfg.horizontal_flip, 3), (cfg.vertical_flip, 2)):
            if enabled:
                flip = (torch.rand(n, generator=gen) < 0.5).to(images.device)
                images = torch.where(flip[:, None, None, None], images.flip(dim), images)
    if cfg.brightness is not None:
        low, high = cfg.brightness
        factor = _uniform(n, low, high, gen).float().to(images.device)
        images = (images * factor[:, None, None, None]).clamp_(0, 255)
    return images
