"""How to rebuild a trained model: one typed recipe, written with every checkpoint and checked on load."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from transfer_cli.config import HeadConfig
from transfer_cli.data.tokens import TOKENIZERS, TextSpec
from transfer_cli.data.transforms import INTERPOLATIONS, InputSpec
from transfer_cli.errors import UserError

FORMAT_VERSION = 2  # of the checkpoint sidecar; bump when the recipe's schema changes


@dataclass(frozen=True)
class ModelRecipe:
    backbone: str  # registered backbone name
    weights: str  # what the body started from (for the record; a rebuild starts from "none")
    data_channels: int  # channels of the data the backbone builder was given
    classes: list[str]  # class names, in the order of the head's outputs
    input: InputSpec | None  # what the model's InputAdapter does to images (None: a text model)
    head: HeadConfig
    text: TextSpec | None = None  # how a text model tokenizes
    cut: int | None = None  # backbone.cut: the body's stages kept (None: all)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ModelRecipe:
        """The recipe in ``raw``, or a UserError naming the first key that does not fit the schema."""
        if isinstance(raw, dict):  # written before text models / backbone.cut existed
            raw = {"text": None, "cut": None, **raw}
        _keys(raw, [f.name for f in fields(cls)], where)
        _keys(raw["head"], [f.name for f in fields(HeadConfig)], f"{where} head")
        head = raw["head"]
        _check(where, "backbone", raw["backbone"], isinstance(raw["backbone"], str) and raw["backbone"], "a backbone name")
        _check(where, "weights", raw["weights"], isinstance(raw["weights"], str), "a string")
        _check(where, "data_channels", raw["data_channels"], _positive_int(raw["data_channels"])
               or (raw["text"] is not None and raw["data_channels"] == 0), "an integer >= 1 (0 for text models)")
        classes = raw["classes"]
        _check(where, "classes", classes, isinstance(classes, list) and len(classes) >= 2
               and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes),
               "a list of at least two distinct class names")
        _check(where, "head.hidden", head["hidden"], isinstance(head["hidden"], list)
               and all(_positive_int(w) for w in head["hidden"]), "a list of widths >= 1")
        _check(where, "head.dropout", head["dropout"], _finite(head["dropout"]) and 0 <= head["dropout"] < 1,
               "a number in [0, 1)")
        _check(where, "input", raw["input"], (raw["input"] is None) == (raw["text"] is not None),
               "a mapping for image models, null for text models (which have a text mapping)")
        _check(where, "cut", raw["cut"], raw["cut"] is None or (_positive_int(raw["cut"]) and raw["text"] is None),
               "null, or an integer >= 1 for an image model")
        text = _text_spec(raw["text"], where) if raw["text"] is not None else None
        return cls(backbone=raw["backbone"], weights=raw["weights"], data_channels=raw["data_channels"],
                   classes=list(classes), input=_input_spec(raw["input"], where) if text is None else None,
                   head=HeadConfig(**head), text=text, cut=raw["cut"])


def _input_spec(spec: Any, where: str) -> InputSpec:
    # checkpoints written before the interpolation key existed were resized bilinearly
    if isinstance(spec, dict) and "interpolation" not in spec:
        spec = {**spec, "interpolation": "bilinear"}
    _keys(spec, [f.name for f in fields(InputSpec)], f"{where} input")
    channels = spec["channels"]
    _check(where, "input.channels", channels, _positive_int(channels), "an integer >= 1")
    _check(where, "input.size", spec["size"], _positive_int(spec["size"]), "an integer >= 1")
    _check(where, "input.resize", spec["resize"], spec["resize"] is None or _positive_int(spec["resize"]),
           "null or an integer >= 1")
    for key, positive in (("mean", False), ("std", True)):
        values = spec[key]
        _check(where, f"input.{key}", values, isinstance(values, list) and len(values) == channels
               and all(_finite(v) and (v > 0 or not positive) for v in values),
               f"{channels} finite numbers{' > 0' if positive else ''} (one per input channel)")
    _check(where, "input.interpolation", spec["interpolation"], spec["interpolation"] in INTERPOLATIONS,
           f"one of {', '.join(INTERPOLATIONS)}")
    return InputSpec(**spec)


def _text_spec(spec: Any, where: str) -> TextSpec:
    _keys(spec, [f.name for f in fields(TextSpec)], f"{where} text")
    _check(where, "text.tokenizer", spec["tokenizer"], spec["tokenizer"] in TOKENIZERS, f"one of {', '.join(TOKENIZERS)}")
    _check(where, "text.source", spec["source"], isinstance(spec["source"], str), "a string")
    _check(where, "text.max_length", spec["max_length"], _positive_int(spec["max_length"]), "an integer >= 1")
    _check(where, "text.ngram_max", spec["ngram_max"], _positive_int(spec["ngram_max"]), "an integer >= 1")
    for key in ("lowercase", "sublinear_tf"):
        _check(where, f"text.{key}", spec[key], isinstance(spec[key], bool), "true or false")
    vocabulary, idf = spec["vocabulary"], spec["idf"]
    _check(where, "text.vocabulary", f"<{type(vocabulary).__name__}>", isinstance(vocabulary, list)
           and all(isinstance(t, str) for t in vocabulary), "a list of strings")
    _check(where, "text.idf", f"<{len(idf) if isinstance(idf, list) else idf}>", isinstance(idf, list)
           and len(idf) == len(vocabulary) and all(_finite(v) and v > 0 for v in idf),
           "one positive number per vocabulary entry")
    return TextSpec(**spec)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _keys(raw: Any, expected: list[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(expected)}, found {type(raw).__name__}.")
    missing = [k for k in expected if k not in raw]
    unknown = [k for k in raw if k not in expected]
    if missing or unknown:
        raise UserError(f"{where} does not match the checkpoint schema (format {FORMAT_VERSION}): "
                        f"missing keys {missing}, unknown keys {unknown}. Expected exactly: {', '.join(expected)}.")


def _check(where: str, key: str, value: Any, ok: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"{where}: recipe.{key}={value!r} is not valid. Allowed: {allowed}.")
