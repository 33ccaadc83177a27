"""The model zoo against the recipes' printed Keras summaries, and the transfer-learning backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hotdog_ray.config import load_config
from hotdog_ray.errors import ConfigError
from hotdog_ray.models import build_model, count_parameters, loss_fn, probabilities, zoo_table

# (model, input size, classes, "Total params" printed in the recipe)
RECIPE_SUMMARIES = [
    ("first_cnn", 120, 2, 1_615_905),  # My First Hotdog Detector (single sigmoid unit)
    ("food_cnn", 128, 10, 10_588_458),  # Food-101 tutorial, first 10 classes
    ("snacks_cnn", 224, 20, 1_177_396),  # snacks chapter
    # Cats vs dogs prints no summary; its layers give 896 + 9,248 + 18,496 + 1,327,168 + 130.
    ("catdog_cnn", 150, 2, 1_355_938),
]


@pytest.mark.parametrize("name,size,classes,params", RECIPE_SUMMARIES, ids=[s[0] for s in RECIPE_SUMMARIES])
def test_recipe_models_match_their_printed_parameter_counts(name, size, classes, params):
    assert count_parameters(build_model(name, classes, size)) == params


def test_vgg16_head_matches_the_recipe_and_backbone_is_frozen():
    model = build_model("vgg16", 2, 150)
    # The recipe's head on 4x4x512 bottleneck features: 8192*512+512 + 512*256+256 + 256+1.
    assert count_parameters(model, trainable_only=True) == 4_326_401
    assert all(not p.requires_grad for p in model.backbone.parameters())
    unfrozen = build_model("vgg16", 2, 150, unfreeze_top=True)
    assert count_parameters(unfrozen, trainable_only=True) > 4_326_401


@pytest.mark.parametrize(
    "name,size,key",
    [
        ("first_cnn", 16, "filters"),
        ("catdog_cnn", 16, "filters"),
        ("food_cnn", 96, "filters"),
        ("snacks_cnn", 16, "filters"),
        ("resnet18", 32, "head_units"),
        ("vgg16", 32, "head_units"),
    ],
)
def test_forward_shapes_and_searchable_width(name, size, key):
    narrow = build_model(name, 3, size, **{key: 8})
    wide = build_model(name, 3, size, **{key: 16})
    out = narrow(torch.rand(2, 3, size, size))
    assert out.shape == (2, 3)
    assert count_parameters(wide, trainable_only=True) > count_parameters(narrow, trainable_only=True)


def test_dropout_rates_are_parameters():
    model = build_model("catdog_cnn", 2, 32, dropout=0.3, conv_dropout=0.1)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.1, 0.3]
    recipe_defaults = [m.p for m in build_model("catdog_cnn", 2, 32).modules() if isinstance(m, nn.Dropout)]
    assert recipe_defaults == [0.25, 0.5]


def test_single_logit_and_softmax_heads_share_one_interface():
    binary = build_model("first_cnn", 2, 16, filters=4)
    multi = build_model("first_cnn", 3, 16, filters=4)
    x = torch.rand(4, 3, 16, 16)
    assert binary(x).shape == (4, 1) and multi(x).shape == (4, 3)
    for model in (binary, multi):
        logits = model(x)
        p = probabilities(logits)
        assert torch.allclose(p.sum(dim=1), torch.ones(4))
        assert loss_fn(logits, torch.tensor([0, 1, 1, 0])).ndim == 0


def test_backbone_weights_load_from_a_file_without_unpickling(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 2, 32, pretrained_weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)

    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        build_model("resnet18", 2, 32, pretrained_weights=str(tmp_path / "wrong.pt"))


def test_too_small_input_and_unknown_model_are_clear():
    with pytest.raises(ValueError, match="too small"):
        build_model("food_cnn", 2, 32)
    with pytest.raises(ConfigError, match="unknown model 'lenet'"):
        load_config(None, ["model.name=lenet"])


def test_zoo_table_lists_every_model_with_its_width_key():
    keys = {r["name"]: r["width_key"] for r in zoo_table()}
    assert keys == {
        "first_cnn": "model.filters",
        "catdog_cnn": "model.filters",
        "food_cnn": "model.filters",
        "snacks_cnn": "model.filters",
        "vgg16": "model.head_units",
        "resnet18": "model.head_units",
    }


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.name=vgg16", "model.filters=64"], "model.head_units"),
        (["model.name=resnet18", "model.conv_dropout=0.2"], "no convolution blocks"),
        (["model.name=first_cnn", "model.head_units=64"], "model.filters"),
    ],
)
def test_each_width_and_dropout_key_belongs_to_one_model_family(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_transfer_heads_dropout_is_model_dropout_only():
    rates = [m.p for m in build_model("vgg16", 2, 32, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert rates[-2:] == [0.3, 0.2]  # the second stays the recipe's: no conv_dropout in a dense head


def test_bundles_from_before_head_units_still_load(tmp_path):
    import json

    from hotdog_ray.bundle import load_bundle, save_bundle

    model = build_model("resnet18", 2, 32, head_units=8)
    save_bundle(
        tmp_path,
        model,
        {
            "name": "resnet18",
            "classes": ["a", "b"],
            "image_size": 32,
            "rescale": "unit",
            "filters": 8,
            "dropout": None,
            "conv_dropout": None,
        },
    )
    assert "head_units" not in json.loads((tmp_path / "model.json").read_text())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_bundle(tmp_path).model(x), model.eval()(x))
