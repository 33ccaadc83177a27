"""Pure image functions: mode conversion, EXIF, bad input, rescale, augmentation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hotdog_ray.config import AugmentSettings
from hotdog_ray.images import (
    ImageError,
    augment_batch,
    augmentation_seed,
    build_augmentation,
    decode_image,
    open_image,
    to_model_input,
)
from tests.imagegen import VARIANTS, encode, truncated_jpeg, truncated_png


@pytest.mark.parametrize("mode,fmt,size", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_mode_becomes_rgb_with_its_gray_level(mode, fmt, size):
    arr = decode_image(encode(200, mode, fmt, size), 12)
    assert arr.shape == (12, 12, 3) and arr.dtype == np.uint8
    assert abs(float(arr.mean()) - 200) < 6


def test_sixteen_bit_range_is_scaled_not_clipped():
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    img = np.asarray(open_image(buf.getvalue()))[..., 0]
    assert img.min() == 0 and img.max() >= 250  # clipping would leave almost everything at 255
    assert np.all(np.diff(img.ravel().astype(int)) >= 0)


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    assert np.asarray(open_image(buf.getvalue())).min() == 255


def test_exif_orientation_is_applied():
    # 20x10, left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise".
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = np.asarray(open_image(buf.getvalue()))
    assert out.shape == (20, 10, 3)  # now portrait
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 50  # top is red (was the left)
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 50  # bottom is blue


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"just some text, not pixels", "not a readable image"),
        (b"%PDF-1.4\n%%EOF\n", "not a readable image"),
        (truncated_jpeg(), "image"),
        (truncated_png(), "corrupt image data"),
    ],
    ids=["empty", "text", "pdf", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, 8)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # small file, 9 M pixels
    with pytest.raises(ImageError, match="too large"):
        open_image(buf.getvalue(), max_pixels=1_000_000)


def test_jpeg_draft_decode_matches_full_decode_closely():
    rng = np.random.default_rng(0)
    big = (rng.random((400, 600, 3)) * 40 + np.linspace(0, 200, 600)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=90)
    fast = decode_image(buf.getvalue(), 32).astype(float)
    full = np.asarray(
        Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((32, 32), Image.BILINEAR), float
    )
    assert np.abs(fast - full).mean() < 4


def test_rescale_modes():
    batch = torch.tensor([[[[0, 0, 0], [255, 255, 255]]]], dtype=torch.uint8)  # N=1, H=1, W=2, C=3
    unit = to_model_input(batch, "unit")
    sym = to_model_input(batch, "symmetric")
    assert unit.shape == (1, 3, 1, 2) and unit.dtype == torch.float32
    assert unit.min() == 0 and unit.max() == 1
    assert sym.min() == -1 and sym.max() == 1
    with pytest.raises(ValueError, match="rescale"):
        to_model_input(batch, "imagenet")


def test_no_augmentation_configured_means_none():
    assert build_augmentation(AugmentSettings()) is None


def test_flip_draws_per_image():
    torch.manual_seed(0)
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[0, :, :4] = 255  # left half white
    batch = np.repeat(img, 64, axis=0)
    out = augment_batch(batch, build_augmentation(AugmentSettings(horizontal_flip=True)))
    flipped = out[:, 0, 7, 0] == 255
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert 5 < flipped.sum() < 59  # both outcomes within one batch: a draw per image, not per batch


def test_seed_style_augmentation_changes_pixels_but_not_shape():
    torch.manual_seed(1)
    cfg = AugmentSettings(
        rotation=90,
        height_shift=0.3,
        width_shift=0.5,
        vertical_flip=True,
        horizontal_flip=True,
        shear=20,
        zoom=0.2,
        brightness=(0.1, 0.9),
    )
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    out = augment_batch(batch, build_augmentation(cfg))
    assert out.shape == batch.shape
    assert not np.array_equal(out, batch)
    # brightness in [0.1, 0.9] can only darken on average
    assert out.mean() < batch.mean()


def test_seeded_augmentation_is_reproducible_and_leaves_the_global_rng_alone():
    transform = build_augmentation(AugmentSettings(rotation=40, zoom=0.2, horizontal_flip=True))
    batch = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    seeds = [augmentation_seed(42, 0, f"train/cat/{i}.jpg") for i in range(6)]
    state = torch.get_rng_state()
    first = augment_batch(batch, transform, seeds)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(first, augment_batch(batch, transform, seeds))
    # each image's draw is its own: the same image and seed give the same pixels in any batch
    assert np.array_equal(first[3:], augment_batch(batch[3:], transform, seeds[3:]))
    assert not np.array_equal(first, augment_batch(batch, transform, [s + 1 for s in seeds]))


def test_augmentation_seed_differs_by_seed_epoch_and_path():
    base = augmentation_seed(42, 0, "a.jpg")
    assert base == augmentation_seed(42, 0, "a.jpg")
    assert (
        len(
            {
                base,
                augmentation_seed(43, 0, "a.jpg"),
                augmentation_seed(42, 1, "a.jpg"),
                augmentation_seed(42, 0, "b.jpg"),
            }
        )
        == 4
    )
    assert 0 <= base < 2**63
