"""Generated image folders for tests: every image mode users send, plus planted bad files.

Each class has its own gray level, in every mode, so a test can tell from the decoded pixels
alone which class an image came from, and so check labels without trusting the code under test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "hotdog")
LEVELS = {"cat": 40, "dog": 128, "hotdog": 220}
# (mode written, format, size): the odd inputs the pipeline must convert to RGB.
VARIANTS = (
    ("RGB", "JPEG", (40, 30)),
    ("L", "PNG", (24, 24)),
    ("RGBA", "PNG", (30, 40)),
    ("P", "PNG", (16, 20)),
    ("CMYK", "JPEG", (32, 32)),
    ("I;16", "PNG", (20, 16)),
    ("RGB-exif", "JPEG", (36, 18)),
)


def encode(level: int, mode: str, fmt: str, size: tuple[int, int], seed: int = 0) -> bytes:
    """An image of uniform gray ``level`` (a little noise) in ``mode``, encoded as ``fmt``."""
    w, h = size
    rng = np.random.default_rng(seed)
    gray = np.clip(level + rng.integers(-2, 3, (h, w)), 0, 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    buf = io.BytesIO()
    if mode == "RGB":
        Image.fromarray(rgb).save(buf, fmt, quality=95)
    elif mode == "RGB-exif":
        img = Image.fromarray(rgb)
        exif = img.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 CW to display
        img.save(buf, fmt, quality=95, exif=exif)
    elif mode == "L":
        Image.fromarray(gray).save(buf, fmt)
    elif mode == "RGBA":
        alpha = np.full((h, w, 1), 255, np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=-1)).save(buf, fmt)
    elif mode == "P":
        Image.fromarray(rgb).convert("P").save(buf, fmt)
    elif mode == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(buf, fmt, quality=95)
    elif mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(buf, fmt)
    else:  # pragma: no cover
        raise ValueError(mode)
    return buf.getvalue()


def truncated_jpeg(level: int = 100) -> bytes:
    data = encode(level, "RGB", "JPEG", (64, 64))
    return data[: len(data) // 2]


def truncated_png(level: int = 100) -> bytes:
    data = encode(level, "RGB", "PNG", (64, 64), seed=3)
    return data[: len(data) // 2]


@dataclass
class ImageTree:
    root: Path
    classes: tuple[str, ...] = CLASSES
    good: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    bad: list[str] = field(default_factory=list)  # paths relative to root

    def good_count(self, split: str) -> int:
        return sum(self.good[split].values())


# Planted bad files: (split, class, name, bytes).
BAD_FILES = (
    ("train", "cat", "empty.jpg", b""),
    ("train", "dog", "truncated.jpg", None),
    ("train", "hotdog", "notes.jpg", b"this is not an image, just text\n" * 4),
    ("train", "cat", "readme.txt", b"plain text file in a class folder\n"),
    ("train", "dog", "report.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"),
    ("validation", "hotdog", "truncated.png", None),
)


def write_image_tree(root: Path, per_split: dict[str, int] | None = None) -> ImageTree:
    """Write ``root/{train,validation,test}/{cat,dog,hotdog}/`` with good and bad files."""
    per_split = per_split or {"train": len(VARIANTS), "validation": 3, "test": 2}
    tree = ImageTree(root=Path(root))
    for split, n in per_split.items():
        tree.good[split] = {}
        for c, cls in enumerate(CLASSES):
            folder = tree.root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, fmt, size = VARIANTS[(i + c) % len(VARIANTS)]
                ext = "jpg" if fmt == "JPEG" else "png"
                (folder / f"{cls}_{i:03d}.{ext}").write_bytes(encode(LEVELS[cls], mode, fmt, size, seed=i))
            tree.good[split][cls] = n
    for split, cls, name, data in BAD_FILES:
        if data is None:
            data = truncated_jpeg() if name.endswith(".jpg") else truncated_png()
        (tree.root / split / cls / name).write_bytes(data)
        tree.bad.append(f"{split}/{cls}/{name}")
    # Hidden files are not data and are not counted.
    (tree.root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    return tree


def class_of_level(mean_level: float) -> str:
    """The class whose gray level is closest to ``mean_level`` (0..255)."""
    return min(LEVELS, key=lambda c: abs(LEVELS[c] - mean_level))
