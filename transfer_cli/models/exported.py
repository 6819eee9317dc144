"""Models outside PyTorch checkpoints: ONNX (run with onnxruntime) and TorchScript files written by
`transfer export`, each carrying its recipe (preprocessing, class names), and one ``Predictor`` interface
over them and over ordinary checkpoints.

An exported model takes what prediction feeds every model: uint8 RGB squares [N, 3, size, size] of the
recipe's input size (``data.inputs.model_input``), any batch size; it returns logits [N, classes].
onnx and onnxruntime are the optional extra ``transfer_cli[export]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_cli.engine.device import Precision
from transfer_cli.errors import UserError
from transfer_cli.models.checkpoint import load_model
from transfer_cli.models.recipe import ModelRecipe

RECIPE_KEY = "transfer_cli.recipe"
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export and ONNX models need onnx and onnxruntime, an optional extra: "
                        "pip install 'transfer_cli[export]' (make install installs it).") from None
    return onnx, onnxruntime


@dataclass
class Predictor:
    """Something that turns model-input batches into logits, with the recipe that says how to feed it."""

    path: str
    recipe: ModelRecipe
    kind: str  # pytorch | onnx | torchscript
    run: Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, 3, S, S] on the CPU -> float logits on the CPU
    model: nn.Module | None = None  # the PyTorch model, for checkpoints


def torch_predictor(path: str, model: nn.Module, recipe: ModelRecipe, device: torch.device,
                    precision: Precision, kind: str = "pytorch") -> Predictor:
    model = model.to(device).eval()

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        with precision.autocast():
            return model(x.to(device)).float().cpu()

    return Predictor(path, recipe, kind, run, model)


def onnx_predictor(path: str) -> Predictor:
    onnx, ort = _onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the process's budget (trainer.threads), not every core
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - an unreadable file is the user's input problem
        raise UserError(f"checkpoint={path!r} could not be loaded by onnxruntime: {err}") from None
    stored = session.get_modelmeta().custom_metadata_map.get(RECIPE_KEY)
    recipe = _recipe(stored, path)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()

    return Predictor(path, recipe, "onnx", run)


def torchscript_predictor(path: str, device: torch.device, precision: Precision) -> Predictor:
    files = {RECIPE_KEY: ""}
    try:
        module = torch.jit.load(path, map_location=device, _extra_files=files)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"checkpoint={path!r} could not be loaded as TorchScript: {err}") from None
    return torch_predictor(path, module, _recipe(files[RECIPE_KEY] or None, path), device, precision, "torchscript")


def _recipe(stored: str | bytes | None, path: str) -> ModelRecipe:
    if not stored:
        raise UserError(f"checkpoint={path!r} carries no transfer_cli recipe (preprocessing and class names): "
                        "only models written by `transfer export` can be used here.")
    return ModelRecipe.from_dict(json.loads(stored), f"checkpoint={path!r} metadata")


def load_predictor(path: str, device: torch.device, precision: Precision) -> Predictor:
    """The right predictor for ``path``: .onnx, .pt/.ts (TorchScript from `transfer export`) or a checkpoint."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return onnx_predictor(path)
    if suffix in (".pt", ".ts"):
        return torchscript_predictor(path, device, precision)
    model, _ = load_model(path)
    return torch_predictor(path, model, model.recipe, device, precision)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ONNX exporter and quantizer narrate every pass on stdout and the log; the user gets our table."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, recipe: ModelRecipe) -> None:
    """``model`` as ONNX at ``path`` with a dynamic batch axis and the recipe in the model's metadata."""
    onnx, _ = _onnx()
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},))
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = RECIPE_KEY, json.dumps(recipe.to_dict())
    onnx.save(proto, str(path))


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8: weights stored as int8, activations quantized on the fly (onnxruntime.quantization)."""
    _onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():  # it logs every tensor it leaves in float
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def quantize_onnx_static(source: Path, target: Path, calibration: torch.Tensor) -> None:
    """Static int8 (QDQ nodes, per-channel int8 weights, uint8 activations): every activation's range is
    calibrated once on ``calibration`` (model inputs), so no range is computed at run time. Weights use 7 of
    their 8 bits (``reduce_range``): x86 CPUs without VNNI multiply uint8 by int8 in 16-bit sums that saturate
    (fine-tuned MobileNetV2 on USPS: 75.6 % with 8-bit weights, 87.7 % with 7-bit, fp32 88.1 %)."""
    _, ort = _onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(32))

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch.numpy()}

    prepared = target.with_name(target.stem + ".prepared.onnx")
    try:
        with _quiet():
            quant_pre_process(str(source), str(prepared))  # shape inference and graph folding, as ORT advises
            quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        prepared.unlink(missing_ok=True)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, recipe: ModelRecipe) -> None:
    """``model`` traced to TorchScript at ``path`` (the recipe in the archive's extra files)."""
    with torch.no_grad(), warnings.catch_warnings():
        # the input adapter's shape checks are meant to be fixed at the traced input form (3 x size x size)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={RECIPE_KEY: json.dumps(recipe.to_dict())})


def quantize_torch(model: nn.Module) -> nn.Module:
    """Dynamic int8 of every Linear layer (torch.ao.quantization.quantize_dynamic, CPU)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8)
