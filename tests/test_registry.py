import pytest

from transfer_cli.data.splits import DATASETS
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS
from transfer_cli.models.backbone import BACKBONES
from transfer_cli.optim import OPTIMIZERS, SCHEDULERS
from transfer_cli.registry import Fraction, Positive, Registry


def make_registry() -> Registry:
    reg = Registry("widget")

    @reg.register("box")
    def box(size: int, colour: str = "red", scale: float = 1.0, tags: list[str] = ()) -> dict:
        return {"size": size, "colour": colour, "scale": scale, "tags": tags}

    return reg


def test_build_passes_config_and_provided_arguments():
    reg = make_registry()
    assert reg.build({"name": "box", "colour": "blue", "scale": 2}, size=3) == {
        "size": 3, "colour": "blue", "scale": 2, "tags": ()}


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError, match=r"widget='bag' is not a known widget. Known: box"):
        make_registry().get("bag")


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(UserError, match=r"widget.color is not an option of widget 'box'. Allowed keys: name, colour, scale, tags"):
        make_registry().check({"name": "box", "color": "blue"}, provided=("size",))


def test_provided_arguments_cannot_come_from_config():
    with pytest.raises(UserError, match="widget.size is not an option"):
        make_registry().check({"name": "box", "size": 3}, provided=("size",))


@pytest.mark.parametrize("key, value, expected", [("scale", "big", "float"), ("colour", 3, "str"),
                                                  ("tags", [1], "list")])
def test_wrong_types_are_rejected(key, value, expected):
    with pytest.raises(UserError, match=rf"widget.{key}=.* is not allowed for widget 'box'. Allowed: .*{expected}"):
        make_registry().check({"name": "box", key: value}, provided=("size",))


def test_int_is_accepted_where_float_is_expected():
    make_registry().check({"name": "box", "scale": 2}, provided=("size",))


def test_bool_is_not_accepted_as_a_number():
    with pytest.raises(UserError, match="is not allowed"):
        make_registry().check({"name": "box", "scale": True}, provided=("size",))


def test_annotated_ranges_are_checked_and_described():
    reg = Registry("widget")

    @reg.register("knob")
    def knob(*, lr: Positive, momentum: Fraction) -> None: ...

    reg.check({"name": "knob", "lr": 0.1, "momentum": 0.0})
    with pytest.raises(UserError, match=r"widget.lr=-1 is not allowed for widget 'knob'. Allowed: float > 0"):
        reg.check({"name": "knob", "lr": -1, "momentum": 0.0})
    with pytest.raises(UserError, match=r"widget.momentum=1.0 .* Allowed: float >= 0 and < 1"):
        reg.check({"name": "knob", "lr": 1, "momentum": 1.0})
    with pytest.raises(UserError, match=r"widget.lr=nan is not allowed"):
        reg.check({"name": "knob", "lr": float("nan"), "momentum": 0.0})


def test_a_required_key_removed_from_the_config_is_named():
    reg = Registry("widget")

    @reg.register("knob")
    def knob(*, lr: Positive, momentum: Fraction) -> None: ...

    with pytest.raises(UserError, match=r"widget 'knob' needs widget.momentum"):
        reg.check({"name": "knob", "lr": 0.1})


def test_registering_a_name_twice_fails():
    reg = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("box")(lambda: None)


def test_registries_are_filled():
    assert {"digits", "mnist", "usps", "cifar10", "imagefolder", "food101"} <= set(DATASETS.names())
    assert {"small_cnn", "lenet", "resnet18", "mobilenet_v2", "vit_b_16", "convnext_tiny"} <= set(BACKBONES.names())
    assert {"sgd", "adam", "adamw", "adagrad"} <= set(OPTIMIZERS.names())
    assert {"none", "cosine", "step", "onecycle"} <= set(SCHEDULERS.names())
    assert "finetune" in METHODS.names()
