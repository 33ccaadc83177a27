"""The model zoo's facts, without torch: names, families, recipe defaults and width keys.

``config`` checks a model section against them, ``models`` builds the networks they name,
``bundle`` reads saved specs with them and the CLI lists them; none of those needs torch to know
what the zoo holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """A zoo model: its family and its recipe's input size, class count and source."""

    family: Literal["recipe", "transfer"]
    image_size: int
    num_classes: int
    source: str

    @property
    def width_key(self) -> str:
        """The ``model.`` key of its searchable width: a transfer model's head, a recipe CNN's filters."""
        return "head_units" if self.family == "transfer" else "filters"


ZOO: dict[str, ZooEntry] = {
    "first_cnn": ZooEntry(family="recipe", image_size=120, num_classes=2, source="My First Hotdog Detector"),
    "catdog_cnn": ZooEntry(family="recipe", image_size=150, num_classes=2, source="cats vs dogs (KDnuggets)"),
    "food_cnn": ZooEntry(family="recipe", image_size=128, num_classes=10, source="Food-101 (Keras tutorial)"),
    "snacks_cnn": ZooEntry(
        family="recipe", image_size=224, num_classes=20, source="snacks (ML by Tutorials ch. 7)"
    ),
    "vgg16": ZooEntry(
        family="transfer",
        image_size=150,
        num_classes=2,
        source="VGG16 transfer learning (cats vs dogs, part 2)",
    ),
    "resnet18": ZooEntry(
        family="transfer", image_size=224, num_classes=2, source="ResNet-18 transfer learning"
    ),
}
TRANSFER = frozenset(name for name, e in ZOO.items() if e.family == "transfer")


def entry(name: str) -> ZooEntry:
    """The zoo's entry for ``name``; ValueError naming the choices when there is none."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ZOO)}")
    return ZOO[name]


def check_settings(
    name: str, *, filters: int | None, head_units: int | None, conv_dropout: float | None
) -> None:
    """ValueError when a width or dropout is set that ``name``'s family has no use for (pure)."""
    family = entry(name).family
    if family == "transfer" and filters is not None:
        raise ValueError(f"{name} keeps its backbone's filters; set model.head_units for its head's width")
    if family == "transfer" and conv_dropout is not None:
        raise ValueError(f"{name} has no convolution blocks of its own; use model.dropout")
    if family == "recipe" and head_units is not None:
        raise ValueError(f"{name} is a recipe CNN; set its width with model.filters")
