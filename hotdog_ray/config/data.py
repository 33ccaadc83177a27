"""Data: where the images are, how they become tensors, augmentation and the decoded cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hotdog_ray.config.base import Section

# Images with more pixels are refused as decompression bombs (data.max_image_pixels' default).
MAX_PIXELS = 50_000_000


class AugmentSettings(Section):
    """Training-split augmentation, in the terms of Keras' ImageDataGenerator used by the recipes."""

    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation: float = Field(0.0, ge=0, le=180, description="max rotation, degrees either way")
    shear: float = Field(0.0, ge=0, le=45, description="max shear, degrees either way")
    zoom: float = Field(0.0, ge=0, lt=1, description="zoom in [1-zoom, 1+zoom]")
    width_shift: float = Field(0.0, ge=0, le=1, description="max horizontal shift, fraction of width")
    height_shift: float = Field(0.0, ge=0, le=1, description="max vertical shift, fraction of height")
    brightness: tuple[float, float] | None = Field(
        None, description="brightness factor range, e.g. [0.1, 0.9] as in the Food-101 recipe"
    )

    @model_validator(mode="after")
    def _check_brightness(self) -> "AugmentSettings":
        if self.brightness is not None:
            lo, hi = self.brightness
            if not 0 <= lo <= hi:
                raise ValueError("brightness must be [low, high] with 0 <= low <= high")
        return self

    @property
    def enabled(self) -> bool:
        return any(
            (
                self.horizontal_flip,
                self.vertical_flip,
                self.rotation,
                self.shear,
                self.zoom,
                self.width_shift,
                self.height_shift,
                self.brightness is not None,
            )
        )


class CacheSettings(Section):
    """The decoded-image cache that training, validation and evaluation read (``hotdog cache``)."""

    root: str | None = Field(
        None, description="folder of the caches: local path or s3:// URI (None: <train.storage_path>/cache)"
    )
    device_share: float = Field(
        0.5, ge=0, le=0.95, description="a GPU worker holds its shard in GPU memory up to this share of it"
    )
    host_share: float = Field(
        0.25,
        ge=0,
        le=0.95,
        description="else in host memory up to this share of the node's RAM; a larger shard streams "
        "from the cache files every epoch",
    )
    shard_images: int = Field(2048, ge=1, le=1_000_000, description="images per cache file")


class DataSettings(Section):
    """Where the images are and how they become tensors."""

    root: str = Field("data/sample", description="dataset root: local path, file://, s3:// or gs:// URI")
    extra_roots: list[str] = Field(
        default_factory=list,
        description="more roots on the same store whose train/<class>/ images join the training split "
        "(labelled feedback exported by hotdog feedback export)",
    )
    image_size: int = Field(32, ge=8, le=1024, description="square side the images are resized to")
    rescale: Literal["unit", "symmetric"] = Field(
        "unit", description="unit: x/255 in [0, 1]; symmetric: x/127.5-1 in [-1, 1]"
    )
    classes: list[str] | None = Field(None, description="use only these classes (default: all)")
    max_classes: int | None = Field(
        None, ge=2, description="use the first N classes in sorted order (the Food-101 recipe uses 10)"
    )
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    files_per_task: int = Field(
        256, ge=1, le=100_000, description="images per Ray Data read task (small tasks cost more to schedule)"
    )
    max_image_pixels: int = Field(
        MAX_PIXELS, ge=1, description="larger images are rejected as decompression bombs"
    )
    min_image_side: int = Field(
        8,
        ge=1,
        description="serving and scoring refuse images smaller than this on a side (training keeps them)",
    )
    cache: CacheSettings = Field(default_factory=CacheSettings)

    @model_validator(mode="after")
    def _one_subset(self) -> "DataSettings":
        if self.classes is not None and self.max_classes is not None:
            raise ValueError("set data.classes or data.max_classes, not both")
        if self.classes is not None and len(set(self.classes)) < 2:
            raise ValueError("data.classes needs at least two distinct classes")
        return self
