"""Decoding photos on the model's device: JPEGs in batches through nvJPEG on a GPU.

A scoring actor with a GPU would otherwise wait on CPU decoding. Here the CPU only reads each
file's header (format, size, EXIF orientation) for the same size guards as
:func:`hotdog_ray.images.open_for_model`; JPEG bytes go to ``torchvision.io.decode_jpeg`` as one
batch on the device, are turned upright, and resized with an antialiased bilinear filter there.
Other formats, and any image the device decoder refuses, take the CPU path, so a bad file's error
carries the same reason text as everywhere else. With the device set to the CPU the same code runs
(libjpeg instead of nvJPEG): that is how it is tested without a GPU.
"""

from __future__ import annotations

import io
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from hotdog_ray.images import decode_rows

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112


def orient(chw: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a CHW image upright as its EXIF orientation (1-8) says, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return chw.flip(-1)
    if orientation == 3:
        return chw.flip(-1).flip(-2)
    if orientation == 4:
        return chw.flip(-2)
    if orientation == 5:
        return chw.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(chw, -1, (-2, -1))
    if orientation == 7:
        return chw.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(chw, 1, (-2, -1))
    return chw


def draft_factor(height: int, width: int, size: int) -> int:
    """The power-of-two reduction (1, 2, 4 or 8) the CPU path's JPEG draft mode decodes at: the
    largest that keeps both sides at least ``size`` (pure)."""
    factor = 1
    while factor < 8 and -(-height // (factor * 2)) >= size and -(-width // (factor * 2)) >= size:
        factor *= 2
    return factor


def resize_on_device(chw: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 CHW image squashed to ``size`` x ``size``, as HWC uint8: box-averaged by the power of
    two the CPU path's draft decode reduces by, then antialiased bilinear, as Pillow resizes."""
    if chw.shape[-2:] != (size, size):
        x = chw[None].float()
        factor = draft_factor(*chw.shape[-2:], size)
        if factor > 1:
            x = F.avg_pool2d(x, factor, ceil_mode=True)
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        chw = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return chw.permute(1, 2, 0)


def _jpeg_header(data: bytes, max_pixels: int, min_side: int) -> int | None:
    """The EXIF orientation of a JPEG that passes the size guards, or None: not a JPEG, or a file
    for the CPU path to decode or to reject with its reason."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):  # CMYK, YCCK: the CPU converts them
            return None
        if img.width * img.height > max_pixels or min(img.size) < min_side:
            return None
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - anything odd goes to the CPU path, which says what is wrong
        return None


def decode_on_device(
    datas: Sequence[bytes],
    size: int,
    device: torch.device,
    *,
    max_pixels: int,
    min_side: int,
) -> tuple[torch.Tensor, list[str]]:
    """Photos to an N x size x size x 3 uint8 batch on ``device``, and each one's error ("" if none).

    A row whose error is set holds zeros. JPEGs are decoded on ``device`` in one call (one call per
    image after a failure: a single bad file fails the whole batched call); the rest on the CPU.
    """
    n = len(datas)
    out = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=device)
    errors = [""] * n
    jpegs: list[int] = []
    orientations: list[int] = []
    on_cpu: list[int] = []
    for i, data in enumerate(datas):
        orientation = _jpeg_header(data, max_pixels, min_side)
        if orientation is None:
            on_cpu.append(i)
        else:
            jpegs.append(i)
            orientations.append(orientation)
    if jpegs:
        raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded = [_one(r, device) for r in raw]
        for i, chw, orientation in zip(jpegs, decoded, orientations):
            if chw is None:
                on_cpu.append(i)
            else:
                out[i] = resize_on_device(orient(chw, orientation), size)
    if on_cpu:  # the CPU's decode loop, so a bad file's reason reads as everywhere else
        rows = decode_rows([datas[i] for i in on_cpu], size=size, max_pixels=max_pixels, min_side=min_side)
        out[on_cpu] = torch.from_numpy(rows.images).to(device)
        for i, error in zip(on_cpu, rows.errors):
            errors[i] = error
    return out, errors


def _one(raw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None
