"""The model zoo: the recipe tutorials' CNNs in PyTorch, and transfer-learning backbones.

Each recipe model, built at its tutorial's input size and class count, has exactly the parameter
count of the tutorial's printed Keras summary (see tests/test_models.py). Every builder takes the
class count, input size, a width and dropout rates, which Tune searches: the recipe CNNs' width is
their base convolution width (``filters``), the transfer models' the units of their new dense head
(``head_units``); ``conv_dropout`` follows convolution blocks and exists only for the CNNs.

Binary models whose recipe ends in a single sigmoid unit output one logit; :func:`loss_fn` and
:func:`probabilities` hide that difference from the rest of the code.
"""

from __future__ import annotations

import io
import logging
from types import ModuleType
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hotdog_ray import storage, zoo
from hotdog_ray.errors import ModelError

log = logging.getLogger(__name__)


def _conv(cin: int, cout: int, k: int, same: bool) -> list[nn.Module]:
    # Keras padding="same" for odd kernels; "valid" is no padding.
    return [nn.Conv2d(cin, cout, k, padding=k // 2 if same else 0), nn.ReLU(inplace=True)]


def _out_units(num_classes: int, single_logit: bool) -> int:
    return 1 if single_logit and num_classes == 2 else num_classes


def _spatial(size: int, steps: list[tuple[str, int]]) -> int:
    """Side length after a list of ("conv_valid", k) / ("pool", k) steps (floor, as Keras)."""
    for kind, k in steps:
        size = size - (k - 1) if kind == "conv_valid" else size // k
        if size < 1:
            raise ValueError("input size too small for this model")
    return size


class FirstCNN(nn.Sequential):
    """ "My First Hotdog Detector": two conv/pool blocks, dense 64, one sigmoid unit (1,615,905 params at 120 px)."""

    def __init__(
        self,
        num_classes: int = 2,
        image_size: int = 120,
        filters: int = 32,
        dropout: float | None = None,
        conv_dropout: float | None = None,
    ) -> None:
        side = _spatial(image_size, [("conv_valid", 3), ("pool", 2), ("conv_valid", 3), ("pool", 2)])
        super().__init__(
            *_conv(3, filters, 3, same=False),
            nn.MaxPool2d(2),
            *_conv(filters, filters, 3, same=False),
            nn.MaxPool2d(2),
            nn.Dropout(conv_dropout or 0.0),
            nn.Flatten(),
            nn.Linear(filters * side * side, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout or 0.0),
            nn.Linear(64, _out_units(num_classes, True)),
        )


class CatDogCNN(nn.Sequential):
    """Cats vs dogs (KDnuggets): three same-padded conv/pool blocks, dropout 0.25 and 0.5, softmax."""

    def __init__(
        self,
        num_classes: int = 2,
        image_size: int = 150,
        filters: int = 32,
        dropout: float | None = None,
        conv_dropout: float | None = None,
    ) -> None:
        side = _spatial(image_size, [("pool", 2)] * 3)
        f = filters
        super().__init__(
            *_conv(3, f, 3, same=True),
            nn.MaxPool2d(2),
            *_conv(f, f, 3, same=True),
            nn.MaxPool2d(2),
            *_conv(f, 2 * f, 3, same=True),
            nn.MaxPool2d(2),
            nn.Dropout(0.25 if conv_dropout is None else conv_dropout),
            nn.Flatten(),
            nn.Linear(2 * f * side * side, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5 if dropout is None else dropout),
            nn.Linear(64, num_classes),
        )


class FoodCNN(nn.Sequential):
    """Food-101 (Keras tutorial): four conv blocks (32, 64, 128, 512 filters) with dropout 0.2, dense 1024."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 128,
        filters: int = 32,
        dropout: float | None = None,
        conv_dropout: float | None = None,
    ) -> None:
        f = filters
        cd = 0.2 if conv_dropout is None else conv_dropout
        side = _spatial(image_size, [("conv_valid", 3), ("pool", 2)] * 3 + [("conv_valid", 5), ("pool", 4)])
        super().__init__(
            *_conv(3, f, 3, True),
            *_conv(f, f, 3, False),
            nn.MaxPool2d(2),
            nn.Dropout(cd),
            *_conv(f, 2 * f, 3, True),
            *_conv(2 * f, 2 * f, 3, False),
            nn.MaxPool2d(2),
            nn.Dropout(cd),
            *_conv(2 * f, 4 * f, 3, True),
            *_conv(4 * f, 4 * f, 3, False),
            nn.MaxPool2d(2),
            nn.Dropout(cd),
            *_conv(4 * f, 16 * f, 5, True),
            *_conv(16 * f, 16 * f, 5, False),
            nn.MaxPool2d(4),
            nn.Dropout(cd),
            nn.Flatten(),
            nn.Linear(16 * f * side * side, 1024),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2 if dropout is None else dropout),
            nn.Linear(1024, num_classes),
        )


class SnacksCNN(nn.Sequential):
    """Snacks (ML by Tutorials ch. 7): four same-padded double-conv blocks, global average pooling."""

    def __init__(
        self,
        num_classes: int = 20,
        image_size: int = 224,
        filters: int = 32,
        dropout: float | None = None,
        conv_dropout: float | None = None,
    ) -> None:
        _spatial(image_size, [("pool", 2)] * 3)
        f = filters
        layers: list[nn.Module] = []
        cin = 3
        for i, width in enumerate((f, 2 * f, 4 * f, 8 * f)):
            layers += [*_conv(cin, width, 3, True), *_conv(width, width, 3, True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
                if conv_dropout:
                    layers.append(nn.Dropout(conv_dropout))
            cin = width
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout or 0.0),
            nn.Linear(8 * f, num_classes),
        ]
        super().__init__(*layers)


# ---------------------------------------------------------------------------------------------
# Transfer learning


class Transfer(nn.Module):
    """A frozen torchvision backbone with a new head; ``unfreeze_top`` trains its last block too."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, top_block: nn.Module, unfreeze_top: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        for p in self.backbone.parameters():
            p.requires_grad = False
        if unfreeze_top:
            for p in top_block.parameters():
                p.requires_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _torchvision_models() -> ModuleType:
    """torchvision's model zoo, imported by the transfer models alone: torchvision's import loads
    torch._dynamo, which every training worker, Serve replica and scorer of a recipe CNN would pay
    for at start-up without using it."""
    from torchvision import models  # noqa: PLC0415 - only transfer models need torchvision (see docstring)

    return models


def _load_backbone_weights(module: nn.Module, weights: str | None, name: str) -> None:
    """Pretrained weights: ``torchvision`` (download) or a state-dict file at a path or URI."""
    if not weights:
        log.warning("%s backbone has random weights (model.pretrained_weights not set)", name)
        return
    if weights == "torchvision":
        tvm = _torchvision_models()
        enum = {"vgg16": tvm.VGG16_Weights.IMAGENET1K_V1, "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1}[
            name
        ]
        try:
            state = enum.get_state_dict(progress=False)
        except (OSError, RuntimeError) as exc:  # no network (URLError is an OSError), or a bad download
            raise ModelError(
                f"could not download {name} weights from torchvision ({exc}); copy the file to local "
                "or S3 storage and set model.pretrained_weights to its path"
            ) from exc
    else:
        loc = storage.resolve(weights)
        # weights_only: a weights file from elsewhere must never run code when loaded.
        state = torch.load(
            io.BytesIO(storage.read_bytes(loc.fs, loc.path)), map_location="cpu", weights_only=True
        )
    missing, _ = module.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith(("fc.", "classifier."))]:
        raise ValueError(f"{weights}: not a {name} state dict (missing {missing[:3]} ...)")


def vgg16(
    num_classes: int = 2,
    image_size: int = 150,
    head_units: int = 512,
    dropout: float | None = None,
    pretrained_weights: str | None = None,
    unfreeze_top: bool = False,
) -> nn.Module:
    """VGG16 convolutional base (frozen) + the recipe's head: dense 512, dropout 0.5, dense 256, dropout 0.2.

    ``dropout`` replaces the first dropout; the second stays the recipe's 0.2.
    """

    base = _torchvision_models().vgg16(weights=None)
    _load_backbone_weights(base, pretrained_weights, "vgg16")
    side = _spatial(image_size, [("pool", 2)] * 5)
    head = nn.Sequential(
        nn.Flatten(),
        nn.Linear(512 * side * side, head_units),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5 if dropout is None else dropout),
        nn.Linear(head_units, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Linear(256, _out_units(num_classes, True)),
    )
    return Transfer(base.features, head, base.features[24:], unfreeze_top)


def resnet18(
    num_classes: int = 2,
    image_size: int = 224,
    head_units: int = 256,
    dropout: float | None = None,
    pretrained_weights: str | None = None,
    unfreeze_top: bool = False,
) -> nn.Module:
    """ResNet-18 (frozen) without its classifier + a head: dense ``head_units``, dropout, dense classes."""

    base = _torchvision_models().resnet18(weights=None)
    _load_backbone_weights(base, pretrained_weights, "resnet18")
    base.fc = nn.Identity()
    head = nn.Sequential(
        nn.Linear(512, head_units),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5 if dropout is None else dropout),
        nn.Linear(head_units, num_classes),
    )
    return Transfer(base, head, base.layer4, unfreeze_top)


# The zoo's networks; its facts (families, recipe sizes, sources) are hotdog_ray.zoo's.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "first_cnn": FirstCNN,
    "catdog_cnn": CatDogCNN,
    "food_cnn": FoodCNN,
    "snacks_cnn": SnacksCNN,
    "vgg16": vgg16,
    "resnet18": resnet18,
}


def build_model(
    name: str,
    num_classes: int,
    image_size: int,
    *,
    filters: int | None = None,
    head_units: int | None = None,
    dropout: float | None = None,
    conv_dropout: float | None = None,
    pretrained_weights: str | None = None,
    unfreeze_top: bool = False,
) -> nn.Module:
    """Build a zoo model by name; a width or dropout left None keeps the recipe's."""
    kwargs: dict = {"num_classes": num_classes, "image_size": image_size, "dropout": dropout}
    if zoo.entry(name).family == "transfer":
        kwargs.update(pretrained_weights=pretrained_weights, unfreeze_top=unfreeze_top)
        if head_units is not None:
            kwargs["head_units"] = head_units
    else:
        kwargs["conv_dropout"] = conv_dropout
        if filters is not None:
            kwargs["filters"] = filters
    return BUILDERS[name](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def zoo_table() -> list[dict]:
    """Each zoo model at its recipe's size and class count, with parameter counts and its width key."""
    rows = []
    for name, spec in zoo.ZOO.items():
        model = build_model(name, spec.num_classes, spec.image_size)
        rows.append(
            {
                "name": name,
                "source": spec.source,
                "image_size": spec.image_size,
                "num_classes": spec.num_classes,
                "parameters": count_parameters(model),
                "trainable": count_parameters(model, trainable_only=True),
                "width_key": f"model.{spec.width_key}",
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# One-logit (sigmoid) and many-logit (softmax) heads behind one interface


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy for a single logit, cross-entropy otherwise (mean over the batch)."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities of ``logits / temperature``, shape (N, num_classes) in both cases."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.float() / temperature)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits.float() / temperature, dim=1)


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the last convolution's activations averaged over the image (N, channels): the
    features the out-of-distribution score compares (:mod:`hotdog_ray.confidence`)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["a"] = output

    handle = last_conv_layer(model).register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    # The recipe CNNs' in-place ReLU has turned the captured output into its activation already.
    return logits, captured["a"].float().mean(dim=(2, 3))


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`hotdog_ray.confidence.knn_score` in torch: ``1 - cos`` to the ``k``-th nearest bank row."""
    similarity = F.normalize(features.float(), dim=1) @ bank.T
    return 1.0 - similarity.topk(min(k, bank.shape[0]), dim=1).values[:, -1]


def last_conv_layer(model: nn.Module) -> nn.Conv2d:
    """The last convolution (Grad-CAM's target layer)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no convolution layer")
    return convs[-1]
