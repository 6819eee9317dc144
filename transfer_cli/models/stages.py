"""Stage split of torchvision architectures: stem first, then blocks, head excluded.

``method.freeze=k`` freezes the first k stages. Families with a known layout get their natural
stages; everything else falls back to the top-level children, expanding the main feature container.
"""

from __future__ import annotations

from torch import nn

Stage = list[str]  # parameter-name prefixes inside the body

_EXPAND = ("features", "trunk_output", "layers")  # containers whose children are the blocks


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _resnet(model: nn.Module) -> list[Stage]:
    return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


def _vgg(model: nn.Module) -> list[Stage]:
    stages: list[Stage] = [[]]
    for name, layer in model.features.named_children():
        stages[-1].append(f"features.{name}")
        if isinstance(layer, nn.MaxPool2d):
            stages.append([])
    return [*stages, ["classifier"]]


def _densenet(model: nn.Module) -> list[Stage]:
    stages: list[Stage] = [["features.conv0", "features.norm0"]]
    for name, _ in model.features.named_children():
        if name.startswith("denseblock"):
            stages.append([f"features.{name}"])
        elif name.startswith("transition") or name == "norm5":
            stages[-1].append(f"features.{name}")
    return stages


def _vit(model: nn.Module) -> list[Stage]:
    blocks = [[f"encoder.layers.{n}"] for n, _ in model.encoder.layers.named_children()]
    blocks[-1].append("encoder.ln")
    return [["conv_proj", "class_token", "encoder.pos_embedding"], *blocks]


def generic_stages(model: nn.Module) -> list[Stage]:
    """Top-level children with parameters, the main feature container expanded into its blocks."""
    stages: list[Stage] = []
    for name, child in model.named_children():
        if name in _EXPAND and isinstance(child, nn.Sequential):
            stages += [[f"{name}.{n}"] for n, c in child.named_children() if _has_params(c)]
        elif _has_params(child):
            stages.append([name])
    return stages


_FAMILIES = {
    "resnet": _resnet,
    "resnext": _resnet,
    "wide_resnet": _resnet,
    "vgg": _vgg,
    "densenet": _densenet,
    "vit": _vit,
}


def torchvision_stages(name: str, body: nn.Module) -> list[Stage]:
    family = next((f for f in _FAMILIES if name.startswith(f)), None)
    split = _FAMILIES[family] if family else generic_stages
    return split(body)


def in_stage(param_name: str, stage: Stage) -> bool:
    return any(param_name == p or param_name.startswith(p + ".") for p in stage)


def complete_stages(body: nn.Module, stages: list[Stage]) -> list[Stage]:
    """Drop stages without parameters; give parameters no stage claims (e.g. ViT's class token) to the stem."""
    names = [n for n, _ in body.named_parameters()]
    stages = [s for s in stages if any(in_stage(n, s) for n in names)]
    orphans = [n for n in names if not any(in_stage(n, s) for s in stages)]
    if orphans:
        stages[0] = stages[0] + orphans
    return stages


def describe_stage(stage: Stage) -> str:
    return "+".join(stage) if len(stage) <= 3 else f"{stage[0]}+...({len(stage)})"
