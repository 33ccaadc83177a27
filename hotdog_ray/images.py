"""Pure image functions: decode, convert to RGB, resize, rescale, augment.

Training, probing, serving and batch scoring all decode through :func:`decode_rows` and feed
models through :func:`to_model_input`, so a served prediction sees exactly the pixels training
saw. Decoding needs no torch, so that decoding tasks in Ray workers do not pay its import (two
CPU-seconds a process); only the CPU augmentation imports it, when it runs.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from hotdog_ray.config.data import MAX_PIXELS
from hotdog_ray.errors import ImageError

if TYPE_CHECKING:
    import torch

    from hotdog_ray.config.data import AugmentSettings

# Modes PIL decodes 16- or 32-bit single-channel data into (16-bit PNG, TIFF).
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the input mode; transparent areas become white, as a viewer shows them."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535; 32-bit float TIFFs are usually 0..1.
        scale = 255.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else 255.0 / 65535.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` fully into an upright RGB image, or raise :class:`ImageError`.

    ``draft_size`` lets the JPEG decoder scale down by 1/2..1/8 while decoding, which is most
    of the cost of ingesting photos that are much larger than the model input.
    """
    if not data:
        raise ImageError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except Exception as exc:  # PIL raises several types for "not an image"
        raise ImageError(f"not a readable image ({type(exc).__name__})") from None
    if img.width * img.height > max_pixels:
        raise ImageError(f"image too large: {img.width}x{img.height} is over {max_pixels} pixels")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        # Truncated files fail here, at pixel access, not at open().
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error...: all mean corrupt
        raise ImageError(f"corrupt image data ({type(exc).__name__}: {exc})") from None


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` (as Keras' ``target_size`` does) and return HWC uint8."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def open_for_model(
    data: bytes, size: int, *, max_pixels: int = MAX_PIXELS, min_side: int = 8, draft: bool = True
) -> Image.Image:
    """Decode to an upright RGB image ready to resize, or raise :class:`ImageError` (empty, not an
    image, truncated, too large, too small). ``draft`` lets JPEGs decode at reduced size, as training does."""
    img = open_image(data, max_pixels=max_pixels, draft_size=size if draft else None)
    if min(img.size) < min_side:
        raise ImageError(f"image too small: {img.width}x{img.height}, need at least {min_side} pixels a side")
    return img


def decode_image(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes to a ``size`` x ``size`` x 3 uint8 array, or raise :class:`ImageError`."""
    return resize(open_image(data, max_pixels=max_pixels, draft_size=size), size)


@dataclass(frozen=True, kw_only=True)
class DecodedRows:
    """A batch of files through :func:`decode_rows`: one row per file, in order."""

    images: np.ndarray | None  # N x size x size x 3 uint8 (zeros where a file failed); None when probing
    sizes: np.ndarray  # N x 2 (width, height) as decoded, -1 where a file failed
    errors: list[str]  # the reason a file failed, "" where it decoded

    @property
    def ok(self) -> np.ndarray:
        return np.asarray([not e for e in self.errors], bool)


def decode_rows(
    datas: Sequence[bytes], *, size: int | None, max_pixels: int = MAX_PIXELS, min_side: int = 1
) -> DecodedRows:
    """The one decode loop of training, probing, scoring and serving: each file to a ``size`` x
    ``size`` model input (JPEGs drafted at reduced size), or, with ``size`` None, only fully decoded
    and measured (``hotdog inspect``). A file that fails keeps its row, with the reason."""
    n = len(datas)
    images = np.zeros((n, size, size, 3), np.uint8) if size else None
    sizes = np.full((n, 2), -1, np.int64)
    errors = [""] * n  # "" rather than None: an all-None column would change type between stages
    for i, data in enumerate(datas):
        try:
            img = open_for_model(
                bytes(data), size or 0, max_pixels=max_pixels, min_side=min_side, draft=bool(size)
            )
            sizes[i] = img.size
            if images is not None:
                images[i] = resize(img, size)
        except ImageError as exc:
            errors[i] = str(exc)
    return DecodedRows(images=images, sizes=sizes, errors=errors)


def to_model_input(images: torch.Tensor, rescale: str) -> torch.Tensor:
    """uint8 NHWC batch to float32 NCHW in the configured range.

    The permute is a view, so a batch moved to the GPU as uint8 (4x less traffic than
    float) comes out in channels-last memory order without a copy.
    """
    return rescale_(images.permute(0, 3, 1, 2).float(), rescale)


def rescale_(x: torch.Tensor, rescale: str) -> torch.Tensor:
    """Float pixels 0..255 to the configured range, in place."""
    if rescale == "unit":
        return x.mul_(1.0 / 255.0)
    if rescale == "symmetric":
        return x.mul_(1.0 / 127.5).sub_(1.0)
    raise ValueError(f"unknown rescale mode {rescale!r} (expected 'unit' or 'symmetric')")


def build_augmentation(cfg: "AugmentSettings") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision v2 transforms matching the recipes' ImageDataGenerator settings, or None."""
    if not cfg.enabled:
        return None
    from torchvision.transforms import v2  # noqa: PLC0415 - decoding tasks import this module without torch

    steps: list = []
    if cfg.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    if cfg.rotation or cfg.shear or cfg.zoom or cfg.width_shift or cfg.height_shift:
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation,
                translate=(cfg.width_shift, cfg.height_shift)
                if (cfg.width_shift or cfg.height_shift)
                else None,
                scale=(1 - cfg.zoom, 1 + cfg.zoom) if cfg.zoom else None,
                shear=cfg.shear or None,
            )
        )
    if cfg.brightness is not None:
        steps.append(v2.ColorJitter(brightness=tuple(cfg.brightness)))
    return v2.Compose(steps)


def augment_batch(
    images: np.ndarray,
    transform: Callable[[torch.Tensor], torch.Tensor],
    seeds: Sequence[int] | None = None,
) -> np.ndarray:
    """Apply ``transform`` to each HWC uint8 image separately (each gets its own random draw).

    With ``seeds`` (one per image) each draw is seeded, so an image's augmentation does not
    depend on which task or in which order it was processed; the caller's RNG is left as it was.
    """
    import torch  # noqa: PLC0415 - decoding tasks import this module without torch

    chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if seeds is None:
        out = torch.stack([transform(img) for img in chw])
    else:
        with torch.random.fork_rng(devices=[]):
            out = torch.stack([_seeded(transform, img, seed) for img, seed in zip(chw, seeds)])
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _seeded(transform: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, seed: int) -> torch.Tensor:
    import torch  # noqa: PLC0415 - decoding tasks import this module without torch

    # The CPU generator alone: torch.manual_seed also seeds every accelerator backend, 100x slower.
    torch.default_generator.manual_seed(seed)
    return transform(img)


def augmentation_seed(seed: int, epoch: int, path: str) -> int:
    """A per-image, per-epoch seed: stable across processes (unlike ``hash``), distinct per epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
